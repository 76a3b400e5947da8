"""Run checkpoints for --resume: a model's tensors, its optimizer's state and the run's progress in one safetensors
file (never a pickle); the optimizer's tensors are stored as tensors, the rest of its state as JSON metadata."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..runtime.errors import C2AMError
from ..runtime.io import atomic_path


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Write model, optimizer and `meta` (JSON-able: config, epoch, step, ...) atomically to `path`."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state_meta = {}
    for idx, st in opt["state"].items():
        state_meta[str(idx)] = {}
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{name}"] = v.detach().cpu().contiguous()
                state_meta[str(idx)][name] = None
            else:
                state_meta[str(idx)][name] = v
    meta = {**meta, "optimizer": {"state": state_meta, "param_groups": opt["param_groups"]}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(meta, the model's state dict, the optimizer's state dict) of a file written by `save_checkpoint`; raises
    what safetensors or json raise on a damaged file (the caller names the file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    opt = meta.pop("optimizer")
    for idx, st in opt["state"].items():
        for name in list(st):
            key = f"optim.{idx}.{name}"
            if key in tensors:
                st[name] = tensors[key]
    opt["state"] = {int(k): v for k, v in opt["state"].items()}
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return meta, model, opt


def resume_checkpoint(path: Path, restore) -> tuple[dict, torch.nn.Module, dict]:
    """(meta, model, optimizer state) of a checkpoint for --resume; `restore(meta, tensors)` rebuilds the model. Any
    failure (truncated or garbled file, unknown config version, tensors of another model) is one line naming it."""
    try:
        meta, tensors, opt = load_checkpoint(path)
        model = restore(meta, tensors)
    except Exception as e:
        reason = str(e) if isinstance(e, C2AMError) else f"{type(e).__name__}: {e}"
        raise C2AMError(f"{path}: cannot resume from this checkpoint ({reason.splitlines()[0]}); "
                        f"remove it to start afresh") from e
    return meta, model, opt
