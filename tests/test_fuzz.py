"""Fuzzing the readers: seeded mutants of real JPEG, PNG, WebP, TIFF and BMP files through the decoders, and through
`localize --maps`, `train`, `eval --dataset masks` and `refine --cues`. Every file ends processed or reported with a
reason: no traceback, no hang.

The normal suite runs a few hundred mutants; `pytest -m fuzz` runs thousands (C2AM_FUZZ_MUTANTS sets how many) and
prints the counts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from c2am_cli import C2AM, ModelConfig
from c2am_cli.cli import app
from c2am_cli.data.images import ImageFolder, SquashedImages, train_transform
from c2am_cli.predict.localize import output_names
from c2am_cli.runtime.io import JsonLines, save_npz_atomic
from mutants import mutants, seed_files
from synthetic import make_folder

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
MAX_PIXELS = 4_000_000  # what the CLI runs are given: mutants that claim more are refused before decoding
DECODE_LIMIT_S = 10.0  # far above the slowest decode measured (well under 1 s): a mutant over it is a hang
FUZZ_MUTANTS = int(os.environ.get("C2AM_FUZZ_MUTANTS", 10000))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    return seed_files()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return C2AM(ModelConfig(backbone="test_resnet", image_size=SIZE)).save(tmp_path_factory.mktemp("m") / "model.safetensors")


def write_mutants(folder: Path, seeds: dict[str, bytes], n: int, seed: int) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    how = {}
    for name, data, mutation in mutants(seeds, n, seed):
        (folder / name).write_bytes(data)
        how[name] = mutation
    return how


def fuzz_readers(tmp_path: Path, seeds: dict[str, bytes], n: int, seed: int) -> dict[str, float | int]:
    """Every mutant through the localize reader (SquashedImages) and the training reader (ImageFolder with the
    training transform): each gives an image or an error record, never an exception, within DECODE_LIMIT_S."""
    folder = tmp_path / f"mutants{seed}"
    how = write_mutants(folder, seeds, n, seed)
    files = sorted(how)
    readers = [SquashedImages(folder, files, SIZE, MAX_PIXELS),
               ImageFolder(folder, files, train_transform(SIZE, None, (0.5,) * 3, (0.5,) * 3), MAX_PIXELS)]
    counts = {"mutants": n, "processed": 0, "reported": 0, "crashes": 0, "hangs": 0, "slowest_s": 0.0}
    crashes, t0 = [], time.time()
    for i, name in enumerate(files):
        outcomes = []
        for ds in readers:
            t = time.time()
            try:
                item = ds[i]
                outcomes.append("error" not in item)
                if "error" in item:
                    assert isinstance(item["error"], str) and item["error"]
                else:
                    assert item["image"].shape[-2:] == (SIZE, SIZE)
            except BaseException as e:  # noqa: BLE001 - anything escaping is a crash
                crashes.append(f"{name} ({how[name]}): {type(e).__name__}: {e}")
                outcomes.append(None)
            dt = time.time() - t
            counts["slowest_s"] = max(counts["slowest_s"], dt)
            counts["hangs"] += dt > DECODE_LIMIT_S
        counts["crashes"] += None in outcomes
        counts["processed" if outcomes[0] else "reported"] += outcomes[0] is not None
    counts["seconds"] = round(time.time() - t0, 1)
    counts["slowest_s"] = round(counts["slowest_s"], 3)
    assert not crashes, crashes[:10]
    assert counts["hangs"] == 0, counts
    return counts


def localize_subprocess(folder: Path, out: Path, model_file: Path, timeout: float = 300) -> dict:
    """`c2am localize --maps` in a subprocess with a timeout: it ends, exits 0 or 3, prints no traceback, and every
    file is in boxes.json (with its map) or in the errors file with a reason."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "c2am_cli", "localize", str(folder), "--out", str(out / "boxes.json"),
                        "--maps", str(out / "maps"), "--weights", str(model_file), "--workers", "0", "--batch-size", "8",
                        "--max-pixels", str(MAX_PIXELS), "-q"],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert r.returncode in (0, 3), (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    records = {rec["file"] for rec in json.loads((out / "boxes.json").read_text())["images"]}
    errors = {e["path"]: e["reason"] for e in JsonLines(out / "boxes.json.errors.jsonl").read()}
    files = {p.name for p in folder.iterdir()}
    assert records | set(errors) == files and not records & set(errors)
    assert all(errors.values())
    names = output_names(sorted(files), ".npy")
    assert {p.name for p in (out / "maps").glob("*.npy")} == {names[f] for f in records}
    return {"files": len(files), "processed": len(records), "reported": len(errors), "seconds": round(time.time() - t0, 1)}


def test_readers_on_mutants(tmp_path, seeds):
    counts = fuzz_readers(tmp_path, seeds, 300, seed=1)
    assert counts["processed"] and counts["reported"]  # the mutants are neither all harmless nor all fatal


def test_localize_cli_on_mutants(tmp_path, seeds, model_file):
    folder = tmp_path / "images"
    write_mutants(folder, seeds, 40, seed=2)
    for name, data in seeds.items():
        (folder / name).write_bytes(data)
    counts = localize_subprocess(folder, tmp_path / "out", model_file)
    assert counts["processed"] >= len(seeds)


def train_on_mutants(tmp_path: Path, seeds: dict[str, bytes], n: int, seed: int) -> dict:
    folder = tmp_path / f"train{seed}"
    write_mutants(folder, seeds, n, seed=seed)
    make_folder(folder, 8, seed=seed, size=72)
    run = tmp_path / f"run{seed}"
    r = invoke("train", folder, "--backbone", "test_resnet", "--epochs", 1, "--batch-size", 8, "--image-size", SIZE,
               "--workers", 0, "--max-pixels", MAX_PIXELS, "--out", run, "-q")
    assert r.exit_code in (0, 3), r.output
    assert "Traceback" not in r.output
    errors = JsonLines(run / "errors.jsonl").read()
    reported = {e["path"] for e in errors}
    assert reported <= {p.name for p in folder.iterdir()} and all(e["reason"] for e in errors)
    trained = C2AM.from_file(run / "model.safetensors").config.data["train_images"]
    assert trained == len(list(folder.iterdir()))  # every file scanned: the readable ones trained on, the rest reported
    return {"files": trained, "processed": trained - len(reported), "reported": len(reported)}


def test_train_on_mutants(tmp_path, seeds):
    train_on_mutants(tmp_path, seeds, 40, seed=3)


def _masks_set(root: Path, seeds: dict[str, bytes], n: int, seed: int) -> list[str]:
    """images/ (good images and mutants) and masks/ (good masks and mutant masks) of a `--dataset masks` root."""
    from synthetic import make_image

    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(seed)
    from PIL import Image

    ids = []
    for i in range(6):
        img, _, mask = make_image(rng, 64)
        img.save(images / f"good{i}.png")
        Image.fromarray(mask).save(masks / f"good{i}.png")
        ids.append(f"good{i}")
    png_seeds = {k: v for k, v in seeds.items() if k.endswith(".png")}
    for k, (name, data, _) in enumerate(mutants(seeds, n, seed)):
        stem = Path(name).stem
        if k % 2:  # a mutant image with a good mask
            (images / name).write_bytes(data)
            img, _, mask = make_image(rng, 48)
            Image.fromarray(mask).crop((0, 0, 48, 48)).save(masks / f"{stem}.png")
        else:  # a good image with a mutant mask (of a PNG)
            mname, mdata, _ = next(mutants(png_seeds, 1, seed * 1000 + k))
            Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(images / f"{stem}.png")
            (masks / f"{stem}.png").write_bytes(mdata)
        ids.append(stem)
    return ids


def eval_on_mutants(tmp_path: Path, seeds: dict[str, bytes], model_file: Path, n: int, seed: int) -> dict:
    ids = _masks_set(tmp_path / f"set{seed}", seeds, n, seed=seed)
    out = tmp_path / f"metrics{seed}.json"
    r = invoke("eval", "--dataset", "masks", "--root", tmp_path / f"set{seed}", "--weights", model_file, "--workers", 0,
               "--batch-size", 8, "--out", out, "-q")
    assert r.exit_code in (0, 3), r.output
    assert "Traceback" not in r.output
    report = json.loads(out.read_text())
    failed = {f["id"] for f in report["failed"]}
    assert all(f["reason"] for f in report["failed"])
    assert failed <= set(ids) and not failed & {f"good{i}" for i in range(6)}
    assert report["images"]["evaluated"] + len(failed) == len(ids)
    return {"files": len(ids), "processed": report["images"]["evaluated"], "reported": len(failed)}


def test_eval_masks_on_mutants(tmp_path, seeds, model_file):
    eval_on_mutants(tmp_path, seeds, model_file, 30, seed=4)


def refine_on_mutants(tmp_path: Path, seeds: dict[str, bytes], n: int, seed: int) -> dict:
    """Mutant cue PNGs (and a few mutant images) for `refine --cues`: each id refined or reported."""
    import io

    from PIL import Image

    cams, images, cues = tmp_path / f"cams{seed}", tmp_path / f"images{seed}", tmp_path / f"cues{seed}"
    for d in (cams, images, cues):
        d.mkdir()
    png_seeds = {k: v for k, v in seeds.items() if k.endswith(("_l.png", "_i16.png"))}  # cues are grayscale PNGs
    rng = np.random.default_rng(seed)
    ids = []
    for k, (name, data, _) in enumerate(mutants(png_seeds, n, seed=seed)):
        key = Path(name).stem
        with Image.open(io.BytesIO(png_seeds[name.split("_", 1)[1]])) as seed_img:
            w, h = seed_img.size
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{key}.jpg")
        save_npz_atomic(cams / f"{key}.npz", keys=np.array([0]), high_res=rng.random((1, h, w), dtype=np.float32))
        (cues / f"{key}.png").write_bytes(data)
        if k % 5 == 4:  # the image a mutant too, the cue good
            (images / f"{key}.jpg").write_bytes(next(mutants({"x.jpg": seeds["seed0_rgb.jpg"]}, 1, seed * 1000 + k))[1])
            Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(cues / f"{key}.png")
        ids.append(key)
    out = tmp_path / f"masks{seed}"
    r = invoke("refine", "--cams", cams, "--images", images, "--cues", cues, "--out", out, "-q")
    assert r.exit_code in (0, 3), r.output
    assert "Traceback" not in r.output
    failed = {e["id"]: e["reason"] for e in JsonLines(out / "errors.jsonl").read()}
    done = {p.stem for p in out.glob("*.png")}
    assert done | set(failed) == set(ids) and not done & set(failed) and all(failed.values())
    return {"files": len(ids), "processed": len(done), "reported": len(failed)}


def test_refine_cues_on_mutants(tmp_path, seeds):
    refine_on_mutants(tmp_path, seeds, 30, seed=5)


# -- the long run: pytest -m fuzz -s ------------------------------------------------------------------------------
@pytest.mark.fuzz
def test_fuzz_readers_thousands(tmp_path, seeds):
    total = {"mutants": 0, "processed": 0, "reported": 0, "crashes": 0, "hangs": 0, "seconds": 0.0, "slowest_s": 0.0}
    for seed in range(10, 10 + max(1, FUZZ_MUTANTS // 1000)):
        counts = fuzz_readers(tmp_path, seeds, min(1000, FUZZ_MUTANTS), seed)
        for k in total:
            total[k] = max(total[k], counts[k]) if k == "slowest_s" else total[k] + counts[k]
    print(f"\nfuzz readers: {json.dumps({**total, 'seconds': round(total['seconds'], 1)})}")


@pytest.mark.fuzz
def test_fuzz_localize_cli_hundreds(tmp_path, seeds, model_file):
    total = {"files": 0, "processed": 0, "reported": 0, "seconds": 0.0}
    for seed in range(4):
        folder = tmp_path / f"images{seed}"
        write_mutants(folder, seeds, 150, seed=100 + seed)
        counts = localize_subprocess(folder, tmp_path / f"out{seed}", model_file, timeout=600)
        for k in total:
            total[k] += counts[k]
    print(f"\nfuzz localize CLI: {json.dumps({**total, 'seconds': round(total['seconds'], 1)})}")


@pytest.mark.fuzz
def test_fuzz_train_eval_refine_hundreds(tmp_path, seeds, model_file):
    for name, run in (("train", lambda s: train_on_mutants(tmp_path, seeds, 300, 200 + s)),
                      ("eval", lambda s: eval_on_mutants(tmp_path, seeds, model_file, 300, 300 + s)),
                      ("refine", lambda s: refine_on_mutants(tmp_path, seeds, 300, 400 + s))):
        t0 = time.time()
        counts = run(0)
        print(f"\nfuzz {name}: {json.dumps({**counts, 'seconds': round(time.time() - t0, 1)})}")
