"""Guided filter and dense CRF: the properties that define them, checked on maps whose answer is known."""
import sys

import numpy as np
import pytest
import torch

from c2am_cli.maps import edges
from c2am_cli.maps.boxes import normalize_map
from c2am_cli.config import ModelConfig
from c2am_cli.maps.edges import crf_probability, full_size_map, guided_filter, refine_full_map, refine_map


def test_flat_guide_gives_the_box_mean_of_the_box_mean():
    # with a constant guide, a = 0 and b = mean(p): the output is mean(mean(p)), flat for a flat map
    p = np.full((20, 30), 0.25, np.float32)
    out = guided_filter(np.full((20, 30, 3), 128, np.uint8), p, radius=3)
    assert np.allclose(out, 0.25, atol=1e-5)


def test_map_equal_to_its_guide_is_kept_with_small_eps():
    # p = I is exactly linear in I: a = var / (var + eps) -> 1, so the output is the guide itself
    g = np.zeros((40, 40), np.float32)
    g[10:30, 12:28] = 1.0
    out = guided_filter(g, g, radius=4, eps=1e-6)
    assert np.abs(out - g).max() < 1e-2


def _best_iou(m, truth):
    return max(((m > t) & truth).sum() / ((m > t) | truth).sum() for t in np.linspace(0.01, 0.99, 99))


def test_blurred_map_snaps_to_the_guide_edges():
    img = np.zeros((80, 80, 3), np.uint8)
    img[20:60, 20:60] = 200  # a square object on a flat background
    truth = img[..., 0] > 0
    yy, xx = np.mgrid[0:80, 0:80]
    blob = np.exp(-(((yy - 40) / 22.0) ** 2 + ((xx - 40) / 22.0) ** 2) * 2).astype(np.float32)  # a soft round map
    # thresholded, the round map is a disc: its best IoU with the square is 0.836; filtered, it takes the square's edges
    assert _best_iou(blob, truth) < 0.85
    refined = refine_map(img, blob, radius=0.1, eps=1e-3)
    assert _best_iou(refined, truth) > 0.99
    assert refined.min() >= 0 and refined.max() <= 1


def test_full_size_map_resizes_and_refines_only_when_asked():
    m = torch.rand(14, 14)
    plain = full_size_map(m, (50, 40))
    assert plain.shape == (40, 50) and plain.dtype == np.float32
    img = np.random.default_rng(0).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    assert np.array_equal(full_size_map(m, (50, 40), img, ModelConfig(edge_radius=0.0)), plain)
    assert not np.allclose(full_size_map(m, (50, 40), img, ModelConfig(edge_radius=0.1)), plain)


def _square_scene(n=80, seed=0):
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(40, 8, (n, n, 3)), 0, 255)
    img[n // 4:3 * n // 4, n // 4:3 * n // 4] = np.clip(rng.normal(200, 8, (n // 2, n // 2, 3)), 0, 255)
    truth = np.zeros((n, n), bool)
    truth[n // 4:3 * n // 4, n // 4:3 * n // 4] = True
    yy, xx = np.mgrid[0:n, 0:n]
    c, r = n / 2, n / 3.2
    blob = 1 / (1 + np.exp(((yy - c) ** 2 + (xx - c) ** 2) ** 0.5 / 4 - r / 4))  # a soft disc, P = 0.5 at radius r
    return img.astype(np.uint8), truth, blob.astype(np.float32)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("max_side", [512, 48])  # at image size, and on a downscaled copy brought back
def test_dense_crf_snaps_a_soft_disc_to_the_square_object(monkeypatch, max_side):
    pytest.importorskip("pydensecrf.densecrf", reason="the crf extra (pydensecrf2) is not installed")
    monkeypatch.setattr(edges, "CRF_MAX_SIDE", max_side)
    img, truth, blob = _square_scene()
    before = _iou(blob > 0.5, truth)
    out = crf_probability(img, blob, iterations=5)
    assert out.shape == blob.shape and 0 <= out.min() and out.max() <= 1
    assert before < 0.85  # disc vs square
    assert _iou(out > 0.5, truth) > 0.95


def test_refine_full_map_normalises_then_calibrates():
    full = np.array([[0.2, 0.4], [0.6, 1.0]], np.float32)  # min-max normalised: 0, 0.25, 0.5, 1
    same = refine_full_map(full, None, ModelConfig(calibration=(0.0, 1.0)))
    assert np.allclose(same, normalize_map(full))
    # knots (0, 0, 1): 0 below 0.5, then linear to 1
    out = refine_full_map(full, None, ModelConfig(calibration=(0.0, 0.0, 1.0)))
    assert np.allclose(out, [[0, 0], [0, 1]], atol=1e-6)
    # uncalibrated weights keep their raw values
    assert np.allclose(refine_full_map(full, None, ModelConfig()), full)


def test_missing_crf_package_warns_once_and_keeps_the_calibrated_map(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    img, _, blob = _square_scene(40)
    cfg = ModelConfig(calibration=(0.0, 1.0), crf_iterations=5)
    with pytest.warns(UserWarning, match=r"not CRF-refined: .*pip install 'c2am\[crf\]'"):
        out = refine_full_map(blob, img, cfg)
    assert np.allclose(out, normalize_map(blob))
