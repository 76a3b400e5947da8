"""TokenCut baseline: the cut on synthetic patch grids and a hand-checked graph, the bilateral solver on a synthetic
edge, ViT keys against a manual qkv, and the predictor / map source on a tiny random ViT (all CPU, no weights)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from scipy import ndimage

from c2am_cli.maps import bilateral
from c2am_cli.baselines import tokencut as tc

H, W = 12, 12
RECT = (slice(3, 7), slice(5, 10))  # a 4 x 5 object: rows 3..6, cols 5..9


def two_cluster_features(rng, h=H, w=W, rects=(RECT,), c=16, noise=0.1, opposite=False):
    """Object patches near one direction, background near an orthogonal (or, `opposite`, the negated) one."""
    u, v = np.zeros(c), np.zeros(c)
    u[0], v[1] = 1.0, 1.0
    if opposite:
        v = -u + 0.0
    truth = np.zeros((h, w), dtype=bool)
    for r in rects:
        truth[r] = True
    feats = np.where(truth.reshape(-1, 1), u, v) + noise * rng.standard_normal((h * w, c))
    return feats, truth


def box_of(mask):
    rows, cols = np.nonzero(mask)
    return (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


# -- ncut ------------------------------------------------------------------------------------------------------------


def test_ncut_finds_the_rectangle():
    feats, truth = two_cluster_features(np.random.default_rng(0))
    res = tc.ncut(torch.from_numpy(feats).float(), (H, W))
    assert res.bipartition.shape == (H, W) and res.bipartition.dtype == bool
    np.testing.assert_array_equal(res.bipartition, truth)
    np.testing.assert_array_equal(res.object_mask, truth)
    assert truth[res.seed]
    assert res.box == (5, 3, 10, 7)
    assert (res.eigvec[truth] > 0).all() and res.eigvec[truth].min() > res.eigvec[~truth].max()
    assert 0 < res.eigenvalue < 1  # the generalised spectrum of a graph Laplacian lies in [0, 2]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ncut_orients_any_eigenvector_sign(monkeypatch, sign):
    """eigh's sign is arbitrary: forcing either sign of the raw eigenvector must give the same oriented result."""
    feats, truth = two_cluster_features(np.random.default_rng(1))
    real = scipy.linalg.eigh

    def signed(*args, **kwargs):
        vals, vecs = real(*args, **kwargs)
        vecs = vecs * np.sign(vecs[np.flatnonzero(truth.ravel())[0], 0]) * sign  # raw sign on the object = sign
        return vals, vecs

    monkeypatch.setattr(tc.scipy.linalg, "eigh", signed)
    res = tc.ncut(feats, (H, W))
    np.testing.assert_array_equal(res.bipartition, truth)
    assert (res.eigvec[truth] > 0).all()
    assert res.box == (5, 3, 10, 7)


def test_ncut_keeps_only_the_seed_component():
    rects = (RECT, (slice(9, 11), slice(0, 3)))
    feats, truth = two_cluster_features(np.random.default_rng(2), rects=rects)
    res = tc.ncut(feats, (H, W))
    np.testing.assert_array_equal(res.bipartition, truth)
    blob = np.zeros((H, W), dtype=bool)
    blob[rects[0] if res.seed[0] < 8 else rects[1]] = True
    assert blob[res.seed]
    np.testing.assert_array_equal(res.object_mask, blob)
    assert res.box == tuple(int(v) for v in box_of(blob))


@pytest.mark.parametrize("binary_graph", [True, False])
def test_ncut_matches_dense_normalized_laplacian(binary_graph):
    """A 2 x 3 graph: x = D^-1/2 u, u the second eigenvector of D^-1/2 (D - A) D^-1/2, scaled to x^T D x = 1."""
    f = np.array([[1.0, 0.1, 0.0], [0.9, 0.3, 0.1], [0.2, 1.0, 0.1], [0.0, 0.2, 1.0], [0.1, 0.1, 0.9], [0.7, 0.7, 0.0]])
    tau = 0.5 if binary_graph else 0.3
    res = tc.ncut(f, (2, 3), tau=tau, binary_graph=binary_graph)
    g = f / np.linalg.norm(f, axis=1, keepdims=True)
    a = g @ g.T
    a = np.where(a > tau, 1.0, 1e-5) if binary_graph else np.where(a < tau, 1e-5, a)
    d = a.sum(axis=1)
    lsym = (np.diag(d) - a) / np.sqrt(np.outer(d, d))
    vals, vecs = np.linalg.eigh(lsym)
    assert vals[2] - vals[1] > 1e-3  # a simple eigenvalue: the eigenvector is unique up to sign
    x = vecs[:, 1] / np.sqrt(d)
    x /= np.sqrt(x @ (d * x))
    got = res.eigvec.ravel()
    x = x * np.sign(x @ got)
    np.testing.assert_allclose(got, x, atol=1e-6)
    assert res.eigenvalue == pytest.approx(vals[1], abs=1e-8)
    np.testing.assert_array_equal(res.bipartition.ravel(), got > got.mean())


def test_ncut_on_identical_features_still_gives_an_object():
    """A blank image: every patch alike; the cut is arbitrary but the result must stay well-formed."""
    res = tc.ncut(np.ones((4 * 6, 8)), (4, 6))
    assert res.object_mask[res.seed] and res.bipartition[res.seed]
    x1, y1, x2, y2 = res.box
    assert 0 <= x1 < x2 <= 6 and 0 <= y1 < y2 <= 4


def test_ncut_rejects_a_wrong_grid():
    with pytest.raises(ValueError):
        tc.ncut(np.ones((10, 4)), (3, 3))


# -- LOST --------------------------------------------------------------------------------------------------------


def test_lost_finds_the_rectangle():
    feats, truth = two_cluster_features(np.random.default_rng(3), opposite=True)
    res = tc.lost(feats, (H, W), k=100)
    assert truth[res.seed]
    np.testing.assert_array_equal(res.mask, truth)
    assert res.box == (5, 3, 10, 7)


# -- bilateral solver ----------------------------------------------------------------------------------------------


def edge_image(h=48, w=64, edge=32, seed=0):
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), dtype=np.float64)
    img[:, :edge] = (200, 40, 40)
    img[:, edge:] = (40, 40, 200)
    img += rng.normal(0, 3, img.shape)
    truth = np.zeros((h, w), dtype=bool)
    truth[:, :edge] = True
    return np.clip(img, 0, 255).astype(np.uint8), truth


def iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


@pytest.mark.parametrize("blur", [0.0, 4.0])
def test_bilateral_solver_snaps_a_misaligned_mask_to_the_edge(blur):
    img, truth = edge_image()
    target = np.zeros(truth.shape)
    target[:, :38] = 1.0  # 6 pixels past the colour edge
    target = ndimage.gaussian_filter(target, blur) if blur else target
    out = tc.bilateral_solve(img, target, np.full(truth.shape, 0.999))
    assert out.shape == truth.shape and np.isfinite(out).all()
    assert out.min() > -0.05 and out.max() < 1.05
    before, after = iou(target > 0.5, truth), iou(out > 0.5, truth)
    assert before < 0.85 and after > 0.95


def test_bilateral_solver_matches_tokencut_reference_values():
    """Values produced by TokenCut's own bilateral_solver.py (bilateral_solver_output with sigmas 16, 16, 8) on this
    deterministic image and mask; our solver agreed with it to 1e-14 everywhere."""
    yy, xx = np.mgrid[:40, :56]
    img = np.stack([(xx * 4) % 256, (yy * 6) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    mask = ((xx - 25) ** 2 / 300 + (yy - 18) ** 2 / 150 < 1).astype(float)
    expected = np.array([[0.258749, 0.29277, 0.323124, 0.168414, 0.095452, 0.060248],
                         [0.269901, 0.305011, 0.498426, 0.394512, 0.156575, 0.076343],
                         [0.314358, 0.474856, 0.630512, 0.508169, 0.275374, 0.139338],
                         [0.194455, 0.347404, 0.585044, 0.56169, 0.268762, 0.177227],
                         [0.083651, 0.142877, 0.265127, 0.271504, 0.235182, 0.0]])
    out = tc.bilateral_solver_output(img, mask)
    np.testing.assert_allclose(out.soft[::8, ::11], expected, atol=2e-6)
    assert out.soft.sum() == pytest.approx(673.925556, abs=1e-5)
    assert out.accepted and out.binary.sum() == 373


def test_bilateral_grid_structure_by_brute_force():
    """S puts each pixel on the vertex of its (x, y, Y, U, V) cell; B = 10 on the diagonal + 1 per lattice
    neighbour (cells one step apart along exactly one axis)."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)
    img[:, 5:] = img[:, :1]  # repeated colours: cells with several pixels
    grid = bilateral._BilateralGrid(img, 4, 64, 64)
    yuv = img.astype(float) @ bilateral._RGB_TO_YUV.T + bilateral._YUV_OFFSET
    yy, xx = np.mgrid[:9, :11]
    cells = np.stack([xx // 4, yy // 4, (yuv[..., 0] / 64).astype(int), (yuv[..., 1] / 64).astype(int),
                      (yuv[..., 2] / 64).astype(int)], -1).reshape(-1, 5)
    s = grid.S.toarray()
    assert (s.sum(axis=0) == 1).all()
    vertex = s.argmax(axis=0)
    same_cell = (cells[:, None] == cells[None]).all(-1)
    np.testing.assert_array_equal(same_cell, vertex[:, None] == vertex[None])
    vcells = np.array([cells[np.flatnonzero(vertex == v)[0]] for v in range(grid.nvertices)])
    dist = np.abs(vcells[:, None] - vcells[None]).sum(-1)
    np.testing.assert_array_equal(grid.B.toarray(), np.where(dist == 0, 10.0, (dist == 1).astype(float)))


def test_bilateral_solver_keeps_a_constant():
    img, _ = edge_image(seed=1)
    out = tc.bilateral_solve(img, np.full(img.shape[:2], 0.7), np.ones(img.shape[:2]))
    np.testing.assert_allclose(out, 0.7, atol=1e-3)


def test_bilateral_solver_output_cleans_and_accepts():
    img, truth = edge_image(seed=2)
    mask = np.zeros(truth.shape)
    mask[:, :38] = 1.0
    mask[40:44, 50:54] = 1.0  # a speck on the other side
    out = tc.bilateral_solver_output(img, mask)
    assert out.accepted
    assert out.soft.shape == truth.shape
    assert iou(out.binary, truth) > 0.95
    sliver = np.zeros(truth.shape)
    sliver[:, 60:] = 1.0
    rejected = tc.bilateral_solver_output(img, sliver)
    assert not rejected.accepted and not rejected.binary.any()  # a 4-column sliver: the solver's mask disagrees


# -- ViT keys and the predictor ------------------------------------------------------------------------------------


def tiny_vit(reg_tokens=2):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                             reg_tokens=reg_tokens, dynamic_img_size=True).eval()


def test_vit_keys_match_manual_qkv():
    model = tiny_vit()
    assert model.num_prefix_tokens == 3
    x = torch.randn(2, 3, 24, 40)  # 3 x 5 patches
    seen = []
    handle = model.blocks[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    keys = tc.vit_keys(model, x)
    handle.remove()
    assert keys.shape == (2, 15, 32)
    blk = model.blocks[-1]
    qkv = blk.norm1(seen[0]) @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    manual = qkv[..., 32:64][:, 3:]  # k = the middle third (heads already concatenated), prefix tokens dropped
    torch.testing.assert_close(keys, manual, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        tc.vit_keys(model, torch.randn(1, 3, 20, 40))


@pytest.mark.parametrize("pad", [False, True])
def test_predict_on_a_tiny_vit(pad):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)
    image[10:30, 15:40] = (250, 20, 20)
    res = tc.TokenCut(tiny_vit(), pad=pad).predict(Image.fromarray(image))
    assert res.mask.shape == (37, 50) and res.eigvec_map.shape == (37, 50) and res.mask_binary.shape == (37, 50)
    assert set(np.unique(res.mask)) <= {0.0, 1.0} and res.mask.any()
    assert res.eigvec_map.min() == 0.0 and res.eigvec_map.max() == 1.0
    x1, y1, x2, y2 = res.box
    assert 0 <= x1 < x2 <= 50 and 0 <= y1 < y2 <= 37
    mx1, my1, mx2, my2 = box_of(res.mask > 0.5)  # the box is the mask's (up to the nearest-upsampling rounding)
    assert max(abs(x1 - mx1), abs(y1 - my1), abs(x2 - mx2), abs(y2 - my2)) <= 2
    grid = (5, 6) if not pad else (5, 7)  # resize 37x50 -> 40x48; pad -> 40x56
    assert res.ncut.eigvec.shape == grid
    assert res.seconds > 0


def test_predict_with_bilateral_solver_and_short_side():
    image = np.full((37, 50, 3), 30, dtype=np.uint8)
    image[8:30, 12:40] = (230, 200, 20)
    pred = tc.TokenCut(tiny_vit(reg_tokens=0), image_size=32, bilateral=True)
    res = pred.predict(image)
    assert res.ncut.eigvec.shape == (4, 5)  # short side 37 -> 32, long side 50 -> 43 -> 40
    assert res.mask.shape == (37, 50) and res.mask.dtype == np.float32
    assert res.mask.min() >= 0.0 and res.mask.max() <= 1.0
    assert isinstance(res.solver_accepted, bool)


def test_from_backbone_builds_a_working_predictor():
    pred = tc.TokenCut.from_backbone("vit_tiny_patch16_224", weights=None, image_size=64)
    assert pred.patch == (16, 16) and pred.settings()["image_size"] == 64
    res = pred.predict(np.random.default_rng(1).integers(0, 255, (37, 50, 3), dtype=np.uint8))
    assert res.ncut.eigvec.shape == (4, 5)  # 37 x 50 -> 64 x 86 -> 64 x 80
    assert res.mask.shape == (37, 50)


def test_map_source_yields_maps_at_each_size():
    pred = tc.TokenCut(tiny_vit())
    images = {"a.png": np.full((37, 50, 3), 90, dtype=np.uint8), "b.png": np.zeros((24, 24, 3), dtype=np.uint8)}
    images["a.png"][5:20, 5:30] = 250

    def loader(path):
        if path.name not in images:
            raise OSError("missing")
        return Image.fromarray(images[path.name])

    items = [SimpleNamespace(image="a.png"), SimpleNamespace(image="gone.png"), SimpleNamespace(image="b.png")]
    src = tc.TokenCutMaps("/nowhere", pred, map="eigvec", loader=loader)
    out = list(src.iterate(items, [(50, 37), (10, 10), (24, 24)], True, True))
    assert [o[0] for o in out] == [0, 1, 2]
    assert out[1][3] == "missing" and out[1][1] is None
    assert out[0][1].shape == (224, 224) and out[0][2].shape == (37, 50) and out[2][2].shape == (24, 24)
    assert 0.0 <= out[0][2].min() and out[0][2].max() <= 1.0
    assert src.describe()["baseline"] == "tokencut"


def test_eval_baseline_tokencut_from_the_command_line(tmp_path):
    """`c2am eval --baseline tokencut` on a masks folder with a ViT's weights from a timm-named file: the report names
    the baseline and both yardsticks; --bilateral runs the solver; its options without the baseline are one line."""
    import timm
    from safetensors.torch import save_file

    from cli_helpers import invoke, one_error_line
    from test_datasets import write_masks_folder

    write_masks_folder(tmp_path / "set", n=3)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    common = ["eval", "-d", "masks", "--root", tmp_path / "set", "--baseline", "tokencut", "--backbone",
              "vit_tiny_patch16_224", "--backbone-weights", weights, "--quiet", "--out", tmp_path / "m.json"]
    r = invoke(*common)
    assert r.exit_code == 0, r.output
    assert "source: baseline tokencut" in r.output and "maxF_meanPR" in r.output and "IoU@0.5" in r.output
    d = json.loads((tmp_path / "m.json").read_text())
    assert d["images"]["evaluated"] == 3 and d["source"]["backbone"] == "vit_tiny_patch16_224"
    assert 0 <= d["oracle"]["maxF"] <= d["oracle"]["maxF_meanPR"] + 1e-9 <= 100 + 1e-9
    r = invoke(*common, "--bilateral", "--graph-tau", "0.5")
    assert r.exit_code == 0 and json.loads((tmp_path / "m.json").read_text())["source"]["bilateral"] is True
    line = one_error_line(invoke("eval", "-d", "masks", "--root", tmp_path / "set", "--baseline", "center", "--bilateral"))
    assert "use them with --baseline tokencut" in line
