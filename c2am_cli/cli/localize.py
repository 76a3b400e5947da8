"""`c2am localize`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import Device, MAX_PIXELS, MaxPixels, Quiet, Scales, Strict, Workers, floats, friendly, stored


@friendly
def localize(
    image_dir: Path = typer.Argument(..., help="Folder of images (searched recursively) or one image."),
    out: Path = typer.Option(Path("boxes.json"), "--out", "-o", help="Boxes file (JSON, or COCO with --format coco)."),
    weights: Optional[str] = typer.Option(None, help="Run folder, .safetensors file, registry name or hf://org/repo[@rev]. Default: the embedded model."),
    maps: Optional[Path] = typer.Option(None, help="Write activation maps here, at image size, same relative paths."),
    map_format: str = typer.Option("npy", help="npy (float16), png (8-bit) or both."),
    overlays: Optional[Path] = typer.Option(None, help="Write overlay PNGs here: the map the boxes come from (the activation map, or the refined one with --boxes-from mask), its boxes, and a legend naming it."),
    format: str = typer.Option("json", "--format", help="json or coco."),
    threshold: Optional[float] = typer.Option(None, help="Box threshold tau in [0, 1], relative to each map's max. " + stored("box_threshold")),
    all_boxes: bool = typer.Option(False, "--all-boxes", help="One box per connected region instead of the largest only."),
    boxes_from: Optional[str] = typer.Option(None, help="map: boxes from the activation map (fast); mask: from the refined (calibrated, CRF) mask at image size, better boxes at some CPU time per image. " + stored("boxes_from")),
    scales: Scales = None,
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Average with the horizontally flipped image. " + stored("flip")),
    batch_size: int = typer.Option(32, min=1, help="Images per batch (through the model at once)."),
    workers: Workers = None,
    device: Device = "auto",
    max_pixels: MaxPixels = MAX_PIXELS,
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every image instead of resuming an earlier run."),
    strict: Strict = False,
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model first (a minute or more; then faster: for long runs)."),
    gpu_decode: bool = typer.Option(False, "--gpu-decode", help="CUDA: decode JPEGs on the GPU (nvjpeg) instead of in the workers."),
    quiet: Quiet = False,
):
    """Localise objects: activation maps and class-agnostic boxes for every image of a folder.

    \b
    Example: c2am localize ./images --out boxes.json --maps maps/ --overlays overlays/

    Exit code 0: all images done; 3: done, but some files could not be read (listed in OUT.errors.jsonl).
    """
    from ..runtime.distributed import is_main
    from ..predict.localize import localize as run_localize

    summary = run_localize(image_dir, out, weights=weights, maps_dir=maps, map_format=map_format, overlays_dir=overlays,
                           fmt=format, threshold=threshold, all_boxes=all_boxes, boxes_from=boxes_from,
                           scales=floats(scales), flip=flip,
                           batch_size=batch_size, num_workers=workers, device=device, max_pixels=max_pixels,
                           compile=compile, gpu_decode=gpu_decode, overwrite=overwrite, strict=strict,
                           progress=not quiet and is_main())
    if is_main():  # under torchrun rank 0 reports the merged run
        typer.echo(f"wrote {summary.out}: {summary.processed} localised, {summary.resumed} from an earlier run, "
                   f"{len(summary.failed)} failed")
    raise typer.Exit(summary.exit_code)
