"""Named C2AM weights: the registry in weights/registry.json (packaged, plus $C2AM_REGISTRY) and its sha256 pins.

Downloads (hub.download) are checked against the sha256 the registry lists, so a registry name always means the
same bytes.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..runtime.errors import C2AMError

REGISTRY_FILE = "registry.json"
REGISTRY_ENV = "C2AM_REGISTRY"  # a JSON file of extra entries (same format), merged over the packaged registry
REGISTRY_FORMAT = 1
MODEL_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
OPTIONAL_FILES = (CONFIG_FILE, CARD_FILE)  # the config is also inside the model's metadata; a card may be missing
DEFAULT_REVISION = "main"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # c2am_cli/
DEFAULT_NAME = "default"


def weights_dir() -> Path:
    """The weights/ folder: inside the installed package, or at the top of a source checkout."""
    for candidate in (PACKAGE_DIR / "weights", PACKAGE_DIR.parent / "weights"):
        if candidate.is_dir():
            return candidate
    raise C2AMError("the weights/ folder of c2am is missing from this installation")


# -- the registry ------------------------------------------------------------------------------
def registry_path() -> Path:
    """weights/registry.json of this installation (source checkout or wheel)."""
    return weights_dir() / REGISTRY_FILE


def _read_registry_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise C2AMError(f"{path}: registry file is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise C2AMError(f"{path}: cannot read the registry ({e})") from None
    if not isinstance(data, dict) or data.get("format") != REGISTRY_FORMAT or not isinstance(data.get("models"), dict):
        raise C2AMError(f"{path}: not a c2am registry (expected {{\"format\": {REGISTRY_FORMAT}, \"models\": {{...}}}})")
    return data["models"]


def load_registry(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Registry entries by name: `path` if given, else the packaged registry with $C2AM_REGISTRY merged over it."""
    if path is not None:
        return _read_registry_file(Path(path))
    entries = dict(_read_registry_file(registry_path()))
    extra = os.environ.get(REGISTRY_ENV)
    if extra:
        entries.update(_read_registry_file(Path(extra).expanduser()))
    return entries


def split_spec(spec: str) -> tuple[str, str | None]:
    """'name', 'org/repo' or either with '@revision' -> (name or repo id, revision or None)."""
    name, sep, revision = str(spec).partition("@")
    if not name or (sep and not revision):
        raise C2AMError(f"{spec!r}: give a registry name or a Hub repo id, optionally with @revision")
    return name, revision or None


def is_registered(spec: str, registry: dict | None = None) -> bool:
    """Whether `spec` (without any @revision) names a registry entry."""
    try:
        name, _ = split_spec(spec)
    except C2AMError:
        return False
    return name in (load_registry() if registry is None else registry)


# -- integrity ---------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    from huggingface_hub.utils.sha import sha_fileobj

    with open(path, "rb") as f:
        return sha_fileobj(f).hex()


def verify_sha256(path: str | Path, expected: str | None, what: str) -> None:
    """Refuse a file whose sha256 is not the one the registry lists for `what`."""
    if not expected:
        return
    if not _SHA256.fullmatch(expected.lower()):
        raise C2AMError(f"{what}: the registry's sha256 {expected!r} is not 64 hex digits")
    got = file_sha256(path)
    if got != expected.lower():
        raise C2AMError(f"{path}: sha256 mismatch for {what}: expected {expected.lower()}, got {got}; "
                        f"the file was not used (delete it, or pull again with --force)")


# -- maintenance -------------------------------------------------------------------------------
def update_default(registry_file: str | Path | None = None, model_file: str | Path | None = None) -> dict[str, Any]:
    """Write the sha256, backbone and input size of weights/default/model.safetensors into the registry."""
    from ..runtime.io import write_json_atomic
    from ..config import read_config

    registry_file = Path(registry_file) if registry_file else registry_path()
    data = json.loads(registry_file.read_text(encoding="utf-8"))
    entry = data["models"].setdefault(DEFAULT_NAME, {"path": f"{DEFAULT_NAME}/{MODEL_FILE}"})
    model_file = Path(model_file) if model_file else registry_file.parent / entry["path"]
    if not model_file.exists():
        raise C2AMError(f"{model_file}: no embedded default to register")
    config = read_config(model_file)
    entry.update(sha256=file_sha256(model_file), backbone=config.model.backbone, input_size=config.model.image_size)
    write_json_atomic(registry_file, data)
    return entry


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m c2am_cli.hub.registry", description=update_default.__doc__)
    parser.add_argument("--update-default", action="store_true", help="recompute the default's sha256 into registry.json")
    parser.add_argument("--registry", type=Path, default=None, help="registry file (default: weights/registry.json)")
    args = parser.parse_args(argv)
    if not args.update_default:
        parser.error("nothing to do: give --update-default")
    try:
        entry = update_default(args.registry)
    except C2AMError as e:
        raise SystemExit(f"error: {e}")
    print(f"{args.registry or registry_path()}: default sha256 {entry['sha256']}")


if __name__ == "__main__":
    main()
