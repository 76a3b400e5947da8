"""The streaming localisation pipeline: torchvision decoding equals Pillow's, uint8 squashing equals
eval_transform, boxes do not depend on workers or on where JPEGs are decoded, and the background writer keeps the
manifest in order and after the files. Tiny random test_resnet models at 64 px."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from c2am_cli import C2AM, ModelConfig
from c2am_cli.data.images import (ImageFolder, SquashedImages, apply_orientation, collate, eval_transform, load_image,
                           load_image_tensor, normalize_batch, read_plain_jpeg, squash)
from c2am_cli.runtime.errors import C2AMError, ImageError
from c2am_cli.predict.localize import InOrder, Localizer, output_names
from c2am_cli.runtime.io import JsonLines
from synthetic import make_folder, make_image

SIZE = 64
XMP_ORIENTATION_6 = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                     b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


def _image(seed: int, w: int = 90, h: int = 70) -> Image.Image:
    img, _, _ = make_image(np.random.default_rng(seed), max(w, h))
    return img.crop((0, 0, w, h))


def _exif(tag: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = tag
    return exif


@pytest.fixture(scope="module")
def model() -> C2AM:
    torch.manual_seed(0)
    return C2AM(ModelConfig(backbone="test_resnet", image_size=SIZE))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    """JPEGs of every kind the fast path takes or hands on: 4:2:0 and 4:4:4 colour, greyscale, the eight EXIF
    orientations, an XMP-only orientation, CMYK; and a PNG."""
    root = tmp_path_factory.mktemp("jpegs")
    _image(0).save(root / "rgb420.jpg", quality=85)
    _image(1).save(root / "rgb444.jpg", quality=95, subsampling=0)
    _image(2).convert("L").save(root / "gray.jpg")
    for tag in range(1, 9):
        _image(3, 50, 30).save(root / f"exif{tag}.jpg", exif=_exif(tag), quality=90)
    _image(4).save(root / "xmp6.jpg", xmp=XMP_ORIENTATION_6)
    _image(5).convert("CMYK").save(root / "cmyk.jpg")
    _image(6).save(root / "plain.png")
    return root


def test_apply_orientation_is_pillows_exif_transpose():
    a = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    t = torch.from_numpy(a).permute(2, 0, 1)
    for tag in range(1, 9):
        img = Image.fromarray(a)
        img.getexif()[0x0112] = tag
        expected = np.asarray(ImageOps.exif_transpose(img))
        assert np.array_equal(apply_orientation(t, tag).permute(1, 2, 0).numpy(), expected), tag


def test_torchvision_decode_equals_pillow(jpegs):
    """Same pixels as load_image, to JPEG tolerance (both are libjpeg-turbo: in practice identical), same orientation."""
    for path in sorted(jpegs.iterdir()):
        fast = load_image_tensor(path)
        slow = np.asarray(load_image(path))
        assert fast.dtype == torch.uint8 and fast.shape == (3, *slow.shape[:2]), path.name
        diff = np.abs(fast.permute(1, 2, 0).numpy().astype(int) - slow.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, (path.name, diff.max(), diff.mean())
    upright = load_image_tensor(jpegs / "exif1.jpg")
    assert load_image_tensor(jpegs / "exif6.jpg").shape[1:] == upright.shape[1:][::-1]  # 90 degrees turned
    assert load_image_tensor(jpegs / "xmp6.jpg").shape[1:] == (90, 70)  # Pillow reads XMP orientation: so do we


def test_fast_path_is_taken_for_plain_jpegs_only(jpegs):
    assert read_plain_jpeg(jpegs / "rgb420.jpg") is not None and read_plain_jpeg(jpegs / "gray.jpg") is not None
    assert read_plain_jpeg(jpegs / "exif6.jpg")[1:] == (6, (30, 50))  # orientation, upright (width, height)
    assert read_plain_jpeg(jpegs / "xmp6.jpg")[1] == 6
    assert read_plain_jpeg(jpegs / "cmyk.jpg") is None and read_plain_jpeg(jpegs / "plain.png") is None
    assert read_plain_jpeg(jpegs / "rgb420.jpg", max_pixels=100) is None  # refused below: by load_image, with its reason


def test_bad_jpegs_give_pillows_reasons(jpegs, tmp_path):
    data = (jpegs / "rgb420.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff garbage")
    for name in ("truncated.jpg", "garbage.jpg"):
        with pytest.raises(ImageError) as fast:
            load_image_tensor(tmp_path / name)
        with pytest.raises(ImageError) as slow:
            load_image(tmp_path / name)
        assert fast.value.reason == slow.value.reason
    with pytest.raises(ImageError, match="over the limit of 100"):
        load_image_tensor(jpegs / "rgb420.jpg", max_pixels=100)


def test_squashed_batch_equals_eval_transform(jpegs):
    """localize's path (uint8 squash in the worker, normalise per batch) gives eval_transform's tensors exactly."""
    files = sorted(p.name for p in jpegs.iterdir())
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = collate([SquashedImages(jpegs, files, SIZE)[i] for i in range(len(files))])
    theirs = collate([ImageFolder(jpegs, files, eval_transform(SIZE, mean, std))[i] for i in range(len(files))])
    assert ours.images.dtype == torch.uint8 and ours.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(normalize_batch(ours.images, mean, std), theirs.images)
    assert ours.sizes == theirs.sizes
    assert torch.equal(squash(TF.pil_to_tensor(load_image(jpegs / "plain.png")), SIZE), ours.images[files.index("plain.png")])


def test_in_order_returns_in_submission_order_and_bounds_work():
    work = InOrder(threads=4, limit=3)
    running = []

    def job(i):
        running.append(i)
        time.sleep(0.02 * (5 - i % 5))  # later jobs finish first
        return i * i

    got = []
    for i in range(10):
        work.submit(i, job, i)
        assert len(work.pending) <= 4
        got += list(work.ready())  # waits while more than 3 are in flight
        assert len(work.pending) <= 3
    got += list(work.ready(wait_all=True))
    work.close()
    assert got == [(i, i * i) for i in range(10)]


def _run(model, images, out, **kw):
    run_kw = {k: kw.pop(k) for k in ("maps_dir", "overwrite") if k in kw}
    loc = Localizer(model, device="cpu", batch_size=4, **{"num_workers": 0, **kw})
    return loc, loc.run(images, out, progress=False, **run_kw)


def _boxes(out: Path) -> dict:
    return {r["file"]: (r["boxes"], r["scores"]) for r in json.loads(out.read_text())["images"]}


def test_same_boxes_with_workers_0_and_2(model, tmp_path):
    images = tmp_path / "images"
    make_folder(images, 10, seed=4, size=80)
    _run(model, images, tmp_path / "w0.json", num_workers=0)
    _run(model, images, tmp_path / "w2.json", num_workers=2, prefetch_factor=2)
    assert _boxes(tmp_path / "w0.json") == _boxes(tmp_path / "w2.json") and len(_boxes(tmp_path / "w0.json")) == 10


def test_deferred_jpeg_decoding_gives_the_same_outputs(model, jpegs, tmp_path):
    """gpu_decode's path (JPEG bytes to the main process, batched decode, orientation and squash there), run on the
    CPU: the same maps, boxes and error reasons as decoding in the workers."""
    images = tmp_path / "images"
    images.mkdir()
    for p in jpegs.iterdir():
        (images / p.name).write_bytes(p.read_bytes())
    data = (jpegs / "rgb420.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (images / "cut_with_eoi.jpg").write_bytes(data[: len(data) // 2] + b"\xff\xd9")  # ends as a whole JPEG: deferred
    _run(model, images, tmp_path / "plain" / "boxes.json", maps_dir=tmp_path / "plain" / "maps")
    loc = Localizer(model, device="cpu", batch_size=4, num_workers=0)
    loc.gpu_decode = True  # on CPU only in this test: Localizer(gpu_decode=True) wants CUDA
    loc.run(images, tmp_path / "deferred" / "boxes.json", maps_dir=tmp_path / "deferred" / "maps", progress=False)
    assert _boxes(tmp_path / "plain" / "boxes.json") == _boxes(tmp_path / "deferred" / "boxes.json")
    for npy in (tmp_path / "plain" / "maps").glob("*.npy"):
        assert np.array_equal(np.load(npy), np.load(tmp_path / "deferred" / "maps" / npy.name)), npy.name
    errs = lambda d: JsonLines(tmp_path / d / "boxes.json.errors.jsonl").read()  # noqa: E731
    assert errs("plain") == errs("deferred") and {e["path"] for e in errs("plain")} >= {"truncated.jpg"}


def test_gpu_decode_wants_cuda(model, tmp_path):
    with pytest.raises(C2AMError, match="--gpu-decode"):
        Localizer(model, device="cpu", gpu_decode=True)
    from typer.testing import CliRunner

    from c2am_cli.cli import app

    make_folder(tmp_path / "images", 2, size=40)
    weights = model.save(tmp_path / "model.safetensors")
    r = CliRunner().invoke(app, ["localize", str(tmp_path / "images"), "--weights", str(weights), "--device", "cpu",
                                 "--gpu-decode", "-q"])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        "error: --gpu-decode: decodes with nvjpeg on a CUDA device; this run is on cpu"]


def test_compile_in_place_keeps_maps_and_weights_names(tmp_path):
    torch.manual_seed(1)
    model = C2AM(ModelConfig(backbone="test_resnet", image_size=SIZE))
    x = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    eager = Localizer(model, device="cpu").maps(x)
    keys = list(model.state_dict())
    compiled = Localizer(model, device="cpu", compile={"backend": "eager"})  # dynamo graph capture, no C++ build
    assert list(compiled.model.state_dict()) == keys  # so the resume fingerprint does not change
    assert torch.allclose(compiled.maps(x), eager, atol=1e-6)


def test_background_writer_keeps_manifest_in_order_and_after_the_files(model, tmp_path, monkeypatch):
    """A write failing part-way (disk full on the 7th map): every record in the manifest has its complete map file,
    in file order; the failed image has neither a record nor a file, nor a temporary; a re-run completes the job
    with outputs identical to an uninterrupted run."""
    import c2am_cli.predict.localize as infer

    images = tmp_path / "images"
    make_folder(images, 12, seed=6, size=72)
    files = sorted(p.name for p in images.iterdir())
    save = infer.save_npy_atomic

    stems = [Path(f).stem for f in files]

    def flaky(path, array):
        i = stems.index(Path(path).stem)
        if i == 6:
            raise C2AMError(f"{path}: cannot write (No space left on device)")
        time.sleep(0.01 * (len(files) - i))  # later files finish first
        save(path, array)

    monkeypatch.setattr(infer, "save_npy_atomic", flaky)
    out, maps = tmp_path / "run" / "boxes.json", tmp_path / "run" / "maps"
    with pytest.raises(C2AMError, match="No space left"):
        _run(model, images, out, maps_dir=maps)
    recorded = [r["record"]["file"] for r in JsonLines(str(out) + ".manifest.jsonl").read() if "record" in r]
    names = output_names(files, ".npy")
    assert recorded == [f for f in files if f in recorded] and files[6] not in recorded  # in order
    for f in recorded:
        assert np.load(maps / names[f]).shape[::-1] == Image.open(images / f).size
    assert not (maps / names[files[6]]).exists() and not [p for p in maps.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(infer, "save_npy_atomic", save)
    _, summary = _run(model, images, out, maps_dir=maps)
    assert summary.resumed == len(recorded) and summary.processed + summary.resumed == len(files)
    _run(model, images, tmp_path / "whole" / "boxes.json", maps_dir=tmp_path / "whole" / "maps")
    assert out.read_bytes() == (tmp_path / "whole" / "boxes.json").read_bytes()
    for f in files:
        assert np.array_equal(np.load(maps / names[f]), np.load(tmp_path / "whole" / "maps" / names[f]))


def test_jsonlines_extend_is_one_append(tmp_path):
    jl = JsonLines(tmp_path / "m.jsonl")
    jl.append({"a": 1})
    jl.extend([{"b": 2}, {"c": "é"}])
    jl.extend([])
    jl.close()
    assert JsonLines(tmp_path / "m.jsonl").read() == [{"a": 1}, {"b": 2}, {"c": "é"}]


def test_localize_with_maps_and_overlays_opens_each_image_once(tmp_path):
    """`c2am localize DIR --maps M --overlays O` with the embedded default (calibrated, CRF): under strace, each image
    file is opened once; the decoded full-size image travels with the batch to the CRF and the overlay."""
    import shutil
    import subprocess
    import sys

    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    images = tmp_path / "images"
    images.mkdir()
    examples = Path(__file__).resolve().parents[1] / "examples" / "images"
    for name in ("cat.jpg", "coffee.jpg"):
        shutil.copy(examples / name, images / name)
    _image(3).save(images / "shapes.png")
    ImageOps.exif_transpose(_image(4)).save(images / "turned.jpg", exif=_exif(6))
    log = tmp_path / "strace.log"
    cmd = [strace, "-f", "-e", "trace=openat", "-o", str(log), sys.executable, "-m", "c2am_cli", "localize", str(images),
           "--out", str(tmp_path / "boxes.json"), "--maps", str(tmp_path / "maps"), "--overlays", str(tmp_path / "overlays"),
           "--workers", "0", "--device", "cpu", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    opened = [line for line in log.read_text().splitlines() if "openat(" in line and "ENOENT" not in line]
    for name in ("cat.jpg", "coffee.jpg", "shapes.png", "turned.jpg"):
        assert sum(f'{images / name}"' in line for line in opened) == 1, [line for line in opened if name in line]
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 4 and len(list((tmp_path / "maps").glob("*.npy"))) == 4
