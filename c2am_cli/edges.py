"""Edge-aware refinement of activation maps: a guided filter (He et al., 2010) with the image as guide.

Maps come from stride-16 features, so their edges are blurred; filtering them with the photo as guide snaps
them to the object's edges. Used for maps written at image size and for masks, never for training."""
from __future__ import annotations

import cv2
import numpy as np


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float = 1e-3) -> np.ndarray:
    """Fast guided filter of a float map `src` (H, W) by an RGB or gray `guide` (H, W[, 3]) in [0, 255] or [0, 1].

    The colour guided filter: per window, src ~ a . I + b with a regularised by eps; output in the map's range.
    """
    g = np.asarray(guide, dtype=np.float32)
    if g.max() > 1.5:
        g = g / 255.0
    p = np.asarray(src, dtype=np.float32)
    ksize = (2 * radius + 1, 2 * radius + 1)

    def mean(x):
        return cv2.boxFilter(x, -1, ksize, borderType=cv2.BORDER_REFLECT)

    if g.ndim == 2:
        mi, mp = mean(g), mean(p)
        a = (mean(g * p) - mi * mp) / (mean(g * g) - mi * mi + eps)
        b = mp - a * mi
        return mean(a) * g + mean(b)
    mi = [mean(g[..., c]) for c in range(3)]
    mp = mean(p)
    cov_ip = np.stack([mean(g[..., c] * p) - mi[c] * mp for c in range(3)], -1)  # (H, W, 3)
    var = np.empty(g.shape[:2] + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            v = mean(g[..., i] * g[..., j]) - mi[i] * mi[j]
            var[..., i, j] = var[..., j, i] = v
    var += eps * np.eye(3, dtype=np.float32)
    a = np.linalg.solve(var, cov_ip[..., None])[..., 0]  # (H, W, 3)
    b = mp - (a * np.stack(mi, -1)).sum(-1)
    return (np.stack([mean(a[..., c]) for c in range(3)], -1) * g).sum(-1) + mean(b)


def refine_map(image, scoremap: np.ndarray, radius: float, eps: float = 1e-2) -> np.ndarray:
    """Guided-filter a map at the image's size (radius as a share of the shorter side); result clipped to [0, 1]."""
    r = max(1, round(radius * min(scoremap.shape)))
    return np.clip(guided_filter(np.asarray(image), scoremap, r, eps), 0.0, 1.0)


def full_size_map(scoremap, size: tuple[int, int], image=None, radius: float = 0.0, eps: float = 1e-2) -> np.ndarray:
    """A model-resolution map (torch, H' x W') brought to the image's (width, height), edge-refined when radius > 0."""
    import torch.nn.functional as F

    w, h = size
    full = F.interpolate(scoremap[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    full = full.clamp(0, 1).cpu().numpy()
    if radius > 0 and image is not None:
        full = refine_map(image, full, radius, eps)
    return full
