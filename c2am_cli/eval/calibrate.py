"""Map calibration: a monotone map from normalised activation values to foreground probabilities.

C2AM's maps rank pixels well but their values are not probabilities (a mid-level background, a soft top), which is
what MAE and a dense CRF's unary need. Isotonic regression of the ground-truth masks on the map values of a
calibration split gives P(foreground | value); it is stored with the weights as K knots and applied by np.interp."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..maps.calibration import apply_calibration
from ..maps.edges import require_crf
from ..runtime.errors import C2AMError

KNOTS = 33  # map values 0, 1/32, .., 1
BINS = 256


class CalibrationFit:
    """Accumulates (map value, mask) pixel counts over images, then fits the isotonic P(foreground | value)."""

    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.count = np.zeros(bins, np.float64)
        self.fg = np.zeros(bins, np.float64)

    def add(self, scoremap: np.ndarray, mask: np.ndarray) -> None:
        """A map in [0, 1] and its mask (1 foreground, 0 background, 255 ignored), the same size."""
        valid = mask != 255
        b = np.clip((np.asarray(scoremap)[valid] * self.bins).astype(np.int64), 0, self.bins - 1)
        self.count += np.bincount(b, minlength=self.bins)
        self.fg += np.bincount(b, weights=(mask[valid] == 1).astype(np.float64), minlength=self.bins)

    def knots(self, n: int = KNOTS) -> tuple[float, ...]:
        """P(foreground) at n evenly spaced map values: the isotonic (non-decreasing) least-squares fit of the
        per-bin foreground shares, weighted by pixel counts, read at the knots."""
        from scipy.optimize import isotonic_regression

        ok = self.count > 0
        if not ok.any():
            raise ValueError("no pixels to calibrate on")
        centres = (np.arange(self.bins) + 0.5) / self.bins
        fit = isotonic_regression(self.fg[ok] / self.count[ok], weights=self.count[ok]).x
        return tuple(round(float(v), 4) for v in np.interp(np.linspace(0, 1, n), centres[ok], fit))


def fit_calibration(pairs: Iterable[tuple[np.ndarray, np.ndarray]], n: int = KNOTS) -> tuple[float, ...]:
    """Knots of P(foreground | map value) from (map, mask) pairs."""
    fit = CalibrationFit()
    for scoremap, mask in pairs:
        fit.add(scoremap, mask)
    return fit.knots(n)


CRF_CANDIDATES = ((0, (60.0, 10.0, 5.0)), (5, (60.0, 10.0, 5.0)), (5, (80.0, 13.0, 4.0)), (5, (40.0, 10.0, 5.0)),
                  (10, (60.0, 10.0, 5.0)))


@dataclass
class CalibrationReport:
    """What `calibrate` chose on which images, and the calibration images' scores for each CRF setting."""

    images: int
    where: str
    knots: tuple[float, ...]
    crf_iterations: int
    crf_bilateral: tuple[float, float, float]
    box_threshold: float
    maxf: dict[str, float] = field(default_factory=dict)  # CRF setting -> maxF (per-image F-beta) on the calibration images
    failed: list[dict] = field(default_factory=list)


def calibrate(weights, dataset: str, root, *, split: str | None = None, calibrate_on: str | None = None,
              fraction: float | None = None, seed: int = 0, crf: bool = True, boxes_from: str | None = None,
              scales=None, flip: bool | None = None, edge_radius: float | None = None, device: str = "auto",
              batch_size: int = 32, num_workers: int | None = None, progress: bool = True):
    """Fit the map calibration, choose the dense-CRF setting (best max F-beta) and the box tau (best CorLoc) on the
    calibration images of a set with masks; returns the model with them stored in its config, and a report.

    The calibration images are `--calibrate-on`'s split, a seeded `fraction` of the evaluated split (the same
    images `c2am eval --calibration-fraction` calibrates on, so its report uses the others), or the whole split.
    `scales`, `flip`, `edge_radius` and `boxes_from`, where given, replace the stored inference settings first: the
    calibration holds for the maps they make."""
    from tqdm.auto import tqdm

    from ..data.images import load_image
    from ..data.datasets import IGNORE, load_dataset
    from .evaluate import Protocol, split_ids
    from .metrics import BoxAccumulator, MaskAccumulator, best_index
    from .sources import ModelMaps
    from ..models.c2am import C2AM

    if crf:
        require_crf("calibrate --crf (the default; --no-crf calibrates without it)")
    ds = load_dataset(dataset, root)
    if ds.task not in ("masks", "semantic"):
        raise C2AMError(f"calibrate needs a dataset with masks (masks or voc), not {dataset}")
    protocol = Protocol(calibrate_on=calibrate_on, fraction=fraction, seed=seed)
    cal_ids, ev_ids, where = split_ids(ds, split, protocol)
    name = Path(ds.root).resolve().name or ds.name
    if calibrate_on:
        where = f"{name} split {calibrate_on} ({len(cal_ids)} images)"
    elif fraction:
        where = f"a seeded random {fraction:g} of {name} (seed {seed}, {len(cal_ids)} images)"
    else:  # no split asked for: calibrate on the whole (evaluation) split
        cal_ids, where = ev_ids, f"{name}, {where} ({len(ev_ids)} images)"
    cal = ds.select(set(cal_ids))
    model = weights if isinstance(weights, C2AM) else C2AM.from_pretrained(weights)
    mc = model.config.model
    mc.calibration, mc.crf_iterations = (0.0, 1.0), 0  # normalised and guided-filtered, not yet calibrated
    for key, value in (("boxes_from", boxes_from), ("flip", flip), ("edge_radius", edge_radius),
                       ("scales", tuple(scales) if scales else None)):
        if value is not None:
            setattr(mc, key, value)
    source = ModelMaps(cal.image_root, model, device=device, batch_size=batch_size, num_workers=num_workers,
                       keep_photos=crf)  # each image decoded once: for its map and for the CRF settings
    truths = [cal.ground_truth(it) for it in cal.items]

    fit, kept, failed = CalibrationFit(), [], []
    images = {}  # decoded once (with the maps) for all CRF settings
    maps = source.iterate(cal.items, [t.size for t in truths], True, True)
    for m in tqdm(maps, total=len(truths), desc="calibrate", unit="img", disable=not progress):
        item, truth = cal.items[m.index], truths[m.index]
        if m.error is not None:
            failed.append({"id": item.id, "reason": m.error})
            continue
        mask = truth.mask
        if ds.task == "semantic":
            mask = np.where(mask == IGNORE, IGNORE, (mask > 0).astype(np.uint8)).astype(np.uint8)
        fit.add(m.full, mask)
        kept.append((item, truth, m.box, m.full, mask, m.corloc))
        if m.photo is not None:
            images[item.id] = m.photo
    if not kept:
        raise C2AMError(f"calibrate: no calibration image could be read ({len(failed)} failed)")
    knots = fit.knots()

    from ..maps.boxes import normalize_map
    from ..maps.edges import crf_probability

    scores, best = {}, None
    for iterations, bilateral in (CRF_CANDIDATES if crf else CRF_CANDIDATES[:1]):
        acc, refined = MaskAccumulator(), []
        for item, _, _, full, mask, _ in kept:
            p = apply_calibration(full, knots)
            if iterations:
                if item.id not in images:
                    images[item.id] = np.asarray(load_image(cal.image_root / item.image, source.predictor.max_pixels))
                try:
                    p = crf_probability(images[item.id], p, iterations, bilateral)
                except ImportError as e:
                    raise C2AMError(f"calibrate: {e}; or give --no-crf") from None
            acc.add(p, mask)
            refined.append(p)
        label = "no CRF" if not iterations else f"CRF {iterations} it, bilateral {bilateral[0]:g}/{bilateral[1]:g}/{bilateral[2]:g}"
        scores[label] = round(float(acc.fmeasure_curve()["F"].max()), 2)  # maxF: per-image F-beta, averaged
        if best is None or scores[label] > best[0]:
            best = (scores[label], iterations, bilateral, refined)
    mc.calibration, mc.crf_iterations, mc.crf_bilateral = knots, best[1], tuple(best[2])
    mc.calibration_source = where

    # box tau: best CorLoc on the calibration images, from the maps `localize` takes boxes from
    boxes = BoxAccumulator()
    for (_, truth, box, _, _, plain), p in zip(kept, best[3]):
        boxes.add(box, truth.boxes, truth.size, normalize_map(p) if mc.boxes_from == "mask" else plain)
    curve = boxes.curves()["CorLoc"]
    mc.box_threshold = float(boxes.thresholds[best_index(curve)])
    mc.box_threshold_source = f"best CorLoc (boxes from the {mc.boxes_from}) on {where}"
    return model, CalibrationReport(len(kept), where, knots, best[1], tuple(best[2]), mc.box_threshold, scores, failed)
