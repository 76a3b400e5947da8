"""Devices and mixed precision: `--device auto|cpu|cuda|cuda:N|mps`, and autocast where it pays."""
from __future__ import annotations

import torch

from .errors import C2AMError


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for `--device`: auto takes CUDA, then MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise C2AMError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True):
    """Autocast on CUDA (bf16 where supported, else fp16) when enabled; elsewhere a context that changes nothing."""
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)
