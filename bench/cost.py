"""Cost per image of two (or more) weights on the same images, measured in the same run: `c2am localize --maps`
end to end (decode, the weights' test-time scales and flip, their refinement at image size, boxes, files), rounds
alternating between the weights, CPU and wall seconds per image and each one's ratio to the first.

    python bench/cost.py --weights default,runs/quality/self-train-seed=0 --images 100 --rounds 3

Images: the first --images of ECSSD from ../shared/data (or $C2AM_DATA). Ratios are medians of per-round ratios, so
a machine that slows down during the run moves both sides of each ratio alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # throughput.py's Clock
DATA = Path(os.environ.get("C2AM_DATA", ROOT.parent / "shared" / "data"))


def one_run(weights: str, images: Path, device: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one `localize --maps` over `images` into a fresh folder (throughput.py's Clock)."""
    import torch

    from c2am_cli.predict.localize import localize
    from throughput import Clock

    with tempfile.TemporaryDirectory() as tmp, Clock(torch.device(device)) as clock:
        localize(images, out=Path(tmp) / "boxes.json", weights=None if weights == "default" else weights,
                 maps_dir=Path(tmp) / "maps", device=device, progress=False)
    return clock.wall, clock.cpu


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="comma-separated weights specs; the first is the reference")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    specs = [w.strip() for w in args.weights.split(",") if w.strip()]
    src = sorted((DATA / "ecssd" / "images").iterdir())[:args.images]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for f in src:
            (folder / f.name).symlink_to(f)
        for spec in specs:  # warm-up: weights loaded and kernels chosen once before timing
            one_run(spec, folder, args.device)
        times = {spec: [] for spec in specs}
        for _ in range(args.rounds):
            for spec in specs:
                times[spec].append(one_run(spec, folder, args.device))
    n = len(src)
    print(f"{n} ECSSD images, {args.rounds} rounds, `localize --maps` end to end, device {args.device}")
    print("| weights | wall s/img | CPU s/img | wall ratio | CPU ratio |\n|---|---:|---:|---:|---:|")
    ref = times[specs[0]]
    for spec in specs:
        t = times[spec]
        wall = statistics.median(w / n for w, _ in t)
        cpu = statistics.median(c / n for _, c in t)
        rw = statistics.median(a[0] / b[0] for a, b in zip(t, ref))
        rc = statistics.median(a[1] / b[1] for a, b in zip(t, ref))
        print(f"| {spec} | {wall:.3f} | {cpu:.3f} | {rw:.2f} | {rc:.2f} |")


if __name__ == "__main__":
    main()
