"""The front door: one-line errors everywhere, `Predictor.predict`, overlays that agree with themselves, `--crf`
checked up front, help that imports no torch, and the small output promises (boxes.json, eval, resume, .gitignore)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from c2am_cli.cli import app
from synthetic import make_folder

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "images"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny untrained model (timm's test_resnet at 32 px), saved as a file."""
    from c2am_cli import C2AM, ModelConfig

    path = tmp_path_factory.mktemp("tiny") / "model.safetensors"
    C2AM(ModelConfig(backbone="test_resnet", image_size=32)).save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_folder(root, 3, seed=5, size=48)
    return root


# -- 1. one-line errors ---------------------------------------------------------------------------------
def test_any_exception_inside_a_command_is_one_line_and_exit_2(monkeypatch, folder, tiny):
    import c2am_cli.predict.localize as loc

    def boom(*args, **kwargs):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(loc, "localize", boom)
    result = CliRunner().invoke(app, ["localize", str(folder), "--weights", str(tiny)])
    assert result.exit_code == 2
    assert result.output == "error: RuntimeError: something broke (c2am --debug ... shows the traceback)\n"


SCRIPT = """
import sys
{setup}
from c2am_cli.cli import main
sys.argv = ["c2am", *sys.argv[1:]]
main()
"""
RAISE = "import c2am_cli.{0} as m\ndef boom(*a, **k):\n    raise {2}\nm.{1} = boom"
BAD_CALLBACK = """
import c2am_cli.cli as cli
class Broken(dict):  # the app's callback stores --debug here: it fails outside every command's `friendly`
    def __setitem__(self, key, value):
        raise RuntimeError("callback broke")
cli.state = Broken(debug=False)
"""


@pytest.mark.parametrize("setup, args", [
    (RAISE.format("predict.localize", "localize", "RuntimeError('broke')"), ["localize", "."]),
    (RAISE.format("hub.download", "list_registry", "KeyError('k')"), ["pull", "--list"]),
    (RAISE.format("eval.run", "check_dataset", "ValueError('v')"), ["eval", "-d", "masks", "--root", ".", "--check"]),
    (RAISE.format("wsss.cams", "compute_cams", "MemoryError()"), ["cams", "--images", ".", "--labels", "l", "-o", "o"]),
    (BAD_CALLBACK, ["pull", "--list"]),
])
def test_the_console_script_prints_one_line_for_any_exception(setup, args, tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(setup=setup), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(monkeypatch, folder, tiny):
    import c2am_cli.predict.localize as loc

    monkeypatch.setattr(loc, "localize", lambda *a, **k: 1 / 0)
    result = CliRunner().invoke(app, ["--debug", "localize", str(folder)])
    assert result.exit_code == 2
    assert "Traceback" in result.output and result.output.rstrip().endswith("(c2am --debug ... shows the traceback)")


def test_offline_timm_weights_name_the_offline_choices(folder, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "c2am_cli", "train", str(folder), "--backbone", "resnet18",
                           "--backbone-weights", "timm", "--out", str(tmp_path / "run"), "--device", "cpu", "-q"],
                          capture_output=True, text=True, env={**_env(), "HF_HOME": str(tmp_path / "hf")}, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "--backbone-weights FILE" in proc.stderr and "efficientnet-lite0" in proc.stderr


# -- 2. Predictor.predict -----------------------------------------------------------------------------------
def test_predict_takes_paths_pil_images_and_arrays(tiny, folder):
    from c2am_cli import Predictor, Result

    files = sorted(folder.rglob("*.*"))
    photo = Image.open(files[0]).convert("RGB").resize((50, 30))
    grey = np.random.default_rng(0).integers(0, 256, (20, 40), dtype=np.uint8)
    predictor = Predictor(str(tiny), device="cpu", batch_size=2)
    results = predictor.predict([files[1], photo, np.asarray(photo), grey])
    assert [type(r) for r in results] == [Result] * 4
    for r, (h, w) in zip(results, [Image.open(files[1]).size[::-1], (30, 50), (30, 50), (20, 40)]):
        assert r.map.shape == (h, w) and r.map.dtype == np.float32 and 0 <= r.map.min() <= r.map.max() <= 1
        assert r.mask.shape == (h, w) and r.mask.dtype == bool
        assert len(r.boxes) == len(r.scores) >= 1
        assert all(0 <= x1 <= x2 < w and 0 <= y1 <= y2 < h for x1, y1, x2, y2 in r.boxes)
    assert results[0].source == str(files[1]) and results[1].source is None
    assert np.array_equal(results[1].map, results[2].map)  # a PIL image and its pixels: the same result
    one = predictor.predict(photo)
    assert isinstance(one, Result) and one.boxes == results[1].boxes


def test_predict_gives_the_boxes_localize_writes(tiny, folder, tmp_path):
    from c2am_cli import Predictor, localize

    localize(folder, tmp_path / "boxes.json", weights=str(tiny), device="cpu", progress=False)
    records = json.loads((tmp_path / "boxes.json").read_text())["images"]
    results = Predictor(str(tiny), device="cpu").predict([folder / r["file"] for r in records])
    assert [r.boxes for r in results] == [r["boxes"] for r in records]
    assert [r.scores for r in results] == [r["scores"] for r in records]


def test_predict_refuses_other_inputs(tiny):
    from c2am_cli import C2AMError, Predictor

    predictor = Predictor(str(tiny), device="cpu")
    with pytest.raises(C2AMError, match="uint8"):
        predictor.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(C2AMError, match="paths, PIL images or uint8 arrays"):
        predictor.predict([3])


def test_predict_with_the_embedded_default_on_the_examples():
    from c2am_cli import Predictor

    results = Predictor(device="cpu").predict(sorted(EXAMPLES.glob("*.jpg")))
    assert len(results) == 4
    for r in results:
        h, w = r.map.shape
        assert r.mask.shape == (h, w) and 0.05 < r.mask.mean() < 0.95  # calibrated: P >= 0.5, neither empty nor all
        (x1, y1, x2, y2), = r.boxes
        assert (x2 - x1) * (y2 - y1) > 0.05 * w * h


# -- 3. overlays ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("boxes_from", ["map", "mask"])
def test_the_overlay_draws_the_map_its_boxes_come_from(tiny, folder, tmp_path, boxes_from):
    from c2am_cli import C2AM, Predictor, localize
    from c2am_cli.maps.boxes import boxes_from_map, scale_boxes
    from c2am_cli.predict.localize import overlay
    from c2am_cli.predict.predictor import Prediction

    model = C2AM.from_file(tiny)
    model.config.model.calibration = (0.0, 0.2, 1.0)  # the refined map differs from the activation map
    weights = model.save(tmp_path / "calibrated.safetensors")
    localize(folder, tmp_path / "b.json", weights=str(weights), device="cpu", overlays_dir=tmp_path / "ov",
             boxes_from=boxes_from, progress=False)
    predictor = Predictor(str(weights), device="cpu", boxes_from=boxes_from)
    for record in json.loads((tmp_path / "b.json").read_text())["images"]:
        image = Image.open(folder / record["file"]).convert("RGB")
        s = model.config.model.image_size
        from c2am_cli.data.images import load_image_tensor, squash

        photo = load_image_tensor(folder / record["file"])
        m = predictor.maps(squash(photo, s)[None])[0].cpu()
        p = Prediction(0, image.size, m, photo)
        full = predictor.full_map(p)
        heat, legend = predictor.box_map(p, full)
        assert ("activation map" if boxes_from == "map" else "refined map") in legend
        boxes, _ = boxes_from_map(heat if boxes_from == "mask" else m.numpy(), predictor.threshold)
        if boxes_from == "map":
            boxes = scale_boxes(boxes, (s, s), image.size)
        assert boxes == record["boxes"]
        drawn = np.asarray(Image.open(tmp_path / "ov" / (Path(record["file"]).stem + ".png"))).astype(int)
        other = full if boxes_from == "map" else predictor.full_map(p, refine=False)  # the map the boxes do not come from
        want, not_it = (np.asarray(overlay(image, x, legend, record["boxes"])).astype(int) for x in (heat, other))
        # the batched forward of `localize` and this one-image forward may differ in the last float bits
        assert np.abs(drawn - want).mean() < 0.1 * np.abs(drawn - not_it).mean(), boxes_from


# -- 4. --crf without its package ------------------------------------------------------------------------
def _no_crf(monkeypatch):
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` raises ImportError


def test_refine_crf_without_pydensecrf_stops_before_any_work(monkeypatch, tmp_path):
    import c2am_cli.models.c2am as c2am

    _no_crf(monkeypatch)
    monkeypatch.setattr(c2am.C2AM, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded the model")))
    (tmp_path / "cams").mkdir()
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(app, ["refine", "--cams", str(tmp_path / "cams"), "--images", str(tmp_path / "images"),
                                      "--weights", "default", "--crf", "10", "--out", str(tmp_path / "masks")])
    assert result.exit_code == 2
    assert result.output == ("error: --crf 10 needs pydensecrf2: pip install 'c2am[crf]' "
                             "(it builds with a C++ compiler)\n")
    assert not (tmp_path / "masks").exists()


def test_calibrate_crf_without_pydensecrf_stops_before_any_work(monkeypatch, tmp_path):
    _no_crf(monkeypatch)
    result = CliRunner().invoke(app, ["calibrate", "--weights", "default", "--dataset", "masks", "--root",
                                      str(tmp_path / "missing"), "--out", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 2 and result.output.startswith("error: calibrate --crf ") and "--no-crf" in result.output


# -- 5. help -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--version"], ["localize", "--help"], ["refine", "--help"], ["train", "--help"]])
def test_version_and_help_import_no_torch(args):
    code = ("import runpy, sys\nsys.argv = ['c2am', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('c2am_cli', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = sorted(m for m in ('torch', 'timm', 'numpy', 'cv2') if m in sys.modules)\n"
            "print('HEAVY', heavy, code, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.stderr.strip().endswith("HEAVY [] 0"), proc.stderr


def _all_commands():
    import typer.main

    group = typer.main.get_command(app)
    return [(name, group.commands[name]) for name in sorted(group.commands)]


def test_every_option_is_described_and_examples_stay_verbatim():
    for name, command in _all_commands():
        for param in command.params:
            assert getattr(param, "help", None), f"c2am {name} {param.name}: no help text"
        out = CliRunner().invoke(app, [name, "--help"], terminal_width=80).output
        for line in command.help.splitlines():
            if line.strip().startswith("Example: "):
                assert line.strip() in out, f"c2am {name} --help rewraps its example:\n{out}"


def test_the_refine_help_names_the_stored_cue_threshold():
    from c2am_cli.config import read_config
    from c2am_cli.hub.resolve import embedded_default

    stored = read_config(embedded_default()).model.cue_threshold  # 0.45 for today's default
    out = CliRunner().invoke(app, ["refine", "--help"], terminal_width=200).output
    assert f"{stored:g} for the embedded default" in " ".join(out.split()) and stored != 0.3


# -- 6. small output promises ------------------------------------------------------------------------
def test_boxes_json_names_the_embedded_default(monkeypatch, tmp_path):
    from c2am_cli.hub.registry import file_sha256
    from c2am_cli.hub.resolve import embedded_default

    image = tmp_path / "in"
    image.mkdir()
    Image.open(EXAMPLES / "cat.jpg").resize((64, 48)).save(image / "cat.jpg")
    result = CliRunner().invoke(app, ["localize", str(image), "--out", str(tmp_path / "boxes.json"), "-q"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "boxes.json").read_text())
    assert payload["weights"] == "default" and payload["weights_sha256"] == file_sha256(embedded_default())


def test_a_refused_resume_names_what_differs(tiny, folder, tmp_path):
    from c2am_cli import C2AMError, localize

    localize(folder, tmp_path / "b.json", weights=str(tiny), device="cpu", progress=False)
    with pytest.raises(C2AMError, match=r"threshold: 0\.5 -> 0\.7; all_boxes: False -> True"):
        localize(folder, tmp_path / "b.json", weights=str(tiny), device="cpu", threshold=0.7, all_boxes=True,
                 progress=False)
    with pytest.raises(C2AMError, match=r"weights: .*tiny.* \(model [0-9a-f]{16}\) -> default \(model [0-9a-f]{16}\)"):
        localize(folder, tmp_path / "b.json", device="cpu", threshold=0.5, progress=False)


def test_eval_without_out_names_no_file_it_did_not_write():
    from c2am_cli.eval.evaluate import Report, format_table

    header = {"dataset": "masks", "root": "r", "split": None, "source": {"kind": "maps", "folder": "m"},
              "images": {"evaluated": 1, "calibration": 0, "failed": 12},
              "protocol": {"mode": "oracle", "description": "oracle"}}
    report = Report(header, failed=[{"id": f"i{i}", "reason": "unreadable"} for i in range(12)])
    text = format_table(report)
    assert "metrics.json" not in text and "pass --out FILE to list them all" in text
    assert "(all in out.json)" in format_table(report, "out.json")


def test_the_quick_start_outputs_are_ignored_by_git():
    paths = ["boxes.json", "boxes.json.manifest.jsonl", "boxes.json.errors.jsonl", "overlays/cat.png", "maps/cat.npy"]
    proc = subprocess.run(["git", "check-ignore", *paths], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.split() == paths
