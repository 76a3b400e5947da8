"""`c2am eval`: score activation maps (files, a model run on the fly, or reference maps) or pseudo-masks against an
evaluation set, with the threshold chosen on calibration images and the oracle numbers labelled as such."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..maps.boxes import normalize_map
from ..data.datasets import IGNORE, EvalSet, read_label_png
from ..runtime.errors import C2AMError, ImageError
from ..runtime.exits import exit_code
from .sources import MapFiles, MapSource
from .metrics import (IOU_THRESHOLDS, RESIZE, BoxAccumulator, MaskAccumulator, best_index, calibration_split,
                      cam_thresholds, foreground_confusion, max_box_acc, miou_from_confusion, semantic_confusion, topk_loc)

YARDSTICKS = {  # what each saliency number means, written into metrics.json and the terminal table
    "maxF": "max over 256 thresholds of the mean over images of each image's F-beta (beta^2 = 0.3; TokenCut, "
            "SelfMask, FOUND, pysodmetrics)",
    "maxF_meanPR": "max over 256 thresholds of F-beta of the mean precision and mean recall (the SOD toolbox)",
    "meanF": "mean over the 256 thresholds of the maxF curve (pysodmetrics' mean F-measure)",
    "F": "each image's F-beta at the chosen tau, averaged over images",
    "IoU@0.5": "TokenCut's IoU: map > 0.5 against the mask, averaged over images",
    "Acc@0.5": "TokenCut's accuracy: pixels where map > 0.5 agrees with the mask, averaged over images",
}


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
        return exit_code(self.failed)

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
        fcurve = masks.f_curve(ev)
        tb, tb_pr = masks.fmeasure_curve(ev), masks.fmeasure_curve(ev, per_image=False)
        keep = {"fgIoU": "dsIoU", "bgIoU": "bgIoU", "mIoU2": "mIoU2"} if dataset.task == "semantic" else \
            {"mIoU": "mIoU", "dsIoU": "dsIoU"}
        report.curves.update({k: mc[v].tolist() for k, v in keep.items()})
        if dataset.task != "semantic":
            report.curves["F@tau"] = fcurve.tolist()
        report.curves["fmeasure"] = {"threshold": (np.arange(256) / 255).tolist(), **{k: v.tolist() for k, v in tb.items()},
                                     "F_meanPR": tb_pr["F"].tolist()}
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
            report.oracle["maxF_meanPR"] = float(np.max(tb_pr["F"]))
            report.extra["oracle_tau"]["maxF"] = round(best_index(tb["F"]) / 255, 4)
            report.extra["oracle_tau"]["maxF_meanPR"] = round(best_index(tb_pr["F"]) / 255, 4)
            report.threshold_free["meanF"] = float(np.mean(tb["F"]))
            report.threshold_free["MAE"] = masks.mae(ev)
            report.threshold_free.update(masks.at_half(ev))
            report.extra["yardsticks"] = YARDSTICKS
        report.threshold_free["PxAP"] = masks.pxap(ev)
        if protocol.mode == "calibrated":
            cm, cf = masks.iou_curves(cal), masks.f_curve(cal)
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
                report.at_tau.update({"mIoU": fm["mIoU"][0], "dsIoU": fm["dsIoU"][0], "F": masks_tau.f_curve(ev)[0]})
    if protocol.mode == "fixed":
        chosen = {k: protocol.threshold for k in report.at_tau}
    report.extra["tau"] = chosen
    return report


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


def format_table(report: Report, out=None) -> str:
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
    if d.get("yardsticks"):
        lines.append("")
        lines += [f"{k}: {v}" for k, v in d["yardsticks"].items()]
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
            where = f"all in {out}" if out is not None else "pass --out FILE to list them all"
            lines.append(f"... and {len(report.failed) - 10} more ({where})")
    return "\n".join(lines)
