"""Pseudo-mask mIoU on a VOC folder: classifier CAMs with a constant background vs refined with C2AM cues.

Each parameter (background threshold T, cue threshold t, soft power p) is chosen on one split (--calibrate, default
train) and reported on another (--report, default val); 21 classes, 255 ignored, confusion summed over the split.

  c2am cams --images $VOC/JPEGImages --labels $VOC/labels.json --classifier-weights efficientnet-lite0 --out cams
  c2am refine --cams cams --images $VOC/JPEGImages --weights RUN --labels $VOC/labels.json --out /tmp/m --save-maps maps
  python bench/refine_voc.py --cams cams --maps maps [--crf 10]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from c2am_cli.data.images import load_image
from c2am_cli.data.datasets import read_id_list, read_label_png
from c2am_cli.eval.metrics import miou_from_confusion, semantic_confusion
from c2am_cli.wsss.cam_files import find_cams, read_labels
from c2am_cli.wsss.refine import background_score, crf_cue, read_cue_map, refine_cams

DATA = Path(os.environ.get("C2AM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def miou(ids, items, bg_of) -> float:
    """mIoU (%) over `ids` with the background score bg_of(id) of each image."""
    conf = np.zeros((21, 22), dtype=np.int64)
    for i in ids:
        cams, gt, _ = items[i]
        conf += semantic_confusion(refine_cams(cams, bg_of(i)), gt, 21, 255)
    return miou_from_confusion(conf).miou


def sweep(name, grid, cal, rep, items, make_bg) -> dict:
    """Best value of `grid` on the calibration ids (lowest among ties), and its score on the report ids."""
    scores = [miou(cal, items, make_bg(v)) for v in grid]
    best = int(np.argmax(scores))
    row = {"method": name, "param": round(float(grid[best]), 4), "calibration_mIoU": round(scores[best], 2),
           "report_mIoU": round(miou(rep, items, make_bg(grid[best])), 2)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc", type=Path, default=DATA / "voc2012_seg_subset")
    ap.add_argument("--cams", type=Path, required=True)
    ap.add_argument("--maps", type=Path, help="dense C2AM maps (c2am refine --save-maps)")
    ap.add_argument("--calibrate", default="train")
    ap.add_argument("--report", default="val")
    ap.add_argument("--crf", type=int, default=0, help="also score c2am cues refined by a dense CRF of N iterations")
    args = ap.parse_args()
    sets = args.voc / "ImageSets" / "Segmentation"
    cal, rep = read_id_list(sets / f"{args.calibrate}.txt"), read_id_list(sets / f"{args.report}.txt")
    labels = read_labels(args.voc / "labels.json")
    sources, _ = find_cams(args.cams)
    items = {}
    for i in cal + rep:
        cams = sources[i].read(labels[i]).restrict(labels[i])
        fg = read_cue_map(args.maps, i) if args.maps else None
        items[i] = (cams, read_label_png(args.voc / "SegmentationClass" / f"{i}.png"), fg)
    print(f"{len(cal)} {args.calibrate} ids for calibration, {len(rep)} {args.report} ids reported", flush=True)
    rows = [sweep("threshold", np.arange(0.0, 1.0001, 0.01), cal, rep, items,
                  lambda T: lambda i: background_score("threshold", bg_threshold=T))]
    if args.maps:
        rows.append(sweep("c2am", np.arange(0.05, 0.9501, 0.01), cal, rep, items,
                          lambda t: lambda i: background_score("c2am", items[i][2], cue_threshold=t)))
        rows.append(sweep("soft", np.array([0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16]), cal, rep, items,
                          lambda p: lambda i: background_score("soft", items[i][2], power=p)))
        if args.crf:
            images = {i: np.asarray(load_image(args.voc / "JPEGImages" / f"{i}.jpg")) for i in items}
            cache = {}

            def crf_bg(t):
                def bg(i):
                    if (t, i) not in cache:
                        cache[(t, i)] = crf_cue(images[i], items[i][2] >= t, args.crf)
                    return background_score("c2am", cue=cache[(t, i)])
                return bg

            rows.append(sweep(f"c2am+crf{args.crf}", np.arange(0.3, 0.9001, 0.05), cal, rep, items, crf_bg))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
