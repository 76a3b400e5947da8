"""The saliency yardsticks by name: maxF (mean of per-image F-beta), maxF_meanPR (F of the mean precision and recall),
meanF, MAE and TokenCut's IoU / accuracy at 0.5, against hand computations and against pysodmetrics."""
import warnings

import numpy as np
import pytest

from c2am_cli.eval.metrics import MaskAccumulator


def _two_images() -> MaskAccumulator:
    acc = MaskAccumulator()
    acc.add(np.array([[1.0, 1.0, 0.0, 0.0]], np.float32), np.array([[1, 1, 0, 0]], np.uint8))  # perfect
    acc.add(np.array([[0.5, 1.0, 1.0, 1.0]], np.float32), np.array([[1, 0, 0, 0]], np.uint8))  # mostly wrong
    return acc


def test_the_two_yardsticks_differ_as_computed_by_hand():
    acc = _two_images()
    f = lambda p, r: 1.3 * p * r / (0.3 * p + r)  # noqa: E731
    per_image = acc.fmeasure_curve()["F"]
    mean_pr = acc.fmeasure_curve(per_image=False)["F"]
    # image 2's map / max is [127, 255, 255, 255]: for k <= 127 everything is foreground (P 1/4, R 1), above it
    # only the three background pixels are (P 0, R 0); image 1 has P = R = 1 for every k >= 1
    assert per_image[1] == pytest.approx(100 * (1 + f(0.25, 1)) / 2)
    assert per_image[200] == pytest.approx(50.0)
    assert per_image.max() == pytest.approx(100 * (1 + f(0.25, 1)) / 2)  # maxF 65.12
    assert mean_pr.max() == pytest.approx(100 * f((1 + 0.25) / 2, 1))  # maxF_meanPR 68.42: the higher number
    assert mean_pr[200] == pytest.approx(100 * f(0.5, 0.5))
    k0 = (f(0.5, 1) + f(0.25, 1)) / 2  # k = 0: every pixel is foreground in both images
    assert per_image.mean() == pytest.approx(100 * (k0 + 127 * (1 + f(0.25, 1)) / 2 + 128 * 0.5) / 256)  # meanF
    # TokenCut's IoU and accuracy at map > 0.5: image 1 perfect; image 2 predicts 3 background pixels only
    assert acc.at_half() == pytest.approx({"IoU@0.5": 50.0, "Acc@0.5": 50.0})
    assert acc.at_half([0]) == pytest.approx({"IoU@0.5": 100.0, "Acc@0.5": 100.0})


def _pysod(maps, masks):
    sod = pytest.importorskip("py_sod_metrics", reason="pysodmetrics (the test extra) is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its Fmeasure class announces a future rename
        fm, mae = sod.Fmeasure(), sod.MAE()
    for m, gt in zip(maps, masks):
        view = (m / m.max() if m.max() > 0 else m).astype(np.float64)  # the F-measure's view of a map: map / max
        fm.step(view, gt, normalize=False)
        mae.step(m.astype(np.float64), gt, normalize=False)
    r = fm.get_results()
    return {"maxF": 100 * r["fm"]["curve"].max(), "meanF": 100 * r["fm"]["curve"].mean(), "MAE": mae.get_results()["mae"]}


def _ours(maps, masks):
    acc = MaskAccumulator()
    for m, gt in zip(maps, masks):
        acc.add(m.astype(np.float32), gt.astype(np.uint8))
    curve = acc.fmeasure_curve()["F"]
    return {"maxF": curve.max(), "meanF": curve.mean(), "MAE": acc.mae()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_pysodmetrics_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for _ in range(6):
        h, w = rng.integers(20, 60, size=2)
        gt = np.zeros((h, w), bool)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        gt[y:y + h // 2, x:x + w // 2] = True
        m = np.clip(gt * rng.uniform(0.3, 0.9) + rng.normal(0, 0.25, (h, w)), 0, 1).astype(np.float32)
        masks.append(gt), maps.append(m)
    masks.append(np.zeros((10, 10), bool)), maps.append(np.full((10, 10), 0.3, np.float32))  # nothing to find
    ours, theirs = _ours(maps, masks), _pysod(maps, masks)
    for key in ("maxF", "meanF", "MAE"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key  # MAE: c2am sums float32 maps


@pytest.mark.realdata
def test_equal_to_pysodmetrics_on_the_default_models_ecssd_maps(shared_data, tmp_path):
    """c2am eval's maxF, meanF and MAE on maps `c2am localize --maps` wrote equal pysodmetrics' on the same files."""
    from c2am_cli import localize
    from c2am_cli.data.datasets import load_dataset
    from c2am_cli.eval.evaluate import evaluate
    from c2am_cli.eval.sources import MapFiles

    ds = load_dataset("masks", shared_data / "ecssd")
    items = ds.items[:10]
    folder = tmp_path / "images"
    folder.mkdir()
    for it in items:  # a link per photo: the data is read in place, never copied
        (folder / it.image).symlink_to(ds.image_root / it.image)
    assert localize(folder, tmp_path / "boxes.json", num_workers=0, progress=False,
                    maps_dir=tmp_path / "maps").exit_code == 0
    report = evaluate(ds.select({it.id for it in items}), MapFiles(tmp_path / "maps", normalized=True),
                      progress=False).as_dict()
    maps = [np.load(tmp_path / "maps" / f"{it.id}.npy").astype(np.float32) for it in items]
    masks = [ds.ground_truth(it).mask == 1 for it in items]
    theirs = _pysod(maps, masks)
    assert report["images"]["evaluated"] == 10
    assert report["oracle"]["maxF"] == pytest.approx(theirs["maxF"], abs=1e-4)
    assert report["threshold_free"]["meanF"] == pytest.approx(theirs["meanF"], abs=1e-4)
    assert report["threshold_free"]["MAE"] == pytest.approx(theirs["MAE"], abs=1e-4)
    assert report["oracle"]["maxF_meanPR"] >= report["oracle"]["maxF"]
    assert set(report["yardsticks"]) >= {"maxF", "maxF_meanPR", "IoU@0.5", "Acc@0.5"}
