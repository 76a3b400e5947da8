"""Checks on weight files before anything big is built: the stored config's values, and the tensors' values.

A weight file is input like any other: its config may say `image_size: -3` or `1e9`, name a backbone that does not
fit its tensors, or carry NaN weights. Each is one line naming the file, found before a large allocation.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import ModelConfig, SelfTrainConfig
from ..runtime.errors import C2AMError

MAX_IMAGE_SIZE = 4096  # model input side: far above any backbone's useful input, far below an absurd allocation


def _number(value, what: str, lo: float, hi: float, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise C2AMError(f"{what} is {value!r}: not {'an integer' if integer else 'a number'}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise C2AMError(f"{what} is {value!r}: must be between {lo:g} and {hi:g}")
    return value


def _numbers(value, what: str, lo: float, hi: float, length: int | None = None, integer: bool = False):
    if not isinstance(value, (tuple, list)) or (length is not None and len(value) != length):
        raise C2AMError(f"{what} is {value!r}: not a list of {length or 'some'} numbers")
    return [_number(v, what, lo, hi, integer) for v in value]


def check_model_config(m: ModelConfig) -> None:
    """Refuse a stored model config whose values are of the wrong type or out of any sensible range."""
    if not isinstance(m.backbone, str) or not m.backbone or len(m.backbone) > 200:
        raise C2AMError(f"backbone is {m.backbone!r}: not a timm model name")
    _number(m.image_size, "image_size", 16, MAX_IMAGE_SIZE, integer=True)
    _numbers(m.feature_levels, "feature_levels", -16, 16, integer=True)
    if not m.feature_levels:
        raise C2AMError("feature_levels is empty")
    if m.output_stride is not None:
        _number(m.output_stride, "output_stride", 1, 64, integer=True)
    _numbers(m.mean, "mean", -10, 10, 3)
    _numbers(m.std, "std", 1e-6, 10, 3)
    if m.polarity not in (1, -1) or isinstance(m.polarity, bool):
        raise C2AMError(f"polarity is {m.polarity!r}: must be 1 or -1")
    _number(m.box_threshold, "box_threshold", 0, 1)
    _number(m.cue_threshold, "cue_threshold", 0, 1)
    _numbers(m.scales, "scales", 1e-3, 8)
    if not m.scales:
        raise C2AMError("scales is empty")
    if not isinstance(m.flip, bool):
        raise C2AMError(f"flip is {m.flip!r}: must be true or false")
    _number(m.edge_radius, "edge_radius", 0, 1)
    _number(m.edge_eps, "edge_eps", 0, 1e6)
    _numbers(m.calibration, "calibration", 0, 1)
    if len(m.calibration) > 100_000:
        raise C2AMError(f"calibration has {len(m.calibration)} values: too many")
    _number(m.crf_iterations, "crf_iterations", 0, 1000, integer=True)
    _numbers(m.crf_bilateral, "crf_bilateral", 0, 1e6, 3)
    if m.boxes_from not in ("map", "mask"):
        raise C2AMError(f"boxes_from is {m.boxes_from!r}: must be map or mask")


def check_self_train_config(st: SelfTrainConfig) -> None:
    """Refuse a self-training config (given, or stored with weights) whose values are out of range, in one line."""
    _number(st.epochs, "self_train.epochs", 1, 100_000, integer=True)
    _number(st.batch_size, "self_train.batch_size", 1, 65_536, integer=True)
    _number(st.rounds, "self_train.rounds", 1, 100, integer=True)
    _number(st.relabel_crf, "self_train.relabel_crf", 0, 1000, integer=True)
    _number(st.image_size, "self_train.image_size", 16, MAX_IMAGE_SIZE, integer=True)
    _number(st.decoder_channels, "self_train.decoder_channels", 1, 1024, integer=True)
    _numbers(st.decoder_levels, "self_train.decoder_levels", -16, 16, integer=True)
    _number(st.lr, "self_train.lr", 0, 10)
    _number(st.weight_decay, "self_train.weight_decay", 0, 10)
    _number(st.finetune_levels, "self_train.finetune_levels", 0, 64, integer=True)
    _number(st.finetune_lr_scale, "self_train.finetune_lr_scale", 0, 100)
    lo, hi = _numbers(st.ignore, "self_train.ignore", 0, 1, 2)
    if lo > hi:
        raise C2AMError(f"self_train.ignore is {st.ignore!r}: the lower bound is above the upper")
    _number(st.min_scale, "self_train.min_scale", 1e-3, 1)
    if not isinstance(st.teacher, str):
        raise C2AMError(f"self_train.teacher is {st.teacher!r}: not a weights name")


def check_fit(path: Path, model_class, config, shapes: dict[str, tuple[int, ...]]) -> None:
    """Build the model on the meta device (no memory) and compare its tensors with the file's, so that a config
    naming a huge or wrong backbone is refused before the real model is allocated."""
    try:
        with torch.device("meta"):
            own = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    except C2AMError as e:  # an unknown backbone, feature levels it lacks
        raise C2AMError(f"{path}: {e}") from None
    except Exception:  # a backbone that cannot be built on the meta device: the real build checks it
        return
    check_shapes(path, config.model.backbone, own, shapes)


def check_shapes(path: Path, backbone: str, own: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a file whose tensors (name -> shape) are not exactly the model's."""
    bad = [k for k in own if shapes.get(k) != own[k]]
    if bad or len(shapes) != len(own):
        raise C2AMError(f"{path}: weights do not fit backbone {backbone!r} ({len(bad)} tensors missing or of another shape)")


def check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or infinite values: every map would be NaN, every box empty."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise C2AMError(f"{path}: tensor {key} holds NaN or infinite values (a diverged or damaged model)")
