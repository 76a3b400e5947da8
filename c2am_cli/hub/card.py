"""The Hub model card (README.md) of C2AM weights, from their config."""
from __future__ import annotations

from typing import Any

CITATION = """@inproceedings{xie2022c2am,
  title     = {C2AM: Contrastive learning of Class-agnostic Activation Map for Weakly Supervised Object
               Localization and Semantic Segmentation},
  author    = {Xie, Jinheng and Xiang, Jianfeng and Chen, Junliang and Hou, Xianxu and Zhao, Xiaodong and Shen, Linlin},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _metrics_table(metrics: dict) -> str:
    """{metric: value} or {dataset: {metric: value}} as a markdown table."""
    if all(isinstance(v, dict) for v in metrics.values()):
        columns = list(dict.fromkeys(k for v in metrics.values() for k in v))
        lines = ["| data | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {ds} | " + " | ".join(_fmt(vals.get(c, "")) for c in columns) + " |" for ds, vals in metrics.items()]
    else:
        lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    return "\n".join(lines)


def _backbone_training(t) -> str:
    """'frozen', 'fine-tuned' or 'fine-tuned (last K feature levels)'."""
    if t.freeze_backbone:
        return "frozen"
    if not t.finetune_levels:
        return "fine-tuned"
    return f"fine-tuned (last {t.finetune_levels} feature level{'s' if t.finetune_levels > 1 else ''})"


def model_card(config, repo_id: str | None = None, license: str | None = None, notes: str = "") -> str:
    """A Hub model card (README.md) for C2AM weights: backbone, training data and settings, metrics, usage, licence.

    `config` is a C2AMConfig; `repo_id` None writes the usage of the embedded default; `notes` (markdown) is
    added as a section of its own (data terms, how the numbers were measured).
    """
    from huggingface_hub import ModelCardData

    m, t, data = config.model, config.train, dict(config.data)
    metrics, data_license = data.pop("metrics", None), data.pop("license", None)
    license = license or data_license or "other"
    front = ModelCardData(library_name="c2am", license=license,
                          tags=["c2am", "class-agnostic-activation-map", "weakly-supervised-object-localization",
                                "weakly-supervised-semantic-segmentation", "timm", "safetensors", m.backbone])
    title = repo_id.split("/")[-1] if repo_id else "c2am embedded default"
    weights_arg = f" --weights hf://{repo_id}" if repo_id else ""
    load_arg = f'"hf://{repo_id}"' if repo_id else ""
    init = t.backbone_weights or "random initialisation"
    lines = [
        "---", front.to_yaml().strip(), "---", "",
        f"# {title}", "",
        "Class-agnostic activation maps (C2AM, Xie et al., CVPR 2022) learned contrastively from unlabeled images: "
        "one foreground map per image, with no class labels, for object boxes (weakly supervised localisation) and "
        "background cues (weakly supervised segmentation). Trained and used with the "
        "[c2am](https://pypi.org/project/c2am/) command.", "",
        "## Model", "",
        "| | |", "|---|---|",
        f"| backbone | `{m.backbone}` (timm), initialised from {init} |",
        f"| feature levels / output stride | {_fmt(m.feature_levels)} / {m.output_stride or 'native'} |",
        f"| input size | {m.image_size} x {m.image_size} |",
        f"| normalisation | mean ({_fmt(m.mean)}), std ({_fmt(m.std)}) |",
        f"| polarity | {m.polarity:+d} (border-prior score {_fmt(m.polarity_score) if m.polarity_score is not None else 'n/a'}) |",
        f"| box threshold | {_fmt(m.box_threshold)} ({m.box_threshold_source}), boxes from the {m.boxes_from} |",
        f"| test-time scales / flip | {_fmt(m.scales)} / {'yes' if m.flip else 'no'} |",
        f"| maps at image size | {_refinement(m)} |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in sorted(config.versions.items())) or 'n/a'} |",
        "", "## Training" + (" (the contrastive stage)" if config.self_train else ""), "",
        "| | |", "|---|---|",
        *[f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in data.items()],
        f"| epochs | {t.epochs} |",
        f"| batch size | {t.batch_size} |",
        f"| augmentation | {t.augment} |",
        f"| alpha (rank-weight decay) | {_fmt(t.alpha)} |",
        f"| optimiser | SGD, lr {_fmt(t.lr)}, momentum {_fmt(t.momentum)}, weight decay {_fmt(t.weight_decay)}, "
        f"head x{_fmt(t.head_lr_mult)}, poly {_fmt(t.poly_power)} |",
        f"| backbone | {_backbone_training(t)}, BatchNorm statistics "
        f"{'updated' if t.bn_train else 'frozen'} |",
        f"| seed | {t.seed} |",
        *_self_training(config.self_train),
        "", "## Metrics", "",
        _metrics_table(metrics) if metrics else "No metrics were recorded with these weights.",
        "", "## Usage", "",
        "```bash", "pip install c2am", f"c2am localize ./images{weights_arg} --out boxes.json --maps maps/", "```", "",
        "```python", "from c2am_cli import C2AM", "", f"model = C2AM.from_pretrained({load_arg})",
        "maps = model.activation_maps(images)  # normalised (N, 3, H, W) -> (N, H, W), high = foreground",
        "boxes = model.boxes(maps)", "```", "",
        "## Licence", "",
        f"Weights: `{license}`. The backbone's pretrained weights and the training images keep their own terms.",
    ]
    if notes.strip():
        lines += ["", "## Notes", "", notes.strip()]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _self_training(st) -> list[str]:
    """The self-training stage's section of the card (none without one)."""
    if st is None:
        return []
    return ["", "## Self-training", "",
            "The map is a saliency decoder's, fitted to the teacher's refined maps (pseudo-masks) of the training "
            "images with " + ("the backbone and activation head frozen." if not st.finetune_levels else
                              f"the backbone's last {st.finetune_levels} feature level{'s' if st.finetune_levels > 1 else ''}"
                              f" and the activation head trained along (lr x {_fmt(st.finetune_lr_scale)}, BatchNorm "
                              "statistics frozen)."), "",
            "| | |", "|---|---|",
            f"| teacher | {st.teacher} (sha256 {st.teacher_sha256[:12] or 'n/a'}) |",
            f"| decoder | levels {_fmt(st.decoder_levels)} plus the head's, {st.decoder_channels} channels |",
            f"| rounds / epochs per round | {st.rounds} / {st.epochs} |",
            f"| seed | {st.seed} |",
            f"| crops | {st.image_size} px, random resized (area {_fmt(st.min_scale)}-1), flip, colour jitter |",
            f"| loss | binary cross-entropy on confident pixels (pseudo-mask <= {_fmt(st.ignore[0])} or >= "
            f"{_fmt(st.ignore[1])}) |",
            f"| optimiser | AdamW, lr {_fmt(st.lr)}, weight decay {_fmt(st.weight_decay)}, cosine, batch {st.batch_size} |"]


def _refinement(m) -> str:
    """The stored refinement of maps at image size, in words."""
    steps = [f"guided filter (radius {_fmt(m.edge_radius)} of the shorter side)"] if m.edge_radius > 0 else []
    if m.calibration:
        steps.append(f"calibrated to P(foreground) ({len(m.calibration)} knots, fitted on {m.calibration_source})")
        if m.crf_iterations:
            steps.append(f"dense CRF ({m.crf_iterations} iterations, bilateral {_fmt(m.crf_bilateral)})")
    return ", ".join(steps) or "bilinear upsampling only"
