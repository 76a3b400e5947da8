"""WSSS pseudo-masks: background cues from dense C2AM maps, readers for classifier CAM files, and the per-pixel
argmax([background score, CAM_1, ..., CAM_K]) over the classes present, written as VOC-palette PNGs."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .arrays import check_npy_sizes
from .data import DEFAULT_MAX_PIXELS, load_image, scan_images, to_tensor_normalized
from .datasets import VOC_CLASSES
from .errors import C2AMError, DiskFull
from .io import JsonLines, save_png_atomic

DENSE_SCALES = (0.5, 1.0, 1.5, 2.0)  # METHOD.md: dense maps for WSSS, each with its horizontal flip
MODES = ("c2am", "threshold", "soft")
KEY_CONVENTIONS = ("auto", "zero", "background")
DEFAULT_BG_THRESHOLD = 0.15  # IRN's cam_eval_thres for plain CAMs
DEFAULT_SOFT_POWER = 1.0  # soft mode: bg_score = (1 - map) ** power; 1 is CCAM's own "1 - saliency" background
CRF_GT_PROB = 0.7  # IRN's crf_inference_label: confidence given to the cue's labels
EXIT_SOME_FAILED = 3
CAM_SUFFIXES = (".npy", ".npz", ".png")


# -- classes and image-level labels -------------------------------------------------------------------------------


def _token(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def class_index(name, classes=VOC_CLASSES) -> int | None:
    """Index of a class given by name ('dining table' = 'diningtable') or by number (1..K); None if unknown."""
    if isinstance(name, (int, np.integer)) or str(name).isdigit():
        i = int(name)
        return i if 0 < i < len(classes) else None
    tokens = {_token(c): i for i, c in enumerate(classes)}
    i = tokens.get(_token(name))
    return i if i else None  # 'background' is no image-level label


def read_labels(path, classes=VOC_CLASSES) -> dict[str, tuple[int, ...]]:
    """Image-level labels from JSON {id: [class names or numbers present]}, as id -> sorted class indices."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise C2AMError(f"{path}: no such labels file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise C2AMError(f"{path}: cannot read labels ({e})") from None
    if not isinstance(data, dict):
        raise C2AMError(f"{path}: labels must be a JSON object {{image id: [class names]}}")
    out = {}
    for key, names in data.items():
        if isinstance(names, (str, int)):
            names = [names]
        if not isinstance(names, list):
            raise C2AMError(f"{path}: labels of {key!r} must be a list of class names")
        idx = set()
        for n in names:
            if _token(n) == "background":
                continue
            i = class_index(n, classes)
            if i is None:
                raise C2AMError(f"{path}: {key!r} has unknown class {n!r} (classes: {', '.join(classes[1:])})")
            idx.add(i)
        out[str(key)] = tuple(sorted(idx))
    return out


# -- classifier CAM files ---------------------------------------------------------------------------------------


@dataclass
class ClassCAMs:
    """CAMs of the classes present in one image: class indices (1..K, 0 is background) and maps (K, H, W)."""

    labels: np.ndarray
    maps: np.ndarray

    def restrict(self, present) -> "ClassCAMs":
        """Only the channels of the classes in `present` (the image-level labels)."""
        keep = [i for i, c in enumerate(self.labels) if int(c) in set(present)]
        return ClassCAMs(self.labels[keep], self.maps[keep])


def _pickle_error(path) -> C2AMError:
    return C2AMError(f"{path}: a pickled .npy (the PSA/IRN dict layout); pass --trust-pickle to read it "
                     "(unpickling runs code: only for files you trust)")


def load_cam_file(path, trust_pickle: bool = False) -> dict | np.ndarray:
    """The raw content of a .npy / .npz CAM file: a dict of arrays, or a plain array. Pickles only when trusted."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except FileNotFoundError:
        raise C2AMError(f"{path}: no such file") from None
    except OSError as e:
        raise C2AMError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK") and not trust_pickle:
        raise C2AMError(f"{path}: not a NumPy .npy/.npz file (a raw pickle is read only with --trust-pickle)")
    check_npy_sizes(path)  # before np.load allocates what a header claims
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=trust_pickle) as z:
                return {k: z[k] for k in z.files}
        obj = np.load(path, allow_pickle=trust_pickle)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise _pickle_error(path) from None
        raise C2AMError(f"{path}: not a readable NumPy file ({e})") from None
    except FileNotFoundError:
        raise C2AMError(f"{path}: no such file") from None
    except Exception as e:  # truncated, garbled or foreign files: numpy and pickle raise many types
        raise C2AMError(f"{path}: not a readable NumPy file ({type(e).__name__}: {e})") from None
    if isinstance(obj, np.lib.npyio.NpzFile):  # an .npz saved under a .npy name
        with obj as z:
            return {k: z[k] for k in z.files}
    if obj.dtype == object:
        item = obj.item() if obj.shape == () else None
        if not isinstance(item, dict):
            raise C2AMError(f"{path}: holds Python objects, not CAMs (expected a dict with 'keys' and 'high_res')")
        return item
    return obj


def _as_maps(a, path) -> np.ndarray:
    try:
        a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise C2AMError(f"{path}: CAMs are not numbers ({e})") from None
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or min(a.shape[1:]) < 1:
        raise C2AMError(f"{path}: CAMs must be (K, H, W), got shape {tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise C2AMError(f"{path}: CAMs contain NaN or infinite values")
    return a


def resolve_keys(keys, n_maps: int, present=None, convention: str = "auto", n_classes: int = len(VOC_CLASSES),
                 path="") -> tuple[list[int], list[int]]:
    """(class indices, map channels) for a 'keys' array under a numbering convention.

    zero: keys are foreground classes from 0 (0 = aeroplane; IRN, PuzzleCAM, CCAM); background: keys count the
    background as 0 (1 = aeroplane), its map (if any) is dropped. Maps may also carry one background channel more
    than the keys. auto: the convention that matches the image-level labels, else 'background' when a key is out
    of range for 'zero' or the maps lack the key-0 channel, else 'zero'.
    """
    keys = [int(k) for k in np.asarray(keys).ravel()]
    n_fg = n_classes - 1

    def zero():
        labels = [k + 1 for k in keys]
        if n_maps == len(keys):
            return labels, list(range(n_maps))
        if n_maps == len(keys) + 1:  # a background map in front of the class maps
            return labels, list(range(1, n_maps))
        return None

    def background():
        labels = [k for k in keys if k != 0]
        if n_maps == len(keys):
            return labels, [i for i, k in enumerate(keys) if k != 0]
        if n_maps == len(labels):
            return labels, list(range(n_maps))
        return None

    if convention not in KEY_CONVENTIONS:
        raise C2AMError(f"--keys {convention}: use one of {', '.join(KEY_CONVENTIONS)}")
    if convention == "auto":
        options = {"zero": zero(), "background": background()}
        fits = {n: o for n, o in options.items() if o is not None and all(0 < c <= n_fg for c in o[0])}
        if present is not None:
            exact = [n for n, o in fits.items() if set(o[0]) == set(present)]
            if exact:
                convention = exact[0]
        if convention == "auto":
            if "zero" in fits and not (0 in keys and n_maps == len(keys) - 1):
                convention = "zero"
            elif "background" in fits:
                convention = "background"
            else:
                convention = "zero"
    got = zero() if convention == "zero" else background()
    if got is None:
        raise C2AMError(f"{path}: {len(keys)} keys {keys} do not fit {n_maps} maps (numbering: {convention})")
    labels, channels = got
    bad = [c for c in labels if not 0 < c <= n_fg]
    if bad:
        raise C2AMError(f"{path}: keys {keys} name classes outside 1..{n_fg} (numbering: {convention}; try --keys)")
    return labels, channels


def cams_from_dict(d: dict, path="", present=None, convention: str = "auto", classes=VOC_CLASSES) -> ClassCAMs:
    """The PSA / IRN / PuzzleCAM / CCAM dict layout: 'keys' with 'high_res' or 'hr_cam' (K, H, W) at image size;
    a 'classes' array of names (as `c2am cams` writes) overrides the numbering; PSA's {class: map} is also read."""
    maps = d.get("high_res", d.get("hr_cam"))
    if maps is None and "keys" not in d and d and all(isinstance(k, (int, np.integer)) for k in d):
        keys = sorted(d)  # PSA: {class index from 0: (H, W) map}
        maps = np.stack([np.asarray(d[k], dtype=np.float32) for k in keys])
        d = {"keys": np.asarray(keys), "high_res": maps}
    if "keys" not in d:
        raise C2AMError(f"{path}: no 'keys' in this CAM file (found: {', '.join(map(str, list(d)[:6])) or 'nothing'})")
    if maps is None:
        raise C2AMError(f"{path}: has 'keys' but no 'high_res' or 'hr_cam' (CAMs at image size)")
    maps = _as_maps(maps, path)
    if "classes" in d:
        names = [str(n) for n in np.asarray(d["classes"]).ravel()]
        labels = [class_index(n, classes) for n in names]
        if None in labels or len(labels) != len(maps):
            raise C2AMError(f"{path}: 'classes' {names} do not name {len(maps)} known classes")
        return ClassCAMs(np.asarray(labels, dtype=np.int64), maps)
    labels, channels = resolve_keys(d["keys"], len(maps), present, convention, len(classes), path)
    return ClassCAMs(np.asarray(labels, dtype=np.int64), maps[channels])


def cams_from_array(a: np.ndarray, path="", present=None, classes=VOC_CLASSES) -> ClassCAMs:
    """A plain (K, H, W) array: K = the image's labels (in class order), every class, or every class after a
    background channel."""
    maps = _as_maps(a, path)
    k, n_fg = len(maps), len(classes) - 1
    if present is not None and k == len(present):
        return ClassCAMs(np.asarray(sorted(present), dtype=np.int64), maps)
    if k == n_fg:
        return ClassCAMs(np.arange(1, n_fg + 1), maps)
    if k == n_fg + 1:
        return ClassCAMs(np.arange(1, n_fg + 1), maps[1:])
    if present is None:
        raise C2AMError(f"{path}: a plain array of {k} maps needs --labels (or {n_fg} maps, one per class)")
    raise C2AMError(f"{path}: {k} maps, but the labels name {len(present)} classes for this image "
                    f"(or give {n_fg} maps, one per class)")


def read_map_png(path) -> np.ndarray:
    """An 8- or 16-bit grayscale PNG as floats in [0, 1]."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(img, dtype=np.float32) / 65535.0
            if img.mode not in ("L", "1"):
                raise C2AMError(f"{path}: a map PNG must be grayscale (mode L or 16-bit), not {img.mode}")
            return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except C2AMError:
        raise
    except FileNotFoundError:
        raise C2AMError(f"{path}: no such file") from None
    except Exception as e:
        raise C2AMError(f"{path}: not a readable PNG ({type(e).__name__}: {e})") from None


def cams_from_pngs(files: dict[int, Path], path="") -> ClassCAMs:
    """One grayscale PNG per class: class index -> file."""
    labels = sorted(files)
    maps = [read_map_png(files[c]) for c in labels]
    if len({m.shape for m in maps}) > 1:
        raise C2AMError(f"{path}: the class PNGs of this image differ in size")
    return ClassCAMs(np.asarray(labels, dtype=np.int64), np.stack(maps))


@dataclass
class CAMSource:
    """Where one image's CAMs are: one array file, or one PNG per class."""

    id: str
    file: Path | None = None
    pngs: dict[int, Path] = field(default_factory=dict)

    def read(self, present=None, convention: str = "auto", trust_pickle: bool = False, classes=VOC_CLASSES) -> ClassCAMs:
        if self.file is None:
            return cams_from_pngs(self.pngs, self.id)
        obj = load_cam_file(self.file, trust_pickle)
        if isinstance(obj, dict):
            return cams_from_dict(obj, self.file, present, convention, classes)
        return cams_from_array(obj, self.file, present, classes)


def find_cams(cams_dir, classes=VOC_CLASSES) -> tuple[dict[str, CAMSource], list[dict]]:
    """CAM sources under a folder by image id (relative path without suffix), and error records for files that
    fit no layout. PNGs are `<id>/<class>.png` or `<id>_<class>.png` (class name or number)."""
    root = Path(cams_dir)
    if not root.is_dir():
        raise C2AMError(f"--cams {root}: no such folder")
    sources: dict[str, CAMSource] = {}
    errors = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in CAM_SUFFIXES:
            continue
        rel = p.relative_to(root).with_suffix("")
        if p.suffix.lower() != ".png":
            key = rel.as_posix()
            if key in sources:
                errors.append({"id": key, "path": str(p), "reason": f"{p}: a second CAM file for image {key}"})
                continue
            sources[key] = CAMSource(key, file=p)
            continue
        cls = class_index(rel.name, classes) if rel.parent != Path(".") else None
        if cls is not None:
            key = rel.parent.as_posix()
        else:
            stem, _, tail = rel.name.rpartition("_")
            cls = class_index(tail, classes) if stem else None
            key = (rel.parent / stem).as_posix()
        if cls is None:
            errors.append({"id": rel.as_posix(), "path": str(p), "reason": f"{p}: not a CAM file (PNG CAMs are "
                           f"<id>/<class>.png or <id>_<class>.png, one per class; also read: .npy, .npz)"})
            continue
        src = sources.setdefault(key, CAMSource(key))
        if src.file is not None:
            errors.append({"id": key, "path": str(p), "reason": f"{p}: image {key} also has {src.file.name}"})
            continue
        src.pngs[cls] = p
    return sources, errors


# -- dense C2AM maps and background cues --------------------------------------------------------------------------


@torch.no_grad()
def dense_map(model, image: Image.Image, scales=DENSE_SCALES, flip: bool = True, device="cpu",
              base_size: int | None = None) -> np.ndarray:
    """C2AM foreground map at image size (H, W), divided by its maximum (METHOD.md, dense maps for WSSS): the image
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
        from .edges import refine_map

        m = refine_map(image, m, mc.edge_radius, mc.edge_eps)
    return m / max(float(m.max()), 1e-5)


def crf_cue(image: np.ndarray, fg: np.ndarray, iterations: int = 10, gt_prob: float = CRF_GT_PROB) -> np.ndarray:
    """A foreground cue (bool, H x W) refined by a fully connected CRF over the RGB image (H, W, 3, uint8),
    with IRN's crf_inference_label settings (Gaussian sxy 3 compat 3, bilateral sxy 50 srgb 5 compat 10)."""
    from .edges import dense_crf

    try:
        import pydensecrf.densecrf  # noqa: F401  (dense_crf's engine)
        from pydensecrf.utils import unary_from_labels
    except ImportError:
        raise C2AMError("--crf needs pydensecrf2: pip install 'c2am[crf]' (it builds with a C++ compiler)") from None
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


@dataclass
class RefineSummary:
    out: Path
    processed: int = 0
    failed: list[dict] = field(default_factory=list)  # {"id", "path", "reason"}

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else 0


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
            from .model import C2AM
            from .train import resolve_device

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
