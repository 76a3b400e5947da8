"""Classifier CAM files for `c2am refine`: image-level labels, and the .npy / .npz / per-class .png CAM formats
(IRN, AMN, or `c2am cams`) read into one ClassCAMs per image."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.datasets import VOC_CLASSES
from ..data.arrays import check_npy_sizes
from ..runtime.errors import C2AMError

KEY_CONVENTIONS = ("auto", "zero", "background")
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


def read_json(path: Path, what: str):
    """A JSON file's content, or one line saying why not (`what` names the file for the user: "labels", ...)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise C2AMError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise C2AMError(f"{path}: cannot read the {what} ({e})") from None


def read_labels(path, classes=VOC_CLASSES) -> dict[str, tuple[int, ...]]:
    """Image-level labels from JSON {id: [class names or numbers present]}, as id -> sorted class indices."""
    path = Path(path)
    data = read_json(path, "labels")
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
