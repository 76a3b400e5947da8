"""Registry, pull and push through huggingface_hub's real code path, against a local fake Hub (no network)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from PIL import Image
from typer.testing import CliRunner

from c2am_cli import C2AM, C2AMConfig, C2AMError, ModelConfig, TrainConfig
from c2am_cli.cli import app
from c2am_cli.hub.card import model_card
from c2am_cli.hub.download import list_registry, pull
from c2am_cli.hub.push import push
from c2am_cli.hub.registry import (REGISTRY_ENV, is_registered, load_registry, registry_path, split_spec,
                                   update_default, weights_dir)
from c2am_cli.hub.resolve import resolve_weights
from fake_hub import FakeHub
from synthetic import make_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A run folder with a tiny C2AM (timm test_resnet, 64 px): model.safetensors + config.json."""
    run = tmp_path_factory.mktemp("run")
    C2AM(ModelConfig(backbone="test_resnet", image_size=64)).save(run)
    return run


@pytest.fixture()
def hub(tiny):
    """A fake Hub holding me/tiny (model, config, card) and me/nocard (model only); stopped after the test."""
    with FakeHub() as h:
        h.commits = {"v1": h.add_commit("me/tiny", {"model.safetensors": (tiny / "model.safetensors").read_bytes(),
                                                    "config.json": (tiny / "config.json").read_bytes(),
                                                    "README.md": b"---\nlibrary_name: c2am\n---\n# tiny\n"})}
        h.add_commit("me/nocard", {"model.safetensors": (tiny / "model.safetensors").read_bytes()})
        yield h


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def registry_for(tiny: Path, hub: FakeHub, sha256: str | None = None) -> dict:
    return {"tiny": {"repo_id": "me/tiny", "revision": hub.commits["v1"], "sha256": sha256 or sha(tiny / "model.safetensors"),
                     "backbone": "test_resnet", "input_size": 64, "license": "apache-2.0", "description": "test"}}


# -- the registry file ---------------------------------------------------------------------------
def test_packaged_registry_is_well_formed():
    entries = load_registry(registry_path())
    assert "default" in entries and entries["default"]["path"] == "default/model.safetensors"
    for name, e in entries.items():
        assert {"backbone", "input_size", "license", "description", "sha256"} <= set(e), name
        assert ("path" in e) != ("repo_id" in e), f"{name}: either shipped (path) or on the Hub (repo_id)"
        if "repo_id" in e:  # Hub entries are pinned: a revision and the sha256 of its model.safetensors
            assert e["revision"] and len(e["sha256"]) == 64, name


def test_default_sha256_matches_the_shipped_file():
    entry = load_registry(registry_path())["default"]
    model = weights_dir() / entry["path"]
    if not model.exists():
        pytest.skip(f"{model} is not there yet (the lead trains it)")
    assert entry["sha256"] == sha(model), "run `python -m c2am_cli.hub.registry --update-default`"
    assert pull("default") == model


def test_update_default_writes_sha256_backbone_and_size(tiny, tmp_path):
    reg = tmp_path / "registry.json"
    reg.write_text(registry_path().read_text())
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    entry = update_default(reg)
    stored = json.loads(reg.read_text())["models"]["default"]
    assert stored == entry and stored["sha256"] == sha(tiny / "model.safetensors")
    assert (stored["backbone"], stored["input_size"]) == ("test_resnet", 64)
    assert stored["license"] == load_registry(registry_path())["default"]["license"]  # the rest is kept


def test_split_spec_and_is_registered():
    assert split_spec("org/repo@v1.0") == ("org/repo", "v1.0")
    assert split_spec("default") == ("default", None)
    with pytest.raises(C2AMError):
        split_spec("org/repo@")
    assert is_registered("default") and not is_registered("org/repo") and not is_registered("@x")


def test_extra_registry_from_environment(tmp_path, monkeypatch):
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"format": 1, "models": {"mine": {"repo_id": "me/mine", "revision": "main"}}}))
    monkeypatch.setenv(REGISTRY_ENV, str(extra))
    assert set(load_registry()) >= {"default", "mine"}
    extra.write_text("{not json")
    with pytest.raises(C2AMError, match="extra.json: cannot read the registry"):
        load_registry()


# -- pull against the fake Hub (HF_ENDPOINT), then from the cache (HF_HUB_OFFLINE) ----------------------
def test_pull_registry_name_downloads_one_commit_and_verifies(tiny, hub, tmp_path):
    reg = registry_for(tiny, hub)
    path = pull("tiny", registry=reg, cache_dir=tmp_path, endpoint=hub.endpoint)
    assert path.read_bytes() == (tiny / "model.safetensors").read_bytes()
    assert path.parent.name == hub.commits["v1"] and path.is_relative_to(tmp_path / "models--me--tiny")
    assert (path.parent / "config.json").read_bytes() == (tiny / "config.json").read_bytes()
    assert (path.parent / "README.md").read_text().startswith("---\nlibrary_name: c2am")
    got = [(m, p) for m, p, _ in hub.requests]
    assert ("HEAD", f"/me/tiny/resolve/{hub.commits['v1']}/model.safetensors") in got
    assert ("GET", f"/blobs/{sha(path)}") in got  # the LFS redirect to the CDN origin was followed
    assert all("c2am/" in h.get("user-agent", h.get("User-Agent", "")) for _, _, h in hub.requests)
    model = C2AM.from_file(path)
    assert model.config.model.backbone == "test_resnet"


def test_pull_then_offline_uses_the_cache_without_requests(tiny, hub, tmp_path, monkeypatch):
    first = pull("me/tiny", cache_dir=tmp_path, endpoint=hub.endpoint, registry={})  # branch main, no sha known
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = pull("me/tiny", cache_dir=tmp_path, endpoint=hub.endpoint, registry={})
    assert again == first and hub.requests == []
    assert pull("tiny", registry=registry_for(tiny, hub), cache_dir=tmp_path, endpoint=hub.endpoint) == first
    with pytest.raises(C2AMError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        pull("me/other", cache_dir=tmp_path, endpoint=hub.endpoint, registry={})
    assert hub.requests == []


def test_wrong_sha256_is_refused_with_file_expected_and_got(tiny, hub, tmp_path):
    bad = "0" * 64
    with pytest.raises(C2AMError) as err:
        pull("tiny", registry=registry_for(tiny, hub, sha256=bad), cache_dir=tmp_path, endpoint=hub.endpoint)
    msg = str(err.value)
    assert "\n" not in msg and "sha256 mismatch" in msg
    assert f"expected {bad}" in msg and f"got {sha(tiny / 'model.safetensors')}" in msg
    assert "models--me--tiny" in msg and "model.safetensors" in msg
    # the same check applies to an unregistered spelling of a registered repo and revision
    with pytest.raises(C2AMError, match="sha256 mismatch"):
        pull(f"me/tiny@{hub.commits['v1']}", registry=registry_for(tiny, hub, sha256=bad), cache_dir=tmp_path,
             endpoint=hub.endpoint)


def test_wrong_sha256_of_a_shipped_entry_is_refused(tiny):
    reg = {"local": {"path": str(tiny / "model.safetensors"), "sha256": "f" * 64}}
    with pytest.raises(C2AMError, match=f"expected {'f' * 64}, got {sha(tiny / 'model.safetensors')}"):
        pull("local", registry=reg)
    reg["local"]["sha256"] = sha(tiny / "model.safetensors")
    assert pull("local", registry=reg) == tiny / "model.safetensors"


def test_pull_revisions_and_missing_card(tiny, hub, tmp_path):
    v2 = hub.add_commit("me/tiny", {"README.md": b"# v2\n"})
    at_v1 = pull(f"me/tiny@{hub.commits['v1']}", cache_dir=tmp_path, endpoint=hub.endpoint, registry={})
    at_main = pull("me/tiny", cache_dir=tmp_path, endpoint=hub.endpoint, registry={})
    assert (at_v1.parent.name, at_main.parent.name) == (hub.commits["v1"], v2)
    assert (at_main.parent / "README.md").read_text() == "# v2\n"
    nocard = pull("me/nocard", cache_dir=tmp_path, endpoint=hub.endpoint, registry={})
    assert nocard.exists() and not (nocard.parent / "README.md").exists()  # optional files may be absent


@pytest.mark.parametrize("spec, message", [
    ("me/absent", "me/absent: no such model repository on http://127.0.0.1"),
    ("me/tiny@nobranch", "me/tiny@nobranch: no such revision"),
    ("tiny@v9", "registry name 'tiny' is pinned to revision"),
    ("nothing", "not a registry name (known: tiny)"),
])
def test_pull_errors_are_one_line(tiny, hub, tmp_path, spec, message):
    with pytest.raises(C2AMError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        pull(spec, registry=registry_for(tiny, hub), cache_dir=tmp_path, endpoint=hub.endpoint)
    assert "\n" not in str(err.value)


def test_pull_a_repo_without_model(hub, tmp_path):
    hub.add_commit("me/empty", {"README.md": b"hi"})
    with pytest.raises(C2AMError, match="me/empty@main: the repository has no model.safetensors"):
        pull("me/empty", cache_dir=tmp_path, endpoint=hub.endpoint, registry={})


def test_list_registry_shows_what_is_cached(tiny, hub, tmp_path):
    reg = registry_for(tiny, hub)
    reg["default"] = {"path": str(tmp_path / "absent.safetensors"), "backbone": "x", "input_size": 1, "license": "l"}
    before = {r.name: r for r in list_registry(cache_dir=tmp_path, registry=reg)}
    assert before["tiny"].local_path is None and before["default"].local_path is None
    assert before["tiny"].source == f"me/tiny@{hub.commits['v1']}" and before["default"].source == "shipped with c2am"
    path = pull("tiny", registry=reg, cache_dir=tmp_path, endpoint=hub.endpoint)
    after = {r.name: r for r in list_registry(cache_dir=tmp_path, registry=reg)}
    assert after["tiny"].local_path == path


def test_resolve_weights_routes_hf_uris_and_registry_names(tiny, hub, tmp_path, monkeypatch):
    path = pull("me/tiny", cache_dir=tmp_path / "hub", endpoint=hub.endpoint, registry={})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # what HF_HOME / HF_HUB_CACHE set
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_weights("hf://me/tiny") == path
    assert resolve_weights("hf://me/tiny@main") == path
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"format": 1, "models": registry_for(tiny, hub)}))
    monkeypatch.setenv(REGISTRY_ENV, str(extra))
    assert resolve_weights("tiny") == path
    with pytest.raises(C2AMError, match="not a registry name or hf://"):
        resolve_weights("me/tiny")  # a bare repo id is not a weights spec: it could be a missing folder


def test_cli_pull_with_environment_variables(tiny, hub, tmp_path):
    """`c2am pull` in a fresh process: HF_ENDPOINT and HF_HOME are honoured, then HF_HUB_OFFLINE=1 needs no server."""
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"format": 1, "models": registry_for(tiny, hub)}))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.endpoint, REGISTRY_ENV: str(extra),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, "-m", "c2am_cli", "pull", "tiny"]
    online = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert online.returncode == 0, online.stderr
    path = Path(online.stdout.strip())
    assert path.is_relative_to(tmp_path / "hf" / "hub" / "models--me--tiny") and sha(path) == sha(tiny / "model.safetensors")
    hub.requests.clear()
    offline = subprocess.run(cmd + ["--list"], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                             timeout=120)
    assert offline.returncode == 0, offline.stderr
    row = next(line for line in offline.stdout.splitlines() if line.startswith("tiny\t"))
    assert row.endswith(str(path)) and hub.requests == []


def test_cli_pull_wrong_sha256_exits_2_with_one_line(tiny, hub, tmp_path, monkeypatch):
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"format": 1, "models": registry_for(tiny, hub, sha256="1" * 64)}))
    monkeypatch.setenv(REGISTRY_ENV, str(extra))
    pull("me/tiny", cache_dir=tmp_path / "hub", endpoint=hub.endpoint, registry={})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = CliRunner().invoke(app, ["pull", f"me/tiny@{hub.commits['v1']}"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"expected {'1' * 64}" in lines[0]


# -- model card and push -----------------------------------------------------------------------------
def card_config() -> C2AMConfig:
    cfg = C2AMConfig(model=ModelConfig(backbone="tf_efficientnet_lite0", image_size=224))
    cfg.train.epochs, cfg.train.alpha, cfg.train.backbone_weights = 7, 0.05, "efficientnet-lite0"
    cfg.data = {"train_dir": "unlabeled_pool", "train_images": 1234,
                "metrics": {"ecssd": {"MaxBoxAccV2": 0.7123, "IoU": 0.55}, "sod_bsds300": {"MaxBoxAccV2": 0.61}}}
    return cfg


def test_model_card_states_backbone_data_settings_metrics_usage_and_licence():
    text = model_card(card_config(), "me/c2am-lite0", license="apache-2.0")
    card = ModelCard(text)  # the front matter parses as Hub metadata
    assert card.data.license == "apache-2.0" and card.data.library_name == "c2am"
    assert "tf_efficientnet_lite0" in card.data.tags
    assert "| backbone | `tf_efficientnet_lite0` (timm), initialised from efficientnet-lite0 |" in text
    assert "| train dir | unlabeled_pool |" in text and "| train images | 1234 |" in text
    assert "| epochs | 7 |" in text and "| alpha (rank-weight decay) | 0.05 |" in text
    assert "| augmentation | crop |" in text
    assert "| data | MaxBoxAccV2 | IoU |" in text
    assert "| ecssd | 0.7123 | 0.55 |" in text and "| sod_bsds300 | 0.61 |  |" in text
    assert "c2am localize ./images --weights hf://me/c2am-lite0" in text
    assert 'C2AM.from_pretrained("hf://me/c2am-lite0")' in text and "@inproceedings{xie2022c2am" in text
    default = model_card(C2AMConfig(), notes="Trained on CC0 images.")
    assert "c2am localize ./images --out" in default and "C2AM.from_pretrained()" in default
    assert "No metrics were recorded" in default and "## Notes\n\nTrained on CC0 images." in default
    assert ModelCard(default).data.license == "other"


def test_push_uploads_model_config_and_card_then_pulls_back(tiny, tmp_path):
    with FakeHub(token="hf_secret") as hub:
        info = push(tiny, "me/pushed", token="hf_secret", license="mit", endpoint=hub.endpoint)
        assert info.commit_url == f"{hub.endpoint}/me/pushed/commit/{info.oid}"
        files = hub.files("me/pushed")
        assert files["model.safetensors"] == (tiny / "model.safetensors").read_bytes()
        assert C2AMConfig.from_json(files["config.json"].decode()).model.backbone == "test_resnet"
        assert ModelCard(files["README.md"].decode()).data.license == "mit"
        assert hub.repos["me/pushed"]["create_payload"]["name"] == "pushed"
        assert hub.repos["me/pushed"]["messages"] == ["Upload C2AM weights (test_resnet, 10 epochs)"]
        # pushing again to an existing repo makes a second commit; pulling gets the pushed weights back
        assert push(tiny, "me/pushed", token="hf_secret", endpoint=hub.endpoint).oid != info.oid
        back = C2AM.from_file(pull("me/pushed", cache_dir=tmp_path, endpoint=hub.endpoint, registry={}))
        own = C2AM.from_file(tiny / "model.safetensors").state_dict()
        assert all(torch.equal(v, own[k]) for k, v in back.state_dict().items())
        with pytest.raises(C2AMError, match="me/other: not authorised to write: set HF_TOKEN"):
            push(tiny, "me/other", token="hf_wrong", endpoint=hub.endpoint)


def test_push_uses_a_readme_beside_the_weights(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for f in ("model.safetensors", "config.json"):
        (run / f).write_bytes((tiny / f).read_bytes())
    (run / "README.md").write_text("---\nlicense: cc0-1.0\n---\n# hand-written\n")
    with FakeHub() as hub:
        push(run / "model.safetensors", "me/handmade", token="x", endpoint=hub.endpoint)
        assert hub.files("me/handmade")["README.md"] == (run / "README.md").read_bytes()


def test_cli_train_push_to_hub_and_push(tmp_path, monkeypatch):
    make_folder(tmp_path / "images", 8, seed=0, size=64)
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)  # what HF_ENDPOINT sets for HfApi
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        run = tmp_path / "run"
        result = CliRunner().invoke(app, ["train", str(tmp_path / "images"), "--backbone", "test_resnet", "--epochs", "1",
                                          "--batch-size", "4", "--image-size", "64", "--workers", "0", "--quiet",
                                          "--out", str(run), "--push-to-hub", "me/trained"])
        assert result.exit_code == 0, result.output
        files = hub.files("me/trained")
        assert files["model.safetensors"] == (run / "model.safetensors").read_bytes()
        assert "| train images | 8 |" in files["README.md"].decode() and "| epochs | 1 |" in files["README.md"].decode()
        assert f"pushed to {hub.endpoint}/me/trained/commit/" in result.output
        result = CliRunner().invoke(app, ["push", str(run), "me/again", "--private", "--license", "apache-2.0"])
        assert result.exit_code == 0, result.output
        assert hub.repos["me/again"]["create_payload"]["visibility"] == "private"
        assert "visibility" not in hub.repos["me/trained"]["create_payload"]  # the Hub's (or organisation's) default
        assert all(h.get("authorization", h.get("Authorization")) == "Bearer hf_test"
                   for m, _, h in hub.requests if m == "POST")
        result = CliRunner().invoke(app, ["push", str(tmp_path / "nowhere"), "me/x"])
        assert result.exit_code == 2 and "error: " in result.output


# -- packaging and the example photos -------------------------------------------------------------------
def test_wheel_ships_the_weights_folder_inside_the_package():
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]["weights"] == "c2am_cli/weights"
    assert registry_path() in (REPO / "weights" / "registry.json", REPO / "c2am_cli" / "weights" / "registry.json")


def test_example_photos_are_small_and_licensed():
    folder = REPO / "examples" / "images"
    photos = sorted(folder.glob("*.jpg"))
    licences = (folder / "LICENSES.md").read_text()
    assert 3 <= len(photos) <= 5 and sum(p.stat().st_size for p in photos) < 500_000
    for p in photos:
        assert f"`{p.name}`" in licences, p.name
        with Image.open(p) as im:
            assert im.format == "JPEG" and min(im.size) >= 256


@pytest.mark.parametrize("train, says", [
    (TrainConfig(freeze_backbone=True), "| backbone | frozen, BatchNorm statistics frozen |"),
    (TrainConfig(), "| backbone | fine-tuned, BatchNorm statistics frozen |"),
    (TrainConfig(finetune_levels=1), "| backbone | fine-tuned (last 1 feature level), BatchNorm statistics frozen |"),
    (TrainConfig(finetune_levels=2, bn_train=True),
     "| backbone | fine-tuned (last 2 feature levels), BatchNorm statistics updated |"),
])
def test_model_card_says_how_much_of_the_backbone_trained(train, says):
    assert says in model_card(C2AMConfig(train=train)).splitlines()
