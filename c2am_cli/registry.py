"""Named C2AM weights: the registry in weights/registry.json, pull from and push to the Hugging Face Hub.

Downloads go through huggingface_hub (its cache, HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT and tokens apply) and are
checked against the sha256 the registry lists, so a registry name always means the same bytes.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import C2AMError
from .hub import DEFAULT_NAME, weights_dir

REGISTRY_FILE = "registry.json"
REGISTRY_ENV = "C2AM_REGISTRY"  # a JSON file of extra entries (same format), merged over the packaged registry
REGISTRY_FORMAT = 1
MODEL_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
OPTIONAL_FILES = (CONFIG_FILE, CARD_FILE)  # the config is also inside the model's metadata; a card may be missing
DEFAULT_REVISION = "main"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_REVISION = re.compile(r"[\w.-][\w./-]{0,199}")


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

    from . import __version__

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


# -- model card and push -----------------------------------------------------------------------
CITATION = """@inproceedings{xie2022c2am,
  title     = {C2AM: Contrastive learning of Class-agnostic Activation Map for Weakly Supervised Object
               Localization and Semantic Segmentation},
  author    = {Xie, Jinheng and Xiang, Jianfeng and Chen, Junliang and Hou, Xianxu and Zhao, Xiaodong and Shen, Linlin},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _metrics_table(metrics: dict) -> str:
    """{metric: value} or {dataset: {metric: value}} as a markdown table."""
    if all(isinstance(v, dict) for v in metrics.values()):
        columns = list(dict.fromkeys(k for v in metrics.values() for k in v))
        lines = ["| data | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {ds} | " + " | ".join(_fmt(vals.get(c, "")) for c in columns) + " |" for ds, vals in metrics.items()]
    else:
        lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    return "\n".join(lines)


def _backbone_training(t) -> str:
    """'frozen', 'fine-tuned' or 'fine-tuned (last K feature levels)'."""
    if t.freeze_backbone:
        return "frozen"
    if not t.finetune_levels:
        return "fine-tuned"
    return f"fine-tuned (last {t.finetune_levels} feature level{'s' if t.finetune_levels > 1 else ''})"


def model_card(config, repo_id: str | None = None, license: str | None = None, notes: str = "") -> str:
    """A Hub model card (README.md) for C2AM weights: backbone, training data and settings, metrics, usage, licence.

    `config` is a C2AMConfig; `repo_id` None writes the usage of the embedded default; `notes` (markdown) is
    added as a section of its own (data terms, how the numbers were measured).
    """
    from huggingface_hub import ModelCardData

    m, t, data = config.model, config.train, dict(config.data)
    metrics, data_license = data.pop("metrics", None), data.pop("license", None)
    license = license or data_license or "other"
    front = ModelCardData(library_name="c2am", license=license,
                          tags=["c2am", "class-agnostic-activation-map", "weakly-supervised-object-localization",
                                "weakly-supervised-semantic-segmentation", "timm", "safetensors", m.backbone])
    title = repo_id.split("/")[-1] if repo_id else "c2am embedded default"
    weights_arg = f" --weights hf://{repo_id}" if repo_id else ""
    load_arg = f'"hf://{repo_id}"' if repo_id else ""
    init = t.backbone_weights or "random initialisation"
    lines = [
        "---", front.to_yaml().strip(), "---", "",
        f"# {title}", "",
        "Class-agnostic activation maps (C2AM, Xie et al., CVPR 2022) learned contrastively from unlabeled images: "
        "one foreground map per image, with no class labels, for object boxes (weakly supervised localisation) and "
        "background cues (weakly supervised segmentation). Trained and used with the "
        "[c2am](https://pypi.org/project/c2am/) command.", "",
        "## Model", "",
        "| | |", "|---|---|",
        f"| backbone | `{m.backbone}` (timm), initialised from {init} |",
        f"| feature levels / output stride | {_fmt(m.feature_levels)} / {m.output_stride or 'native'} |",
        f"| input size | {m.image_size} x {m.image_size} |",
        f"| normalisation | mean ({_fmt(m.mean)}), std ({_fmt(m.std)}) |",
        f"| polarity | {m.polarity:+d} (border-prior score {_fmt(m.polarity_score) if m.polarity_score is not None else 'n/a'}) |",
        f"| box threshold | {_fmt(m.box_threshold)} ({m.box_threshold_source}), boxes from the {m.boxes_from} |",
        f"| test-time scales / flip | {_fmt(m.scales)} / {'yes' if m.flip else 'no'} |",
        f"| maps at image size | {_refinement(m)} |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in sorted(config.versions.items())) or 'n/a'} |",
        "", "## Training", "",
        "| | |", "|---|---|",
        *[f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in data.items()],
        f"| epochs | {t.epochs} |",
        f"| batch size | {t.batch_size} |",
        f"| augmentation | {t.augment} |",
        f"| alpha (rank-weight decay) | {_fmt(t.alpha)} |",
        f"| optimiser | SGD, lr {_fmt(t.lr)}, momentum {_fmt(t.momentum)}, weight decay {_fmt(t.weight_decay)}, "
        f"head x{_fmt(t.head_lr_mult)}, poly {_fmt(t.poly_power)} |",
        f"| backbone | {_backbone_training(t)}, BatchNorm statistics "
        f"{'updated' if t.bn_train else 'frozen'} |",
        f"| seed | {t.seed} |",
        "", "## Metrics", "",
        _metrics_table(metrics) if metrics else "No metrics were recorded with these weights.",
        "", "## Usage", "",
        "```bash", "pip install c2am", f"c2am localize ./images{weights_arg} --out boxes.json --maps maps/", "```", "",
        "```python", "from c2am_cli import C2AM", "", f"model = C2AM.from_pretrained({load_arg})",
        "maps = model.activation_maps(images)  # normalised (N, 3, H, W) -> (N, H, W), high = foreground",
        "boxes = model.boxes(maps)", "```", "",
        "## Licence", "",
        f"Weights: `{license}`. The backbone's pretrained weights and the training images keep their own terms.",
    ]
    if notes.strip():
        lines += ["", "## Notes", "", notes.strip()]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _refinement(m) -> str:
    """The stored refinement of maps at image size, in words."""
    steps = [f"guided filter (radius {_fmt(m.edge_radius)} of the shorter side)"] if m.edge_radius > 0 else []
    if m.calibration:
        steps.append(f"calibrated to P(foreground) ({len(m.calibration)} knots, fitted on {m.calibration_source})")
        if m.crf_iterations:
            steps.append(f"dense CRF ({m.crf_iterations} iterations, bilateral {_fmt(m.crf_bilateral)})")
    return ", ".join(steps) or "bilinear upsampling only"


def _read_push_config(model_path: Path):
    """The config to publish: config.json beside the weights if it is valid (it may hold metrics), else the metadata."""
    from .config import C2AMConfig
    from .model import METADATA_KEY, read_config

    beside = model_path.parent / CONFIG_FILE
    if beside.exists():
        try:
            return C2AMConfig.from_json(beside.read_text(encoding="utf-8"))
        except (C2AMError, OSError):
            pass
    try:
        return read_config(model_path)
    except KeyError:
        raise C2AMError(f"{model_path}: not a c2am model (no {METADATA_KEY} in its metadata)") from None
    except Exception as e:
        raise C2AMError(f"{model_path}: cannot read weights ({type(e).__name__}: {e})") from None


def push(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         license: str | None = None, endpoint: str | None = None, commit_message: str | None = None):
    """Upload model.safetensors, config.json and a model card to `repo_id` (created if needed); returns the CommitInfo.

    `run_dir` is a run folder, a .safetensors file or a registry name. A README.md beside the weights is uploaded
    as it is; otherwise the card is generated by `model_card`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from .hub import resolve_weights

    model_path = resolve_weights(str(run_dir))
    config = _read_push_config(model_path)
    card = model_path.parent / CARD_FILE
    card_bytes = card.read_bytes() if card.exists() else model_card(config, repo_id, license).encode("utf-8")
    operations = [
        CommitOperationAdd(path_in_repo=MODEL_FILE, path_or_fileobj=str(model_path)),
        CommitOperationAdd(path_in_repo=CONFIG_FILE, path_or_fileobj=(config.to_json() + "\n").encode("utf-8")),
        CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card_bytes),
    ]
    api = HfApi(endpoint=endpoint, token=token)
    try:
        # private=False leaves the visibility to the Hub (public, unless the organisation's default is private)
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        return api.create_commit(repo_id, operations, commit_message=commit_message or
                                 f"Upload C2AM weights ({config.model.backbone}, {config.train.epochs} epochs)")
    except Exception as e:
        from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

        if isinstance(e, LocalTokenNotFoundError) or (isinstance(e, HfHubHTTPError) and e.response is not None
                                                      and e.response.status_code == 401):
            raise C2AMError(f"{repo_id}: not authorised to write: set HF_TOKEN or run `hf auth login`") from None
        first = str(e).splitlines()[0] if str(e) else ""
        raise C2AMError(f"{repo_id}: upload to {api.endpoint} failed ({type(e).__name__}: {first})") from None


# -- maintenance -------------------------------------------------------------------------------
def update_default(registry_file: str | Path | None = None, model_file: str | Path | None = None) -> dict[str, Any]:
    """Write the sha256, backbone and input size of weights/default/model.safetensors into the registry."""
    from .io import write_json_atomic
    from .model import read_config

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

    parser = argparse.ArgumentParser(prog="python -m c2am_cli.registry", description=update_default.__doc__)
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
