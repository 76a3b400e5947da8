"""The `c2am` command end to end: help, version, train, and every output of localize (JSON, COCO, maps, overlays)."""
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

import c2am_cli
from c2am_cli.cli import app
from synthetic import make_folder

SIZE = 64  # model input size
SUBCOMMANDS = ("pull", "train", "localize", "refine", "eval")
SIZES = {"sub0/img_000.png": (80, 48), "sub1/img_001.jpg": (50, 70), "sub0/img_002.jpg": (64, 64),
         "sub1/img_003.png": (97, 61), "sub0/img_004.jpg": (40, 40), "sub1/img_005.jpg": (120, 90)}


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def console_script() -> Path:
    """The installed `c2am` entry point, beside this interpreter (a venv's bin/ or Scripts/)."""
    for name in ("c2am", "c2am.exe"):
        path = Path(sys.executable).with_name(name)
        if path.exists():
            return path
    pytest.skip("the c2am console script is not installed next to this Python (pip install -e .)")


# -- help and version -------------------------------------------------------------------------------
def test_help_lists_the_five_subcommands():
    out = invoke("--help").output
    commands = re.findall(r"^  (\w+)\s", out.split("Commands:")[1], flags=re.M)
    assert set(SUBCOMMANDS) <= set(commands), commands
    for name in SUBCOMMANDS:  # each has its own help with an example
        assert "Usage: " in invoke(name, "--help").output


def test_version_is_the_package_version():
    assert invoke("--version").output == f"c2am {c2am_cli.__version__}\n"
    assert importlib.metadata.version("c2am") == c2am_cli.__version__


# -- train once with the real console script, then localize it every way ----------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`c2am train` on 32 synthetic images, in a real subprocess of the installed console script."""
    root = tmp_path_factory.mktemp("cli")
    make_folder(root / "train", 32, seed=11, size=72)
    out = root / "run"
    proc = subprocess.run([str(console_script()), "train", str(root / "train"), "--backbone", "test_resnet", "--epochs", "1",
                           "--batch-size", "16", "--image-size", str(SIZE), "--workers", "0", "--device", "cpu",
                           "--out", str(out), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out / 'model.safetensors'}"
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six images in two sub-folders, of other sizes than the model's input (not square, up- and down-scaled)."""
    root = tmp_path_factory.mktemp("images")
    make_folder(root, len(SIZES), seed=12, size=72, subdirs=True)
    for rel, size in SIZES.items():
        Image.open(root / rel).convert("RGB").resize(size).save(root / rel, quality=95)
    return root


def test_train_writes_weights_that_name_the_backbone(run):
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["c2am_config"])
    assert meta["model"]["backbone"] == "test_resnet" and meta["model"]["image_size"] == SIZE
    assert meta["train"]["epochs"] == 1 and meta["data"]["train_images"] == 32
    assert json.loads((run / "config.json").read_text()) == meta


def _check_record_schema(payload: dict, weights: str, threshold: float) -> dict:
    assert list(payload) == ["version", "weights", "weights_sha256", "threshold", "images"]
    assert payload["version"] == 1 and payload["weights"] == weights and payload["threshold"] == threshold
    assert re.fullmatch(r"[0-9a-f]{64}", payload["weights_sha256"])
    records = {r["file"]: r for r in payload["images"]}
    assert sorted(records) == sorted(SIZES) and len(records) == len(payload["images"])  # one per image, relative to DIR
    for rel, r in records.items():
        assert list(r) == ["file", "width", "height", "boxes", "scores"]
        assert (r["width"], r["height"]) == SIZES[rel]
        assert len(r["boxes"]) == len(r["scores"]) >= 1
        for (x1, y1, x2, y2), s in zip(r["boxes"], r["scores"]):
            assert all(isinstance(v, int) for v in (x1, y1, x2, y2))
            assert 0 <= x1 <= x2 < r["width"] and 0 <= y1 <= y2 < r["height"]
            assert 0.0 <= s <= 1.0
    return records


@pytest.fixture(scope="module")
def localized(run, images, tmp_path_factory):
    """One plain run (JSON boxes and .npy maps) and one with everything else (COCO, PNG maps, overlays)."""
    out = tmp_path_factory.mktemp("out")
    common = ["--weights", run, "--workers", 0, "--batch-size", 4, "--device", "cpu", "-q"]
    invoke("localize", images, "--out", out / "boxes.json", "--maps", out / "npy", *common)
    invoke("localize", images, "--out", out / "coco.json", "--format", "coco", "--maps", out / "png", "--map-format", "png",
           "--overlays", out / "overlays", *common)
    return out


def test_localize_writes_a_record_per_image_in_the_schema(localized, run):
    _check_record_schema(json.loads((localized / "boxes.json").read_text()), str(run), 0.5)


def test_coco_output_is_valid_and_matches_the_boxes(localized):
    coco = json.loads((localized / "coco.json").read_text())
    records = {r["file"]: r for r in json.loads((localized / "boxes.json").read_text())["images"]}
    assert coco["categories"] == [{"id": 1, "name": "object"}]
    ids = {im["id"]: im for im in coco["images"]}
    assert len(ids) == len(coco["images"]) == len(SIZES)
    assert {im["file_name"]: (im["width"], im["height"]) for im in coco["images"]} == SIZES
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    found = {}
    for a in coco["annotations"]:
        im = ids[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert a["category_id"] == 1 and w >= 1 and h >= 1 and a["area"] == w * h and a["iscrowd"] == 0
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
        found.setdefault(im["file_name"], []).append(([x, y, x + w - 1, y + h - 1], a["score"]))
    assert found == {f: list(zip(r["boxes"], r["scores"])) for f, r in records.items()}  # [x, y, w, h] = the same boxes


def test_maps_are_float16_npy_and_8bit_png_at_image_size(localized):
    for rel, (w, h) in SIZES.items():
        stem = str(Path(rel).with_suffix(""))
        npy = np.load(localized / "npy" / f"{stem}.npy", allow_pickle=False)
        assert npy.dtype == np.float16 and npy.shape == (h, w)
        assert 0.0 <= npy.min() and npy.max() <= 1.0 and npy.max() > npy.min()
        png = Image.open(localized / "png" / f"{stem}.png")
        assert png.mode == "L" and png.size == (w, h)
        assert np.abs(np.asarray(png) / 255.0 - npy.astype(np.float32)).max() <= 1 / 255 + 1e-3  # the same map
        overlay = Image.open(localized / "overlays" / f"{stem}.png")
        assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == (w, h)
    assert not list((localized / "npy").rglob("*.png")) and not list((localized / "png").rglob("*.npy"))


@pytest.fixture
def two_regions(monkeypatch):
    """Maps with two known regions on the model's 64 x 64 grid, whatever the image: a small bright one (16 x 12 pixels,
    value 1.0) and a larger, dimmer one (24 x 16, value 0.8)."""
    import torch

    from c2am_cli.models.c2am import C2AM

    def maps(self, x, *args, **kwargs):
        m = torch.zeros(x.shape[0], SIZE, SIZE)
        m[:, 8:20, 8:24] = 1.0
        m[:, 40:56, 36:60] = 0.8
        return m

    monkeypatch.setattr(C2AM, "activation_maps", maps)


SQUARE = "sub0/img_002.jpg"  # 64 x 64, the model's scale: boxes are those of the map grid


def test_all_boxes_gives_every_region(run, images, tmp_path, two_regions):
    common = ["--weights", run, "--workers", 0, "--device", "cpu", "-q"]
    invoke("localize", images, "--out", tmp_path / "one.json", *common)
    invoke("localize", images, "--out", tmp_path / "all.json", "--all-boxes", *common)
    one = _check_record_schema(json.loads((tmp_path / "one.json").read_text()), str(run), 0.5)
    every = _check_record_schema(json.loads((tmp_path / "all.json").read_text()), str(run), 0.5)
    # wsolevaluation's box of a contour is (x, y, x + w, y + h), clipped to the image
    assert one[SQUARE]["boxes"] == [[36, 40, 60, 56]]  # the largest contour
    assert every[SQUARE]["boxes"] == [[8, 8, 24, 20], [36, 40, 60, 56]]  # every contour, the brighter first
    assert every[SQUARE]["scores"][0] > every[SQUARE]["scores"][1]
    for rel in SIZES:
        assert len(every[rel]["boxes"]) == 2 and one[rel]["boxes"][0] == every[rel]["boxes"][1]


def test_threshold_option_is_recorded_and_used(run, images, tmp_path, two_regions):
    invoke("localize", images, "--weights", run, "--out", tmp_path / "b.json", "--threshold", 0.9, "--all-boxes",
           "--workers", 0, "-q")
    records = _check_record_schema(json.loads((tmp_path / "b.json").read_text()), str(run), 0.9)
    assert records[SQUARE]["boxes"] == [[8, 8, 24, 20]]  # 0.8 < 0.9 * max: the dimmer region is gone
    assert all(len(r["boxes"]) == 1 for r in records.values())


# -- any timm backbone ------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_vit"])
def test_train_and_localize_with_any_timm_backbone(backbone, images, tmp_path):
    train_dir = tmp_path / "train"
    make_folder(train_dir, 8, seed=13, size=72)
    invoke("train", train_dir, "--backbone", backbone, "--epochs", 1, "--batch-size", 4, "--image-size", SIZE,
           "--workers", 0, "--device", "cpu", "--out", tmp_path / "run", "-q")
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["c2am_config"])["model"]["backbone"] == backbone
    invoke("localize", images, "--weights", tmp_path / "run" / "model.safetensors", "--out", tmp_path / "boxes.json",
           "--maps", tmp_path / "maps", "--workers", 0, "--device", "cpu", "-q")
    _check_record_schema(json.loads((tmp_path / "boxes.json").read_text()), str(tmp_path / "run" / "model.safetensors"), 0.5)
    assert len(list((tmp_path / "maps").rglob("*.npy"))) == len(SIZES)


def test_train_options_for_feature_levels_and_augmentation_are_stored(tmp_path):
    make_folder(tmp_path / "train", 8, seed=17, size=72)
    invoke("train", tmp_path / "train", "--backbone", "test_resnet", "--feature-levels", "1,2", "--augment", "strong",
           "--epochs", 1, "--batch-size", 4, "--image-size", SIZE, "--workers", 0, "--device", "cpu",
           "--out", tmp_path / "run", "-q")
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["c2am_config"])
        head = f.get_tensor("head.conv.weight")
    assert config["model"]["feature_levels"] == [1, 2] and config["train"]["augment"] == "strong"
    import timm

    channels = timm.create_model("test_resnet", features_only=True, out_indices=(1, 2)).feature_info.channels()
    assert head.shape == (1, sum(channels), 3, 3)
    for option, value, message in [("--feature-levels", "a,b", "--feature-levels 'a,b': give timm feature indices such as '-2,-1' or '2,3'"),
                                   ("--augment", "blur", "--augment blur: use crop or strong")]:
        result = CliRunner().invoke(app, ["train", str(tmp_path / "train"), "--backbone", "test_resnet", option, value,
                                          "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "bad"), "-q"])
        assert result.exit_code == 2 and result.output.startswith(f"error: {message}"), result.output
        assert result.output.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["train", ".", "--batch-size", "0"], "error: Invalid value for '--batch-size': "),
    (["localize"], "error: Missing argument 'image_dir'. (see c2am localize --help)"),
    (["--nope"], "error: No such option: --nope (see c2am --help)"),
])
def test_usage_errors_of_the_console_script_are_one_line(args, message):
    proc = subprocess.run([str(console_script()), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
