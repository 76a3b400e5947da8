"""Metrics against hand-computed cases: wsolevaluation box conventions, mask metrics, VOC mIoU, the protocol."""
import cv2
import numpy as np
import pytest

from c2am_cli.maps.boxes import binarize, contour_boxes, normalize_map
from c2am_cli.eval.metrics import (BoxAccumulator, MaskAccumulator, binarize_sweep, box_iou, calibration_split,
                              cam_thresholds, foreground_confusion, max_box_acc, miou_from_confusion,
                              pxap_from_histograms, resize_box, semantic_confusion, sweep_boxes, topk_loc)

S = 224


def rect_map(x1, y1, x2, y2, size=S):
    m = np.zeros((size, size), np.float32)
    m[y1:y2 + 1, x1:x2 + 1] = 1
    return m


# -- boxes ------------------------------------------------------------------------------------------------------


def test_iou_counts_pixels_inclusively():
    # 10x10 boxes overlapping in 5 columns: 50 / (100 + 100 - 50)
    assert box_iou([[0, 0, 9, 9]], [[5, 0, 14, 9]])[0, 0] == pytest.approx(1 / 3)
    assert box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0, 0] == 1.0  # one pixel is an area of 1, not 0
    assert box_iou([[0, 0, 9, 9]], [[10, 0, 19, 9]])[0, 0] == 0.0  # touching, not overlapping
    assert box_iou([[0, 0, 0, 0]], [[0, 0, 1, 1]])[0, 0] == pytest.approx(1 / 4)
    assert box_iou([[5, 5, 2, 2]], [[5, 5, 2, 2]])[0, 0] == 0.0  # degenerate: union <= 0 scores 0
    assert box_iou([[0, 0, 9, 9], [0, 0, 4, 9]], [[0, 0, 9, 9]]).tolist() == [[1.0], [0.5]]


def test_resize_box_truncates_like_wsolevaluation():
    assert resize_box([10, 20, 30, 41], (448, 448)) == [5, 10, 15, 20]
    assert resize_box([0, 0, 299, 199], (300, 200)) == [0, 0, 223, 222]  # 299*224/300 = 223.25, 199*224/200 = 222.88


@pytest.mark.parametrize("kind", ["noise", "blur", "cubic", "steps"])
def test_vectorised_sweep_equals_binarize_and_contour_boxes_at_every_tau(kind):
    rng = np.random.default_rng({"noise": 0, "blur": 1, "cubic": 2, "steps": 3}[kind])
    raw = {"noise": lambda: rng.random((S, S)),
           "blur": lambda: cv2.GaussianBlur(rng.random((S, S)).astype(np.float32), (0, 0), 4),
           "cubic": lambda: cv2.resize(rng.random((7, 9)).astype(np.float32), (S, S), interpolation=cv2.INTER_CUBIC),
           "steps": lambda: np.kron(rng.integers(0, 5, (4, 4)), np.ones((56, 56))) * 0.2}[kind]()
    m = normalize_map(raw)
    taus = cam_thresholds(0.01)
    sw, masks = sweep_boxes(m, taus), binarize_sweep(m, taus)
    for t, tau in enumerate(taus):
        b = binarize(m, tau)
        assert np.array_equal(b > 0, masks[t])
        assert sw.largest[t].tolist() == contour_boxes(b, all_contours=False)[0]
        assert sw.every[sw.index[t]].tolist() == contour_boxes(b, all_contours=True)


def test_perfect_map_scores_100_with_the_plus_one_box_convention():
    gt = [50, 60, 149, 139]  # 100 x 80 pixels
    acc = BoxAccumulator()
    acc.add(rect_map(*gt), [gt])
    # the contour's bounding rectangle ends at x + w (one past the last pixel): box [50, 60, 150, 140]
    assert acc.iou_v1[0][50] == pytest.approx(100 * 80 / (101 * 81))
    curves = acc.curves()
    assert max_box_acc(curves) == {"MaxBoxAcc": 100.0, "MaxBoxAccV2": 100.0, "MaxBoxAccV2@30": 100.0,
                                   "MaxBoxAccV2@50": 100.0, "MaxBoxAccV2@70": 100.0}
    assert "CorLoc" not in curves  # no full-size map was given


def test_shifted_box_with_known_iou():
    gt = [0, 0, 99, 99]
    acc = BoxAccumulator()
    acc.add(rect_map(20, 0, 119, 99), [gt])
    # predicted [20, 0, 120, 100]: intersection 80 x 100, union 101*101 + 100*100 - 8000
    iou = 8000 / (10201 + 10000 - 8000)
    assert acc.iou_v1[0] == pytest.approx(np.full(100, iou))
    res = max_box_acc(acc.curves())
    assert (res["MaxBoxAcc"], res["MaxBoxAccV2@30"], res["MaxBoxAccV2@50"], res["MaxBoxAccV2@70"]) == (100, 100, 100, 0)
    assert res["MaxBoxAccV2"] == pytest.approx(200 / 3)


def test_box_clipped_at_the_image_edge():
    acc = BoxAccumulator()
    acc.add(rect_map(124, 124, 223, 223), [[124, 124, 223, 223]])  # x + w = 224 is clipped to W - 1 = 223
    assert acc.iou_v1[0][0] == 1.0


@pytest.mark.parametrize("value", [0.0, 0.7])
def test_empty_and_constant_maps_give_the_0_0_0_0_box(value):
    m = normalize_map(np.full((S, S), value, np.float32))  # constant -> all zeros, as wsolevaluation
    sw = sweep_boxes(m, cam_thresholds())
    assert (sw.largest == 0).all() and all(e.tolist() == [[0, 0, 0, 0]] for e in sw.every)
    acc = BoxAccumulator()
    acc.add(m, [[10, 10, 50, 50]])
    acc.add(m, [[0, 0, 1, 1]])  # the (0,0,0,0) box is one pixel: IoU 1/4 with a 2x2 box at the corner
    assert acc.curves()["BoxAcc@50"].max() == 0.0
    assert acc.iou_v1[1][0] == pytest.approx(0.25)


def test_multi_contour_maps_v1_takes_the_largest_v2_takes_any():
    m = rect_map(10, 10, 109, 109) + rect_map(150, 150, 179, 179)  # big square and a small one
    gt = [150, 150, 179, 179]  # the object is the small one
    acc = BoxAccumulator()
    acc.add(m, [gt])
    c = acc.curves()
    assert c["BoxAcc@50"].max() == 0.0  # the largest contour is the wrong object
    assert c["BoxAccV2@70"].min() == 100.0  # predicted [150, 150, 180, 180]: IoU 900 / 961
    assert acc.iou_v2[0][0] == pytest.approx(900 / 961)


def test_hole_contours_count_in_v2_as_in_opencv_retr_tree():
    m = rect_map(20, 20, 79, 79)
    m[40:60, 40:60] = 0  # a square ring; RETR_TREE also returns the hole, bounding rect [39, 39, 61, 61]
    acc = BoxAccumulator()
    acc.add(m, [[40, 40, 59, 59]])
    assert acc.iou_v1[0][0] == pytest.approx(400 / (61 * 61))
    assert acc.iou_v2[0][0] == pytest.approx(400 / (23 * 23))


def test_gt_boxes_are_rescaled_from_the_original_size_and_corloc_uses_it():
    acc = BoxAccumulator()
    full = np.zeros((200, 300), np.float32)  # the map at the image's size (300 x 200)
    full[50:150, 60:240] = 1
    gt = [60, 50, 239, 149]
    small = cv2.resize(full, (S, S), interpolation=cv2.INTER_NEAREST)
    acc.add(small, [gt], (300, 200), full)
    c = acc.curves()
    assert c["CorLoc"].min() == 100.0
    assert acc.iou_orig[0][0] == pytest.approx(180 * 100 / (181 * 101))  # +1 box convention at full size
    with pytest.raises(ValueError, match="image size"):
        acc.add(small, [gt], (300, 200), small)


def test_image_without_ground_truth_counts_as_wrong():
    acc = BoxAccumulator()
    acc.add(rect_map(0, 0, 9, 9), [[0, 0, 9, 9]])
    acc.add(rect_map(0, 0, 9, 9), [])
    assert acc.curves()["BoxAcc@50"].max() == 50.0


def test_max_box_acc_v2_chooses_tau_per_delta():
    curves = {"BoxAcc@50": np.array([10.0, 40.0]), "BoxAccV2@30": np.array([90.0, 60.0]),
              "BoxAccV2@50": np.array([50.0, 70.0]), "BoxAccV2@70": np.array([20.0, 10.0])}
    res = max_box_acc(curves)
    assert res["MaxBoxAcc"] == 40.0 and res["MaxBoxAccV2"] == pytest.approx((90 + 70 + 20) / 3)


def test_topk_loc_needs_class_and_box():
    ok = np.array([True, True, False, True])
    labels = [3, 5, 1, 7]
    preds = [[3, 0, 0, 0, 0], [1, 2, 5, 0, 0], [1, 0, 0, 0, 0], [0, 1, 2, 4, 6]]
    assert topk_loc(ok, labels, preds, 1) == 25.0  # image 0 only
    assert topk_loc(ok, labels, preds, 5) == 50.0  # images 0 and 1; image 2's box is wrong, image 3's class absent


def test_calibration_split_is_seeded_and_disjoint():
    a, b = calibration_split(10, 0.3, seed=0)
    assert len(a) == 3 and len(b) == 7 and not set(a) & set(b) and set(a) | set(b) == set(range(10))
    assert np.array_equal(a, calibration_split(10, 0.3, seed=0)[0])
    assert not np.array_equal(a, calibration_split(10, 0.3, seed=1)[0])


# -- masks ------------------------------------------------------------------------------------------------------


def test_mask_metrics_on_a_hand_computed_case():
    m = np.array([[1.0, 0.6, 0.2, 0.0]], np.float32)
    gt = np.array([[1, 0, 1, 0]], np.uint8)
    acc = MaskAccumulator()
    acc.add(m, gt)
    # tau 0.5: level int(0.5 * 255) = 127, foreground = {255, 153} = pixels 0, 1; IoU = 1 / 3
    assert acc.iou_curves()["mIoU"][50] == pytest.approx(100 / 3)
    # toolbox F: pixel >= t; the best is t in (0.6, 1]: P = 1, R = 1/2, F = 1.3 * 0.5 / (0.3 + 0.5)
    assert acc.fmeasure_curve()["F"].max() == pytest.approx(81.25)
    assert acc.mae() == pytest.approx((0 + 0.6 + 0.8 + 0) / 4)
    # PxAP: recall 0 -> 1/2 at precision 1, then 1/2 -> 1 at precision 2/3
    assert acc.pxap() == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))


def test_perfect_mask_map_and_ignore_pixels():
    gt = np.zeros((40, 60), np.uint8)
    gt[10:30, 20:50] = 1
    m = gt.astype(np.float32)
    gt_ignore = gt.copy()
    gt_ignore[0:5, :] = 255
    m_wrong = m.copy()
    m_wrong[0:5, :] = 1.0  # wrong only where the ground truth says ignore
    acc = MaskAccumulator()
    acc.add(m, gt)
    acc.add(m_wrong, gt_ignore)
    iou = acc.iou_curves()
    assert iou["mIoU"].max() == 100.0 and iou["dsIoU"].max() == 100.0 and iou["bgIoU"].max() == 100.0
    assert acc.fmeasure_curve()["F"].max() == pytest.approx(100.0)
    assert acc.mae() == 0.0 and acc.pxap() == pytest.approx(100.0)


def test_dataset_iou_pools_pixels_and_empty_union_counts_one():
    acc = MaskAccumulator()
    a = np.zeros((10, 10), np.uint8)
    a[:, :5] = 1  # 50 foreground pixels, all predicted
    acc.add(a.astype(np.float32), a)
    b = np.zeros((10, 10), np.uint8)
    b[0, :2] = 1  # 2 foreground pixels, none predicted, 8 false positives
    pred = np.zeros((10, 10), np.float32)
    pred[5, :8] = 1
    acc.add(pred, b)
    c = np.zeros((10, 10), np.uint8)  # nothing to find, nothing predicted: union empty
    acc.add(np.zeros((10, 10), np.float32), c)
    iou = acc.iou_curves()
    assert iou["mIoU"][50] == pytest.approx(100 * (1 + 0 + 1) / 3)
    assert iou["dsIoU"][50] == pytest.approx(100 * 50 / (50 + 2 + 8))
    assert acc.iou_curves([0])["mIoU"][50] == 100.0  # subsets


def test_full_map_precision_is_the_foreground_share():
    gt = np.zeros((10, 10), np.uint8)
    gt[:3] = 1  # 30 % foreground
    acc = MaskAccumulator()
    acc.add(np.ones((10, 10), np.float32), gt)
    assert acc.pxap() == pytest.approx(30.0)
    assert acc.fmeasure_curve()["F"].max() == pytest.approx(100 * 1.3 * 0.3 / (0.3 * 0.3 + 1))
    assert acc.mae() == pytest.approx(0.7)


def test_pxap_without_positive_ground_truth_is_nan():
    assert np.isnan(pxap_from_histograms(np.zeros(5), np.ones(5)))


# -- VOC --------------------------------------------------------------------------------------------------------


def test_semantic_confusion_ignores_255_and_keeps_unlabelled_predictions():
    gt = np.array([[0, 0, 1, 1, 255, 2]])
    pred = np.array([[0, 1, 1, 255, 1, 2]])
    conf = semantic_confusion(pred, gt, n_classes=3)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    s = miou_from_confusion(conf)
    # class 0: tp 1, gt 2, pred 1 -> 1/2; class 1: tp 1, gt 2, pred 2 -> 1/3; class 2: 1
    assert s.iou.tolist() == pytest.approx([50.0, 100 / 3, 100.0])
    assert s.miou == pytest.approx((50 + 100 / 3 + 100) / 3)
    assert s.fp[1] == pytest.approx(100 / 3) and s.fn[1] == pytest.approx(100 / 3)  # the 255 prediction is a miss
    assert (s.iou + s.fp + s.fn) == pytest.approx(np.full(3, 100.0))


def test_miou_accumulates_over_the_set_not_per_image():
    gt1, pred1 = np.array([[1, 1, 1, 1]]), np.array([[1, 1, 1, 1]])
    gt2, pred2 = np.array([[1, 0, 0, 0]]), np.array([[0, 0, 0, 0]])
    conf = semantic_confusion(pred1, gt1, 2) + semantic_confusion(pred2, gt2, 2)
    s = miou_from_confusion(conf)
    assert s.iou.tolist() == pytest.approx([75.0, 80.0])  # bg 3 / 4; fg 4 / 5 (per-image mean would differ)


def test_absent_class_is_left_out_and_false_positive_class_scores_zero():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 3, 1, 1]])
    s = miou_from_confusion(semantic_confusion(pred, gt, n_classes=5))
    assert np.isnan(s.iou[2]) and np.isnan(s.iou[4]) and s.iou[3] == 0.0
    assert s.miou == pytest.approx((50 + 100 + 0) / 3)


def test_foreground_confusion_collapses_classes():
    gt = np.array([[0, 0, 1, 2, 2, 255]])
    pred = np.array([[0, 1, 2, 2, 255, 0]])
    fb = foreground_confusion(semantic_confusion(pred, gt, n_classes=3))
    assert fb.tolist() == [[1, 1, 0], [0, 2, 1]]
    s = miou_from_confusion(fb)
    assert s.iou.tolist() == pytest.approx([50.0, 200 / 4])  # bg: 1 / (2 + 1 - 1); fg: 2 / (3 + 3 - 2)
