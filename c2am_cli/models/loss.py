"""The contrastive loss of C2AM: foreground/background contrast across a batch (Xie et al., CVPR 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIM_MIN, SIM_MAX = 0.0005, 0.9995


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, C) x (M, C) -> (N, M) cosine similarities, clamped so that the logs stay finite."""
    sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    return sim.clamp(SIM_MIN, SIM_MAX)


def rank_weights(sim: torch.Tensor, alpha: float) -> torch.Tensor:
    """exp(-alpha * (r - 1)) with r the rank of each entry in its row, most similar first (r = 0)."""
    order = sim.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)
    return torch.exp(-alpha * (rank.to(sim.dtype) - 1))


def positive_loss(emb: torch.Tensor, alpha: float) -> torch.Tensor:
    """Pull embeddings of the same kind (fg-fg or bg-bg) together, rank-weighted."""
    sim = cosine_similarity_matrix(emb, emb)
    loss = (-torch.log(sim)).clamp_min(0)
    return (loss * rank_weights(sim.detach(), alpha)).mean()


def negative_loss(bg: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Push every background embedding away from every foreground embedding."""
    return -torch.log(1 - cosine_similarity_matrix(bg, fg)).mean()


class ContrastiveLoss(nn.Module):
    """L = L_pos(bg) + L_neg(bg, fg) + L_pos(fg); returns the total and the three terms."""

    def __init__(self, alpha: float = 0.25):
        super().__init__()
        self.alpha = alpha

    def forward(self, fg: torch.Tensor, bg: torch.Tensor) -> dict[str, torch.Tensor]:
        fg, bg = fg.float(), bg.float()
        terms = {
            "pos_bg": positive_loss(bg, self.alpha),
            "neg": negative_loss(bg, fg),
            "pos_fg": positive_loss(fg, self.alpha),
        }
        terms["loss"] = terms["pos_bg"] + terms["neg"] + terms["pos_fg"]
        return terms
