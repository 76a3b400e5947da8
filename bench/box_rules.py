"""Box rules on one model's maps: how much CorLoc the fixed box threshold leaves on the table, and whether a
label-free per-image threshold wins it back.

    python bench/box_rules.py --weights default

For each dev set the maps are made once (the weights' scales and flip, at the model's input size, brought to the
image's size as `c2am eval` does); then boxes (largest contour) come from: the stored tau; a per-image threshold
from the map's own statistics (Otsu, mean + k std, median + k (1 - median)), k chosen on the seeded ECSSD
calibration half; and two oracles for reference (the best tau per set, and the best tau per image: the share of
images for which some tau gives a correct box). ECSSD is reported on the other half, as in bench/quality.py.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import DATA, SETS  # noqa: E402

BOX_SETS = ("imagenet", "sod", "ecssd", "horse")
TAUS = np.round(np.arange(0.0, 1.0, 0.01), 2)


def set_maps(weights: str, device: str) -> dict:
    """Per set: a list of (map at image size, min-max normalised; ground-truth boxes)."""
    from torch.utils.data import DataLoader

    from c2am_cli.maps.boxes import normalize_map
    from c2am_cli.data.images import ImageFolder, collate, eval_transform
    from c2am_cli.data.datasets import load_dataset
    from c2am_cli.maps.edges import full_size_map
    from c2am_cli.predict.localize import Localizer

    loc = Localizer(weights, device=device, num_workers=0)
    mc = loc.model.config.model
    out = {"tau": loc.threshold}
    for key in BOX_SETS:
        adapter, folder, _ = SETS[key]
        ds = load_dataset(adapter, DATA / folder)
        gts = [ds.ground_truth(it) for it in ds.items]
        images = ImageFolder(ds.image_root, [it.image for it in ds.items], eval_transform(mc.image_size, mc.mean, mc.std))
        rows = [None] * len(gts)
        for batch in DataLoader(images, batch_size=32, collate_fn=collate):
            maps = loc.maps(batch.images)
            for j, i in enumerate(batch.indices):
                rows[i] = (normalize_map(full_size_map(maps[j], gts[i].size)), np.asarray(gts[i].boxes))
        out[key] = rows
        print(f"  maps: {key} ({len(rows)})", flush=True)
    return out


def hits(fm: np.ndarray, gt: np.ndarray, taus) -> np.ndarray:
    """Per tau: does the largest contour's box (wsolevaluation's mining, as `c2am eval`) reach IoU 0.5 with a
    ground-truth box?"""
    from c2am_cli.eval.metrics import box_iou, sweep_boxes

    return box_iou(sweep_boxes(fm, taus).largest, gt).max(axis=1) >= 0.5


RULES = {  # name: (parameter grid, tau of a map for parameter k)
    "Otsu x k": (np.round(np.arange(0.8, 1.41, 0.05), 2),
                 lambda fm, k: cv2.threshold((fm * 255).astype(np.uint8), 0, 255, cv2.THRESH_OTSU)[0] / 255 * k),
    "mean + k std": (np.round(np.arange(0.0, 1.51, 0.1), 2), lambda fm, k: fm.mean() + k * fm.std()),
    "median + k (1 - median)": (np.round(np.arange(0.2, 0.81, 0.05), 2),
                                lambda fm, k: np.median(fm) + k * (1 - np.median(fm))),
}


def main(argv=None) -> None:
    from c2am_cli.eval.metrics import calibration_split

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="default")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not (DATA / "ecssd").is_dir():
        sys.exit(f"no dev data at {DATA} (set C2AM_DATA)")
    maps = set_maps(args.weights, args.device)
    cal, rep = calibration_split(len(maps["ecssd"]), 0.5, 0)
    reported = {k: (rep if k == "ecssd" else range(len(maps[k]))) for k in BOX_SETS}

    def corloc(key, idx, tau_of) -> float:
        return 100 * float(np.mean([hits(fm, gt, [min(tau_of(fm), 0.99)])[0] for fm, gt in (maps[key][i] for i in idx)]))

    rows = {f"stored tau {maps['tau']:g} (the weights')": [corloc(k, reported[k], lambda fm: maps["tau"]) for k in BOX_SETS]}
    for name, (grid, rule) in RULES.items():
        k = max(grid, key=lambda v: corloc("ecssd", cal, lambda fm: rule(fm, v)))  # first best on the calibration half
        rows[f"{name}, k = {k:g} (chosen on the ECSSD half)"] = [corloc(s, reported[s], lambda fm: rule(fm, k)) for s in BOX_SETS]
    sweeps = {k: np.array([hits(fm, gt, TAUS) for fm, gt in (maps[k][i] for i in reported[k])]) for k in BOX_SETS}
    rows["oracle: best tau per set"] = [100 * float(sweeps[k].mean(axis=0).max()) for k in BOX_SETS]
    rows["oracle: best tau per image"] = [100 * float(sweeps[k].any(axis=1).mean()) for k in BOX_SETS]
    print("\n| box rule | mean CorLoc | " + " | ".join(f"CorLoc {k}" for k in BOX_SETS) + " |")
    print("|---|---:|" + "---:|" * len(BOX_SETS))
    for name, vals in rows.items():
        print(f"| {name} | {statistics.mean(vals):.1f} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
