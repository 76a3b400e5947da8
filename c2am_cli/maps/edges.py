"""Edge-aware refinement of activation maps at image size: a guided filter (He et al., 2010) and a fully connected
CRF (Kraehenbuehl and Koltun, 2011) with the photo as guide.

Maps come from stride-16 features, so their edges are blurred; the guided filter snaps them to the object's edges,
the calibration (calibration.py) turns them into foreground probabilities, and the dense CRF makes those agree with
colour and position. Used for maps written at image size, masks and mask-derived boxes, never for training."""
from __future__ import annotations

import warnings

import cv2
import numpy as np

from ..runtime.errors import C2AMError
from .boxes import normalize_map
from .calibration import apply_calibration

CRF_MAX_SIDE = 512  # the dense CRF runs at most at this size (long side); its cost grows with the pixel count


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


def require_crf(option: str) -> None:
    """A C2AMError naming `option` unless pydensecrf2 imports: checked before any work, not at the first image."""
    try:
        import pydensecrf.densecrf  # noqa: F401
        import pydensecrf.utils  # noqa: F401
    except ImportError:
        raise C2AMError(f"{option} needs pydensecrf2: pip install 'c2am[crf]' (it builds with a C++ compiler)") from None


def dense_crf(image, unary: np.ndarray, iterations: int, bilateral=(60.0, 10.0, 5.0), gaussian=(3.0, 3.0)) -> np.ndarray:
    """Mean-field inference of a 2-label dense CRF (pydensecrf2) over an RGB uint8 image (H, W, 3) from negative
    log-probabilities `unary` (2, H, W: background, foreground); returns the marginals (2, H, W)."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise ImportError("the dense CRF needs pydensecrf2: pip install 'c2am[crf]' (it builds with a C++ compiler)") from None
    _, h, w = unary.shape
    rgb = np.array(image, dtype=np.uint8, order="C")
    if rgb.shape[:2] != (h, w):
        raise ValueError(f"dense CRF: image {rgb.shape[1]}x{rgb.shape[0]} and unary {w}x{h} differ in size")
    d = dcrf.DenseCRF2D(w, h, 2)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(2, -1), dtype=np.float32))
    d.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1])
    sxy, srgb, compat = bilateral
    d.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=rgb, compat=compat)
    return np.asarray(d.inference(int(iterations)), dtype=np.float32).reshape(2, h, w)


def crf_probability(image, prob: np.ndarray, iterations: int, bilateral=(60.0, 10.0, 5.0)) -> np.ndarray:
    """A foreground probability map (H, W) made to agree with the image's colours and positions by a dense CRF,
    run at most at CRF_MAX_SIDE (long side) and brought back to (H, W)."""
    h, w = prob.shape
    rgb = np.asarray(image, dtype=np.uint8)
    scale = min(1.0, CRF_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    p = cv2.resize(prob, size, interpolation=cv2.INTER_LINEAR) if scale < 1 else prob
    if rgb.shape[:2] != (size[1], size[0]):
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    p = np.clip(p, 1e-3, 1 - 1e-3).astype(np.float32)
    fg = dense_crf(rgb, -np.log(np.stack([1 - p, p])), iterations, bilateral)[1]
    return cv2.resize(fg, (w, h), interpolation=cv2.INTER_LINEAR) if scale < 1 else fg


def uses_image(config) -> bool:
    """Whether refine_full_map needs the photo (guided filter or dense CRF), so callers decode it only then."""
    return config.edge_radius > 0 or (bool(config.calibration) and config.crf_iterations > 0)


def refine_full_map(full: np.ndarray, image, config, crf: bool = True) -> np.ndarray:
    """An activation map at image size through the stored refinement: min-max normalised (when calibrated),
    guided-filtered, calibrated to foreground probabilities, and dense-CRF-refined, each where the config says.
    Without pydensecrf2 the map stays calibrated and a warning says so (once: Python's default warning filter)."""
    calibrated = bool(config.calibration)
    if calibrated:
        full = normalize_map(full)
    if config.edge_radius > 0 and image is not None:
        full = refine_map(image, full, config.edge_radius, config.edge_eps)
    if calibrated:
        full = apply_calibration(full, config.calibration)
        if crf and config.crf_iterations > 0 and image is not None:
            try:
                full = crf_probability(image, full, config.crf_iterations, config.crf_bilateral)
            except ImportError as e:
                warnings.warn(f"maps are not CRF-refined: {e}", stacklevel=2)
    return np.clip(full, 0.0, 1.0).astype(np.float32)


def full_size_map(scoremap, size: tuple[int, int], image=None, config=None, crf: bool = True) -> np.ndarray:
    """A model-resolution map (torch, H' x W') brought to the image's (width, height) and, given the model's config
    and the image, refined as the config says (refine_full_map)."""
    import torch.nn.functional as F

    w, h = size
    full = F.interpolate(scoremap[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    full = full.clamp(0, 1).cpu().numpy()
    return full if config is None else refine_full_map(full, image, config, crf)
