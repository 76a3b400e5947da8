"""Guided filter: the properties that define it, checked on maps whose answer is known."""
import numpy as np
import torch

from c2am_cli.edges import full_size_map, guided_filter, refine_map


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
    assert np.array_equal(full_size_map(m, (50, 40), img, radius=0.0), plain)
    assert not np.allclose(full_size_map(m, (50, 40), img, radius=0.1), plain)
