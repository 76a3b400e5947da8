"""The fast bilateral solver (Barron & Poole, ECCV 2016) as TokenCut uses it to snap a mask to image edges:
a reimplementation from TokenCut's public unsupervised_saliency_detection/bilateral_solver.py (its sigmas 16 / 16 / 8
and solver parameters), on scipy.sparse."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import ndimage
from scipy.sparse.linalg import cg

__all__ = ["bilateral_solve", "BilateralOutput", "bilateral_solver_output"]


# RGB -> YUV (JPEG YCbCr), the colour space of the bilateral grid
_RGB_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YUV_OFFSET = np.array([0.0, 128.0, 128.0])


class _BilateralGrid:
    """A sparse bilateral grid: pixels splatted (S, vertices x pixels) onto the occupied cells of an (x, y, Y, U, V)
    lattice with cells of sigma_spatial x sigma_spatial x sigma_luma x sigma_chroma x sigma_chroma; `blur` is the
    [1 2 1] kernel along each of the 5 axes over occupied neighbours."""

    def __init__(self, image: np.ndarray, sigma_spatial: float, sigma_luma: float, sigma_chroma: float):
        h, w = image.shape[:2]
        yuv = image.astype(np.float64) @ _RGB_TO_YUV.T + _YUV_OFFSET
        yy, xx = np.mgrid[:h, :w]
        coords = np.stack([(xx / sigma_spatial).astype(np.int64), (yy / sigma_spatial).astype(np.int64),
                           (yuv[..., 0] / sigma_luma).astype(np.int64), (yuv[..., 1] / sigma_chroma).astype(np.int64),
                           (yuv[..., 2] / sigma_chroma).astype(np.int64)], axis=-1).reshape(-1, 5)
        coords -= coords.min(axis=0)
        shape = tuple(int(s) + 3 for s in coords.max(axis=0))  # +1 margin on each side for the neighbours

        def key(c):
            return np.ravel_multi_index(tuple((c + 1).T), shape)

        keys, inverse = np.unique(key(coords), return_inverse=True)
        inverse = inverse.ravel()
        self.npixels, self.nvertices = h * w, len(keys)
        self.S = sp.csr_matrix((np.ones(self.npixels), (inverse, np.arange(self.npixels))),
                               shape=(self.nvertices, self.npixels))
        one_pixel = np.zeros(self.nvertices, dtype=np.int64)
        one_pixel[inverse] = np.arange(self.npixels)  # any pixel of a vertex has the vertex's coordinates
        vertex_coords = coords[one_pixel]
        blur = sp.identity(self.nvertices, format="csr") * (2.0 * coords.shape[1])
        for dim in range(coords.shape[1]):
            for step in (-1, 1):
                nb = vertex_coords.copy()
                nb[:, dim] += step
                nkey = key(nb)
                loc = np.clip(np.searchsorted(keys, nkey), 0, len(keys) - 1)
                ok = np.flatnonzero(keys[loc] == nkey)
                blur = blur + sp.csr_matrix((np.ones(len(ok)), (ok, loc[ok])), shape=(self.nvertices,) * 2)
        self.B = blur.tocsr()

    def splat(self, x: np.ndarray) -> np.ndarray:
        return self.S @ x

    def slice(self, y: np.ndarray) -> np.ndarray:
        return self.S.T @ y

    def bistochastize(self, iterations: int = 10) -> tuple[sp.dia_matrix, sp.dia_matrix]:
        """Diagonal Dn, Dm with Dn B Dn 1 = Dm 1 = splat(1), so the normalised blur has unit row sums (10 rounds of
        the paper's fixed point, then m recomputed from n, as TokenCut)."""
        m = self.splat(np.ones(self.npixels))
        n = np.ones(self.nvertices)
        for _ in range(iterations):
            n = np.sqrt(n * m / (self.B @ n))
        m = n * (self.B @ n)
        return sp.diags(n), sp.diags(m)


def bilateral_solve(image: np.ndarray, target: np.ndarray, confidence: np.ndarray, sigma_spatial: float = 16,
                    sigma_luma: float = 16, sigma_chroma: float = 8, lam: float = 256, a_diag_min: float = 1e-5,
                    cg_tol: float = 1e-5, cg_maxiter: int = 25) -> np.ndarray:
    """The fast bilateral solver: y minimising lam * smoothness in bilateral space + sum confidence * (y - target)^2,
    solved on the grid by conjugate gradient with a Jacobi preconditioner from the flat initialisation
    splat(c t) / splat(c); returns the sliced solution (H, W). `image` is uint8 RGB (H, W, 3). Defaults: TokenCut's
    get_saliency.py sigmas and bilateral_solver.py's lam=256, A_diag_min=1e-5, cg tol 1e-5 (relative), 25 steps."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB; got {image.shape}")
    h, w = image.shape[:2]
    t = np.asarray(target, dtype=np.float64)
    c = np.asarray(confidence, dtype=np.float64)
    if t.shape != (h, w) or c.shape != (h, w):
        raise ValueError(f"target {t.shape} and confidence {c.shape} must be the image's size {(h, w)}")
    grid = _BilateralGrid(image, sigma_spatial, sigma_luma, sigma_chroma)
    dn, dm = grid.bistochastize()
    c_splat = grid.splat(c.ravel())
    a = lam * (dm - dn @ grid.B @ dn) + sp.diags(c_splat)
    b = grid.splat((c * t).ravel())
    precond = sp.diags(1.0 / np.maximum(a.diagonal(), a_diag_min))
    with np.errstate(divide="ignore", invalid="ignore"):
        y0 = np.where(c_splat > 0, b / c_splat, 0.0)
    y, _ = cg(a.tocsr(), b, x0=y0, M=precond, maxiter=cg_maxiter, rtol=cg_tol)
    return grid.slice(y).reshape(h, w)


@dataclass
class BilateralOutput:
    """TokenCut's bilateral post-processing: `soft` the solver's output (what TokenCut scores as
    "TokenCut + bilateral solver"), `binary` its cleaned mask, `accepted` whether that mask's IoU with the input
    mask is >= 0.5 (TokenCut blanks the binary mask otherwise: `binary` is then all False)."""

    soft: np.ndarray
    binary: np.ndarray
    accepted: bool


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def bilateral_solver_output(image: np.ndarray, mask: np.ndarray, sigma_spatial: float = 16, sigma_luma: float = 16,
                            sigma_chroma: float = 8, **params) -> BilateralOutput:
    """TokenCut's refinement of an image-size mask: solve with the mask as target and confidence 0.999 everywhere;
    binary = holes filled in (soft > 0.5), then its largest connected component (all True when there is none, as
    TokenCut); the binary mask is kept only if its IoU with the input (> 0.5) is at least 0.5.

    One deviation: TokenCut picks `argsort(component sizes incl. background)[-2]`, which is the background itself
    when the object is larger than the background; here it is always the largest foreground component.
    """
    mask = np.asarray(mask, dtype=np.float64)
    soft = bilateral_solve(image, mask, np.full(mask.shape, 0.999), sigma_spatial, sigma_luma, sigma_chroma, **params)
    filled = ndimage.binary_fill_holes(soft > 0.5)
    labels, count = ndimage.label(filled)
    if count == 0:
        binary = np.ones(mask.shape, dtype=bool)
    else:
        sizes = np.bincount(labels.ravel())[1:]
        binary = labels == 1 + int(np.argmax(sizes))
    accepted = _iou(mask > 0.5, binary) >= 0.5
    return BilateralOutput(soft, binary if accepted else np.zeros(mask.shape, dtype=bool), accepted)
