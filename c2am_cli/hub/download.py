"""Pull C2AM weights from the Hugging Face Hub, and list the registry with what is on this machine.

Downloads go through huggingface_hub (its cache, HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT and tokens apply) and are
checked against the sha256 the registry lists.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import C2AMError
from .registry import (_COMMIT, DEFAULT_REVISION, MODEL_FILE, OPTIONAL_FILES, load_registry, split_spec,
                       verify_sha256, weights_dir)

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_REVISION = re.compile(r"[\w.-][\w./-]{0,199}")


# -- pull --------------------------------------------------------------------------------------
def _hub_error(e: Exception, repo_id: str, revision: str, filename: str, endpoint: str | None) -> C2AMError:
    """One line for the user from a huggingface_hub / network failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo_id}@{revision}"
    host = endpoint or constants.ENDPOINT
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if constants.is_offline_mode():
            return C2AMError(f"{where}: {filename} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
        return C2AMError(f"{where}: cannot reach {host} and {filename} is not in the Hugging Face cache")
    if isinstance(e, GatedRepoError):
        return C2AMError(f"{repo_id}: gated repository on {host}: accept its terms there and set HF_TOKEN")
    if isinstance(e, RepositoryNotFoundError):
        return C2AMError(f"{repo_id}: no such model repository on {host} (if it is private, set HF_TOKEN or run `hf auth login`)")
    if isinstance(e, RevisionNotFoundError):
        return C2AMError(f"{where}: no such revision on {host}")
    if isinstance(e, RemoteEntryNotFoundError):
        return C2AMError(f"{where}: the repository has no {filename} (is it a c2am model?)")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        return C2AMError(f"{where}: {filename}: the Hub answered HTTP {status} ({str(e).splitlines()[0]})")
    first = str(e).splitlines()[0] if str(e) else ""
    return C2AMError(f"{where}: downloading {filename} failed ({type(e).__name__}: {first})")


def _download(repo_id: str, filename: str, revision: str, optional: bool = False, **kwargs) -> Path | None:
    """hf_hub_download with one-line errors; an optional file that is absent (or not cached offline) gives None."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    from ..runtime.version import __version__

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, library_name="c2am",
                                    library_version=__version__, **kwargs))
    except (RemoteEntryNotFoundError, LocalEntryNotFoundError) as e:
        if optional:
            return None
        raise _hub_error(e, repo_id, revision, filename, kwargs.get("endpoint")) from None
    except Exception as e:  # huggingface_hub / httpx / OS errors -> one line
        raise _hub_error(e, repo_id, revision, filename, kwargs.get("endpoint")) from None


def _registered_sha256(registry: dict, repo_id: str, revision: str) -> tuple[str | None, str | None]:
    """(sha256, entry name) of a registry entry for this repo at this revision, if any."""
    for name, entry in registry.items():
        if entry.get("repo_id") == repo_id and entry.get("revision", DEFAULT_REVISION) == revision:
            return entry.get("sha256"), name
    return None, None


def pull(spec: str, *, token: str | bool | None = None, cache_dir: str | Path | None = None,
         endpoint: str | None = None, force_download: bool = False, registry: dict | None = None) -> Path:
    """Local path of model.safetensors for a registry name or 'org/repo[@revision]'.

    model.safetensors, config.json and README.md (the model card) are fetched from one commit into the
    huggingface_hub cache; a registry entry's sha256 is verified. The embedded default needs no download.
    """
    from_files = registry is None  # entries of registry files (packaged, $C2AM_REGISTRY) stay in the weights folder
    registry = load_registry() if registry is None else registry
    name, revision = split_spec(spec)
    entry = registry.get(name)
    if entry is not None and entry.get("path"):  # shipped inside the package (the embedded default)
        if revision is not None:
            raise C2AMError(f"{spec}: {name} is shipped with c2am; it has no revisions")
        path = weights_dir() / str(entry["path"])
        if from_files and (Path(str(entry["path"])).is_absolute()
                           or not path.resolve().is_relative_to(weights_dir().resolve())):
            raise C2AMError(f"registry entry {name!r}: path {entry['path']!r} is outside c2am's weights folder")
        if not path.exists():
            raise C2AMError(f"{path}: the registry's {name!r} model is missing from this installation")
        verify_sha256(path, entry.get("sha256"), f"registry entry {name!r}")
        return path
    if entry is not None:
        if revision is not None and revision != entry.get("revision", DEFAULT_REVISION):
            raise C2AMError(f"{spec}: registry name {name!r} is pinned to revision {entry.get('revision')}; "
                            f"pull {entry['repo_id']}@{revision} for another one")
        repo_id, revision = entry["repo_id"], entry.get("revision", DEFAULT_REVISION)
        expected, what = entry.get("sha256"), f"registry entry {name!r}"
    else:
        if "/" not in name:
            known = ", ".join(sorted(registry)) or "none"
            raise C2AMError(f"{spec}: not a registry name (known: {known}) nor a Hub repo id 'org/name'")
        repo_id, revision = name, revision or DEFAULT_REVISION
        expected, found = _registered_sha256(registry, repo_id, revision)
        what = f"registry entry {found!r}" if found else repo_id

    if not _REPO_ID.fullmatch(str(repo_id)) or ".." in str(repo_id) or not _REVISION.fullmatch(str(revision)) \
            or ".." in str(revision):  # both become cache paths: never a way out of the cache folder
        raise C2AMError(f"{spec}: not a valid Hub repo id 'org/name' with an optional @revision")
    kwargs = dict(token=token, cache_dir=cache_dir, endpoint=endpoint)
    model = _download(repo_id, MODEL_FILE, revision, force_download=force_download, **kwargs)
    verify_sha256(model, expected, what)
    commit = model.parent.name if _COMMIT.fullmatch(model.parent.name) else revision  # the rest from the same commit
    for filename in OPTIONAL_FILES:
        _download(repo_id, filename, commit, optional=True, force_download=force_download, **kwargs)
    return model


@dataclass
class RegistryRow:
    """One line of `c2am pull --list`: a registry entry and where it is on this machine, if anywhere."""

    name: str
    source: str  # 'org/repo@revision' or 'shipped with c2am'
    backbone: str
    input_size: int | None
    license: str
    description: str
    local_path: Path | None  # cached or shipped model.safetensors; None when it must be pulled first


def list_registry(cache_dir: str | Path | None = None, registry: dict | None = None) -> list[RegistryRow]:
    """The registry with, for each entry, its local model.safetensors when it is cached (or shipped)."""
    from huggingface_hub import try_to_load_from_cache

    rows = []
    for name, entry in sorted((load_registry() if registry is None else registry).items()):
        if entry.get("path"):
            path = weights_dir() / entry["path"]
            source, local = "shipped with c2am", path if path.exists() else None
        else:
            revision = entry.get("revision", DEFAULT_REVISION)
            source = f"{entry['repo_id']}@{revision}"
            hit = try_to_load_from_cache(entry["repo_id"], MODEL_FILE, cache_dir=cache_dir, revision=revision)
            local = Path(hit) if isinstance(hit, str) else None
        rows.append(RegistryRow(name, source, entry.get("backbone", "?"), entry.get("input_size"),
                                entry.get("license") or "?", entry.get("description", ""), local))
    return rows
