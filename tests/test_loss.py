"""The loss against values computed by hand on three 2-D embeddings (see the comments)."""
import math

import pytest
import torch

from c2am_cli.models.loss import ContrastiveLoss, negative_loss, positive_loss, rank_weights

# f0 = (1, 0), f1 = (0, 1), f2 = (1, 1): cosines 0, 1/sqrt(2), and 1 on the diagonal (clamped to 0.9995)
FG = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
BG = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
HI, LO, MID = -math.log(0.9995), -math.log(0.0005), -math.log(1 / math.sqrt(2))


def test_rank_weights_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.9]])
    a = 0.5
    # row 0: order 0 (r=0), 2 (r=1), 1 (r=2); row 1: order 2, 1, 0
    expected = torch.tensor([[math.exp(a), math.exp(-a), 1.0], [math.exp(-a), 1.0, math.exp(a)]])
    assert torch.allclose(rank_weights(sim, a), expected)


@pytest.mark.parametrize("alpha", [0.05, 0.5, 0.75])
def test_positive_term_by_hand(alpha):
    e = math.exp
    row0 = e(alpha) * HI + MID + e(-alpha) * LO  # f0: itself, then f2, then f1
    row1 = e(alpha) * HI + MID + e(-alpha) * LO  # f1: itself, then f2, then f0
    row2 = e(alpha) * HI + MID + e(-alpha) * MID  # f2: itself, then f0 and f1 tied (index order)
    assert positive_loss(FG, alpha).item() == pytest.approx((row0 + row1 + row2) / 9, rel=1e-5)


def test_negative_term_by_hand():
    # bg0 and bg1 point along x, bg2 along y; -log(1 - s) for s = 0.9995, 0.0005 and 1/sqrt(2)
    far, near, mid = -math.log(1 - 0.9995), -math.log(1 - 0.0005), -math.log(1 - 1 / math.sqrt(2))
    expected = (3 * (far + near + mid)) / 9
    assert negative_loss(BG, FG).item() == pytest.approx(expected, rel=1e-5)


def test_total_is_the_sum_and_gradients_flow():
    fg = FG.clone().requires_grad_(True)
    bg = BG.clone().requires_grad_(True)
    terms = ContrastiveLoss(alpha=0.25)(fg, bg)
    assert terms["loss"].item() == pytest.approx((terms["pos_bg"] + terms["neg"] + terms["pos_fg"]).item())
    assert terms["pos_bg"].item() == pytest.approx(positive_loss(BG, 0.25).item())
    terms["loss"].backward()
    assert torch.isfinite(fg.grad).all() and fg.grad.abs().sum() > 0


def test_clamp_keeps_the_loss_finite_for_identical_and_orthogonal_embeddings():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    terms = ContrastiveLoss(0.25)(x, x)  # fg == bg: similarity 1 is clamped to 0.9995
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["neg"].item() == pytest.approx(-math.log(0.0005), rel=1e-5)
