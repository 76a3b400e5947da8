"""Where weights come from: the embedded default, local files and run folders, the registry, the Hub."""
from __future__ import annotations

from pathlib import Path

from ..runtime.errors import C2AMError
from .registry import DEFAULT_NAME, weights_dir


def embedded_default() -> Path:
    path = weights_dir() / DEFAULT_NAME / "model.safetensors"
    if not path.exists():
        raise C2AMError(f"{path}: the embedded default model is missing from this installation")
    return path


def resolve_weights(spec: str | Path | None) -> Path:
    """A local .safetensors path for a weights spec: None/'default', a file, a run folder, a registry name or hf://."""
    if spec is None or str(spec) == DEFAULT_NAME:
        return embedded_default()
    text = str(spec)
    if text.startswith("hf://"):
        from .download import pull

        return pull(text[len("hf://"):])
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
        if not path.exists():
            raise C2AMError(f"{path.parent}: no model.safetensors in this folder")
        return path
    if path.exists():
        if path.suffix != ".safetensors":
            raise C2AMError(f"{path}: c2am weights are .safetensors files")
        return path
    from .download import pull
    from .registry import is_registered

    if is_registered(text):
        return pull(text)
    raise C2AMError(f"{text}: no such file or folder, and not a registry name or hf:// id")
