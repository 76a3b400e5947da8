"""The self-trained saliency decoder: a light top-down (FPN-style) path from the activation head's features and map
down through finer backbone levels, to a foreground logit at the finest level's stride."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SaliencyDecoder(nn.Module):
    """Top: the head's features with its foreground map as one more channel; then, coarse to fine, each finer level
    (1x1 lateral) added to the upsampled path and mixed by a 3x3 conv; a 1x1 conv gives the logit."""

    def __init__(self, head_channels: int, level_channels: list[int], channels: int = 64):
        super().__init__()
        self.top = conv_bn_relu(head_channels + 1, channels, 1)
        self.laterals = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in level_channels)
        self.mix = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in level_channels)
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, head_feats: torch.Tensor, head_map: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        """Foreground logits (N, 1, h, w) at the finest level's resolution; `levels` fine to coarse."""
        x = self.top(torch.cat([head_feats, head_map.to(head_feats.dtype)], dim=1))
        for i in reversed(range(len(levels))):
            f = levels[i]
            x = F.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False) + self.laterals[i](f)
            x = self.mix[i](x)
        return self.out(x)
