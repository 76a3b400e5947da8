"""Hostile inputs and faults: weight files, CAM / cue / mask / map files, a full disk, a read-only or vanished output
folder, two runs into one output. Each ends in one line or a per-file report: no traceback, no hang, nothing lost.
Tiny random test_resnet models at 64 px, --workers 0."""
from __future__ import annotations

import json
import os
import shutil
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
from safetensors.torch import save_file

from c2am_cli import C2AM, ModelConfig
from c2am_cli.runtime.io import JsonLines
from c2am_cli.config import METADATA_KEY
from cli_helpers import invoke, one_error_line
from synthetic import make_folder, make_image

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return C2AM(ModelConfig(backbone="test_resnet", image_size=SIZE)).save(tmp_path_factory.mktemp("model") / "model.safetensors")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "images"
    make_folder(root, 4, seed=9, size=72)
    return root


def png_bomb(side: int = 100_000) -> bytes:
    """A 200-byte PNG whose header claims side x side pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def npy_header_only(shape, dtype="<f4") -> bytes:
    """A .npy whose header claims `shape` but holds no data: reading it must not allocate the claimed size."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def npz_bytes(**members: bytes) -> bytes:
    """An .npz (a zip of .npy members) from raw member bytes, which may lie."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(f"{name}.npy", data)
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


# -- hostile weight files -------------------------------------------------------------------------------------
def _rewrite(src: Path, dst: Path, config=None, metadata=..., tensors=None) -> Path:
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    if config is not None:
        cfg = json.loads(meta[METADATA_KEY])
        for key, value in config.items():
            part, _, field = key.partition("__")
            (cfg[part] if field else cfg)[field or part] = value
        meta[METADATA_KEY] = json.dumps(cfg)
    if metadata is not ...:
        meta = metadata
    if tensors is not None:
        state = tensors(state)
    save_file(state, str(dst), metadata=meta)
    return dst


def _poison(value):
    def f(state):
        key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1 and "head" in k)
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value
        return state
    return f


WEIGHT_CASES = {
    "garbage": (lambda src, dst: dst.write_bytes(os.urandom(4096)) and dst, "cannot read weights"),
    "huge_header_length": (lambda src, dst: dst.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}" * 10) and dst, "cannot read weights"),
    "header_not_json": (lambda src, dst: dst.write_bytes(struct.pack("<Q", 12) + b"{not json!!}") and dst, "cannot read weights"),
    "no_metadata": (lambda src, dst: _rewrite(src, dst, metadata=None), "not a c2am model"),
    "metadata_not_json": (lambda src, dst: _rewrite(src, dst, metadata={METADATA_KEY: "{{{"}), "config is not valid JSON"),
    "metadata_a_list": (lambda src, dst: _rewrite(src, dst, metadata={METADATA_KEY: "[1, 2]"}), "config is not a JSON object"),
    "model_not_an_object": (lambda src, dst: _rewrite(src, dst, {"model": 5}), "ModelConfig in config is not a JSON object"),
    "image_size_negative": (lambda src, dst: _rewrite(src, dst, {"model__image_size": -3}), "image_size is -3"),
    "image_size_zero": (lambda src, dst: _rewrite(src, dst, {"model__image_size": 0}), "image_size is 0"),
    "image_size_huge": (lambda src, dst: _rewrite(src, dst, {"model__image_size": 10 ** 9}), "image_size is 1000000000"),
    "image_size_text": (lambda src, dst: _rewrite(src, dst, {"model__image_size": "big"}), "image_size is 'big'"),
    "scales_nan": (lambda src, dst: _rewrite(src, dst, {"model__scales": [float("nan")]}), "scales is nan"),
    "unknown_backbone": (lambda src, dst: _rewrite(src, dst, {"model__backbone": "no_such_net"}), "backbone 'no_such_net'"),
    "other_backbone": (lambda src, dst: _rewrite(src, dst, {"model__backbone": "test_efficientnet"}), "do not fit backbone 'test_efficientnet'"),
    "huge_backbone": (lambda src, dst: _rewrite(src, dst, {"model__backbone": "vit_huge_patch14_224", "model__image_size": 56}), "do not fit backbone 'vit_huge_patch14_224'"),
    "truncated": (lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 3]) and dst, "cannot read weights"),
    "nan_tensor": (lambda src, dst: _rewrite(src, dst, tensors=_poison(float("nan"))), "NaN or infinite"),
    "inf_tensor": (lambda src, dst: _rewrite(src, dst, tensors=_poison(float("inf"))), "NaN or infinite"),
    "missing_tensor": (lambda src, dst: _rewrite(src, dst, tensors=lambda s: {k: v for k, v in list(s.items())[1:]}), "do not fit backbone"),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_hostile_weight_file_is_one_line(case, model_file, images, tmp_path):
    make, want = WEIGHT_CASES[case]
    path = make(model_file, tmp_path / "m.safetensors")
    t0 = time.time()
    line = one_error_line(invoke("localize", images, "--weights", path, "--out", tmp_path / "b.json", "--workers", 0, "-q"))
    assert want in line and "m.safetensors" in line, line
    assert time.time() - t0 < 30
    assert not (tmp_path / "b.json").exists()


def test_weights_of_a_huge_backbone_are_refused_without_building_it(model_file, tmp_path):
    """vit_huge (630 M parameters, 2.5 GB) named by a small file: refused on the meta device, in seconds, small RSS."""
    path = WEIGHT_CASES["huge_backbone"][0](model_file, tmp_path / "m.safetensors")
    code = ("import re, sys; from c2am_cli import C2AM; from c2am_cli.runtime.errors import C2AMError\n"
            "try: C2AM.from_file(sys.argv[1])\nexcept C2AMError as e: print('refused', e)\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())\n"  # this process's peak (ru_maxrss
            "print(int(hwm.group(1)) // 1024 if hwm else 0)")  # would carry the parent's over exec)
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    out = r.stdout.split("\n")
    assert out[0].startswith("refused") and "do not fit backbone 'vit_huge_patch14_224'" in out[0], r.stdout + r.stderr
    assert int(out[1]) < 1500, f"peak RSS {out[1]} MiB"  # the real model alone would be 2500 MiB


@pytest.mark.parametrize("entry", [{"path": "../../../etc/passwd"}, {"path": "/etc/passwd"}, {"path": "default/../../../x"}])
def test_registry_path_cannot_escape_the_weights_folder(entry, images, tmp_path):
    extra = tmp_path / "registry.json"
    extra.write_text(json.dumps({"format": 1, "models": {"evil": entry}}))
    line = one_error_line(invoke("localize", images, "--weights", "evil", "--out", tmp_path / "b.json", "-q",
                                 env={"C2AM_REGISTRY": str(extra)}))
    assert "outside c2am's weights folder" in line


@pytest.mark.parametrize("spec", ["hf://../../etc", "hf://org/../../etc", "hf://org/repo@../../../etc", "hf:///etc/passwd",
                                  "hf://org/repo@/abs"])
def test_hub_spec_cannot_escape_the_cache(spec, images, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = one_error_line(invoke("localize", images, "--weights", spec, "--out", tmp_path / "b.json", "-q"))
    assert "not a valid Hub repo id" in line
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))


# -- hostile CAM, cue, mask and map files -----------------------------------------------------------------------
def _cam_set(root: Path, n: int = 2, size=(40, 32)):
    """n good ids: images, CAM .npz files, cue PNGs; returns the folders."""
    cams, imgs, cues = root / "cams", root / "images", root / "cues"
    for d in (cams, imgs, cues):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(imgs / f"good{i}.jpg")
        np.savez(cams / f"good{i}.npz", keys=np.array([0]), high_res=rng.random((1, h, w), dtype=np.float32))
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(cues / f"good{i}.png")
    return cams, imgs, cues


HOSTILE_CAMS = {  # id -> (CAM file name, bytes or array) ; the cue and the image are good
    "cam_nan": ("npz", {"keys": np.array([0]), "high_res": np.full((1, 32, 40), np.nan, np.float32)}),
    "cam_inf": ("npz", {"keys": np.array([0]), "high_res": np.full((1, 32, 40), np.inf, np.float32)}),
    "cam_shape": ("npz", {"keys": np.array([0]), "high_res": np.zeros((1, 7, 9), np.float32)}),
    "cam_4d": ("npz", {"keys": np.array([0]), "high_res": np.zeros((1, 1, 32, 40), np.float32)}),
    "cam_object": ("npz", {"keys": np.array([0]), "high_res": np.array([{"a": 1}, None], dtype=object)}),
    "cam_absurd": ("npy", npy_header_only((1, 100_000, 100_000))),
    "cam_absurd_npz": ("npz", npz_bytes(keys=npy_bytes(np.array([0])), high_res=npy_header_only((1, 100_000, 100_000)))),
    "cam_text": ("npy", b"\x93NUMPY garbage after a right magic"),
}
HOSTILE_CUES = {  # id -> (cue file name, bytes or array); the CAMs and the image are good
    "cue_nan": ("npy", np.full((32, 40), np.nan, np.float32)),
    "cue_inf": ("npy", np.full((32, 40), -np.inf, np.float32)),
    "cue_shape": ("npy", np.zeros((7, 9), np.float32)),
    "cue_3d": ("npy", np.zeros((2, 32, 40), np.float32)),
    "cue_object": ("npy", np.array([None, 1], dtype=object)),
    "cue_absurd": ("npy", npy_header_only((100_000, 100_000))),
    "cue_bomb": ("png", png_bomb()),
    "cue_rgb": ("png", "rgb"),
}


def _write(path: Path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, str):
        Image.new("RGB", (40, 32)).save(path)
    else:
        np.save(path, content, allow_pickle=True)


def test_refine_hostile_cams_and_cues_reported_per_file(tmp_path):
    cams, imgs, cues = _cam_set(tmp_path)
    rng = np.random.default_rng(1)
    for key, (ext, content) in {**HOSTILE_CAMS, **HOSTILE_CUES}.items():
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(imgs / f"{key}.jpg")
        if key in HOSTILE_CAMS:
            _write(cams / f"{key}.{ext}", content)
            Image.fromarray(rng.integers(0, 255, (32, 40), dtype=np.uint8)).save(cues / f"{key}.png")
        else:
            np.savez(cams / f"{key}.npz", keys=np.array([0]), high_res=rng.random((1, 32, 40), dtype=np.float32))
            _write(cues / f"{key}.{ext}", content)
    # negative CAM values are not an error: ReLU, as CAM methods do
    np.savez(cams / "good_negative.npz", keys=np.array([0]), high_res=-rng.random((1, 32, 40), dtype=np.float32))
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(imgs / "good_negative.jpg")
    np.save(cues / "good_negative.npy", -rng.random((32, 40)).astype(np.float32))
    out = tmp_path / "masks"
    t0 = time.time()
    r = invoke("refine", "--cams", cams, "--images", imgs, "--cues", cues, "--out", out, "-q")
    assert r.exit_code == 3, r.output
    assert "Traceback" not in r.output and time.time() - t0 < 60
    failed = {e["id"]: e["reason"] for e in JsonLines(out / "errors.jsonl").read()}
    assert set(failed) == set(HOSTILE_CAMS) | set(HOSTILE_CUES), failed
    assert {p.stem for p in out.glob("*.png")} == {"good0", "good1", "good_negative"}
    assert "NaN or infinite" in failed["cam_nan"] and "NaN or infinite" in failed["cam_inf"]
    assert "finite" in failed["cue_nan"] and "finite" in failed["cue_inf"]
    assert "decompression bomb" in failed["cue_bomb"].lower()
    assert "holds 0 bytes" in failed["cue_absurd"] and "holds 0 bytes" in failed["cam_absurd"]
    assert "high_res.npy claims a 1x100000x100000 float32 array" in failed["cam_absurd_npz"], failed["cam_absurd_npz"]
    assert np.asarray(Image.open(out / "good_negative.png")).max() == 0  # no CAM above 0: all background


def _masks_root(root: Path, n_good: int = 3) -> list[str]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(2)
    ids = []
    for i in range(n_good):
        img, _, mask = make_image(rng, 48)
        img.save(root / "images" / f"good{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"good{i}.png")
        ids.append(f"good{i}")
    return ids


HOSTILE_MAPS = {
    "map_nan": np.full((48, 48), np.nan, np.float32),
    "map_inf": np.full((48, 48), np.inf, np.float32),
    "map_3d": np.zeros((2, 48, 48), np.float32),
    "map_object": np.array([None], dtype=object),
    "map_absurd": npy_header_only((100_000, 100_000)),
    "map_bomb": png_bomb(),
    "map_text": b"not a map at all",
}


def test_eval_hostile_maps_and_masks_reported_per_file(tmp_path):
    root = tmp_path / "set"
    good = _masks_root(root)
    maps = tmp_path / "maps"
    maps.mkdir()
    rng = np.random.default_rng(3)
    for g in good:
        np.save(maps / f"{g}.npy", rng.random((48, 48)).astype(np.float32))
    np.save(maps / "good_negative.npy", -rng.random((48, 48)).astype(np.float32))  # min-max normalised: fine
    img, _, mask = make_image(rng, 48)
    img.save(root / "images" / "good_negative.png")
    Image.fromarray(mask).save(root / "masks" / "good_negative.png")
    for key, content in HOSTILE_MAPS.items():
        img, _, mask = make_image(rng, 48)
        img.save(root / "images" / f"{key}.png")
        Image.fromarray(mask).save(root / "masks" / f"{key}.png")
        ext = "png" if key == "map_bomb" else "npy"
        _write(maps / f"{key}.{ext}", content) if not isinstance(content, bytes) else (maps / f"{key}.{ext}").write_bytes(content)
    hostile_masks = {"mask_bomb": png_bomb(), "mask_text": b"not a png", "mask_trunc": png_bomb(48)[:40]}
    for key, data in hostile_masks.items():
        img, _, _ = make_image(rng, 48)
        img.save(root / "images" / f"{key}.png")
        (root / "masks" / f"{key}.png").write_bytes(data)
        np.save(maps / f"{key}.npy", rng.random((48, 48)).astype(np.float32))
    out = tmp_path / "metrics.json"
    r = invoke("eval", "--dataset", "masks", "--root", root, "--maps", maps, "--out", out, "-q")
    assert r.exit_code == 3, r.output
    assert "Traceback" not in r.output
    report = json.loads(out.read_text())
    failed = {f["id"]: f["reason"] for f in report["failed"]}
    assert set(failed) == set(HOSTILE_MAPS) | set(hostile_masks), failed
    assert report["images"]["evaluated"] == len(good) + 1  # the good ones, and the negative map (min-max normalised)
    assert "NaN or infinite" in failed["map_nan"] and "NaN or infinite" in failed["map_inf"]
    assert "holds 0 bytes" in failed["map_absurd"]


# -- the file system: a full disk, read-only and vanished folders ------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only: CI runs as root); skips with the reason where it cannot be mounted."""
    mounted = []

    def mount(name: str, size: str = "1m", options: str = "") -> Path:
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip() or 'not root'}); "
                        "the full-disk and read-only tests need root")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _localize_args(images: Path, out_dir: Path, model_file: Path) -> list:
    return ["localize", images, "--out", out_dir / "boxes.json", "--maps", out_dir / "maps", "--map-format", "both",
            "--weights", model_file, "--batch-size", 4, "--workers", 0, "-q"]


def _fill(folder: Path, leave: int) -> Path:
    """Fill a tmpfs up to `leave` free bytes with one file."""
    st = os.statvfs(folder)
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_disk_full_mid_run_stops_in_one_line_and_resumes(tmpfs, model_file, tmp_path):
    images = tmp_path / "images"
    make_folder(images, 24, seed=4, size=128)
    disk = tmpfs("disk")
    filler = _fill(disk, 150_000)  # room for a few maps (each ~40 kB as npy + png), not for 24
    out = disk / "run"
    r = invoke(*_localize_args(images, out, model_file))
    line = one_error_line(r)
    assert "disk full" in line, line
    assert not (out / "boxes.json").exists() or json.loads((out / "boxes.json").read_text())  # never a corrupt JSON
    assert not [p for p in out.rglob("*.tmp")]  # no half-written file left
    done = [rec for rec in JsonLines(out / "boxes.json.manifest.jsonl").read() if "record" in rec]
    assert 0 < len(done) < 24, len(done)
    for rec in done:  # what the manifest says is finished is finished: its map is whole
        stem = Path(rec["record"]["file"]).with_suffix(".npy")
        assert np.load(out / "maps" / stem).shape == (128, 128)

    filler.unlink()  # space freed: the rerun resumes, and ends as an uninterrupted run would
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    again = invoke(*_localize_args(images, out, model_file))
    assert again.exit_code == 0, again.output
    assert f"{24 - len(done)} localised, {len(done)} from an earlier run" in again.stdout
    whole = invoke(*_localize_args(images, tmp_path / "whole", model_file))
    assert whole.exit_code == 0
    assert (out / "boxes.json").read_bytes() == (tmp_path / "whole" / "boxes.json").read_bytes()
    for p in (tmp_path / "whole" / "maps").iterdir():
        assert (out / "maps" / p.name).read_bytes() == p.read_bytes()


def test_disk_full_while_training_keeps_the_last_checkpoint(tmpfs, tmp_path):
    images = tmp_path / "images"
    make_folder(images, 8, seed=6, size=72)
    disk = tmpfs("disk", size="6m")  # a checkpoint and a model fit once, not twice beside a new checkpoint
    common = ["--backbone", "test_resnet", "--epochs", 3, "--batch-size", 4, "--image-size", SIZE, "--workers", 0, "-q"]
    run = disk / "run"
    line = one_error_line(invoke("train", images, "--out", run, *common))
    assert "disk full" in line, line
    assert not list(run.glob(".*.tmp"))
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        epoch = json.loads(f.metadata()["state"])["epoch"]
    assert 1 <= epoch < 3
    assert [r["epoch"] for r in JsonLines(run / "log.jsonl").read()][:epoch] == list(range(1, epoch + 1))
    moved = tmp_path / "moved"  # a rerun in a bigger place resumes
    shutil.copytree(run, moved)
    r = invoke("train", images, "--out", moved, *common, "--resume")
    assert r.exit_code == 0, r.output
    assert f"resuming {moved} after epoch {epoch}" in r.stdout


def test_disk_full_while_refining_stops_instead_of_failing_each_file(tmpfs, tmp_path):
    cams, imgs, cues = _cam_set(tmp_path, n=30, size=(160, 120))
    disk = tmpfs("disk")
    filler = _fill(disk, 60_000)
    out = disk / "masks"
    line = one_error_line(invoke("refine", "--cams", cams, "--images", imgs, "--cues", cues, "--out", out,
                                 "--save-maps", disk / "maps", "-q"))
    assert "disk full" in line, line
    written = list(out.glob("*.png"))
    assert len(written) < 30 and all(Image.open(p).size == (160, 120) for p in written)  # each one whole
    assert not list(disk.rglob(".*.tmp"))
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    r = invoke("refine", "--cams", cams, "--images", imgs, "--cues", cues, "--out", out, "--save-maps", disk / "maps", "-q")
    assert r.exit_code == 0, r.output
    assert len(list(out.glob("*.png"))) == 30


def test_read_only_output_folder_is_one_line(tmpfs, model_file, images):
    ro = tmpfs("ro", options=",ro")
    line = one_error_line(invoke(*_localize_args(images, ro / "run", model_file)))
    assert "Read-only file system" in line, line
    line = one_error_line(invoke("train", images, "--backbone", "test_resnet", "--epochs", 1, "--batch-size", 2,
                                 "--image-size", SIZE, "--workers", 0, "--out", ro / "run", "-q"))
    assert "Read-only file system" in line, line


def _subprocess(args: list, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "C2AM_TEST_SLEEP_PER_BATCH": str(sleep), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "c2am_cli", *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _poll(cond, proc, timeout=120.0):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out waiting for the run"
        time.sleep(0.05)


def test_output_folder_vanishing_mid_run(model_file, tmp_path, monkeypatch):
    """The output folder is removed while the run writes into it: no traceback; either one line naming the file that
    could not be written, or (where the run recreated the folder first) a complete boxes.json in the recreated folder.
    A rerun redoes the maps that vanished."""
    monkeypatch.delenv("C2AM_TEST_SLEEP_PER_BATCH", raising=False)
    images = tmp_path / "images"
    make_folder(images, 12, seed=7, size=72)
    out = tmp_path / "out"
    proc = _subprocess(_localize_args(images, out, model_file), sleep=0.3)
    manifest = JsonLines(out / "boxes.json.manifest.jsonl")
    _poll(lambda: sum("record" in r for r in manifest.read()) >= 4, proc)
    out.rename(tmp_path / "gone")  # the folder vanishes from its path at once (and then from the disk)
    shutil.rmtree(tmp_path / "gone", ignore_errors=True)
    stdout, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    if proc.returncode == 2:  # a write met the folder gone: one line naming the file
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "cannot write (No such file or directory)" in errors[0], stderr
    else:  # the run recreated the folder first and went on into it
        assert proc.returncode == 0, stderr
        assert len(json.loads((out / "boxes.json").read_text())["images"]) == 12
    again = invoke(*_localize_args(images, out, model_file))
    assert again.exit_code == 0, again.output
    assert len(list((out / "maps").glob("*.npy"))) == 12  # the rerun redid the maps that vanished


# -- one run per output ----------------------------------------------------------------------------------------
def test_second_localize_into_same_out_refuses(model_file, tmp_path, monkeypatch):
    monkeypatch.delenv("C2AM_TEST_SLEEP_PER_BATCH", raising=False)
    images = tmp_path / "images"
    make_folder(images, 24, seed=8, size=72)
    out = tmp_path / "out"
    proc = _subprocess(_localize_args(images, out, model_file), sleep=1.0)
    manifest = JsonLines(out / "boxes.json.manifest.jsonl")
    _poll(lambda: sum("record" in r for r in manifest.read()) >= 1, proc)
    t0 = time.time()
    line = one_error_line(invoke(*_localize_args(images, out, model_file)))
    assert time.time() - t0 < 30
    assert "is in use by another c2am run" in line and f"pid {proc.pid}" in line and "boxes.json.lock" in line, line
    proc.send_signal(signal.SIGKILL)  # killed: its lock goes with it; the lock file it leaves does not block
    proc.wait()
    assert (out / "boxes.json.lock").exists()
    r = invoke(*_localize_args(images, out, model_file))
    assert r.exit_code == 0, r.output
    assert len(json.loads((out / "boxes.json").read_text())["images"]) == 24
    assert not (out / "boxes.json.lock").exists()  # a run that ends removes its lock file
    records = [r["record"]["file"] for r in manifest.read() if "record" in r]
    assert sorted(set(records)) == sorted(records)  # never interleaved: each image recorded once


def test_second_train_into_same_run_refuses(tmp_path, monkeypatch):
    monkeypatch.delenv("C2AM_TEST_SLEEP_PER_BATCH", raising=False)
    images = tmp_path / "images"
    make_folder(images, 8, seed=9, size=72)
    run = tmp_path / "run"
    common = ["--backbone", "test_resnet", "--epochs", 2, "--batch-size", 4, "--image-size", SIZE, "--workers", 0, "-q"]
    proc = _subprocess(["train", images, "--out", run, *common], sleep=0.5)
    _poll(lambda: (run / ".lock").exists() and (run / ".lock").read_text().strip() == str(proc.pid), proc)
    line = one_error_line(invoke("train", images, "--out", run, *common, "--resume"))
    assert "is in use by another c2am run" in line and f"pid {proc.pid}" in line, line
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = invoke("train", images, "--out", run, *common, "--resume")
    assert r.exit_code == 0, r.output
    assert not (run / ".lock").exists()


def test_lock_released_at_exit_even_on_error(tmp_path):
    from c2am_cli.runtime.errors import C2AMError
    from c2am_cli.runtime.locking import output_lock

    lock = tmp_path / "x.lock"
    with pytest.raises(RuntimeError):
        with output_lock(lock, "--out x"):
            with pytest.raises(C2AMError, match=f"pid {os.getpid()}"):
                with output_lock(lock, "--out x"):
                    pass
            raise RuntimeError("the run failed")
    with output_lock(lock, "--out x"):  # free again
        pass
    assert not lock.exists()
