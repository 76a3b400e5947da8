"""`c2am refine` and `c2am cams`: pseudo-masks for weakly supervised segmentation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import Device, Quiet, floats, friendly, id_list, scales_option, stored


@friendly
def refine(
    cams: Path = typer.Option(..., "--cams", help="Classifier CAMs: .npz/.npy per image (keys + high_res/hr_cam, or a plain (K,H,W) array), or <id>/<class>.png / <id>_<class>.png."),
    images: Path = typer.Option(..., "--images", help="The images the CAMs belong to (matched by id = file name without suffix)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the pseudo-masks: <id>.png, VOC palette, class indices."),
    weights: Optional[str] = typer.Option(None, help="C2AM weights for the background cues (run folder, .safetensors, registry name, hf://...)."),
    cues: Optional[Path] = typer.Option(None, "--cues", help="Background cues from a folder instead: <id>.png (0/255 cues or 8-bit maps, e.g. from --save-maps) or <id>.npy maps."),
    mode: str = typer.Option("c2am", help="Background score: c2am (1 on a background cue, else 0), threshold (a constant), soft ((1 - map)^power)."),
    cue_threshold: Optional[float] = typer.Option(None, help="c2am: map values below this are background cues. " + stored("cue_threshold")),
    bg_threshold: float = typer.Option(0.15, help="threshold mode: the constant background score."),
    power: float = typer.Option(1.0, help="soft mode: bg_score = (1 - map)^power (1: CCAM's 1 - saliency)."),
    crf: int = typer.Option(0, min=0, help="Refine the cues with a dense CRF of this many iterations (needs c2am[crf]; authors: 10)."),
    labels: Optional[Path] = typer.Option(None, help="Image-level labels, JSON {id: [class names]}: keep only those classes' CAMs (needed for plain arrays)."),
    ids: Optional[Path] = typer.Option(None, help="Only these image ids (a file with one id per line, e.g. ImageSets/Segmentation/train.txt)."),
    keys: str = typer.Option("auto", help="Numbering of 'keys': zero (0 = first class; IRN, PuzzleCAM, CCAM), background (0 = background), auto."),
    save_cues: Optional[Path] = typer.Option(None, help="Also write the cues used (0 = background, 255 = foreground) here."),
    save_maps: Optional[Path] = typer.Option(None, help="Also write the dense C2AM maps (8-bit) here: reuse with --cues at another --cue-threshold."),
    scales: scales_option("Default: 0.5,1,1.5,2 (dense maps for WSSS; the stored scales are not used).") = None,
    flip: bool = typer.Option(True, "--flip/--no-flip", help="--weights: add the flipped image."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Read pickled .npy dicts (PSA/IRN layout); unpickling runs code: only files you trust."),
    device: Device = "auto",
    quiet: Quiet = False,
):
    """Refine classifier CAMs into pseudo-masks with C2AM background cues: label = argmax([bg, CAM_1..CAM_K]).

    \b
    Example: c2am refine --cams cams/ --images VOC2012/JPEGImages --weights default --labels labels.json --out masks/

    Exit code 0: all images done; 3: done, but some failed (listed in OUT/errors.jsonl).
    """
    from ..wsss.refine import DENSE_SCALES, refine as run_refine

    summary = run_refine(cams, images, out, labels=labels, ids=id_list(ids), save_cues=save_cues, save_maps=save_maps,
                         progress=not quiet, mode=mode, weights=weights, cues_dir=cues, cue_threshold=cue_threshold,
                         bg_threshold=bg_threshold, power=power, crf=crf, scales=floats(scales) or DENSE_SCALES,
                         flip=flip, device=device, keys=keys, trust_pickle=trust_pickle)
    typer.echo(f"wrote {summary.processed} pseudo-masks to {out}, {len(summary.failed)} failed"
               + (f" (see {out / 'errors.jsonl'})" if summary.failed else ""))
    raise typer.Exit(summary.exit_code)


@friendly
def cams(
    images: Path = typer.Option(..., "--images", help="Folder of images (matched by id = file name without suffix)."),
    labels: Path = typer.Option(..., "--labels", help="Image-level labels, JSON {id: [class names]} (VOC names by default)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for <id>.npz: keys (from 0), high_res (K,H,W) at image size, classes."),
    classifier: str = typer.Option("tf_efficientnet_lite0", help="Any timm classifier with global pooling + linear head."),
    classifier_weights: str = typer.Option("timm", help="'timm' (pretrained, needs the Hub), a .safetensors/.pth file, or efficientnet-lite0/1/2 (offline)."),
    class_map: Optional[Path] = typer.Option(None, help="JSON {class name: [classifier indices]}. Default: the shipped VOC -> ImageNet map."),
    ids: Optional[Path] = typer.Option(None, help="Only these image ids (a file with one id per line)."),
    scales: scales_option("Default: 0.5,1,1.5,2 (dense CAMs for WSSS, as refine's maps).") = None,
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Add the flipped image at each scale."),
    device: Device = "auto",
    quiet: Quiet = False,
):
    """Classifier CAMs for given image-level labels, in the layout `c2am refine` reads (pickle-free .npz).

    \b
    Example: c2am cams --images VOC2012/JPEGImages --labels labels.json --classifier-weights efficientnet-lite0 --out cams/

    Exit code 0: all images done; 3: done, but some failed (listed in OUT/errors.jsonl).
    """
    from ..wsss.cams import compute_cams
    from ..wsss.refine import DENSE_SCALES

    summary = compute_cams(images, labels, out, classifier=classifier, classifier_weights=classifier_weights,
                           class_map=class_map, scales=floats(scales) or DENSE_SCALES, flip=flip, ids=id_list(ids),
                           device=device, progress=not quiet)
    typer.echo(f"wrote {summary.processed} CAM files to {out}, {len(summary.failed)} failed"
               + (f" (see {out / 'errors.jsonl'})" if summary.failed else ""))
    raise typer.Exit(summary.exit_code)
