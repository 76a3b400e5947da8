"""Dataset adapters (synthetic layouts and the real ../shared/data folders) and `c2am eval` end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from c2am_cli import C2AMError
from c2am_cli.cli import app
from c2am_cli.data.datasets import load_dataset, mask_boxes
from c2am_cli.eval.evaluate import evaluate
from c2am_cli.eval.run import run_eval
from c2am_cli.eval.sources import Baseline
from synthetic import make_image

runner = CliRunner()


def write_masks_folder(root: Path, n: int = 6, size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """images/ + masks/ (0/255) with one synthetic object each; returns id -> 0/1 mask."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    out = {}
    for i in range(n):
        img, _, mask = make_image(rng, size)
        img.save(root / "images" / f"im{i}.jpg", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
        out[f"im{i}"] = (mask > 127).astype(np.uint8)
    return out


# -- masks ------------------------------------------------------------------------------------------------------


def test_mask_boxes_keep_components_of_one_percent_and_the_whole_foreground():
    fg = np.zeros((100, 100), np.uint8)
    fg[10:30, 10:40] = 1  # 600 px
    fg[60:90, 50:60] = 1  # 300 px
    fg[95:97, 95:97] = 1  # 4 px < 1 % of 10,000: not an object of its own, but inside the whole-foreground box
    assert mask_boxes(fg) == [[10, 10, 39, 29], [50, 60, 59, 89], [10, 10, 96, 96]]
    assert mask_boxes(np.zeros((5, 5), np.uint8)) == []
    diag = np.eye(20, dtype=np.uint8)  # 8-connected: one component
    assert mask_boxes(diag) == [[0, 0, 19, 19], [0, 0, 19, 19]]


def test_masks_adapter(tmp_path):
    masks = write_masks_folder(tmp_path / "set", n=3)
    (tmp_path / "set" / "splits").mkdir()
    (tmp_path / "set" / "splits" / "cal.txt").write_text("im0\n# comment\nim2\n")
    ds = load_dataset("masks", tmp_path / "set")
    assert [it.id for it in ds.items] == ["im0", "im1", "im2"] and ds.task == "masks"
    gt = ds.ground_truth(ds.items[1])
    assert gt.size == (64, 64) and np.array_equal(gt.mask, masks["im1"])
    assert gt.boxes[-1] == mask_boxes(masks["im1"])[-1]
    assert ds.split_ids("cal") == ["im0", "im2"]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("im1.jpg\n")
    assert ds.split_ids(str(ids_file)) == ["im1"]
    with pytest.raises(C2AMError, match="not a split"):
        ds.split_ids("nope")
    (tmp_path / "set" / "masks" / "im2.png").unlink()
    with pytest.raises(C2AMError, match="im2.jpg: no mask"):
        load_dataset("masks", tmp_path / "set")


# -- VOC --------------------------------------------------------------------------------------------------------


def write_voc(root: Path, labels: dict[str, np.ndarray], splits: dict[str, list[str]], xml: bool = False) -> None:
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "Annotations"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, lab in labels.items():
        Image.fromarray(np.full(lab.shape + (3,), 128, np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        p = Image.fromarray(lab, mode="P")
        p.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (252 * 3) + [224, 224, 192])
        p.save(root / "SegmentationClass" / f"{i}.png")
        if xml:
            (root / "Annotations" / f"{i}.xml").write_text(
                "<annotation><size><width>40</width><height>30</height></size><object><name>dog</name>"
                "<bndbox><xmin>11</xmin><ymin>6</ymin><xmax>30</xmax><ymax>20</ymax></bndbox></object></annotation>")
    for name, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")


def test_voc_adapter_reads_palette_indices_and_derives_boxes(tmp_path):
    lab = np.zeros((30, 40), np.uint8)
    lab[5:20, 10:30] = 12
    lab[4, 10:30] = 255  # boundary band: neither object nor background
    write_voc(tmp_path / "VOC2012", {"a": lab, "b": lab}, {"train": ["a"], "val": ["b"]}, xml=True)
    ds = load_dataset("voc", tmp_path)  # the devkit folder above VOC2012 works too
    assert ds.default_split == "val" and ds.split_ids("train") == ["a"] and ds.num_classes == 21
    gt = ds.ground_truth(ds.items[0])
    assert gt.mask[10, 15] == 12 and gt.mask[4, 15] == 255
    assert gt.boxes == [[10, 5, 29, 19], [10, 5, 29, 19]]
    xml = load_dataset("voc", tmp_path, box_source="xml")
    assert xml.ground_truth(xml.items[0]).boxes == [[10, 5, 29, 19]]  # 1-based XML made 0-based


def test_voc_pseudo_masks_are_scored_with_a_set_confusion(tmp_path):
    lab = np.zeros((30, 40), np.uint8)
    lab[5:20, 10:30] = 12
    lab[4, 10:30] = 255
    write_voc(tmp_path / "voc", {"a": lab, "b": lab}, {"all": ["a", "b"]})
    pred_dir = tmp_path / "pseudo"
    pred_dir.mkdir()
    Image.fromarray(np.where(lab == 255, 0, lab).astype(np.uint8)).save(pred_dir / "a.png")
    wrong = np.zeros_like(lab)  # all background
    Image.fromarray(wrong).save(pred_dir / "b.png")
    rep = run_eval("voc", tmp_path / "voc", masks=pred_dir, progress=False).as_dict()
    tf = rep["threshold_free"]
    fg = 15 * 20
    # class 12: tp = fg (image a), gt = 2 fg, pred = fg -> 1/2; background: tp = 2 * bg, gt = 2 * bg, pred = 2 * bg + fg
    bg = 30 * 40 - fg - 20
    assert rep["per_class"]["dog"]["IoU"] == pytest.approx(50.0)
    assert rep["per_class"]["background"]["IoU"] == pytest.approx(100 * 2 * bg / (2 * bg + fg), abs=1e-3)
    assert tf["mIoU"] == pytest.approx((50 + 100 * 2 * bg / (2 * bg + fg)) / 2, abs=1e-3)
    assert tf["fgIoU"] == pytest.approx(50.0) and rep["per_class"]["cat"]["IoU"] is None


# -- wsolevaluation metadata, CUB, ImageNet ---------------------------------------------------------------------


def write_wsol(folder: Path, rows: list[tuple[str, int, int, int, list[list[int]]]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "image_ids.txt").write_text("".join(f"{p}\n" for p, *_ in rows))
    (folder / "class_labels.txt").write_text("".join(f"{p},{c}\n" for p, c, *_ in rows))
    (folder / "image_sizes.txt").write_text("".join(f"{p},{w},{h}\n" for p, _, w, h, _ in rows))
    (folder / "localization.txt").write_text("".join(f"{p},{b[0]},{b[1]},{b[2]},{b[3]}\n"
                                                     for p, _, _, _, bs in rows for b in bs))


def test_wsol_metadata_parses_validates_and_knows_splits(tmp_path):
    meta = tmp_path / "meta"
    write_wsol(meta / "test", [("c1/a.jpg", 0, 100, 80, [[1, 2, 50, 60], [10, 10, 20, 20]]), ("c2/b.jpg", 1, 50, 50, [[0, 0, 49, 49]])])
    write_wsol(meta / "val", [("c1/v.jpg", 0, 60, 60, [[5, 5, 30, 30]])])
    ds = load_dataset("wsol", meta)
    assert ds.default_split == "test" and ds.split_ids("test") == ["c1/a.jpg", "c2/b.jpg"] and ds.split_ids("val") == ["c1/v.jpg"]
    a = ds.ground_truth(ds.items[0])
    assert a.size == (100, 80) and a.boxes == [[1, 2, 50, 60], [10, 10, 20, 20]] and ds.items[0].label == 0
    # images are not needed for reference maps: the sizes come from image_sizes.txt
    rep = evaluate(ds, Baseline("full"), split="test", progress=False).as_dict()
    assert rep["images"]["evaluated"] == 2 and rep["oracle"]["MaxBoxAcc"] == 50.0  # b's box is the whole image
    # Top-1 / Top-5 Loc at a fixed tau: a's box is wrong, b's is right; b's class (1) is second in its top-5
    top5 = tmp_path / "top5.txt"
    top5.write_text("c1/a.jpg 0 2 3 4 5\nc2/b.jpg,3,1,2,4,5\n")
    at = run_eval("wsol", meta, baseline="full", threshold=0.5, top5=top5, progress=False).as_dict()["at_tau"]
    assert (at["Top-1 Loc"], at["Top-5 Loc"], at["Top-1 Cls"], at["GT-known Loc"]) == (0.0, 50.0, 50.0, 50.0)
    with pytest.raises(C2AMError, match="one tau"):
        run_eval("wsol", meta, baseline="full", top5=top5, progress=False)
    write_wsol(tmp_path / "bad", [("a.jpg", 0, 40, 30, [[0, 0, 45, 20]])])
    with pytest.raises(C2AMError, match="outside the 40x30 image"):
        load_dataset("wsol", tmp_path / "bad")
    (meta / "val" / "image_sizes.txt").write_text("")
    with pytest.raises(C2AMError, match="image_sizes.txt: no entry for 1 image"):
        load_dataset("wsol", meta)


def test_wsol_checks_image_headers_against_image_sizes(tmp_path):
    write_wsol(tmp_path / "m", [("a.png", 0, 40, 30, [[0, 0, 10, 10]])])
    (tmp_path / "img").mkdir()
    Image.new("RGB", (41, 30)).save(tmp_path / "img" / "a.png")
    assert load_dataset("wsol", tmp_path / "m", images=tmp_path / "img").image_root == tmp_path / "img"
    with pytest.raises(C2AMError, match="image is 41x30 but image_sizes.txt says 40x30"):
        load_dataset("wsol", tmp_path / "m", images=tmp_path / "img", check_images=True)


def test_cub_official_layout(tmp_path):
    root = tmp_path / "CUB_200_2011"
    (root / "images" / "001.X").mkdir(parents=True)
    for n in ("a", "b"):
        Image.new("RGB", (100, 80)).save(root / "images" / "001.X" / f"{n}.jpg")
    (root / "images.txt").write_text("1 001.X/a.jpg\n2 001.X/b.jpg\n")
    (root / "bounding_boxes.txt").write_text("1 60.0 27.0 25.0 30.5\n2 0.0 0.0 99.0 79.0\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n")
    ds = load_dataset("cub", tmp_path, check_images=True)
    assert ds.split_ids("train") == ["001.X/a.jpg"] and ds.default_split == "test"
    assert ds.items[0].boxes == [[60, 27, 85, 57]] and ds.items[0].label == 0  # x + w, y + h; labels 0-based
    assert ds.items[1].size == (100, 80)


def test_imagenet_boxes_json_and_xml(tmp_path):
    root = tmp_path / "in"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (50, 40)).save(root / "images" / "v1.jpg")
    (root / "boxes.json").write_text(json.dumps({"v1.jpg": [[1, 2, 30, 39]]}))
    (root / "class_labels.json").write_text(json.dumps({"v1.jpg": 7}))
    ds = load_dataset("imagenet", root)
    assert ds.items[0].boxes == [[1, 2, 30, 39]] and ds.items[0].label == 7 and ds.items[0].size == (50, 40)
    (root / "boxes.json").unlink()
    (root / "annotations").mkdir()
    (root / "annotations" / "v1.xml").write_text(
        "<annotation><size><width>50</width><height>40</height></size><object><name>n01</name><bndbox>"
        "<xmin>3</xmin><ymin>4</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object></annotation>")
    assert load_dataset("imagenet", root).items[0].boxes == [[3, 4, 20, 30]]
    (root / "boxes.json").write_text(json.dumps({"v1.jpg": [[1, 2, 60, 39]]}))
    with pytest.raises(C2AMError, match="outside the 50x40 image"):
        load_dataset("imagenet", root)


# -- eval end to end ----------------------------------------------------------------------------------------------


def test_perfect_maps_from_npy_and_png_score_100(tmp_path):
    masks = write_masks_folder(tmp_path / "set", n=4)
    maps = tmp_path / "maps"
    maps.mkdir()
    for i, (k, m) in enumerate(masks.items()):
        if i % 2:
            np.save(maps / f"{k}.npy", m.astype(np.float16))
        else:
            Image.fromarray(m * 255).save(maps / f"{k}.png")
    rep = run_eval("masks", tmp_path / "set", maps=maps, calibration_fraction=0.5, progress=False).as_dict()
    assert rep["images"] == {"listed": 4, "evaluated": 2, "calibration": 2, "failed": 0}
    for key in ("MaxBoxAcc", "CorLoc", "mIoU", "dsIoU", "maxF"):
        assert rep["oracle"][key] == pytest.approx(100.0), key
    assert rep["at_tau"]["GT-known Loc"] == 100.0 and rep["at_tau"]["mIoU"] == pytest.approx(100.0)
    assert rep["threshold_free"]["MAE"] == 0.0 and rep["threshold_free"]["PxAP"] == pytest.approx(100.0)
    # binary predicted masks (here the ground truth itself, 0/255) are scored as 0/1 maps
    rep = run_eval("masks", tmp_path / "set", masks=tmp_path / "set" / "masks", threshold=0.5, progress=False).as_dict()
    assert rep["at_tau"]["mIoU"] == pytest.approx(100.0) and rep["at_tau"]["GT-known Loc"] == 100.0


def test_calibrated_tau_comes_from_the_calibration_images_only(tmp_path):
    """Maps: a core (1.0) inside a halo (0.6). Calibration objects are the halo (found at tau < 0.6), evaluation
    objects the core (found at tau >= 0.6): the oracle on evaluation is 100, the honest number 0."""
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    maps = tmp_path / "maps"
    maps.mkdir()
    m = np.zeros((100, 100), np.float32)
    m[20:80, 20:80] = 0.6
    m[40:60, 40:60] = 1.0
    for i in range(4):
        Image.new("RGB", (100, 100)).save(root / "images" / f"{i}.png")
        gt = (m >= (0.5 if i < 2 else 0.9)).astype(np.uint8) * 255
        Image.fromarray(gt).save(root / "masks" / f"{i}.png")
        np.save(maps / f"{i}.npy", m)
    (root / "splits" / "cal.txt").write_text("0\n1\n")
    rep = run_eval("masks", root, maps=maps, calibrate_on="cal", progress=False).as_dict()
    assert rep["protocol"]["mode"] == "calibrated" and rep["images"]["calibration"] == 2
    assert rep["oracle"]["MaxBoxAcc"] == 100.0
    assert rep["at_tau"]["GT-known Loc"] == 0.0 and rep["tau"]["GT-known Loc"] < 0.6
    fixed = run_eval("masks", root, maps=maps, threshold=0.7, progress=False).as_dict()
    assert fixed["at_tau"]["GT-known Loc"] == 50.0 and fixed["tau"]["GT-known Loc"] == 0.7


def test_missing_map_is_reported_and_bad_arguments_are_one_line(tmp_path):
    write_masks_folder(tmp_path / "set", n=3)
    maps = tmp_path / "maps"
    maps.mkdir()
    for k in ("im0", "im1"):
        np.save(maps / f"{k}.npy", np.random.default_rng(0).random((64, 64)).astype(np.float32))
    out, plot = tmp_path / "m.json", tmp_path / "c.png"
    r = runner.invoke(app, ["eval", "--dataset", "masks", "--root", str(tmp_path / "set"), "--maps", str(maps),
                            "--out", str(out), "--plot", str(plot), "-q"])
    assert r.exit_code == 3, r.output
    assert "1 FAILED" in r.output and "im2" in r.output and "oracle" in r.output
    data = json.loads(out.read_text())
    assert data["images"]["failed"] == 1 and len(data["curves"]["BoxAccV2@70"]) == 100
    assert Image.open(plot).size == (900, 560)
    r = runner.invoke(app, ["eval", "-d", "masks", "--root", str(tmp_path / "set"), "--maps", str(maps), "--baseline", "full"])
    assert r.exit_code == 2 and "error: give exactly one of" in r.output
    r = runner.invoke(app, ["eval", "-d", "masks", "--root", str(tmp_path / "set"), "--baseline", "center",
                            "--threshold", "0.5", "--calibration-fraction", "0.5"])
    assert r.exit_code == 2 and "cannot be combined" in r.output
    np.save(maps / "im2.npy", np.zeros((2, 3, 4)))
    r = runner.invoke(app, ["eval", "-d", "masks", "--root", str(tmp_path / "set"), "--maps", str(maps), "--strict"])
    assert r.exit_code == 2 and "expected a 2-D numeric map" in r.output


def test_weights_run_on_the_fly(tmp_path):
    import torch

    from c2am_cli import C2AM, ModelConfig

    write_masks_folder(tmp_path / "set", n=3)
    torch.manual_seed(0)
    path = C2AM(ModelConfig(backbone="test_resnet", image_size=64)).save(tmp_path / "run" / "model.safetensors")
    rep = run_eval("masks", tmp_path / "set", weights=str(path), num_workers=0, batch_size=2, device="cpu",
                   progress=False).as_dict()
    assert rep["images"]["evaluated"] == 3 and rep["protocol"]["mode"] == "fixed"
    assert rep["tau"]["GT-known Loc"] == 0.5 and 0 <= rep["at_tau"]["mIoU"] <= 100
    assert all(np.isfinite(v) for v in rep["oracle"].values())
    # maps written by `c2am localize --maps` are found by their relative paths
    from c2am_cli.predict.localize import localize

    localize(tmp_path / "set" / "images", tmp_path / "boxes.json", weights=str(path), maps_dir=tmp_path / "maps",
             num_workers=0, batch_size=2, device="cpu", progress=False)
    rep = run_eval("masks", tmp_path / "set", maps=tmp_path / "maps", threshold=0.5, progress=False).as_dict()
    assert rep["images"]["evaluated"] == 3 and rep["images"]["failed"] == 0


# -- real data (../shared/data) ----------------------------------------------------------------------------------

# BASELINES.md reference rows (oracle tau on the dev folders), measured by an independent evaluator
REFERENCE = {
    ("masks", "sod_bsds300"): {"full": [51.3, 54.0, 50.7, 26.9, 26.9, 32.4, 0.731, 26.9],
                               "center": [73.3, 67.6, 74.0, 35.3, 36.2, 51.6, 0.343, 48.8]},
    ("masks", "ecssd"): {"full": [34.6, 38.9, 34.4, 23.9, 24.0, 29.0, 0.761, 24.0],
                         "center": [65.2, 60.0, 64.0, 40.5, 41.5, 59.3, 0.308, 58.0]},
    ("masks", "weizmann_horse"): {"full": [79.3, 74.6, 79.3, 25.9, 25.8, 31.3, 0.741, 25.8],
                                  "center": [98.8, 93.1, 98.8, 43.1, 43.2, 61.7, 0.304, 64.7]},
    ("imagenet", "imagenet_val_subset"): {"full": [2.0, 14.7, 2.0], "center": [34.0, 36.0, 32.0]},
    ("voc", "voc2012_seg_subset"): {"full": [50.0, 51.9, 50.0, 28.9, 0.0, 14.4, 28.9],
                                    "center": [65.4, 61.5, 67.3, 33.7, 68.0, 50.9, 51.2]},
}


@pytest.mark.realdata
def test_real_folders_parse(shared_data):
    counts = {("masks", "ecssd"): 500, ("masks", "sod_bsds300"): 150, ("masks", "weizmann_horse"): 164,
              ("imagenet", "imagenet_val_subset"): 50, ("voc", "voc2012_seg_subset"): 52}
    for (name, folder), n in counts.items():
        assert len(load_dataset(name, shared_data / folder)) == n, folder
    voc = load_dataset("voc", shared_data / "voc2012_seg_subset")
    assert len(voc.split_ids("val")) == 27 and len(voc.split_ids("train")) == 25 and voc.default_split == "all"
    inet = load_dataset("imagenet", shared_data / "imagenet_val_subset")
    assert sum(len(it.boxes) for it in inet.items) == 100 and all(it.label is not None for it in inet.items)
    cub = load_dataset("wsol", shared_data / "cub_metadata_only" / "wsolevaluation_CUB_test")
    assert len(cub) == 5794 and cub.num_classes == 200
    assert cub.items[0].size == (500, 335) and cub.items[0].boxes == [[60, 27, 385, 331]]
    r = runner.invoke(app, ["eval", "-d", "wsol", "--root", str(shared_data / "cub_metadata_only" / "wsolevaluation_CUB_test"), "--check"])
    assert r.exit_code == 0 and "5794 images" in r.output and "checked against the stated image sizes" in r.output


@pytest.mark.realdata
@pytest.mark.parametrize("key", list(REFERENCE), ids=[k[1] for k in REFERENCE])
def test_reference_maps_reproduce_baselines_md(shared_data, key):
    name, folder = key
    ds = load_dataset(name, shared_data / folder)
    for kind, expected in REFERENCE[key].items():
        d = evaluate(ds, Baseline(kind), progress=False).as_dict()
        o, tf = d["oracle"], d["threshold_free"]
        got = [o["MaxBoxAcc"], o["MaxBoxAccV2"], o["CorLoc"]]
        if name == "masks":
            got += [o["mIoU"], o["dsIoU"], o["maxF_meanPR"], tf["MAE"], tf["PxAP"]]  # BASELINES.md: mean-PR F
        elif name == "voc":
            got += [o["fgIoU"], o["bgIoU"], o["mIoU2"], tf["PxAP"]]
        for g, e in zip(got, expected):
            assert g == pytest.approx(e, abs=0.0015 if e < 1 else 0.051), (folder, kind, got, expected)


@pytest.mark.realdata
def test_voc_calibrate_on_train_reports_on_val(shared_data):
    rep = run_eval("voc", shared_data / "voc2012_seg_subset", baseline="center", calibrate_on="train",
                   progress=False).as_dict()
    assert rep["images"]["evaluated"] == 27 and rep["images"]["calibration"] == 25
    assert rep["at_tau"]["mIoU2"] <= rep["oracle"]["mIoU2"] + 1e-9
