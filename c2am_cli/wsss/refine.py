"""WSSS pseudo-masks: background cues from dense C2AM maps and, with the classifier CAMs (wsss.cam_files), the per-pixel
argmax([background score, CAM_1, ..., CAM_K]) over the classes present, written as VOC-palette PNGs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.arrays import check_npy_sizes
from ..data.images import DEFAULT_MAX_PIXELS, load_image, scan_images, to_tensor_normalized
from ..data.datasets import VOC_CLASSES
from ..maps.edges import require_crf
from ..runtime.errors import C2AMError, DiskFull
from ..runtime.exits import RunSummary
from ..runtime.io import JsonLines, save_png_atomic
from .cam_files import KEY_CONVENTIONS, CAMSource, ClassCAMs, find_cams, read_labels, read_map_png

DENSE_SCALES = (0.5, 1.0, 1.5, 2.0)  # C2AM (CVPR 2022): dense maps for WSSS, each with its horizontal flip
MODES = ("c2am", "threshold", "soft")
DEFAULT_BG_THRESHOLD = 0.15  # IRN's cam_eval_thres for plain CAMs
DEFAULT_SOFT_POWER = 1.0  # soft mode: bg_score = (1 - map) ** power; 1 is CCAM's own "1 - saliency" background
CRF_GT_PROB = 0.7  # IRN's crf_inference_label: confidence given to the cue's labels


# -- dense C2AM maps and background cues --------------------------------------------------------------------------


@torch.no_grad()
def dense_map(model, image: Image.Image, scales=DENSE_SCALES, flip: bool = True, device="cpu",
              base_size: int | None = None) -> np.ndarray:
    """C2AM foreground map at image size (H, W), divided by its maximum (the paper's dense maps for WSSS): the image
    squashed to base_size x base_size (default: the model's training size, as `localize` does), each scale of it
    and its flip, averaged and resized to the image. At the image's own size a 224-trained model sees textures,
    not objects (fg/bg mIoU2 57.5 vs 59.0 on voc2012_seg_subset train). Weights that store an edge radius get the
    guided filter (edges.py) at image size, as `localize` maps do, but not their calibration and dense CRF: the cue
    threshold is chosen on these maps, and `--crf` refines the cue itself."""
    mc = model.config.model
    w, h = image.size
    side = int(base_size or mc.image_size)
    x = to_tensor_normalized(mc.mean, mc.std)(image.resize((side, side), Image.BILINEAR))[None].to(device)
    m = model.activation_maps(x, scales=scales, flip=flip, size=(h, w))[0].float().cpu().numpy()
    if getattr(mc, "edge_radius", 0) > 0:
        from ..maps.edges import refine_map

        m = refine_map(image, m, mc.edge_radius, mc.edge_eps)
    return m / max(float(m.max()), 1e-5)


def crf_cue(image: np.ndarray, fg: np.ndarray, iterations: int = 10, gt_prob: float = CRF_GT_PROB) -> np.ndarray:
    """A foreground cue (bool, H x W) refined by a fully connected CRF over the RGB image (H, W, 3, uint8),
    with IRN's crf_inference_label settings (Gaussian sxy 3 compat 3, bilateral sxy 50 srgb 5 compat 10)."""
    from ..maps.edges import dense_crf

    require_crf("--crf")
    from pydensecrf.utils import unary_from_labels
    h, w = fg.shape
    if image.shape[:2] != (h, w):
        raise C2AMError(f"CRF: image {image.shape[1]}x{image.shape[0]} and cue {w}x{h} differ in size")
    unary = unary_from_labels(fg.astype(np.int32), 2, gt_prob=gt_prob, zero_unsure=False).reshape(2, h, w)
    q = dense_crf(image, unary, iterations, bilateral=(50, 5, 10))
    return q[1] > q[0]


def background_score(mode: str, fg_map: np.ndarray | None = None, cue_threshold: float = 0.3,
                     bg_threshold: float = DEFAULT_BG_THRESHOLD, power: float = DEFAULT_SOFT_POWER, cue=None):
    """The background channel of the argmax: c2am 1 where the cue is background (map < t, or `cue` False) else 0;
    threshold a constant; soft (1 - map) ** power."""
    if mode == "threshold":
        return float(bg_threshold)
    if fg_map is None and cue is None:
        raise C2AMError(f"--mode {mode} needs background cues: give --weights or --cues")
    if mode == "c2am":
        fg = cue if cue is not None else fg_map >= cue_threshold
        return (~np.asarray(fg, dtype=bool)).astype(np.float32)
    if mode == "soft":
        return np.power(np.clip(1.0 - fg_map, 0.0, 1.0), power, dtype=np.float32)
    raise C2AMError(f"--mode {mode}: use one of {', '.join(MODES)}")


def normalize_cams(maps: np.ndarray) -> np.ndarray:
    """ReLU, then each class map divided by its maximum (an all-zero map stays zero)."""
    maps = np.maximum(np.asarray(maps, dtype=np.float32), 0)
    peak = maps.reshape(len(maps), -1).max(1) if len(maps) else np.zeros(0, np.float32)
    return maps / np.maximum(peak, 1e-5)[:, None, None]


def refine_cams(cams: ClassCAMs, bg) -> np.ndarray:
    """Pseudo-mask (H, W, uint8 class indices): argmax([bg, CAM_1, ..., CAM_K]) with CAMs normalised per class;
    ties go to the first channel, so a pixel where every CAM is 0 is background."""
    maps = normalize_cams(cams.maps)
    h, w = maps.shape[1:]
    scores = np.concatenate([np.broadcast_to(np.asarray(bg, dtype=np.float32), (h, w))[None], maps])
    lut = np.concatenate([[0], cams.labels]).astype(np.uint8)
    return lut[scores.argmax(0)]


# -- VOC-palette PNGs -------------------------------------------------------------------------------------------


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (n, 3) uint8: class 1 (128, 0, 0), ..., 255 (224, 224, 192)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def mask_image(labels: np.ndarray) -> Image.Image:
    """A class-index map as a palette ('P') image with the VOC colours: viewers show colours, readers get indices."""
    img = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    img.putpalette(voc_palette().ravel().tolist())
    return img


def save_mask(path, labels: np.ndarray) -> None:
    save_png_atomic(path, mask_image(labels))


# -- folders ----------------------------------------------------------------------------------------------------


def image_index(images_dir) -> dict[str, str]:
    """Image id (relative path without suffix, and the bare file stem where unique) -> relative path."""
    files = scan_images(images_dir)
    index = {str(Path(f).with_suffix("").as_posix()): f for f in files}
    stems: dict[str, list[str]] = {}
    for f in files:
        stems.setdefault(Path(f).stem, []).append(f)
    for stem, fs in stems.items():
        if len(fs) == 1:
            index.setdefault(stem, fs[0])
    return index


def read_cue_map(cues_dir, key: str) -> np.ndarray:
    """A cue or map for one image from a folder: <id>.png (0/255 cue or 8/16-bit map) or <id>.npy (float map),
    divided by its maximum."""
    root = Path(cues_dir)
    png, npy = root / f"{key}.png", root / f"{key}.npy"
    if png.is_file():
        m = read_map_png(png)
    elif npy.is_file():
        check_npy_sizes(npy)  # before np.load allocates what a header claims
        try:
            m = np.load(npy, allow_pickle=False).astype(np.float32)
        except Exception as e:
            raise C2AMError(f"{npy}: not a readable map ({type(e).__name__}: {e})") from None
        if m.ndim != 2 or not np.isfinite(m).all():
            raise C2AMError(f"{npy}: a map must be a finite (H, W) array, got shape {m.shape}")
    else:
        raise C2AMError(f"{png}: no background cue for this image (looked for .png and .npy in --cues)")
    return m / max(float(m.max()), 1e-5)


@dataclass(kw_only=True)
class RefineSummary(RunSummary):
    """`failed`: {"id", "path", "reason"} per image that could not be refined."""


def record_failure(summary, errors, record: dict, progress: bool) -> None:
    """One skipped item: a warning line, a record in the errors file and in the summary."""
    if progress:
        tqdm.write(f"warning: {record['reason']} (skipped)")
    errors.append(record)
    summary.failed.append(record)


class Refiner:
    """Turns classifier CAMs into pseudo-masks with C2AM background cues (from weights or a cue folder)."""

    def __init__(self, mode: str = "c2am", weights=None, cues_dir=None, cue_threshold: float | None = None,
                 bg_threshold: float = DEFAULT_BG_THRESHOLD, power: float = DEFAULT_SOFT_POWER, crf: int = 0,
                 scales=DENSE_SCALES, flip: bool = True, device: str = "auto", keys: str = "auto",
                 trust_pickle: bool = False, classes=VOC_CLASSES, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        if mode not in MODES:
            raise C2AMError(f"--mode {mode}: use one of {', '.join(MODES)}")
        if keys not in KEY_CONVENTIONS:
            raise C2AMError(f"--keys {keys}: use one of {', '.join(KEY_CONVENTIONS)}")
        if crf < 0:
            raise C2AMError(f"--crf {crf}: give a number of mean-field iterations (0 = no CRF)")
        if crf and mode != "c2am":
            raise C2AMError("--crf refines the background cue: use it with --mode c2am")
        if crf:
            require_crf(f"--crf {crf}")
        if weights is not None and cues_dir is not None:
            raise C2AMError("give either --weights (cues computed here) or --cues (a folder of cues), not both")
        if mode != "threshold" and weights is None and cues_dir is None:
            raise C2AMError(f"--mode {mode} needs background cues: give --weights or --cues (or use --mode threshold)")
        if cues_dir is not None and not Path(cues_dir).is_dir():
            raise C2AMError(f"--cues {cues_dir}: no such folder")
        if not 0.0 <= bg_threshold <= 1.0:
            raise C2AMError(f"--bg-threshold {bg_threshold}: must be between 0 and 1")
        if power <= 0:
            raise C2AMError(f"--power {power}: must be positive")
        self.mode, self.cues_dir, self.crf, self.keys = mode, cues_dir, int(crf), keys
        self.bg_threshold, self.power, self.trust_pickle, self.classes = float(bg_threshold), float(power), trust_pickle, classes
        self.scales, self.flip, self.max_pixels = tuple(scales), flip, max_pixels
        self.model = None
        if weights is not None and mode != "threshold":
            from ..models.c2am import C2AM
            from ..runtime.device import resolve_device

            self.device = resolve_device(device)
            self.model = weights if isinstance(weights, C2AM) else C2AM.from_pretrained(weights)
            self.model.to(self.device).eval()
        t = cue_threshold if cue_threshold is not None else (
            self.model.config.model.cue_threshold if self.model is not None else 0.3)
        if not 0.0 < t <= 1.0:
            raise C2AMError(f"--cue-threshold {t}: must be in (0, 1]")
        self.cue_threshold = float(t)

    def foreground(self, key: str, image: Image.Image) -> np.ndarray | None:
        """The dense foreground map of one image in [0, 1] (None in threshold mode)."""
        if self.mode == "threshold":
            return None
        if self.model is not None:
            return dense_map(self.model, image, self.scales, self.flip, self.device)
        m = read_cue_map(self.cues_dir, key)
        if m.shape != (image.height, image.width):
            raise C2AMError(f"{Path(self.cues_dir) / key}: cue is {m.shape[1]}x{m.shape[0]} but the image is "
                            f"{image.width}x{image.height}")
        return m

    def one(self, source: CAMSource, image_path, present=None, save_cues=None, save_maps=None) -> np.ndarray:
        """The pseudo-mask of one image; raises C2AMError with the reason."""
        cams = source.read(present, self.keys, self.trust_pickle, self.classes)
        if present is not None:
            cams = cams.restrict(present)
        image = load_image(image_path, self.max_pixels)
        if cams.maps.shape[1:] != (image.height, image.width):
            where = source.file or next(iter(source.pngs.values()), source.id)
            raise C2AMError(f"{where}: CAMs are {cams.maps.shape[2]}x{cams.maps.shape[1]} but the image is "
                            f"{image.width}x{image.height} (CAMs must be at image size: high_res / hr_cam)")
        fg_map = self.foreground(source.id, image)
        cue = None
        if fg_map is not None:
            cue = fg_map >= self.cue_threshold
            if self.crf:
                cue = crf_cue(np.asarray(image), cue, self.crf)
            if save_maps is not None:
                save_png_atomic(Path(save_maps) / f"{source.id}.png",
                                Image.fromarray((np.clip(fg_map, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L"))
            if save_cues is not None:
                save_png_atomic(Path(save_cues) / f"{source.id}.png", Image.fromarray(cue.astype(np.uint8) * 255, mode="L"))
        bg = background_score(self.mode, fg_map, self.cue_threshold, self.bg_threshold, self.power, cue=cue)
        return refine_cams(cams, bg)

    def run(self, cams_dir, images_dir, out, labels=None, ids=None, save_cues=None, save_maps=None,
            progress: bool = True) -> RefineSummary:
        """Pseudo-masks `<out>/<id>.png` for every CAM source (or `ids`); failures go to `<out>/errors.jsonl`."""
        out = Path(out)
        if labels is not None and not isinstance(labels, dict):
            labels = read_labels(labels, self.classes)
        sources, bad = find_cams(cams_dir, self.classes)
        index = image_index(images_dir)
        if ids is not None:
            ids = list(ids)
            missing = [i for i in ids if i not in sources]
            bad += [{"id": i, "path": str(Path(cams_dir) / i), "reason": f"{Path(cams_dir) / i}: no CAMs for this image"}
                    for i in missing]
            sources = {i: sources[i] for i in ids if i in sources}
        if not sources and not bad:
            raise C2AMError(f"--cams {cams_dir}: no CAM files (.npy, .npz, or one PNG per class)")
        summary = RefineSummary(out=out)
        errors = JsonLines(out / "errors.jsonl")
        errors.reset()
        for rec in bad:
            errors.append(rec)
            summary.failed.append(rec)
        try:
            for key, src in tqdm(sources.items(), desc="refine", unit="img", disable=not progress):
                try:
                    rel = index.get(key)
                    if rel is None:
                        raise C2AMError(f"{Path(images_dir) / key}: no image for these CAMs in {images_dir}")
                    present = None
                    if labels is not None:
                        present = labels.get(key, labels.get(Path(key).name))
                        if present is None:
                            raise C2AMError(f"{key}: not in the labels file")
                    mask = self.one(src, Path(images_dir) / rel, present, save_cues, save_maps)
                    save_mask(out / f"{key}.png", mask)
                    summary.processed += 1
                except C2AMError as e:
                    if isinstance(e, DiskFull):
                        raise  # not this image's fault: stop, keeping the masks written
                    record_failure(summary, errors, {"id": key, "path": str(src.file or Path(cams_dir) / key), "reason": str(e)}, progress)
        finally:
            errors.close()
        if not summary.failed:
            errors.path.unlink(missing_ok=True)
        return summary


def refine(cams_dir, images_dir, out, *, labels=None, ids=None, save_cues=None, save_maps=None, progress: bool = True,
           **kwargs) -> RefineSummary:
    """Pseudo-masks for every CAM file under `cams_dir` (see `Refiner` for the options)."""
    return Refiner(**kwargs).run(cams_dir, images_dir, out, labels=labels, ids=ids, save_cues=save_cues,
                                 save_maps=save_maps, progress=progress)
