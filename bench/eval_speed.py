"""Benchmark: MaxBoxAccV2 (and MaxBoxAcc, same pass) of N synthetic 224x224 activation maps over 100 thresholds.

Target: 5,000 maps in under 30 s on the 2-core development machine.
Usage: python bench/eval_speed.py [--n 5000] [--interval 0.01] [--seed 0]
The maps are CAM-like: 1-3 Gaussian blobs plus noise, pooled to 14x14 and upsampled bicubically (as
wsolevaluation does with real CAMs), so some thresholds give several contours. Map generation is not timed.
"""
from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from c2am_cli.maps.boxes import normalize_map
from c2am_cli.eval.metrics import BoxAccumulator, cam_thresholds, max_box_acc


def synthetic(n: int, seed: int = 0, size: int = 224) -> tuple[list[np.ndarray], list[list[list[int]]]]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    maps, boxes = [], []
    for _ in range(n):
        m = np.zeros((size, size), np.float32)
        gt = []
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(30, size - 30, 2)
            sx, sy = rng.uniform(12, 50, 2)
            m += np.exp(-((xx - cx) ** 2 / (2 * sx * sx) + (yy - cy) ** 2 / (2 * sy * sy)))
            gt.append([int(max(cx - 2 * sx, 0)), int(max(cy - 2 * sy, 0)), int(min(cx + 2 * sx, size - 1)),
                       int(min(cy + 2 * sy, size - 1))])
        m += rng.normal(0, 0.05, m.shape).astype(np.float32)
        small = cv2.resize(m, (14, 14), interpolation=cv2.INTER_AREA)
        maps.append(normalize_map(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)))
        boxes.append(gt)
    return maps, boxes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    maps, boxes = synthetic(args.n, args.seed)
    acc = BoxAccumulator(cam_thresholds(args.interval))
    start = time.perf_counter()
    for m, b in zip(maps, boxes):
        acc.add(m, b)  # boxes already on the 224 grid
    result = max_box_acc(acc.curves())
    elapsed = time.perf_counter() - start
    print(f"{args.n} maps x {len(acc.thresholds)} thresholds: MaxBoxAccV2 {result['MaxBoxAccV2']:.2f} "
          f"(MaxBoxAcc {result['MaxBoxAcc']:.2f}) in {elapsed:.1f} s = {elapsed / args.n * 1000:.2f} ms/map "
          f"(target: 5,000 maps < 30 s)")


if __name__ == "__main__":
    main()
