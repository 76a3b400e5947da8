"""Map calibration: isotonic P(foreground | map value), checked against counts worked out by hand."""
import numpy as np
import pytest

from c2am_cli.eval.calibrate import CalibrationFit, calibrate, fit_calibration
from c2am_cli.maps.calibration import apply_calibration


def test_apply_interpolates_between_knots():
    m = np.array([0.0, 0.25, 0.5, 0.75, 1.0], np.float32)
    assert np.allclose(apply_calibration(m, (0.0, 1.0)), m)
    assert np.allclose(apply_calibration(m, (0.0, 0.0, 1.0)), [0, 0, 0, 0.5, 1])


def _pixels(value, n, n_fg):
    mask = np.zeros(n, np.uint8)
    mask[:n_fg] = 1
    return np.full(n, value, np.float32), mask


def test_isotonic_fit_pools_a_decreasing_pair_and_reads_the_knots():
    # value 0.3: 40 of 100 pixels foreground; 0.6: 60 of 300 -> a decrease, pooled to 100/400 = 0.25;
    # value 0.9: 50 of 50 -> 1. Bin centres (256 bins): 76.5/256, 153.5/256, 230.5/256.
    parts = [_pixels(0.3, 100, 40), _pixels(0.6, 300, 60), _pixels(0.9, 50, 50)]
    m = np.concatenate([p[0] for p in parts])[None]
    mask = np.concatenate([p[1] for p in parts])[None]
    knots = fit_calibration([(m, mask)], n=5)  # read at 0, .25, .5, .75, 1
    c6, c9 = 153.5 / 256, 230.5 / 256
    at75 = 0.25 + (0.75 - c6) / (c9 - c6) * (1 - 0.25)
    assert knots == pytest.approx((0.25, 0.25, 0.25, round(at75, 4), 1.0), abs=1e-4)


def test_ignored_pixels_do_not_count_and_accumulation_is_additive():
    m = np.array([[0.5, 0.5, 0.5, 0.5]], np.float32)
    one = CalibrationFit()
    one.add(m, np.array([[1, 0, 255, 255]], np.uint8))
    assert one.count.sum() == 2 and one.fg.sum() == 1
    assert one.knots(3) == (0.5, 0.5, 0.5)
    one.add(m, np.array([[1, 1, 1, 0]], np.uint8))  # 4 of 6 now
    assert one.knots(2) == pytest.approx((4 / 6, 4 / 6), abs=1e-4)


def test_no_pixels_is_an_error():
    with pytest.raises(ValueError, match="no pixels"):
        CalibrationFit().knots()


# -- c2am calibrate on a small synthetic mask set -----------------------------------------------------------------

import json  # noqa: E402

from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from c2am_cli.cli import app  # noqa: E402
from c2am_cli.config import ModelConfig  # noqa: E402
from c2am_cli.models.c2am import C2AM  # noqa: E402
from synthetic import make_image  # noqa: E402


@pytest.fixture(scope="module")
def mask_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("maskset")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(3)
    for i in range(10):
        img, _, mask = make_image(rng, 48, salient=True)
        img.save(root / "images" / f"{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model.safetensors"
    C2AM(ModelConfig(backbone="test_resnet", image_size=32, edge_radius=0.1)).save(path)
    return path


def test_calibrate_fits_on_exactly_the_calibration_half(mask_set, tiny_model):
    from c2am_cli.eval.calibrate import calibrate
    from c2am_cli.data.datasets import load_dataset
    from c2am_cli.eval.evaluate import Protocol, evaluate, split_ids
    from c2am_cli.eval.sources import ModelMaps

    model, report = calibrate(str(tiny_model), "masks", mask_set, fraction=0.5, seed=0, crf=False,
                              device="cpu", num_workers=0, progress=False)
    ds = load_dataset("masks", mask_set)
    cal_ids, ev_ids, _ = split_ids(ds, None, Protocol(fraction=0.5, seed=0))
    assert report.images == len(cal_ids) == 5 and not set(cal_ids) & set(ev_ids)
    # independently: the same maps (normalised, guided-filtered) of those five images, fitted by hand
    check = C2AM.from_file(tiny_model)
    check.config.model.calibration = (0.0, 1.0)
    cal = ds.select(set(cal_ids))
    sizes = [cal.ground_truth(it).size for it in cal.items]
    pairs = [(m.full, cal.ground_truth(cal.items[m.index]).mask) for m in
             ModelMaps(cal.image_root, check, device="cpu", num_workers=0).iterate(cal.items, sizes, False, True)]
    assert model.config.model.calibration == fit_calibration(pairs)
    knots = np.asarray(model.config.model.calibration)
    assert np.all(np.diff(knots) >= 0) and 0 <= knots.min() and knots.max() <= 1
    assert model.config.model.crf_iterations == 0 and list(report.maxf) == ["no CRF"]
    assert "seeded random 0.5" in model.config.model.calibration_source
    # the stored box tau is what the evaluator calls the oracle CorLoc tau on those same images
    report = evaluate(cal, ModelMaps(cal.image_root, model, device="cpu", num_workers=0), progress=False)
    assert model.config.model.box_threshold == report.extra["oracle_tau"]["CorLoc"]


def test_calibrate_keeps_the_best_crf_setting(mask_set, tiny_model):
    pytest.importorskip("pydensecrf.densecrf", reason="the crf extra (pydensecrf2) is not installed")
    from c2am_cli.eval.calibrate import CRF_CANDIDATES, calibrate

    from c2am_cli.data.datasets import load_dataset
    from c2am_cli.eval.evaluate import evaluate
    from c2am_cli.eval.sources import ModelMaps

    model, report = calibrate(str(tiny_model), "masks", mask_set, crf=True, boxes_from="mask", device="cpu",
                              num_workers=0, progress=False)
    assert len(report.maxf) == len(CRF_CANDIDATES) and report.images == 10
    best = max(report.maxf, key=report.maxf.get)
    assert (best == "no CRF") == (model.config.model.crf_iterations == 0)
    ds = load_dataset("masks", mask_set)
    again = evaluate(ds, ModelMaps(ds.image_root, model, device="cpu", num_workers=0), progress=False)
    assert again.oracle["maxF"] == pytest.approx(report.maxf[best], abs=0.01)
    assert model.config.model.box_threshold == again.extra["oracle_tau"]["CorLoc"]


def test_calibrate_cli_writes_weights_that_eval_uses(mask_set, tiny_model, tmp_path):
    out = tmp_path / "cal.safetensors"
    r = CliRunner().invoke(app, ["calibrate", "--weights", str(tiny_model), "--dataset", "masks", "--root", str(mask_set),
                                 "--calibration-fraction", "0.5", "--no-crf", "--out", str(out), "--workers", "0",
                                 "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    assert f"calibrated on a seeded random 0.5 of {mask_set.name} (seed 0, 5 images)" in r.output
    stored = C2AM.from_file(out).config.model
    assert len(stored.calibration) == 33 and stored.box_threshold_source.startswith("best CorLoc (boxes from the map)")
    report = tmp_path / "eval.json"
    r = CliRunner().invoke(app, ["eval", "--dataset", "masks", "--root", str(mask_set), "--weights", str(out),
                                 "--calibration-fraction", "0.5", "--workers", "0", "--device", "cpu", "-q",
                                 "--out", str(report)])
    assert r.exit_code == 0, r.output
    d = json.loads(report.read_text())
    assert d["images"]["evaluated"] == 5 and 0 <= d["threshold_free"]["MAE"] <= 1


def test_calibrate_needs_masks(tmp_path, tiny_model):
    (tmp_path / "x").mkdir()
    r = CliRunner().invoke(app, ["calibrate", "--weights", str(tiny_model), "--dataset", "imagenet", "--root",
                                 str(tmp_path / "x"), "--out", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: ")


@pytest.mark.parametrize("boxes_from", ["map", "mask"])
def test_eval_corloc_is_what_localize_boxes_score(mask_set, tiny_model, tmp_path, boxes_from):
    """eval's CorLoc at a fixed tau, recomputed by hand from the boxes `localize` writes with the same settings."""
    from c2am_cli import localize
    from c2am_cli.data.datasets import load_dataset, mask_boxes
    from c2am_cli.eval.run import run_eval
    from c2am_cli.eval.metrics import box_iou

    model, _ = calibrate(str(tiny_model), "masks", mask_set, crf=False, device="cpu", num_workers=0, progress=False)
    path = model.save(tmp_path / "cal.safetensors")
    out = tmp_path / "boxes.json"
    localize(mask_set / "images", out, weights=str(path), boxes_from=boxes_from, threshold=0.5, num_workers=0,
             device="cpu", progress=False)
    hits = []
    for r in json.loads(out.read_text())["images"]:
        gt = mask_boxes(np.asarray(Image.open(mask_set / "masks" / r["file"])) > 127)
        hits.append(box_iou(np.array(r["boxes"][:1]), np.array(gt)).max() >= 0.5)
    report = run_eval("masks", mask_set, weights=str(path), threshold=0.5, boxes_from=boxes_from, device="cpu",
                      num_workers=0, progress=False)
    assert report.at_tau["CorLoc"] == pytest.approx(100 * np.mean(hits))
    assert len(load_dataset("masks", mask_set).items) == len(hits) == 10
