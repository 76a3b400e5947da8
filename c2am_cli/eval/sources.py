"""Where `c2am eval` and `c2am calibrate` get maps from: map files, pseudo-masks, reference maps, or a model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import Image

from ..data.datasets import Item, read_label_png
from ..maps.boxes import normalize_map
from ..runtime.errors import C2AMError, ImageError
from .metrics import RESIZE

BASELINES = ("full", "center")


@dataclass(frozen=True)
class SourceMaps:
    """One item's maps from a MapSource (it also unpacks, in this order, as the 5-tuple of c2am 0.1)."""

    index: int  # the item's position in the list given to `iterate`
    box: np.ndarray | None = None  # at RESIZE x RESIZE, for the box metrics
    full: np.ndarray | None = None  # at the ground truth's size, for the mask metrics
    error: str | None = None  # why this item has no maps (then every map is None)
    corloc: np.ndarray | None = None  # at image size, the map CorLoc mines boxes from; None: use `full`
    photo: np.ndarray | None = None  # the decoded image, (H, W, 3) uint8, where the source was asked to keep it

    def __iter__(self):
        return iter((self.index, self.box, self.full, self.error, self.corloc))


class MapSource:
    """Yields a SourceMaps per item: its map at RESIZE x RESIZE for box metrics, at the ground truth's size for mask
    metrics, and the image-size map CorLoc mines boxes from (or None: the mask-metrics map), or the error.

    `normalized`: maps are in [0, 1] and used as given (wsolevaluation's evaluator on stored score maps); otherwise
    each map is min-max normalised per image (boxes.normalize_map, as wsolevaluation's inference does).
    """

    name = "maps"
    normalized = False

    def describe(self) -> dict:
        return {"kind": self.name}

    def iterate(self, items: list[Item], sizes: list[tuple[int, int]], need_box: bool, need_full: bool
                ) -> Iterator[SourceMaps]:
        for i, (item, size) in enumerate(zip(items, sizes)):
            try:
                raw = self.load(item)
            except ImageError as e:
                yield SourceMaps(i, error=e.reason)
                continue
            box = _resize(raw, (RESIZE, RESIZE), self.enlarge) if need_box else None
            full = _resize(raw, size, self.enlarge) if need_full else None
            yield SourceMaps(i, box, full)

    @property
    def enlarge(self) -> int:
        """Upsampling: bicubic (wsolevaluation's choice) for maps to be normalised; bilinear for maps used as given,
        which must stay in [0, 1]."""
        return cv2.INTER_LINEAR if self.normalized else cv2.INTER_CUBIC

    def load(self, item: Item) -> np.ndarray:
        raise NotImplementedError


def _resize(m: np.ndarray, size: tuple[int, int], enlarge: int = cv2.INTER_CUBIC) -> np.ndarray:
    """To (width, height): area averaging when shrinking (nearest for masks), `enlarge` when enlarging."""
    w, h = size
    if m.shape == (h, w):
        return m
    shrink = w * h < m.shape[0] * m.shape[1]
    method = enlarge if not shrink else (cv2.INTER_NEAREST if enlarge == cv2.INTER_NEAREST else cv2.INTER_AREA)
    return cv2.resize(m.astype(np.float32), (w, h), interpolation=method)


class MapFiles(MapSource):
    """Maps written by `c2am localize --maps DIR` (.npy float or 8/16-bit .png), found by the image's relative path."""

    name = "maps"

    def __init__(self, folder, normalized: bool = False, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise C2AMError(f"--maps {self.folder}: no such folder")
        self.normalized, self.allow_pickle = normalized, allow_pickle
        self._names: dict[str, list[str]] = {}

    def describe(self) -> dict:
        return {"kind": "maps", "folder": str(self.folder), "normalized": self.normalized}

    def prepare(self, items: list[Item]) -> None:
        from ..predict.localize import output_names

        files = [it.image for it in items]
        npy, png = output_names(files, ".npy"), output_names(files, ".png")
        for f in files:
            stem = str(Path(f).with_suffix(""))
            self._names[f] = list(dict.fromkeys([npy[f], png[f], stem + ".npy", stem + ".png", f + ".npy", f + ".png"]))

    def load(self, item: Item) -> np.ndarray:
        names = self._names.get(item.image) or [str(Path(item.image).with_suffix("")) + s for s in (".npy", ".png")]
        path = next((self.folder / n for n in names if (self.folder / n).is_file()), None)
        if path is None:
            raise ImageError(self.folder / names[0], "no map file for this image (.npy or .png)")
        return read_map(path, self.allow_pickle)


def read_map(path: Path, allow_pickle: bool = False) -> np.ndarray:
    """A 2-D float32 map from .npy (never unpickled unless asked) or an 8/16-bit PNG (scaled to [0, 1])."""
    try:
        if path.suffix.lower() == ".npy":
            from ..data.arrays import check_npy_sizes

            check_npy_sizes(path)  # before np.load allocates what a header claims
            m = np.load(path, allow_pickle=allow_pickle)
        else:
            with Image.open(path) as img:
                m = np.asarray(img)
                if img.mode not in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
                    m = np.asarray(img.convert("L"))
                scale = 65535.0 if img.mode.startswith("I;16") else (1.0 if img.mode == "F" else 255.0)
                m = m.astype(np.float32) / scale
    except C2AMError as e:
        raise ImageError(path, str(e).removeprefix(f"{path}: ")) from None
    except ValueError as e:
        raise ImageError(path, f"cannot load ({e}); object arrays need --allow-pickle") from None
    except OSError as e:
        raise ImageError(path, f"cannot read ({e})") from None
    except Exception as e:  # a decompression bomb, a truncated pickle, any decoder failure: this map's
        raise ImageError(path, f"cannot read ({type(e).__name__}: {e})") from None
    m = np.squeeze(np.asarray(m))
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.number):
        raise ImageError(path, f"expected a 2-D numeric map, found shape {m.shape} and dtype {m.dtype}")
    if not np.isfinite(m).all():
        raise ImageError(path, "the map holds NaN or infinite values")
    return m.astype(np.float32)


class PredictedMasks(MapFiles):
    """Binary masks (PNG, non-zero = foreground) scored as maps that are 0 or 1: IoU, F, MAE, boxes of the mask."""

    name = "masks"

    def __init__(self, folder):
        super().__init__(folder, normalized=True)

    def describe(self) -> dict:
        return {"kind": "masks", "folder": str(self.folder)}

    @property
    def enlarge(self) -> int:
        return cv2.INTER_NEAREST  # a mask stays a mask

    def load(self, item: Item) -> np.ndarray:
        path = self.folder / (Path(item.id).stem + ".png")
        if not path.is_file():
            path = self.folder / (str(Path(item.image).with_suffix("")) + ".png")
        try:
            return (read_label_png(path) > 0).astype(np.float32)
        except C2AMError as e:
            raise ImageError(path, str(e).split(": ", 1)[-1]) from None


class Baseline(MapSource):
    """Reference maps that need no image: `full` (all ones: the whole image is the object; used as given, since
    min-max would make it all zeros) and `center` (a Gaussian at the image centre, sigma = 1/4 of the width and of
    the height, min-max normalised like any map). These reproduce the zero-training reference rows of an independent evaluator."""

    def __init__(self, kind: str):
        if kind not in BASELINES:
            raise C2AMError(f"--baseline {kind}: use full, center or tokencut")
        self.kind = kind
        self.name = f"baseline {kind}"
        self.normalized = kind == "full"

    def describe(self) -> dict:
        return {"kind": "baseline", "baseline": self.kind}

    def make(self, size: tuple[int, int]) -> np.ndarray:
        w, h = size
        if self.kind == "full":
            return np.ones((h, w), dtype=np.float32)
        x = (np.arange(w, dtype=np.float64) - (w - 1) / 2) / (w / 4)
        y = (np.arange(h, dtype=np.float64) - (h - 1) / 2) / (h / 4)
        return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)

    def iterate(self, items, sizes, need_box, need_full):
        for i, size in enumerate(sizes):
            yield SourceMaps(i, self.make((RESIZE, RESIZE)) if need_box else None, self.make(size) if need_full else None)


class ModelMaps(MapSource):
    """Maps of a C2AM model run on the fly: the Predictor `localize` uses, on the same squashed images, each file
    decoded once (its photo, for the refinement or `keep_photos`, comes from that decode too)."""

    name = "weights"
    normalized = True  # iterate() normalises and refines them itself

    def __init__(self, image_root, weights=None, device: str = "auto", scales=None, flip=None, batch_size: int = 32,
                 num_workers: int | None = None, boxes_from: str | None = None, keep_photos: bool = False):
        from ..predict.predictor import Predictor

        self.image_root = Path(image_root)
        self.predictor = Predictor(weights, device=device, scales=scales, flip=flip, batch_size=batch_size,
                                   num_workers=num_workers, boxes_from=boxes_from)
        self.keep_photos = keep_photos  # SourceMaps.photo: the decoded image, (H, W, 3) uint8

    @property
    def localizer(self):  # the name of 0.1
        return self.predictor

    def describe(self) -> dict:
        return {"kind": "weights", **self.predictor.settings()}

    @property
    def threshold(self) -> float:
        return self.predictor.threshold

    def iterate(self, items, sizes, need_box, need_full):
        """Box maps min-max normalised at RESIZE; full maps refined as the weights say (normalised when not
        calibrated); and `corloc`, the map CorLoc mines boxes from. Boxes come from what `localize` takes them
        from: the plain activation map, or with boxes from masks the refined map (squashed to RESIZE for the
        wsolevaluation metrics)."""
        import torch.nn.functional as F

        from ..maps.edges import full_size_map, uses_image

        pred = self.predictor
        mc = pred.model.config.model
        from_mask = pred.boxes_from == "mask"
        refine_photo = uses_image(mc) and (need_full or from_mask)
        files = [it.image for it in items]
        for predictions, errors in pred.batches(self.image_root, files, photos=refine_photo or self.keep_photos):
            for idx, reason in errors:
                yield SourceMaps(idx, error=reason)
            for p in predictions:
                idx, m = p.index, p.map[None, None]
                box = full = corloc = None
                image = p.image()
                if need_full or from_mask:
                    full = full_size_map(m[0, 0], sizes[idx], image if refine_photo else None, mc)
                    if not mc.calibration:
                        full = normalize_map(full)
                    corloc = normalize_map(full if from_mask else full_size_map(m[0, 0], sizes[idx]))
                if need_box and from_mask:  # every box metric from the refined mask, squashed as wsolevaluation does
                    box = normalize_map(cv2.resize(full, (RESIZE, RESIZE), interpolation=cv2.INTER_LINEAR))
                elif need_box:
                    box = m if m.shape[-2:] == (RESIZE, RESIZE) else F.interpolate(m, size=(RESIZE, RESIZE), mode="bilinear", align_corners=False)
                    box = normalize_map(box[0, 0].clamp(0, 1).cpu().numpy())
                photo = np.asarray(image) if self.keep_photos and image is not None else None
                yield SourceMaps(idx, box, full if need_full else None, corloc=corloc, photo=photo)
