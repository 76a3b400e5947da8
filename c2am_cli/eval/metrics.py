"""Box, mask and semantic-segmentation metrics, defined exactly as clovaai/wsolevaluation, the saliency papers
(TokenCut, SelfMask, FOUND and pysodmetrics for maxF; the SOD benchmark toolbox for maxF_meanPR) and the PASCAL VOC
convention define them; every threshold sweep is vectorised over all thresholds at once.

Accumulators keep per-image curves, so that a threshold can be chosen on some images (calibration) and the metrics
reported on the others. Nothing here reads files or runs a model.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..maps.boxes import contour_boxes

RESIZE = 224  # wsolevaluation squashes every image to 224 x 224 for its box metrics
PXAP_INTERVAL = 0.001  # PxAP's score bins: wsolevaluation's evaluate_wsol default (cam_curve_interval=.001)
IOU_THRESHOLDS = (30, 50, 70)  # MaxBoxAccV2's deltas, in percent
FBETA2 = 0.3  # beta^2 of the saliency F-measure
MASK_THRESHOLD = 0.5  # TokenCut's IoU and accuracy binarise a probability map at 0.5


def cam_thresholds(interval: float = 0.01) -> np.ndarray:
    """wsolevaluation's tau grid: 0, d, 2d, ..., 1 - d (its CLI uses d = 0.01, its API 0.001)."""
    if not 0 < interval < 1:
        raise ValueError(f"threshold interval {interval}: must be in (0, 1)")
    return np.arange(0, 1, interval, dtype=np.float64)


# -- boxes ------------------------------------------------------------------------------------------------------


def box_iou(a, b) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of [x1, y1, x2, y2] boxes counting pixels inclusively (+1 on each side length);
    a degenerate pair (union <= 0) scores 0, as in wsolevaluation's calculate_multiple_iou."""
    a = np.asarray(a, dtype=np.int64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, dtype=np.int64).reshape(-1, 4)[None, :, :]
    iw = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return iou


def resize_box(box, image_size: tuple[int, int], resize_size: tuple[int, int] = (RESIZE, RESIZE)) -> list[int]:
    """wsolevaluation's resize_bbox: every corner scaled by new/old size and truncated to int (no +1 handling)."""
    (w, h), (nw, nh) = image_size, resize_size
    x1, y1, x2, y2 = (float(v) for v in box)
    return [int(x1 * nw / w), int(y1 * nh / h), int(x2 * nw / w), int(y2 * nh / h)]


def binarize_sweep(scoremap: np.ndarray, thresholds) -> np.ndarray:
    """(T, H, W) boolean foregrounds, one per tau: uint8(map * 255) > int(tau * max(uint8 map)).

    Equal, threshold by threshold, to c2am_cli.boxes.binarize (tested), in one numpy expression.
    """
    u8 = (np.asarray(scoremap, dtype=np.float32) * 255).astype(np.uint8)
    return u8[None] > _levels(u8, thresholds)[:, None, None]


def _levels(u8: np.ndarray, thresholds) -> np.ndarray:
    return (np.asarray(thresholds, dtype=np.float64) * int(u8.max())).astype(np.int64)


@dataclass
class BoxSweep:
    """Boxes mined from one map at every tau: `largest` (T, 4), the largest contour's box (MaxBoxAcc, V1), and
    `every[k]`, an (n, 4) array of every contour's box at the k-th distinct binary map, `index[t]` = k."""

    largest: np.ndarray
    every: list[np.ndarray]
    index: np.ndarray


def sweep_boxes(scoremap: np.ndarray, thresholds) -> BoxSweep:
    """wsolevaluation's box mining (uint8 map, tau * max, OpenCV RETR_TREE contours, x2/y2 clipped) at every tau.

    `scoremap` is used as given (normalise it first, e.g. with boxes.normalize_map). Thresholds that give the same
    binary map share one contour search, and contours are searched in the foreground's bounding window (plus a
    one-pixel margin, so OpenCV sees the same neighbourhood and the W-1 / H-1 clipping is unchanged).
    """
    u8 = (np.asarray(scoremap, dtype=np.float32) * 255).astype(np.uint8)
    h, w = u8.shape
    levels = _levels(u8, thresholds)
    hist = np.bincount(u8.ravel(), minlength=256)
    above = hist.sum() - np.cumsum(hist)  # above[l] = number of pixels with value > l
    counts = above[levels]
    # equal counts <=> equal binary maps (the foregrounds are nested)
    _, first, index = np.unique(counts, return_index=True, return_inverse=True)
    lv = levels[first][:, None]
    rows, cols = u8.max(axis=1)[None] > lv, u8.max(axis=0)[None] > lv  # (K, H), (K, W): rows/cols with foreground
    top, bottom = rows.argmax(1), h - 1 - rows[:, ::-1].argmax(1)
    left, right = cols.argmax(1), w - 1 - cols[:, ::-1].argmax(1)
    largest_k, every = [], []
    for k, t in enumerate(first):
        if counts[t] == 0:
            every.append(np.zeros((1, 4), dtype=np.int64))
            largest_k.append([0, 0, 0, 0])
            continue
        y0, y1 = max(top[k] - 1, 0), min(bottom[k] + 2, h)
        x0, x1 = max(left[k] - 1, 0), min(right[k] + 2, w)
        window = cv2.threshold(u8[y0:y1, x0:x1], int(levels[t]), 255, cv2.THRESH_BINARY)[1]
        boxes = contour_boxes(window, all_contours=True)
        big = boxes[0] if len(boxes) == 1 else contour_boxes(window, all_contours=False)[0]
        offset = np.array([x0, y0, x0, y0])
        every.append(np.asarray(boxes, dtype=np.int64) + offset)
        largest_k.append(list(np.asarray(big) + offset))
    largest = np.asarray(largest_k, dtype=np.int64)[index]
    return BoxSweep(largest, every, index)


class BoxAccumulator:
    """Per-image best IoU at every tau: largest box (MaxBoxAcc), every box (MaxBoxAccV2), both on the map squashed
    to 224 x 224 against the rescaled boxes; and (CorLoc) the largest box of the map at the image's own size
    against the original boxes, when that map is given."""

    def __init__(self, thresholds=None, resize: int = RESIZE):
        self.thresholds = cam_thresholds() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        self.resize = resize
        self.iou_v1: list[np.ndarray] = []
        self.iou_v2: list[np.ndarray] = []
        self.iou_orig: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.iou_v1)

    def add(self, scoremap: np.ndarray, gt_boxes, image_size: tuple[int, int] | None = None,
            full_map: np.ndarray | None = None) -> None:
        """One normalised map at resize x resize; `gt_boxes` in original pixels of an image of `image_size`
        (width, height; default: the map's grid). `full_map`, the same map at the image's size, adds CorLoc."""
        s = self.resize
        if scoremap.shape != (s, s):
            raise ValueError(f"box metrics need {s}x{s} maps, got {scoremap.shape}")
        size = tuple(image_size) if image_size is not None else (s, s)
        gt = np.asarray(gt_boxes, dtype=np.int64).reshape(-1, 4)
        gt_small = np.asarray([resize_box(b, size, (s, s)) for b in gt], dtype=np.int64).reshape(-1, 4)
        if full_map is not None and full_map.shape != (size[1], size[0]):
            raise ValueError(f"CorLoc needs the map at the image size {size}, got {full_map.shape[::-1]}")
        T = len(self.thresholds)
        if len(gt) == 0:  # nothing to find: every prediction is wrong
            zero = np.zeros(T)
            self.iou_v1.append(zero), self.iou_v2.append(zero)
            self.iou_orig.append(zero if full_map is not None else None)
            return
        sw = sweep_boxes(scoremap, self.thresholds)
        self.iou_v1.append(box_iou(sw.largest, gt_small).max(axis=1))
        every = np.concatenate(sw.every)
        ends = np.cumsum([len(e) for e in sw.every])
        best = box_iou(every, gt_small).max(axis=1)
        self.iou_v2.append(np.maximum.reduceat(best, np.r_[0, ends[:-1]])[sw.index])
        if full_map is None:
            self.iou_orig.append(None)
        else:
            self.iou_orig.append(box_iou(sweep_boxes(full_map, self.thresholds).largest, gt).max(axis=1))

    def curves(self, idx=None) -> dict[str, np.ndarray]:
        """Accuracy (%) at every tau: BoxAcc@50 (largest box), BoxAccV2@30/50/70 (every box), and CorLoc where
        every image came with its full-size map."""
        v1, v2 = _rows(self.iou_v1, idx), _rows(self.iou_v2, idx)
        out = {"BoxAcc@50": _acc(v1, 0.5)}
        for d in IOU_THRESHOLDS:
            out[f"BoxAccV2@{d}"] = _acc(v2, d / 100)
        if self.iou_orig and all(r is not None for r in self.iou_orig):
            out["CorLoc"] = _acc(_rows(self.iou_orig, idx), 0.5)
        return out

    def correct(self, tau_index: int, idx=None, which: str = "v1", delta: float = 0.5) -> np.ndarray:
        """Per-image correctness at one tau (for Top-1 / Top-5 Loc)."""
        arr = _rows({"v1": self.iou_v1, "v2": self.iou_v2, "orig": self.iou_orig}[which], idx)
        return arr[:, tau_index] >= delta


def _rows(rows: list[np.ndarray], idx) -> np.ndarray:
    arr = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    return arr if idx is None else arr[np.asarray(idx, dtype=np.int64)]


def _acc(iou: np.ndarray, delta: float) -> np.ndarray:
    if len(iou) == 0:
        return np.full(iou.shape[1], np.nan)
    return (iou >= delta).mean(axis=0) * 100.0


def max_box_acc(curves: dict[str, np.ndarray]) -> dict[str, float]:
    """MaxBoxAcc (largest contour, IoU 0.5) and MaxBoxAccV2 (every contour, mean over IoU 30/50/70 of the max over
    tau chosen per delta), as wsolevaluation's BoxEvaluator.compute()."""
    out = {"MaxBoxAcc": float(np.max(curves["BoxAcc@50"]))}
    v2 = [float(np.max(curves[f"BoxAccV2@{d}"])) for d in IOU_THRESHOLDS]
    out["MaxBoxAccV2"] = float(np.mean(v2))
    out.update({f"MaxBoxAccV2@{d}": v for d, v in zip(IOU_THRESHOLDS, v2)})
    return out


def topk_loc(correct_box: np.ndarray, labels, predictions, k: int) -> float:
    """Top-k Loc (%): the true class is among the first k predicted classes AND the box is correct."""
    hit = np.array([lab is not None and lab in list(p)[:k] for lab, p in zip(labels, predictions)], dtype=bool)
    return float((hit & np.asarray(correct_box, dtype=bool)).mean() * 100.0) if len(hit) else float("nan")


# -- foreground masks -------------------------------------------------------------------------------------------


class MaskAccumulator:
    """Per-image statistics of a map against a binary mask (0 background, 1 foreground, 255 ignore), from which
    IoU at every tau, the F-measure curves, MAE, TokenCut's IoU and accuracy at 0.5 and wsolevaluation's PxAP follow
    for any image subset.

    Binarisation at tau is the box rule, uint8(map * 255) > int(tau * max), so one tau means one foreground for
    boxes and masks. The F-measure sees map / max at 256 thresholds k/255 (pixel >= k/255) with precision and recall
    per image (0/0 -> 0, beta^2 = 0.3); `fmeasure_curve` averages either each image's F-beta (maxF, the yardstick of
    TokenCut, SelfMask, FOUND and pysodmetrics) or its precision and recall (maxF_meanPR, the SOD toolbox's).
    """

    def __init__(self, thresholds=None, pxap_interval: float = PXAP_INTERVAL):
        self.thresholds = cam_thresholds() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        self.edges = np.append(cam_thresholds(pxap_interval), [1.0, 2.0, 3.0])  # wsolevaluation MaskEvaluator bins
        self._fg, self._bg, self._max = [], [], []  # 256-bin histograms of uint8(map*255), and max(uint8 map)
        self._ffg, self._fbg = [], []  # the same for uint8(map / max * 255): the toolbox's F-measure view
        self._pfg, self._pbg = [], []  # PxAP histograms over self.edges
        self._mae = []
        self._half = []  # TP, FP, FN, TN of map > 0.5 (TokenCut's IoU and accuracy)

    def __len__(self) -> int:
        return len(self._mae)

    def add(self, scoremap: np.ndarray, mask: np.ndarray) -> None:
        m = np.asarray(scoremap, dtype=np.float32)
        if m.shape != mask.shape:
            raise ValueError(f"map {m.shape} and mask {mask.shape} differ in size")
        fg, valid = mask == 1, mask != 255
        bg = valid & ~fg
        u8 = (m * 255).astype(np.uint8)
        self._fg.append(np.bincount(u8[fg], minlength=256))
        self._bg.append(np.bincount(u8[bg], minlength=256))
        self._max.append(int(u8.max()))
        top = float(m.max())
        if top == 1.0:
            f8 = u8
        elif top > 0:
            f8 = (m / top * 255).astype(np.uint8)
        else:
            f8 = np.zeros_like(u8)
        self._ffg.append(np.bincount(f8[fg], minlength=256))
        self._fbg.append(np.bincount(f8[bg], minlength=256))
        self._pfg.append(np.histogram(m[fg], bins=self.edges)[0])
        self._pbg.append(np.histogram(m[bg], bins=self.edges)[0])
        half = m > MASK_THRESHOLD
        self._half.append((int((half & fg).sum()), int((half & bg).sum()), int((~half & fg).sum()), int((~half & bg).sum())))
        n = int(valid.sum())
        self._mae.append(float(np.abs(m[valid] - fg[valid]).sum() / n) if n else float("nan"))

    def _confusion(self, idx):
        """TP, FP, FN, TN per image (rows) at every tau (columns)."""
        sel = slice(None) if idx is None else np.asarray(idx, dtype=np.int64)
        fg, bg = np.asarray(self._fg)[sel], np.asarray(self._bg)[sel]
        mx = np.asarray(self._max)[sel]
        levels = (self.thresholds[None, :] * mx[:, None]).astype(np.int64)  # (N, T), as _levels per image
        fg_above = fg.sum(1, keepdims=True) - np.cumsum(fg, axis=1)  # pixels with value > l
        bg_above = bg.sum(1, keepdims=True) - np.cumsum(bg, axis=1)
        tp = np.take_along_axis(fg_above, levels, axis=1)
        fp = np.take_along_axis(bg_above, levels, axis=1)
        fn = fg.sum(1, keepdims=True) - tp
        tn = bg.sum(1, keepdims=True) - fp
        return tp, fp, fn, tn

    def iou_curves(self, idx=None) -> dict[str, np.ndarray]:
        """Per-image mean IoU (an empty union counts 1), dataset IoU of foreground and of background, in %."""
        tp, fp, fn, tn = (a.astype(np.float64) for a in self._confusion(idx))
        union = tp + fp + fn
        per_image = np.where(union > 0, tp / np.where(union > 0, union, 1), 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            fg_iou = tp.sum(0) / union.sum(0)
            bg_iou = tn.sum(0) / (tn + fp + fn).sum(0)
        return {"mIoU": per_image.mean(0) * 100, "dsIoU": fg_iou * 100, "bgIoU": bg_iou * 100,
                "mIoU2": (fg_iou + bg_iou) / 2 * 100}

    def fmeasure_curve(self, idx=None, per_image: bool = True) -> dict[str, np.ndarray]:
        """Precision, recall (averaged over images) and F-beta (%) at thresholds k/255, k = 0..255.

        per_image=True: the mean over images of each image's F-beta (maxF = its max, meanF = its mean; TokenCut's
        metric.py, pysodmetrics' Fmeasure). per_image=False: F-beta of the mean precision and mean recall (the SOD
        toolbox; maxF_meanPR = its max, never lower than maxF).
        """
        sel = slice(None) if idx is None else np.asarray(idx, dtype=np.int64)
        fg, bg = np.asarray(self._ffg, dtype=np.float64)[sel], np.asarray(self._fbg, dtype=np.float64)[sel]
        tp = np.cumsum(fg[:, ::-1], axis=1)[:, ::-1]  # pixels >= k
        fp = np.cumsum(bg[:, ::-1], axis=1)[:, ::-1]
        npos = fg.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.nan_to_num(tp / (tp + fp))
            recall = np.nan_to_num(tp / npos)
        p, r = precision.mean(0), recall.mean(0)
        f = _fbeta(precision, recall).mean(0) if per_image else _fbeta(p, r)
        return {"precision": p * 100, "recall": r * 100, "F": f * 100}

    def f_curve(self, idx=None) -> np.ndarray:
        """F-beta (%) at every tau of the box rule: each image's F-beta, averaged over images (maxF's yardstick at
        one threshold)."""
        tp, fp, fn, _ = (a.astype(np.float64) for a in self._confusion(idx))
        with np.errstate(invalid="ignore", divide="ignore"):
            return _fbeta(np.nan_to_num(tp / (tp + fp)), np.nan_to_num(tp / (tp + fn))).mean(0) * 100

    def at_half(self, idx=None) -> dict[str, float]:
        """TokenCut's IoU and accuracy (%) of map > 0.5, averaged over images (an empty union counts IoU 1)."""
        sel = slice(None) if idx is None else np.asarray(idx, dtype=np.int64)
        tp, fp, fn, tn = np.asarray(self._half, dtype=np.float64).reshape(-1, 4)[sel].T
        union, total = tp + fp + fn, tp + fp + fn + tn
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), 1.0)
        acc = np.where(total > 0, (tp + tn) / np.where(total > 0, total, 1), np.nan)
        return {"IoU@0.5": float(iou.mean() * 100) if len(iou) else float("nan"),
                "Acc@0.5": float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else float("nan")}

    def mae(self, idx=None) -> float:
        vals = np.asarray(self._mae)[slice(None) if idx is None else np.asarray(idx, dtype=np.int64)]
        return float(np.nanmean(vals)) if len(vals) else float("nan")

    def pxap(self, idx=None) -> float:
        """wsolevaluation's PxAP (%): pixel precision-recall over all pixels of all images, AP = sum P * dR."""
        sel = slice(None) if idx is None else np.asarray(idx, dtype=np.int64)
        return pxap_from_histograms(np.asarray(self._pfg)[sel].sum(0), np.asarray(self._pbg)[sel].sum(0))


def _fbeta(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """F-beta (beta^2 = 0.3) of precision and recall in [0, 1]; 0 where both are 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num((1 + FBETA2) * p * r / (FBETA2 * p + r))


def pxap_from_histograms(fg_hist: np.ndarray, bg_hist: np.ndarray) -> float:
    """MaskEvaluator.compute() of wsolevaluation on accumulated score histograms (bins ascending)."""
    tp = np.asarray(fg_hist, dtype=np.float64)[::-1].cumsum()
    fp = np.asarray(bg_hist, dtype=np.float64)[::-1].cumsum()
    fn = tp[-1] - tp
    if tp[-1] <= 0 or ((tp + fp) <= 0).all():
        return float("nan")
    nonzero = (tp + fp) != 0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
    return float((precision[1:] * np.diff(recall))[nonzero[1:]].sum() * 100)


# -- semantic segmentation (VOC) --------------------------------------------------------------------------------


def semantic_confusion(pred: np.ndarray, gt: np.ndarray, n_classes: int = 21, ignore: int = 255) -> np.ndarray:
    """Confusion counts (n_classes, n_classes + 1): rows the true class, columns the predicted class; the last
    column counts pixels predicted as no class (e.g. 255). Pixels whose true label is `ignore` (or not a class)
    are left out. Sum these over a whole set before `miou_from_confusion` (the VOC convention)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    valid = (gt != ignore) & (gt >= 0) & (gt < n_classes)
    p = pred[valid].astype(np.int64)
    p = np.where((p >= 0) & (p < n_classes), p, n_classes)
    idx = gt[valid].astype(np.int64) * (n_classes + 1) + p
    return np.bincount(idx, minlength=n_classes * (n_classes + 1)).reshape(n_classes, n_classes + 1)


@dataclass
class SemanticScores:
    """Per-class IoU, false-positive and false-negative shares of each class's union (IoU + FP + FN = 1),
    and their means over the classes that occur (in the ground truth or the prediction), all in %."""

    iou: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    miou: float
    mean_fp: float
    mean_fn: float

    def as_dict(self, names=None) -> dict:
        names = names or [str(i) for i in range(len(self.iou))]
        per = {n: {"IoU": _num(i), "FP": _num(f), "FN": _num(g)} for n, i, f, g in zip(names, self.iou, self.fp, self.fn)}
        return {"mIoU": self.miou, "FP": self.mean_fp, "FN": self.mean_fn, "per_class": per}


def _num(v) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def miou_from_confusion(conf: np.ndarray) -> SemanticScores:
    """mIoU of a set from its summed confusion ((n, n) or (n, n + 1) with a last 'no class' column).

    A class absent from both ground truth and prediction has no IoU and is left out of the means.
    """
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.shape[0]
    tp = np.diag(conf[:, :n])
    t = conf.sum(1)  # ground-truth pixels per class
    p = conf[:, :n].sum(0)  # predicted pixels per class
    union = t + p - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        fp = np.where(union > 0, (p - tp) / union, np.nan)
        fn = np.where(union > 0, (t - tp) / union, np.nan)
    mean = lambda a: float(np.nanmean(a) * 100) if np.isfinite(a).any() else float("nan")  # noqa: E731
    return SemanticScores(iou * 100, fp * 100, fn * 100, mean(iou), mean(fp), mean(fn))


def foreground_confusion(conf: np.ndarray, background: int = 0) -> np.ndarray:
    """Collapse a semantic confusion into background vs foreground (every other class): a (2, 3) confusion whose
    last column keeps the 'no class' predictions; miou_from_confusion of it gives bgIoU, fgIoU and their mean."""
    conf = np.asarray(conf)
    n = conf.shape[0]
    extra = conf[:, n:].sum(1) if conf.shape[1] > n else np.zeros(n, dtype=conf.dtype)
    fg = [c for c in range(n) if c != background]
    out = np.zeros((2, 3), dtype=conf.dtype)
    for row, classes in ((0, [background]), (1, fg)):
        out[row, 0] = conf[classes][:, background].sum()
        out[row, 1] = conf[classes][:, fg].sum()
        out[row, 2] = extra[classes].sum()
    return out


# -- threshold choice -------------------------------------------------------------------------------------------


def best_index(curve: np.ndarray) -> int:
    """Index of the best tau (the lowest one among ties), ignoring NaN."""
    curve = np.asarray(curve, dtype=np.float64)
    if not np.isfinite(curve).any():
        return 0
    return int(np.nanargmax(curve))


def calibration_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random (calibration, evaluation) partition of range(n), `fraction` of it for calibration."""
    if not 0 < fraction < 1:
        raise ValueError(f"calibration fraction {fraction}: must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    k = min(max(int(round(fraction * n)), 1), n - 1)
    return np.sort(order[:k]), np.sort(order[k:])
