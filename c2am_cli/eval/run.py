"""`c2am eval` from names and paths: the dataset, the map source, the protocol; and `--check`."""
from __future__ import annotations

from pathlib import Path

from ..runtime.errors import C2AMError
from .evaluate import Protocol, Report, evaluate, evaluate_semantic
from .sources import Baseline, MapFiles, MapSource, ModelMaps, PredictedMasks


def run_eval(dataset: str, root, *, maps=None, weights=None, baseline: str | None = None, masks=None,
             images=None, split: str | None = None, calibrate_on: str | None = None,
             calibration_fraction: float | None = None, seed: int = 0, threshold: float | None = None,
             top5=None, interval: float = 0.01, maps_normalized: bool = False, allow_pickle: bool = False,
             box_source: str = "mask", mask_format: str = "semantic", device: str = "auto", scales=None, flip=None,
             boxes_from: str | None = None, batch_size: int = 32, num_workers: int | None = None, strict: bool = False,
             progress: bool = True, backbone: str | None = None, backbone_weights: str | None = None,
             bilateral: bool = False, graph_tau: float = 0.2) -> Report:
    """Parse `dataset` at `root` and score exactly one input: --maps, --weights, --baseline or --masks.

    `backbone`, `backbone_weights`, `bilateral`, `graph_tau`: the ViT, its weights, TokenCut's bilateral solver and
    its affinity threshold for `baseline='tokencut'`."""
    from ..data.datasets import load_dataset

    given = [n for n, v in (("--maps", maps), ("--weights", weights), ("--baseline", baseline), ("--masks", masks))
             if v is not None]
    if len(given) != 1:
        raise C2AMError("give exactly one of --maps, --weights, --baseline, --masks"
                        + (f" (got {', '.join(given)})" if given else ""))
    if threshold is not None and not 0 <= threshold <= 1:
        raise C2AMError(f"--threshold {threshold}: must be between 0 and 1")
    if calibration_fraction is not None and not 0 < calibration_fraction < 1:
        raise C2AMError(f"--calibration-fraction {calibration_fraction}: must be between 0 and 1 (exclusive)")
    if not 0 < interval < 1:
        raise C2AMError(f"--interval {interval}: must be between 0 and 1 (exclusive)")
    if (backbone or backbone_weights or bilateral) and baseline != "tokencut":
        raise C2AMError("--backbone, --backbone-weights and --bilateral choose TokenCut's ViT: use them with "
                        "--baseline tokencut")
    if boxes_from is not None and weights is None:
        raise C2AMError("--boxes-from chooses how a model's maps become boxes: use it with --weights")
    if mask_format not in ("semantic", "binary"):
        raise C2AMError(f"--mask-format {mask_format}: use semantic or binary")
    ds = load_dataset(dataset, root, images=images, box_source=box_source)
    if masks is not None and ds.task == "semantic" and mask_format == "semantic":
        if calibrate_on or calibration_fraction or threshold is not None or top5:
            raise C2AMError("pseudo-masks are scored without a threshold: drop --threshold/--calibrate-on/--top5")
        return evaluate_semantic(ds, masks, split=split, strict=strict, progress=progress)
    protocol = Protocol(threshold, "given" if threshold is not None else None, calibrate_on, calibration_fraction, seed)
    if masks is not None:
        if ds.task == "boxes":
            raise C2AMError(f"--masks needs a dataset with masks (voc or masks), not {dataset}")
        source: MapSource = PredictedMasks(masks)
    elif maps is not None:
        source = MapFiles(maps, normalized=maps_normalized, allow_pickle=allow_pickle)
    elif baseline == "tokencut":
        from ..baselines.tokencut import DEFAULT_BACKBONE, DEFAULT_WEIGHTS, TokenCut, TokenCutMaps
        from ..runtime.device import resolve_device
        from .metrics import RESIZE

        predictor = TokenCut.from_backbone(backbone or DEFAULT_BACKBONE, backbone_weights or DEFAULT_WEIGHTS,
                                           bilateral=bilateral, tau=graph_tau, device=resolve_device(device))
        source = TokenCutMaps(ds.image_root, predictor, box_size=RESIZE)
    elif baseline is not None:
        source = Baseline(baseline)
    else:
        source = ModelMaps(ds.image_root, weights, device=device, scales=scales, flip=flip, batch_size=batch_size,
                           num_workers=num_workers, boxes_from=boxes_from)
        if protocol.mode == "oracle":  # the weights carry their own tau: report at it too
            protocol.threshold, protocol.threshold_from = source.threshold, "stored with the weights"
    return evaluate(ds, source, split=split, protocol=protocol, interval=interval, top5=top5, strict=strict,
                    progress=progress)


def check_dataset(dataset: str, root, *, images=None, box_source: str = "mask") -> str:
    """Parse and validate a set without scoring anything (wsol: boxes against image_sizes.txt, and image headers
    against it where the images are there); a one-paragraph summary."""
    from ..data.datasets import load_dataset

    if dataset == "wsol":
        check = images is not None
        if check and not Path(images).is_dir():
            raise C2AMError(f"--images {images}: no such folder")
    else:
        check = dataset == "cub"
    ds = load_dataset(dataset, root, images=images, box_source=box_source, check_images=check)
    n_boxes = sum(len(it.boxes) for it in ds.items if it.boxes is not None)
    labels = sum(it.label is not None for it in ds.items)
    splits = ", ".join(f"{k} ({len(v)})" for k, v in ds.splits.items()) or "none"
    parts = [f"{ds.name} {ds.root}: {len(ds)} images", f"splits: {splits}"]
    if n_boxes:
        parts.append(f"{n_boxes} boxes" + (" (checked against the stated image sizes)" if dataset == "wsol" else ""))
    if labels:
        parts.append(f"{labels} class labels")
    if ds.task != "boxes":
        parts.append(f"{sum(it.mask is not None for it in ds.items)} masks")
    parts.append("image headers checked" if check else "images not opened")
    return "; ".join(parts)
