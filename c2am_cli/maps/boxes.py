"""Activation map -> boxes, exactly as clovaai/wsolevaluation mines them (uint8 map, tau * max, OpenCV contours)."""
from __future__ import annotations

import cv2
import numpy as np


def normalize_map(scoremap: np.ndarray) -> np.ndarray:
    """Per-image min-max normalisation to [0, 1]; a constant map becomes all zeros; NaN becomes 0."""
    m = np.nan_to_num(np.asarray(scoremap, dtype=np.float32))
    lo, hi = float(m.min()), float(m.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def binarize(scoremap: np.ndarray, threshold: float) -> np.ndarray:
    """uint8(map * 255) > int(tau * max(uint8 map)), the wsolevaluation rule, as a uint8 0/255 image."""
    u8 = (np.asarray(scoremap, dtype=np.float32) * 255).astype(np.uint8)
    _, binary = cv2.threshold(u8, int(threshold * np.max(u8)), 255, cv2.THRESH_BINARY)
    return binary


def contour_boxes(binary: np.ndarray, all_contours: bool = False) -> list[list[int]]:
    """Bounding rectangles [x1, y1, x2, y2] of the largest contour (or of every contour); x2, y2 clipped to W-1, H-1."""
    h, w = binary.shape
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return [[0, 0, 0, 0]]
    if not all_contours:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        boxes.append([int(x), int(y), int(min(x + bw, w - 1)), int(min(y + bh, h - 1))])
    return boxes


def boxes_from_map(scoremap: np.ndarray, threshold: float, all_contours: bool = False) -> tuple[list[list[int]], list[float]]:
    """Boxes in the map's pixel grid and a score per box (the mean normalised activation inside it).

    With several boxes, they come sorted by score, best first.
    """
    norm = normalize_map(scoremap)
    boxes = contour_boxes(binarize(norm, threshold), all_contours)
    scores = [float(norm[y1:y2 + 1, x1:x2 + 1].mean()) for x1, y1, x2, y2 in boxes]
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    return [boxes[i] for i in order], [round(scores[i], 4) for i in order]


def scale_boxes(boxes: list[list[int]], from_size: tuple[int, int], to_size: tuple[int, int]) -> list[list[int]]:
    """Rescale [x1, y1, x2, y2] from one (width, height) grid to another, clipped to the target."""
    (fw, fh), (tw, th) = from_size, to_size
    sx, sy = tw / fw, th / fh
    out = []
    for x1, y1, x2, y2 in boxes:
        out.append([int(min(round(x1 * sx), tw - 1)), int(min(round(y1 * sy), th - 1)),
                    int(min(round((x2 + 1) * sx) - 1, tw - 1)), int(min(round((y2 + 1) * sy) - 1, th - 1))])
    return out
