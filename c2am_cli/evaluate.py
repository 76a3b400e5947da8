"""`c2am eval`: score activation maps (files, a model run on the fly, or reference maps) or pseudo-masks against an
evaluation set, with the threshold chosen on calibration images and the oracle numbers labelled as such."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .boxes import normalize_map
from .datasets import IGNORE, EvalSet, Item, read_label_png
from .errors import C2AMError, ImageError
from .metrics import (IOU_THRESHOLDS, RESIZE, BoxAccumulator, MaskAccumulator, best_index, calibration_split,
                      cam_thresholds, foreground_confusion, max_box_acc, miou_from_confusion, semantic_confusion, topk_loc)

BASELINES = ("full", "center")


# -- map sources --------------------------------------------------------------------------------------------------


class MapSource:
    """Yields, per item, (index, map at RESIZE x RESIZE for box metrics, map at the ground truth's size for mask
    metrics, error, image-size map CorLoc mines boxes from or None for the mask-metrics map).

    `normalized`: maps are in [0, 1] and used as given (wsolevaluation's evaluator on stored score maps); otherwise
    each map is min-max normalised per image (boxes.normalize_map, as wsolevaluation's inference does).
    """

    name = "maps"
    normalized = False

    def describe(self) -> dict:
        return {"kind": self.name}

    def iterate(self, items: list[Item], sizes: list[tuple[int, int]], need_box: bool, need_full: bool
                ) -> Iterator[tuple[int, np.ndarray | None, np.ndarray | None, str | None]]:
        for i, (item, size) in enumerate(zip(items, sizes)):
            try:
                raw = self.load(item)
            except ImageError as e:
                yield i, None, None, e.reason, None
                continue
            box = _resize(raw, (RESIZE, RESIZE), self.enlarge) if need_box else None
            full = _resize(raw, size, self.enlarge) if need_full else None
            yield i, box, full, None, None

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
        from .infer import output_names

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
            from .arrays import check_npy_sizes

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
    the height, min-max normalised like any map). These reproduce the reference rows of BASELINES.md."""

    def __init__(self, kind: str):
        if kind not in BASELINES:
            raise C2AMError(f"--baseline {kind}: use full or center")
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
            yield i, self.make((RESIZE, RESIZE)) if need_box else None, self.make(size) if need_full else None, None, None


class ModelMaps(MapSource):
    """Maps of a C2AM model run on the fly (Localizer.maps on batches of squashed images)."""

    name = "weights"
    normalized = True  # iterate() normalises and refines them itself

    def __init__(self, image_root, weights=None, device: str = "auto", scales=None, flip=None, batch_size: int = 32,
                 num_workers: int = 2, boxes_from: str | None = None):
        from .infer import Localizer

        self.image_root = Path(image_root)
        self.localizer = Localizer(weights, device=device, scales=scales, flip=flip, batch_size=batch_size,
                                   num_workers=num_workers, boxes_from=boxes_from)

    def describe(self) -> dict:
        return {"kind": "weights", **self.localizer.settings()}

    @property
    def threshold(self) -> float:
        return self.localizer.threshold

    def iterate(self, items, sizes, need_box, need_full):
        """Box maps min-max normalised at RESIZE; full maps refined as the weights say (normalised when not
        calibrated); a fifth element, the map CorLoc mines boxes from. Boxes come from what `localize` takes them
        from: the plain activation map, or with boxes from masks the refined map (squashed to RESIZE for the
        wsolevaluation metrics)."""
        import torch.nn.functional as F
        from torch.utils.data import DataLoader

        from .data import ImageFolder, collate, eval_transform, load_image
        from .edges import full_size_map, uses_image

        loc = self.localizer
        mc = loc.model.config.model
        needs_image = uses_image(mc)
        from_mask = loc.boxes_from == "mask"
        ds = ImageFolder(self.image_root, [it.image for it in items], eval_transform(mc.image_size, mc.mean, mc.std),
                         loc.max_pixels)
        loader = DataLoader(ds, batch_size=loc.batch_size, shuffle=False, num_workers=loc.num_workers, collate_fn=collate)
        for batch in loader:
            for idx, reason in batch.errors:
                yield idx, None, None, reason, None
            if not len(batch):
                continue
            maps = loc.maps(batch.images)[:, None]
            for j, idx in enumerate(batch.indices):
                m = maps[j:j + 1]
                box = full = corloc = None
                if need_full or from_mask:
                    image = load_image(self.image_root / items[idx].image, loc.max_pixels) if needs_image else None
                    full = full_size_map(m[0, 0], sizes[idx], image, mc)
                    if not mc.calibration:
                        full = normalize_map(full)
                    corloc = normalize_map(full if from_mask else full_size_map(m[0, 0], sizes[idx]))
                if need_box and from_mask:  # every box metric from the refined mask, squashed as wsolevaluation does
                    box = normalize_map(cv2.resize(full, (RESIZE, RESIZE), interpolation=cv2.INTER_LINEAR))
                elif need_box:
                    box = m if m.shape[-2:] == (RESIZE, RESIZE) else F.interpolate(m, size=(RESIZE, RESIZE), mode="bilinear", align_corners=False)
                    box = normalize_map(box[0, 0].clamp(0, 1).cpu().numpy())
                yield idx, box, full if need_full else None, None, corloc


def _prepare(m: np.ndarray, normalized: bool, where: str) -> np.ndarray:
    if not normalized:
        return normalize_map(m)
    m = np.nan_to_num(np.asarray(m, dtype=np.float32))
    lo, hi = float(m.min()), float(m.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ImageError(where, f"values span [{lo:.3g}, {hi:.3g}], not [0, 1]; drop --maps-normalized to min-max normalise")
    return np.clip(m, 0, 1)


# -- protocol -----------------------------------------------------------------------------------------------------


@dataclass
class Protocol:
    """How tau is chosen: `fixed` (a given tau), `calibrated` (best tau on calibration images, reported on the
    others), or `oracle` only (max over tau on the evaluated images, which is what Max* metrics mean)."""

    threshold: float | None = None
    threshold_from: str | None = None
    calibrate_on: str | None = None
    fraction: float | None = None
    seed: int = 0

    @property
    def mode(self) -> str:
        if self.calibrate_on or self.fraction:
            return "calibrated"
        return "fixed" if self.threshold is not None else "oracle"


def split_ids(dataset: EvalSet, split: str | None, protocol: Protocol) -> tuple[list[str], list[str], str]:
    """(calibration ids, evaluation ids, description) under the protocol; the two lists never share an image."""
    split = split or dataset.default_split
    ids = dataset.split_ids(split) if split else [it.id for it in dataset.items]
    if protocol.calibrate_on and protocol.fraction:
        raise C2AMError("give either --calibrate-on or --calibration-fraction, not both")
    if protocol.mode == "calibrated" and protocol.threshold is not None:
        raise C2AMError("--threshold fixes tau; it cannot be combined with calibration")
    where = f"split {split}" if split else "all images"
    if protocol.calibrate_on:
        cal = dataset.split_ids(protocol.calibrate_on)
        cal_set = set(cal)
        ev = [i for i in ids if i not in cal_set]
        if not ev:
            raise C2AMError(f"--calibrate-on {protocol.calibrate_on}: it covers the whole evaluation split ({where})")
        return cal, ev, f"tau chosen on {protocol.calibrate_on} ({len(cal)} images), reported on {where} minus those ({len(ev)})"
    if protocol.fraction:
        if len(ids) < 2:
            raise C2AMError("a calibration fraction needs at least 2 images")
        c, e = calibration_split(len(ids), protocol.fraction, protocol.seed)
        return ([ids[k] for k in c], [ids[k] for k in e],
                f"tau chosen on a random {protocol.fraction:g} of {where} (seed {protocol.seed}, {len(c)} images), "
                f"reported on the other {len(e)}")
    return [], ids, where


# -- evaluation ---------------------------------------------------------------------------------------------------


def _round(v, nd: int = 4):
    if isinstance(v, dict):
        return {k: _round(x, nd) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_round(x, nd) for x in v]
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else round(float(v), nd)
    if isinstance(v, np.integer):
        return int(v)
    return v


def load_top5(path, dataset: EvalSet) -> dict[str, list[int]]:
    """A classifier's top-5 classes per image: JSON {image: [c1, ..., c5]} or lines `image c1 c2 c3 c4 c5`
    (commas or spaces); images named by id, relative path or stem."""
    path = Path(path)
    if not path.is_file():
        raise C2AMError(f"--top5 {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        table = json.loads(text) if text.lstrip().startswith("{") else None
    except json.JSONDecodeError as e:
        raise C2AMError(f"--top5 {path}: not valid JSON ({e})") from None
    if table is None:
        table = {}
        for n, line in enumerate(text.splitlines(), start=1):
            parts = line.replace(",", " ").split()
            if not parts or parts[0].startswith("#"):
                continue
            try:
                table[parts[0]] = [int(p) for p in parts[1:]]
            except ValueError:
                raise C2AMError(f"--top5 {path}:{n}: class indices must be integers") from None
    out = {}
    for it in dataset.items:
        for key in (it.id, it.image, Path(it.image).stem, Path(it.image).name):
            if key in table:
                out[it.id] = [int(c) for c in table[key]][:5]
                break
    if not out:
        raise C2AMError(f"--top5 {path}: names none of the {len(dataset)} images")
    return out


@dataclass
class Report:
    """Everything `c2am eval` measured; `as_dict()` is metrics.json."""

    header: dict
    oracle: dict = field(default_factory=dict)
    at_tau: dict = field(default_factory=dict)
    threshold_free: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0

    def as_dict(self) -> dict:
        return _round({**self.header, "oracle": self.oracle, "at_tau": self.at_tau,
                       "threshold_free": self.threshold_free, **self.extra, "curves": self.curves,
                       "failed": self.failed})


def evaluate(dataset: EvalSet, source: MapSource, *, split: str | None = None, protocol: Protocol | None = None,
             interval: float = 0.01, top5=None, strict: bool = False, progress: bool = True) -> Report:
    """Score `source`'s maps on `dataset`: box metrics (wsolevaluation), mask or VOC foreground metrics where the
    set has masks; oracle numbers on the evaluation images, and numbers at a fixed or calibrated tau."""
    protocol = protocol or Protocol()
    cal_ids, ev_ids, where = split_ids(dataset, split, protocol)
    used = dataset.select(set(cal_ids) | set(ev_ids))
    items = used.items
    thresholds = cam_thresholds(interval)
    need_full = True  # CorLoc mines boxes at the image's size; mask metrics are measured there too
    has_masks = dataset.task in ("masks", "semantic")
    boxes = BoxAccumulator(thresholds)
    masks = MaskAccumulator(thresholds) if has_masks else None
    fixed = protocol.mode == "fixed"
    boxes_tau = BoxAccumulator([protocol.threshold]) if fixed else None
    masks_tau = MaskAccumulator([protocol.threshold]) if fixed and has_masks else None
    if isinstance(source, MapFiles):
        source.prepare(items)
    failed, done, gts, sizes = [], [], {}, []
    for k, item in enumerate(items):
        try:
            gts[k] = used.ground_truth(item)
            sizes.append(gts[k].size)
        except C2AMError as e:
            if strict:
                raise
            failed.append({"id": item.id, "reason": str(e)})
            sizes.append((RESIZE, RESIZE))
    bar = tqdm(total=len(items), desc="eval", unit="img", disable=not progress)
    for k, box_map, full_map, error, corloc_map in source.iterate(items, sizes, True, need_full):
        bar.update(1)
        item = items[k]
        if k not in gts:
            continue
        try:
            if error is not None:
                raise ImageError(item.image, error)
            gt = gts[k]
            bm = _prepare(box_map, source.normalized, item.image)
            fm = _prepare(full_map, source.normalized, item.image) if need_full else None
            cm = fm if corloc_map is None else _prepare(corloc_map, source.normalized, item.image)
            mask = gt.mask
            if has_masks and dataset.task == "semantic":
                mask = np.where(mask == IGNORE, IGNORE, (mask > 0).astype(np.uint8)).astype(np.uint8)
            boxes.add(bm, gt.boxes, gt.size, cm)
            if boxes_tau is not None:
                boxes_tau.add(bm, gt.boxes, gt.size, cm)
            if masks is not None:
                masks.add(fm, mask)
                if masks_tau is not None:
                    masks_tau.add(fm, mask)
            done.append(item.id)
        except ImageError as e:
            if strict:
                raise
            failed.append({"id": item.id, "reason": e.reason if e.path == item.image else str(e)})
    bar.close()
    if not done:
        reason = failed[0]["reason"] if failed else "no images"
        raise C2AMError(f"no image could be evaluated ({len(failed)} failed; first: {reason})")
    pos = {i: n for n, i in enumerate(done)}
    cal = [pos[i] for i in cal_ids if i in pos]
    ev = [pos[i] for i in ev_ids if i in pos]
    if not ev:
        raise C2AMError("every evaluation image failed")
    if protocol.mode == "calibrated" and not cal:
        raise C2AMError("every calibration image failed")

    if protocol.mode == "fixed":
        tau_note = f"tau = {protocol.threshold:g} fixed ({protocol.threshold_from or 'given'}), on {where}"
    elif protocol.mode == "calibrated":
        tau_note = where
    else:
        tau_note = f"{where}; no tau given or calibrated, so only max-over-tau (oracle) numbers are reported"
    header = {"version": 1, "dataset": dataset.name, "root": str(dataset.root), "split": split or dataset.default_split,
              "task": dataset.task, "box_source": dataset.box_source, "source": source.describe(),
              "images": {"listed": len(items), "evaluated": len(ev), "calibration": len(cal), "failed": len(failed)},
              "protocol": {"mode": protocol.mode, "description": tau_note, "interval": interval,
                           "oracle_note": "oracle = best tau on the evaluated images themselves (what MaxBoxAcc, "
                                          "MaxBoxAccV2 and maxF mean); not a held-out estimate"},
              "thresholds": thresholds}
    report = Report(header, failed=failed)
    taus = thresholds.tolist()
    report.curves["tau"] = taus

    # boxes
    bc = boxes.curves(ev)
    report.curves.update({k: v.tolist() for k, v in bc.items()})
    report.oracle.update(max_box_acc(bc))
    report.oracle["CorLoc"] = float(np.max(bc["CorLoc"]))
    report.extra["oracle_tau"] = {"MaxBoxAcc": taus[best_index(bc["BoxAcc@50"])], "CorLoc": taus[best_index(bc["CorLoc"])],
                                  **{f"MaxBoxAccV2@{d}": taus[best_index(bc[f"BoxAccV2@{d}"])] for d in IOU_THRESHOLDS}}
    chosen: dict[str, float] = {}
    if protocol.mode == "calibrated":
        cc = boxes.curves(cal)
        pick = {name: best_index(cc[name]) for name in cc}
        at = {"GT-known Loc": bc["BoxAcc@50"][pick["BoxAcc@50"]], "CorLoc": bc["CorLoc"][pick["CorLoc"]]}
        v2 = [bc[f"BoxAccV2@{d}"][pick[f"BoxAccV2@{d}"]] for d in IOU_THRESHOLDS]
        chosen.update({"GT-known Loc": taus[pick["BoxAcc@50"]], "CorLoc": taus[pick["CorLoc"]],
                       **{f"BoxAccV2@{d}": taus[pick[f"BoxAccV2@{d}"]] for d in IOU_THRESHOLDS}})
        loc_index, loc_acc = pick["BoxAcc@50"], boxes
    elif fixed:
        fc = boxes_tau.curves(ev)
        at = {"GT-known Loc": fc["BoxAcc@50"][0], "CorLoc": fc["CorLoc"][0]}
        v2 = [fc[f"BoxAccV2@{d}"][0] for d in IOU_THRESHOLDS]
        loc_index, loc_acc = 0, boxes_tau
    if protocol.mode != "oracle":
        at["BoxAccV2"] = float(np.mean(v2))
        at.update({f"BoxAccV2@{d}": v for d, v in zip(IOU_THRESHOLDS, v2)})
        if top5 is not None:
            preds = load_top5(top5, dataset) if not isinstance(top5, dict) else top5
            ids = [done[n] for n in ev]
            labels = {it.id: it.label for it in dataset.items}
            ok = loc_acc.correct(loc_index, ev)
            lab = [labels[i] for i in ids]
            pr = [preds.get(i, []) for i in ids]
            at["Top-1 Loc"] = topk_loc(ok, lab, pr, 1)
            at["Top-5 Loc"] = topk_loc(ok, lab, pr, 5)
            at["Top-1 Cls"] = topk_loc(np.ones(len(ids), bool), lab, pr, 1)
            at["Top-5 Cls"] = topk_loc(np.ones(len(ids), bool), lab, pr, 5)
            report.extra["top5_missing"] = sum(1 for i in ids if i not in preds)
        report.at_tau.update(at)
    elif top5 is not None:
        raise C2AMError("Top-1/Top-5 Loc are measured at one tau: give --threshold or a calibration split")

    # masks
    if masks is not None:
        mc = masks.iou_curves(ev)
        fcurve = _f_at_tau(masks, ev)
        tb = masks.fmeasure_curve(ev)
        keep = {"fgIoU": "dsIoU", "bgIoU": "bgIoU", "mIoU2": "mIoU2"} if dataset.task == "semantic" else \
            {"mIoU": "mIoU", "dsIoU": "dsIoU"}
        report.curves.update({k: mc[v].tolist() for k, v in keep.items()})
        if dataset.task != "semantic":
            report.curves["F@tau"] = fcurve.tolist()
        report.curves["toolbox"] = {"threshold": (np.arange(256) / 255).tolist(), **{k: v.tolist() for k, v in tb.items()}}
        names = ("mIoU2", "dsIoU", "bgIoU") if dataset.task == "semantic" else ("mIoU", "dsIoU")
        if dataset.task == "semantic":
            b = best_index(mc["mIoU2"])
            report.oracle.update({"fgIoU": mc["dsIoU"][b], "bgIoU": mc["bgIoU"][b], "mIoU2": mc["mIoU2"][b]})
            report.extra["oracle_tau"]["mIoU2"] = taus[b]
        else:
            for n in names:
                report.oracle[n] = float(np.max(mc[n]))
                report.extra["oracle_tau"][n] = taus[best_index(mc[n])]
            report.oracle["maxF"] = float(np.max(tb["F"]))
            report.extra["oracle_tau"]["maxF"] = round(best_index(tb["F"]) / 255, 4)
            report.threshold_free["MAE"] = masks.mae(ev)
        report.threshold_free["PxAP"] = masks.pxap(ev)
        if protocol.mode == "calibrated":
            cm, cf = masks.iou_curves(cal), _f_at_tau(masks, cal)
            if dataset.task == "semantic":
                b = best_index(cm["mIoU2"])
                report.at_tau.update({"fgIoU": mc["dsIoU"][b], "bgIoU": mc["bgIoU"][b], "mIoU2": mc["mIoU2"][b]})
                chosen["mIoU2"] = taus[b]
            else:
                for n in names:
                    b = best_index(cm[n])
                    report.at_tau[n], chosen[n] = mc[n][b], taus[b]
                b = best_index(cf)
                report.at_tau["F"], chosen["F"] = fcurve[b], taus[b]
        elif fixed:
            fm = masks_tau.iou_curves(ev)
            if dataset.task == "semantic":
                report.at_tau.update({"fgIoU": fm["dsIoU"][0], "bgIoU": fm["bgIoU"][0], "mIoU2": fm["mIoU2"][0]})
            else:
                report.at_tau.update({"mIoU": fm["mIoU"][0], "dsIoU": fm["dsIoU"][0], "F": _f_at_tau(masks_tau, ev)[0]})
    if protocol.mode == "fixed":
        chosen = {k: protocol.threshold for k in report.at_tau}
    report.extra["tau"] = chosen
    return report


def _f_at_tau(acc: MaskAccumulator, idx) -> np.ndarray:
    """F-beta (beta^2 = 0.3, %) at every tau of the box rule, precision and recall averaged over images."""
    tp, fp, fn, _ = (a.astype(np.float64) for a in acc._confusion(idx))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.nan_to_num(tp / (tp + fp)).mean(0)
        r = np.nan_to_num(tp / (tp + fn)).mean(0)
        return np.nan_to_num(1.3 * p * r / (0.3 * p + r)) * 100


def evaluate_semantic(dataset: EvalSet, masks_dir, *, split: str | None = None, strict: bool = False,
                      progress: bool = True) -> Report:
    """VOC pseudo-masks (PNG of class indices, `<id>.png`): 21-class mIoU accumulated over the set (255 ignored),
    per-class IoU, FP and FN shares, and the class-agnostic foreground / background IoU."""
    if dataset.task != "semantic":
        raise C2AMError("--masks with class-index PNGs needs --dataset voc")
    folder = Path(masks_dir)
    if not folder.is_dir():
        raise C2AMError(f"--masks {folder}: no such folder")
    _, ids, where = split_ids(dataset, split, Protocol())
    n = dataset.num_classes
    conf = np.zeros((n, n + 1), dtype=np.int64)
    failed, done = [], 0
    for item in tqdm(dataset.select(ids).items, desc="eval", unit="img", disable=not progress):
        try:
            gt = read_label_png(item.mask)
            pred_path = folder / f"{item.id}.png"
            if not pred_path.is_file():
                raise C2AMError(f"{pred_path}: no pseudo-mask for this image")
            pred = read_label_png(pred_path)
            if pred.shape != gt.shape:
                raise C2AMError(f"{pred_path}: {pred.shape[1]}x{pred.shape[0]} but the ground truth is "
                                f"{gt.shape[1]}x{gt.shape[0]}")
            conf += semantic_confusion(pred, gt, n, IGNORE)
            done += 1
        except C2AMError as e:
            if strict:
                raise
            failed.append({"id": item.id, "reason": str(e)})
    if not done:
        raise C2AMError(f"no pseudo-mask could be scored ({failed[0]['reason'] if failed else 'no images'})")
    scores = miou_from_confusion(conf)
    fgbg = miou_from_confusion(foreground_confusion(conf))
    header = {"version": 1, "dataset": dataset.name, "root": str(dataset.root), "split": split or dataset.default_split,
              "task": "semantic", "source": {"kind": "pseudo-masks", "folder": str(folder)},
              "images": {"listed": len(ids), "evaluated": done, "calibration": 0, "failed": len(failed)},
              "protocol": {"mode": "no threshold", "description": f"{where}; confusion accumulated over the set, "
                                                                   f"label {IGNORE} ignored"}}
    report = Report(header, failed=failed)
    report.threshold_free.update({"mIoU": scores.miou, "FP": scores.mean_fp, "FN": scores.mean_fn,
                                  "bgIoU": float(fgbg.iou[0]), "fgIoU": float(fgbg.iou[1]), "mIoU2": fgbg.miou})
    report.extra["per_class"] = scores.as_dict(list(dataset.class_names))["per_class"]
    report.extra["confusion"] = conf.tolist()
    return report


# -- output -------------------------------------------------------------------------------------------------------

_LOWER_IS_BETTER = {"MAE", "FP", "FN"}


def format_table(report: Report) -> str:
    """The readable terminal summary: one metric per row with its kind (oracle / at tau / threshold-free)."""
    d = report.as_dict()
    src = d["source"]
    src_text = {"maps": f"maps {src.get('folder')}", "baseline": f"baseline {src.get('baseline')}",
                "weights": f"weights {src.get('weights')}", "masks": f"masks {src.get('folder')}",
                "pseudo-masks": f"pseudo-masks {src.get('folder')}"}.get(src.get("kind"), str(src))
    im = d["images"]
    lines = [f"c2am eval  {d['dataset']}  {d['root']}  ({d.get('split') or 'all images'})",
             f"source: {src_text}",
             f"images: {im['evaluated']} evaluated" + (f", {im['calibration']} for calibration" if im["calibration"] else "")
             + (f", {im['failed']} FAILED and not counted" if im["failed"] else ""),
             f"protocol: {d['protocol']['description']}"]
    rows = []
    otau = d.get("oracle_tau", {})
    for k, v in d["oracle"].items():
        t = otau.get(k) if k in otau else otau.get({"fgIoU": "mIoU2", "bgIoU": "mIoU2"}.get(k, ""))
        rows.append((k, v, t, "oracle (best tau on these images)"))
    chosen = d.get("tau", {})
    label = "calibrated" if d["protocol"]["mode"] == "calibrated" else "fixed tau"
    for k, v in d["at_tau"].items():
        t = chosen.get(k, chosen.get({"Top-1 Loc": "GT-known Loc", "Top-5 Loc": "GT-known Loc", "BoxAccV2": None,
                                      "fgIoU": "mIoU2", "bgIoU": "mIoU2"}.get(k, k)))
        rows.append((k, v, t, label if "Cls" not in k else "classifier"))
    for k, v in d["threshold_free"].items():
        rows.append((k, v, None, "threshold-free" + (" (lower is better)" if k in _LOWER_IS_BETTER else "")))
    width = max(len(r[0]) for r in rows) if rows else 10
    lines.append("")
    lines.append(f"{'metric'.ljust(width)}  {'value':>8}  {'tau':>5}  kind")
    for name, v, t, kind in rows:
        value = "n/a" if v is None else (f"{v:.3f}" if name == "MAE" else f"{v:.2f}")
        lines.append(f"{name.ljust(width)}  {value:>8}  {'' if t is None else f'{t:.2f}':>5}  {kind}")
    if d.get("per_class"):
        lines.append("")
        lines.append("per class   IoU     FP     FN")
        for name, s in d["per_class"].items():
            f = lambda x: "   n/a" if x is None else f"{x:6.2f}"  # noqa: E731
            lines.append(f"{name[:11].ljust(11)} {f(s['IoU'])} {f(s['FP'])} {f(s['FN'])}")
    if report.failed:
        lines.append("")
        for f in report.failed[:10]:
            lines.append(f"failed: {f['id']}: {f['reason']}")
        if len(report.failed) > 10:
            lines.append(f"... and {len(report.failed) - 10} more (all in metrics.json)")
    return "\n".join(lines)


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot_curves(report: Report, path, size: tuple[int, int] = (900, 560)) -> None:
    """Accuracy / IoU (%) against tau, one line per curve, the chosen taus marked; a PNG drawn with Pillow."""
    from .io import save_png_atomic

    curves = report.curves
    if "tau" not in curves:
        raise C2AMError("--plot: these results have no threshold curve (pseudo-masks are scored without one)")
    names = [k for k in ("BoxAcc@50", "BoxAccV2@30", "BoxAccV2@50", "BoxAccV2@70", "CorLoc", "mIoU", "dsIoU",
                         "fgIoU", "bgIoU", "mIoU2", "F@tau") if k in curves]
    w, h = size
    left, right, top, bottom = 64, 190, 36, 52
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = left, w - right, top, h - bottom
    X = lambda t: x0 + (x1 - x0) * t  # noqa: E731
    Y = lambda v: y1 - (y1 - y0) * v / 100  # noqa: E731
    for v in range(0, 101, 10):
        draw.line([(x0, Y(v)), (x1, Y(v))], fill=(230, 230, 230))
        draw.text((x0 - 30, Y(v) - 6), f"{v:3d}", fill="black", font=font)
    for i in range(0, 11):
        t = i / 10
        draw.line([(X(t), y0), (X(t), y1)], fill=(240, 240, 240))
        draw.text((X(t) - 8, y1 + 6), f"{t:.1f}", fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2 - 80, h - 22), "threshold tau (relative to each map's max)", fill="black", font=font)
    d = report.header
    src = d["source"]
    what = src.get("baseline") or src.get("folder") or src.get("weights") or ""
    draw.text((x0, 10), f"c2am eval: {d['dataset']} {Path(d['root']).name} - {src.get('kind')} {what} - "
                        f"{d['images']['evaluated']} images - accuracy / IoU (%)", fill="black", font=font)
    taus = curves["tau"]
    for n, name in enumerate(names):
        colour = _COLOURS[n % len(_COLOURS)]
        pts = [(X(t), Y(v)) for t, v in zip(taus, curves[name]) if v is not None and math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        ly = y0 + 18 * n
        draw.line([(x1 + 12, ly + 6), (x1 + 36, ly + 6)], fill=colour, width=3)
        draw.text((x1 + 42, ly), name, fill="black", font=font)
    chosen = report.extra.get("tau", {})
    for t in sorted(set(v for v in chosen.values() if v is not None)):
        for yy in range(int(y0), int(y1), 8):
            draw.line([(X(t), yy), (X(t), min(yy + 4, y1))], fill=(90, 90, 90))
    if chosen:
        draw.text((x1 + 12, y0 + 18 * len(names) + 12), "dashed: tau used", fill="black", font=font)
    save_png_atomic(path, img)


def run_eval(dataset: str, root, *, maps=None, weights=None, baseline: str | None = None, masks=None,
             images=None, split: str | None = None, calibrate_on: str | None = None,
             calibration_fraction: float | None = None, seed: int = 0, threshold: float | None = None,
             top5=None, interval: float = 0.01, maps_normalized: bool = False, allow_pickle: bool = False,
             box_source: str = "mask", mask_format: str = "semantic", device: str = "auto", scales=None, flip=None,
             boxes_from: str | None = None, batch_size: int = 32, num_workers: int = 2, strict: bool = False,
             progress: bool = True) -> Report:
    """Parse `dataset` at `root` and score exactly one input: --maps, --weights, --baseline or --masks."""
    from .datasets import load_dataset

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
    from .datasets import load_dataset

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
