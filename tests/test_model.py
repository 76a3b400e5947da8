"""Model: any timm backbone, the embeddings formula, polarity, save/load round trip."""
import json

import pytest
import torch
from safetensors import safe_open

from c2am_cli import C2AM, C2AMError, ModelConfig
from c2am_cli.models.c2am import Backbone, embeddings
from c2am_cli.training.trainer import decide_polarity


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_vit", "test_convnext"])
def test_backbones_give_one_map_at_the_finer_level(name):
    bb = Backbone(name, (-2, -1), 16).eval()
    feats = bb(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, bb.channels, 4, 4)  # stride 16 for all of these at 64 px


def test_nhwc_feature_maps_are_permuted():
    bb = Backbone("test_resnet", (-2, -1), 16).eval()
    x = torch.randn(1, 3, 64, 64)
    nchw = bb(x)

    class ChannelsLast(torch.nn.Module):  # what timm's swin/NHWC feature models return
        def __init__(self, body):
            super().__init__()
            self.inner = body

        def forward(self, t):
            return [f.permute(0, 2, 3, 1) for f in self.inner(t)]

    bb.body, bb.nhwc = ChannelsLast(bb.body), True
    assert torch.equal(bb(x), nchw)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(C2AMError, match="no_such_net"):
        Backbone("no_such_net")


def test_three_feature_levels_come_at_the_finest_of_them():
    bb = Backbone("test_efficientnet", (-3, -2, -1), 16).eval()
    assert bb.reduction == 8 and bb.channels == sum(bb.body.feature_info.channels())
    assert bb(torch.randn(1, 3, 64, 64)).shape == (1, bb.channels, 8, 8)
    with pytest.raises(C2AMError, match=r"feature levels \(7,\) are not all among its levels"):
        Backbone("test_efficientnet", (7,), 16)


def test_embeddings_match_the_formula():
    feats = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    act = torch.tensor([1.0, 0.0, 0.5, 0.25]).reshape(1, 1, 2, 2).expand(2, 1, 2, 2)
    fg, bg = embeddings(feats, act)
    # image 0, channel 0 holds 0, 1, 2, 3: fg = (0*1 + 1*0 + 2*0.5 + 3*0.25) / 4
    assert fg[0, 0].item() == pytest.approx((0 + 0 + 1 + 0.75) / 4)
    assert bg[0, 0].item() == pytest.approx((0 + 1 + 1 + 2.25) / 4)
    assert torch.allclose(fg + bg, feats.flatten(2).mean(-1))


def test_activation_maps_are_foreground_probabilities_with_polarity():
    torch.manual_seed(0)
    model = C2AM(ModelConfig(backbone="test_resnet", image_size=64)).eval()
    x = torch.randn(2, 3, 64, 64)
    raw = torch.nn.functional.interpolate(model(x).map, size=(64, 64), mode="bilinear", align_corners=False).squeeze(1)
    maps = model.activation_maps(x)
    assert maps.shape == (2, 64, 64) and torch.allclose(maps, raw, atol=1e-6)
    model.config.model.polarity = -1
    assert torch.allclose(model.activation_maps(x), 1 - raw, atol=1e-6)
    tta = model.activation_maps(x, scales=(0.5, 1.0), flip=True, size=(32, 48))
    assert tta.shape == (2, 32, 48) and tta.min() >= 0 and tta.max() <= 1


def test_decide_polarity_from_the_border_prior():
    maps = torch.zeros(4, 10, 10)
    maps[:, 3:7, 3:7] = 1  # object in the middle: the map is foreground
    assert decide_polarity(maps)[0] == 1
    assert decide_polarity(1 - maps)[0] == -1


def test_save_and_load_round_trip(tmp_path):
    model = C2AM(ModelConfig(backbone="test_efficientnet", image_size=64, box_threshold=0.37)).eval()
    path = model.save(tmp_path / "run")
    assert path.name == "model.safetensors" and (tmp_path / "run" / "config.json").exists()
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["c2am_config"])
    assert meta["model"]["backbone"] == "test_efficientnet" and meta["version"] == 1 and "torch" in meta["versions"]
    loaded = C2AM.from_pretrained(tmp_path / "run")
    assert loaded.config.model.box_threshold == 0.37
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded.activation_maps(x), model.activation_maps(x))


def test_half_precision_save_loads_as_float(tmp_path):
    model = C2AM(ModelConfig(backbone="test_resnet", image_size=64)).eval()
    path = model.save(tmp_path / "m.safetensors", dtype=torch.float16)
    loaded = C2AM.from_file(path)
    assert next(loaded.parameters()).dtype == torch.float32
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded.activation_maps(x), model.activation_maps(x), atol=2e-2)


def test_wrong_or_broken_weights_are_clear_errors(tmp_path):
    path = C2AM(ModelConfig(backbone="test_resnet", image_size=64)).save(tmp_path / "run")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(C2AMError, match="cut.safetensors: cannot read weights"):
        C2AM.from_file(cut)
    with pytest.raises(C2AMError, match="no such file"):
        C2AM.from_pretrained(tmp_path / "missing.safetensors")
