"""Batch jobs that never lose work: every kind of bad input, SIGKILL and resume, atomic outputs,
one-line errors. Tiny random test_resnet models at 64 px, --workers 0."""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from c2am_cli import C2AM, ModelConfig
from c2am_cli.data.images import load_image, scan_images
from c2am_cli.predict.localize import output_names
from c2am_cli.runtime.io import JsonLines, atomic_path
from c2am_cli.config import METADATA_KEY
from cli_helpers import invoke, one_error_line
from synthetic import make_folder, make_image

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # model input size


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    return C2AM(ModelConfig(backbone="test_resnet", image_size=SIZE)).save(path)


def _rand_image(seed: int, w: int = 72, h: int = 56) -> Image.Image:
    img, _, _ = make_image(np.random.default_rng(seed), max(w, h))
    return img.crop((0, 0, w, h))


def _png_bomb() -> bytes:
    """A 200-byte PNG whose header claims 100000 x 100000 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


MAX_PIXELS = 20_000  # passed as --max-pixels: big.png (200 x 150) is over it, everything else under
UNLISTABLE = "locked_dir"


def build_messy_folder(root: Path) -> tuple[dict[str, str | None], callable]:
    """Good images mixed with every bad kind. Returns {relative path: None if it must be localised, else
    a word its error reason must contain}, and a context manager that makes the unreadable cases unreadable
    (chmod 000, or, as root where chmod does not stop reads, the same PermissionError simulated)."""
    root.mkdir(parents=True)
    expect: dict[str, str | None] = {}

    def good(rel: str, img: Image.Image, **save):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel, **save)
        expect[rel] = None

    def bad(rel: str, data: bytes, reason: str):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        expect[rel] = reason

    for i in range(4):
        good(f"good_{i}.jpg", _rand_image(i))
    rgb = _rand_image(10)
    good("cmyk.jpg", rgb.convert("CMYK"))
    good("gray16.png", Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)))
    assert Image.open(root / "gray16.png").mode.startswith("I")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    good("palette.png", pal, transparency=0)
    good("la.png", rgb.convert("LA"))
    good("rgba.png", rgb.convert("RGBA"))
    good("gray.jpg", rgb.convert("L"))
    good("tiny_1x1.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    good("with space é ü.jpg", _rand_image(11))
    good("日本語/写真 1.png", _rand_image(12))
    good("a/b/c/deep.jpg", _rand_image(13))
    # EXIF orientation: the upright image and copies whose stored pixels are turned, with the tag that undoes it
    upright = _rand_image(14, 48, 64)
    good("exif/upright.png", upright)
    for tag, turn in ((6, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180), (8, Image.Transpose.ROTATE_270)):
        exif = Image.Exif()
        exif[0x0112] = tag
        good(f"exif/orientation{tag}.png", upright.transpose(turn), exif=exif)
    exif = Image.Exif()
    exif[0x0112] = 6
    good("exif/camera6.jpg", upright.transpose(Image.Transpose.ROTATE_90), exif=exif, quality=95)
    # an undecodable (non-UTF-8) file name, as Linux allows
    try:
        raw = os.fsencode(root) + b"/latin1_\xe9t\xe9.jpg"
        with open(raw, "wb") as f:
            f.write(_jpeg_bytes(_rand_image(15)))
        expect[os.fsdecode(b"latin1_\xe9t\xe9.jpg")] = None
    except OSError:
        pass  # a filesystem that refuses such names
    # two inputs that share a stem in one folder, and a stem shared across folders
    good("same/x.jpg", _rand_image(16, 40, 30))
    good("same/x.png", _rand_image(17, 50, 30))
    good("same/x.jpg.png", _rand_image(18, 60, 30))
    good("other/x.jpg", _rand_image(19, 30, 30))

    jpeg = _jpeg_bytes(_rand_image(20))
    bad("zero_bytes.jpg", b"", "empty file")
    bad("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")
    bad("truncated_header.jpg", jpeg[:200], "truncated")
    bad("text.jpg", b"this is not an image\n" * 20, "not an image")
    bad("bomb.png", _png_bomb(), "decompression bomb")
    _rand_image(21, 200, 150).save(root / "big.png")
    expect["big.png"] = f"over the limit of {MAX_PIXELS}"
    (root / "loop").symlink_to(".", target_is_directory=True)  # a folder link loop: nothing may be seen twice
    (root / "self.jpg").symlink_to("self.jpg")
    expect["self.jpg"] = "symbolic link loop"
    (root / "dangling.jpg").symlink_to("nowhere.jpg")
    expect["dangling.jpg"] = "broken symbolic link"
    os.mkfifo(root / "pipe.jpg")  # would block a reader forever
    expect["pipe.jpg"] = "not a regular file"
    good("locked.jpg", _rand_image(22))
    expect["locked.jpg"] = "permission denied"
    good(f"{UNLISTABLE}/hidden.jpg", _rand_image(23))
    del expect[f"{UNLISTABLE}/hidden.jpg"]
    expect[UNLISTABLE] = "cannot list this folder"
    (root / "notes.txt").write_text("not an image extension: ignored")
    (root / "folder.jpg").mkdir()  # a folder with an image extension: ignored
    return expect


class unreadable:
    """chmod 000 on locked.jpg and locked_dir; as root (where that does not stop reads) the same errors simulated."""

    def __init__(self, root: Path, monkeypatch):
        self.root, self.mp = root, monkeypatch
        self.simulated = os.geteuid() == 0  # root reads a chmod 000 file: simulate the PermissionError instead

    def __enter__(self):
        file, folder = self.root / "locked.jpg", self.root / UNLISTABLE
        if not self.simulated:
            file.chmod(0)
            folder.chmod(0)
            return self
        open_image, scandir = Image.open, os.scandir

        def fake_open(fp, *a, **k):
            if str(fp).endswith("locked.jpg"):
                raise PermissionError(13, "Permission denied", str(fp))
            return open_image(fp, *a, **k)

        def fake_scandir(path="."):
            if os.fsdecode(path).endswith(UNLISTABLE):
                raise PermissionError(13, "Permission denied", path)
            return scandir(path)

        self.mp.setattr(Image, "open", fake_open)
        self.mp.setattr(os, "scandir", fake_scandir)
        return self

    def __exit__(self, *exc):
        if not self.simulated:
            (self.root / "locked.jpg").chmod(0o644)
            (self.root / UNLISTABLE).chmod(0o755)
        else:
            self.mp.undo()


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy") / "images"
    return root, build_messy_folder(root)


def test_localize_messy_folder_outcome_per_file(messy, model_file, tmp_path, monkeypatch):
    root, expect = messy
    out, maps = tmp_path / "out" / "boxes.json", tmp_path / "maps"
    with unreadable(root, monkeypatch):
        r = invoke("localize", root, "--weights", model_file, "--out", out, "--maps", maps, "--map-format", "both",
                   "--batch-size", 4, "--workers", 0, "--max-pixels", MAX_PIXELS, "-q")
    assert r.exit_code == 3, r.output  # the documented "done, but some files failed"
    good = {f for f, why in expect.items() if why is None}
    bad = {f: why for f, why in expect.items() if why is not None}

    doc = json.loads(out.read_text(encoding="utf-8"))
    records = {rec["file"]: rec for rec in doc["images"]}
    assert set(records) == good  # every good file once: the link loop added no duplicates
    errors = {e["path"]: e["reason"] for e in JsonLines(str(out) + ".errors.jsonl").read()}
    assert set(errors) == set(bad)
    for f, why in bad.items():
        assert why.lower() in errors[f].lower(), (f, errors[f])
        warnings = [ln for ln in r.stderr.splitlines() if ln.startswith(f"warning: {f}: ")]
        assert len(warnings) == 1, (f, r.stderr)

    for f, rec in records.items():  # boxes inside the upright image; maps at its size, one file per input
        w, h = load_image(root / f).size
        assert (rec["width"], rec["height"]) == (w, h)
        for x1, y1, x2, y2 in rec["boxes"]:
            assert 0 <= x1 <= x2 < w and 0 <= y1 <= y2 < h
        npy = maps / output_names(sorted(good), ".npy")[f]
        png = maps / output_names(sorted(good), ".png")[f]
        assert np.load(npy).shape == (h, w) and Image.open(png).size == (w, h)
    assert records["tiny_1x1.png"]["boxes"] == [[0, 0, 0, 0]]
    # same stem: distinct map files, each of its own image's size (an overwrite would show another size)
    for f, shape in {"same/x.jpg": (30, 40), "same/x.png": (30, 50), "same/x.jpg.png": (30, 60), "other/x.jpg": (30, 30)}.items():
        assert np.load(maps / output_names(sorted(good), ".npy")[f]).shape == shape
    # EXIF: orientation applied before the model, so maps and boxes equal those of the upright copy
    ref = np.load(maps / "exif/upright.npy")
    assert ref.shape == (64, 48)
    for tag in (3, 6, 8):
        assert np.array_equal(np.load(maps / f"exif/orientation{tag}.npy"), ref)
        assert records[f"exif/orientation{tag}.png"]["boxes"] == records["exif/upright.png"]["boxes"]
    assert records["exif/camera6.jpg"]["width"] == 48 and records["exif/camera6.jpg"]["height"] == 64
    # nothing half-written lies around
    assert not [p for p in list(maps.rglob(".*")) + list(out.parent.glob(".*")) if p.name.endswith(".tmp")]

    # a re-run after completion is a no-op that writes the same boxes.json, and reports the same failures
    before = out.read_bytes()
    stamp = {p: p.stat().st_mtime_ns for p in maps.rglob("*.npy")}
    with unreadable(root, monkeypatch):
        r2 = invoke("localize", root, "--weights", model_file, "--out", out, "--maps", maps, "--map-format", "both",
                    "--batch-size", 4, "--workers", 0, "--max-pixels", MAX_PIXELS, "-q")
    assert r2.exit_code == 3 and f"0 localised, {len(good)} from an earlier run, {len(bad)} failed" in r2.stdout
    assert out.read_bytes() == before
    assert stamp == {p: p.stat().st_mtime_ns for p in maps.rglob("*.npy")}
    assert {e["path"] for e in JsonLines(str(out) + ".errors.jsonl").read()} == set(bad)


def test_strict_stops_at_first_bad_file(messy, model_file, tmp_path):
    root, expect = messy
    out = tmp_path / "boxes.json"
    r = invoke("localize", root, "--weights", model_file, "--out", out, "--batch-size", 4, "--workers", 0,
               "--max-pixels", MAX_PIXELS, "--strict", "-q")
    first_bad = next(f for f in sorted(scan_images(root)) if expect.get(f) is not None and f != "locked.jpg")
    line = one_error_line(r)
    assert f"{first_bad}: " in line and expect[first_bad] in line.lower()
    assert not out.exists()
    assert [e["path"] for e in JsonLines(str(out) + ".errors.jsonl").read()] == [first_bad]


def test_train_on_messy_folder_reports_and_goes_on(messy, tmp_path, monkeypatch):
    root, expect = messy
    run = tmp_path / "run"
    with unreadable(root, monkeypatch):
        r = invoke("train", root, "--backbone", "test_resnet", "--epochs", 1, "--batch-size", 4, "--image-size", SIZE,
                   "--workers", 0, "--max-pixels", MAX_PIXELS, "--out", run, "-q")
    assert r.exit_code == 3, r.output
    reported = [e["path"] for e in JsonLines(run / "errors.jsonl").read()]
    assert sorted(reported) == sorted(f for f, why in expect.items() if why is not None)  # each bad file once
    hidden = 1  # the image inside the folder that could not be listed
    assert C2AM.from_file(run / "model.safetensors").config.data["train_images"] == len(scan_images(root)) - hidden
    assert [rec["epoch"] for rec in JsonLines(run / "log.jsonl").read()] == [1]


def test_image_decoding_values(tmp_path):
    """16-bit scaled (not clipped), transparency over white, palette, grayscale: pixel values by hand."""
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert np.asarray(load_image(tmp_path / "g16.png"))[0, :, 0].tolist() == [0, 128, 255]
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.asarray(load_image(tmp_path / "rgba.png"))[0].tolist() == [[255, 255, 255], [255, 0, 0], [127, 127, 255]]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "float.tif")
    assert np.asarray(load_image(tmp_path / "float.tif"))[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[10, 200]], dtype=np.uint8), "L").save(tmp_path / "l.png")
    assert np.asarray(load_image(tmp_path / "l.png"))[0].tolist() == [[10, 10, 10], [200, 200, 200]]


def test_output_names_never_collide():
    files = ["a.jpg", "a.png", "a.jpg.png", "b.jpg", "d/a.jpg", "e/B.png", "e/b.jpg"]
    names = output_names(files, ".npy")
    assert len({n.casefold() for n in names.values()}) == len(files)
    assert names["b.jpg"] == "b.npy" and names["d/a.jpg"] == "d/a.npy"  # short names where nothing clashes
    assert names["a.jpg"] == "a.jpg.npy" and names["a.jpg.png"] == "a.jpg.png.npy"


def test_jsonlines_survives_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    jl = JsonLines(path)
    jl.append({"file": "é.jpg"})
    jl.close()
    with open(path, "ab") as f:
        f.write('{"file": "写'.encode()[:-1])  # killed inside a UTF-8 character
    assert JsonLines(path).read() == [{"file": "é.jpg"}]
    jl = JsonLines(path)
    jl.append({"file": os.fsdecode(b"\xff.jpg")})  # an undecodable name: escaped, still valid UTF-8
    jl.close()
    assert JsonLines(path).read()[-1] == {"file": os.fsdecode(b"\xff.jpg")}
    assert path.read_bytes().splitlines()[-1].decode("utf-8").isascii()  # written as \udcff, valid UTF-8


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]


# -- resume and kill -------------------------------------------------------------------------------
def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _poll(cond, proc, timeout=120.0):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - t0 < timeout, "timed out waiting for the run"
        time.sleep(0.05)


def _subprocess(args: list, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "C2AM_TEST_SLEEP_PER_BATCH": str(sleep)}  # test hook in c2am_cli.data.images.pause_for_tests
    return subprocess.Popen([sys.executable, "-m", "c2am_cli", *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_localize_killed_and_rerun_equals_uninterrupted(model_file, tmp_path, monkeypatch):
    monkeypatch.delenv("C2AM_TEST_SLEEP_PER_BATCH", raising=False)
    images = tmp_path / "images"
    make_folder(images, 13, seed=3, size=72, subdirs=True)
    (images / "sub0" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    common = ["--weights", model_file, "--batch-size", 3, "--workers", 0, "--map-format", "both", "-q"]

    def args(name):
        d = tmp_path / name
        return ["localize", images, "--out", d / "boxes.json", "--maps", d / "maps", "--overlays", d / "overlays", *common]

    killed = tmp_path / "killed"
    manifest = JsonLines(killed / "boxes.json.manifest.jsonl")
    proc = _subprocess(args("killed"), sleep=0.3)
    _poll(lambda: sum("record" in r for r in manifest.read()) >= 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = sum("record" in r for r in manifest.read())
    assert 4 <= done_at_kill < 13 and not (killed / "boxes.json").exists()
    (killed / "maps" / ".img_000.npy.abcd1234.tmp").write_bytes(b"left by a kill mid-write")

    again = invoke(*args("killed"))
    assert again.exit_code == 3, again.output
    assert f" {done_at_kill} from an earlier run" in again.stdout
    whole = invoke(*args("whole"))
    assert whole.exit_code == 3
    a, b = _tree(killed), _tree(tmp_path / "whole")
    a = {k: v for k, v in a.items() if ".jsonl" not in k}
    b = {k: v for k, v in b.items() if ".jsonl" not in k}
    assert a.keys() == b.keys() and len([k for k in a if k.endswith(".npy")]) == 13
    assert a == b  # boxes.json, every map (npy and png) and every overlay: byte for byte
    errs = lambda d: JsonLines(tmp_path / d / "boxes.json.errors.jsonl").read()
    assert errs("killed") == errs("whole") == [{"path": "sub0/broken.jpg", "reason": errs("whole")[0]["reason"]}]


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_train_killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.delenv("C2AM_TEST_SLEEP_PER_BATCH", raising=False)
    images = tmp_path / "images"
    make_folder(images, 12, seed=5, size=72)
    common = ["--backbone", "test_resnet", "--epochs", 3, "--batch-size", 4, "--image-size", SIZE, "--workers", 0,
              "--seed", 7, "-q"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = _subprocess(["train", images, "--out", killed, *common], sleep=0.4)
    _poll(lambda: (killed / "checkpoint.safetensors").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with safe_open(str(killed / "checkpoint.safetensors"), "pt") as f:
        epoch_at_kill = json.loads(f.metadata()["state"])["epoch"]
    assert 1 <= epoch_at_kill < 3
    stale = killed / ".checkpoint.safetensors.abcd1234.tmp"  # as left by a kill while a checkpoint was written
    stale.write_bytes(b"half a checkpoint")

    r = invoke("train", images, "--out", killed, *common, "--resume")
    assert r.exit_code == 0, r.output
    assert f"resuming {killed} after epoch {epoch_at_kill}" in r.stdout and not stale.exists()
    r = invoke("train", images, "--out", whole, *common)
    assert r.exit_code == 0, r.output
    for name in ("model.safetensors", "checkpoint.safetensors"):
        a, b = _model_tensors(killed / name), _model_tensors(whole / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert C2AM.from_file(killed / "model.safetensors").config.model == C2AM.from_file(whole / "model.safetensors").config.model
    log = lambda d: [{k: v for k, v in rec.items() if k != "seconds"} for rec in JsonLines(d / "log.jsonl").read()]
    assert log(killed) == log(whole) and [rec["epoch"] for rec in log(whole)] == [1, 2, 3]


def test_resume_after_last_checkpoint_rewrites_final_model(tmp_path):
    """Killed between the last checkpoint and model.safetensors: --resume finishes the file from the checkpoint."""
    images = tmp_path / "images"
    make_folder(images, 8, seed=1, size=72)
    common = ["--backbone", "test_resnet", "--epochs", 1, "--batch-size", 4, "--image-size", SIZE, "--workers", 0, "-q"]
    assert invoke("train", images, "--out", tmp_path / "run", *common).exit_code == 0
    final = tmp_path / "run" / "model.safetensors"
    good = final.read_bytes()
    final.write_bytes(b"stale")
    r = invoke("train", images, "--out", tmp_path / "run", *common, "--resume")
    assert r.exit_code == 0, r.output
    assert final.read_bytes() == good


def test_nan_loss_stops_naming_the_step(tmp_path, monkeypatch):
    from c2am_cli.models.loss import ContrastiveLoss

    images = tmp_path / "images"
    make_folder(images, 8, seed=2, size=72)
    forward, calls = ContrastiveLoss.forward, []

    def poisoned(self, fg, bg):
        terms = forward(self, fg, bg)
        calls.append(1)
        if len(calls) == 3:  # the third step: epoch 2 with 2 steps per epoch
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(ContrastiveLoss, "forward", poisoned)
    run = tmp_path / "run"
    r = invoke("train", images, "--backbone", "test_resnet", "--epochs", 3, "--batch-size", 4, "--image-size", SIZE,
               "--workers", 0, "--out", run, "-q")
    line = one_error_line(r)
    assert "loss is nan at step 2 (epoch 2)" in line
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:  # the last good checkpoint is intact
        assert json.loads(f.metadata()["state"])["epoch"] == 1
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys() if f.get_tensor(k).is_floating_point())


# -- wrong arguments: one line, exit 2, no traceback -------------------------------------------------
def _rewrite_config(src: Path, dst: Path, **changes) -> Path:
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta[METADATA_KEY])
    for key, value in changes.items():
        part, _, field = key.partition("__")
        (cfg[part] if field else cfg)[field or part] = value
    meta[METADATA_KEY] = json.dumps(cfg)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "images"
    make_folder(root, 4, seed=9, size=72)
    return root


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "other_backbone", "truncated", "unknown_version",
                                  "threshold_high", "threshold_low", "scales", "format", "out_is_folder",
                                  "maps_equal_overlays", "other_settings", "maps_is_a_file"])
def test_localize_wrong_arguments(case, small_folder, model_file, tmp_path):
    args = ["localize", small_folder, "--weights", model_file, "--out", tmp_path / "b.json", "--workers", 0, "-q"]
    if case == "missing":
        args[1], want = tmp_path / "nope", "no such folder"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[1], want = tmp_path / "empty", "no images found"
    elif case == "no_images":
        (tmp_path / "txt").mkdir()
        (tmp_path / "txt" / "a.txt").write_text("x")
        args[1], want = tmp_path / "txt", "no images found"
    elif case == "other_backbone":
        args[3], want = _rewrite_config(model_file, tmp_path / "m.safetensors", model__backbone="test_efficientnet"), "do not fit backbone 'test_efficientnet'"
    elif case == "truncated":
        (tmp_path / "t.safetensors").write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
        args[3], want = tmp_path / "t.safetensors", "cannot read weights"
    elif case == "unknown_version":
        args[3], want = _rewrite_config(model_file, tmp_path / "v.safetensors", version=99), "config version 99 is not supported"
    elif case == "threshold_high":
        args, want = args + ["--threshold", "1.5"], "--threshold 1.5: must be between 0 and 1"
    elif case == "threshold_low":
        args, want = args + ["--threshold", "-0.1"], "must be between 0 and 1"
    elif case == "scales":
        args, want = args + ["--scales", "big"], "--scales 'big'"
    elif case == "format":
        args, want = args + ["--format", "xml"], "--format xml: use json or coco"
    elif case == "out_is_folder":
        args[5], want = tmp_path, "is a folder"
    elif case == "maps_equal_overlays":
        args, want = args + ["--maps", tmp_path / "o", "--overlays", tmp_path / "o", "--map-format", "png"], "overwrite each other"
    elif case == "other_settings":
        assert invoke(*args).exit_code == 0
        args, want = args + ["--threshold", "0.3"], "an earlier run used other weights or settings (threshold: 0.5 -> 0.3); pass --overwrite"
    elif case == "maps_is_a_file":  # a write that fails (like a full disk): one line naming the output
        (tmp_path / "maps").write_text("a file where the maps folder should be")
        args, want = args + ["--maps", tmp_path / "maps"], "img_000.npy: cannot write"
    line = one_error_line(invoke(*args))
    assert want in line, line
    if case == "truncated":
        assert "t.safetensors" in line


def test_train_wrong_arguments(small_folder, model_file, tmp_path):
    import timm

    common = ["--epochs", 1, "--batch-size", 2, "--image-size", SIZE, "--workers", 0, "-q"]
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "resnet.safetensors"))
    line = one_error_line(invoke("train", small_folder, "--backbone", "test_efficientnet", "--backbone-weights",
                                 tmp_path / "resnet.safetensors", "--out", tmp_path / "r1", *common))
    assert "backbone weights do not fit this backbone" in line
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "a.png")
    (tmp_path / "a_file").write_text("x")
    assert "is a file; give a run folder" in one_error_line(invoke("train", small_folder, "--backbone", "test_resnet", "--out", tmp_path / "a_file", *common))
    assert "the contrast needs at least 2" in one_error_line(invoke("train", one, "--backbone", "test_resnet", "--out", tmp_path / "r2", *common))
    run = tmp_path / "r3"
    assert invoke("train", small_folder, "--backbone", "test_resnet", "--out", run, *common).exit_code == 0
    ckpt = run / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    line = one_error_line(invoke("train", small_folder, "--backbone", "test_resnet", "--out", run, *common, "--resume"))
    assert "checkpoint.safetensors: cannot resume from this checkpoint" in line


def test_debug_shows_the_traceback(tmp_path):
    r = invoke("--debug", "localize", tmp_path / "nope")
    assert r.exit_code == 2 and "Traceback" in r.stderr and "no such folder" in r.stderr


def test_outputs_inside_input_folder_are_not_inputs(small_folder, model_file, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(small_folder, images)
    args = ["localize", images, "--weights", model_file, "--out", images / "boxes.json", "--maps", images / "maps",
            "--overlays", images / "overlays", "--map-format", "png", "--workers", 0, "-q"]
    assert invoke(*args).exit_code == 0
    r = invoke(*args)
    assert r.exit_code == 0 and "0 localised, 4 from an earlier run, 0 failed" in r.stdout
    single = invoke("localize", images / "img_001.jpg", "--weights", model_file, "--out", tmp_path / "one.json", "-q")
    assert single.exit_code == 0 and [rec["file"] for rec in json.loads((tmp_path / "one.json").read_text())["images"]] == ["img_001.jpg"]


def test_pillow_limit_is_left_alone_unless_more_is_asked_for(tmp_path, monkeypatch):
    from c2am_cli.data.images import DEFAULT_MAX_PIXELS
    from c2am_cli.runtime.errors import ImageError

    fresh = subprocess.run([sys.executable, "-c", "import c2am_cli.cli, c2am_cli.data.images, PIL.Image as I; print(I.MAX_IMAGE_PIXELS)"],
                           capture_output=True, text=True, check=True)
    pillow = int(fresh.stdout)  # importing c2am leaves Pillow's limit as it was
    assert 2 * pillow == DEFAULT_MAX_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow)  # restored after the test
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_bomb())
    with pytest.raises(ImageError, match=r"10000000000 pixels is over the limit of 178956970 .*raise --max-pixels"):
        load_image(bomb)  # Pillow refuses first; the reason is still c2am's
    assert Image.MAX_IMAGE_PIXELS == pillow
    with pytest.raises(ImageError, match="cannot decode"):  # asked for: Pillow lets it through, the data is short
        load_image(bomb, max_pixels=None)
    assert Image.MAX_IMAGE_PIXELS is None


@pytest.mark.parametrize("args, reason", [
    (["--freeze-backbone", "--finetune-levels", "1"], "--freeze-backbone trains the head only"),
    (["--finetune-levels", "5"], "--finetune-levels 5: this backbone has 5 feature levels (use 1..4"),
])
def test_contradictory_or_impossible_fine_tuning_is_one_line(args, reason, tmp_path):
    make_folder(tmp_path / "imgs", 4, seed=2, size=48)
    r = invoke("train", tmp_path / "imgs", "--backbone", "test_resnet", "--image-size", 48, "--workers", 0,
               "--out", tmp_path / "run", *args)
    assert reason in one_error_line(r)
