"""The self-training stage: a decoder fitted to a teacher's pseudo-masks lifts a weak map; the CLI stage, its stored
config, rounds, resume, and hostile configs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from c2am_cli.config import ModelConfig, SelfTrainConfig, read_config
from c2am_cli.models.c2am import C2AM
from c2am_cli.predict.predictor import Predictor
from c2am_cli.runtime.errors import C2AMError
from c2am_cli.training.self_train import SelfTrainer, confident_bce, self_train
from cli_helpers import invoke, one_error_line
from synthetic import make_image

SIZE = 48


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    """Salient synthetic images, their true masks, and weak pseudo-masks: each object's box grown by 5 pixels (a
    coarse teacher: right place, wrong shape, the background around the object called foreground)."""
    root = tmp_path_factory.mktemp("weak")
    images, masks = root / "images", root / "pseudo"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(7)
    truth = {}
    for i in range(16):
        img, box, mask = make_image(rng, SIZE, salient=True)
        img.save(images / f"{i:02d}.png")
        truth[f"{i:02d}.png"] = mask > 127
        pseudo = np.zeros((SIZE, SIZE), np.uint8)
        x1, y1, x2, y2 = box
        pseudo[max(0, y1 - 5):y2 + 6, max(0, x1 - 5):x2 + 6] = 255
        Image.fromarray(pseudo).save(masks / f"{i:02d}.png")
    torch.manual_seed(0)
    C2AM(ModelConfig(backbone="test_resnet", image_size=SIZE)).save(root / "teacher")
    return root, truth


def _config(root, **kw) -> SelfTrainConfig:
    base = dict(teacher=str(root / "teacher"), epochs=20, batch_size=8, lr=3e-3, image_size=SIZE,
                decoder_levels=(0, 1), num_workers=0)
    return SelfTrainConfig(**{**base, **kw})


def test_self_training_lifts_a_weak_map(weak, tmp_path):
    root, truth = weak
    path = self_train(root / "images", tmp_path / "run", _config(root), pseudo_masks=root / "pseudo", device="cpu",
                      progress=False)
    predictor = Predictor(str(path), device="cpu", batch_size=8)
    student, teacher = [], []
    for rel, gt in truth.items():
        student.append(_iou(predictor.predict(root / "images" / rel).map >= 0.5, gt))
        teacher.append(_iou(np.asarray(Image.open(root / "pseudo" / rel)) >= 128, gt))
    # the grown boxes cover the object and a ring of background: IoU ~0.6; the student learns the object's look
    assert np.mean(teacher) < 0.7
    assert np.mean(student) > np.mean(teacher) + 0.1, (np.mean(student), np.mean(teacher))
    cfg = read_config(path)
    assert cfg.self_train is not None and cfg.self_train.decoder_levels == (0, 1) and len(cfg.self_train.teacher_sha256) == 64
    assert cfg.model.image_size == SIZE and cfg.model.scales == (1.0,) and cfg.model.calibration == ()
    from c2am_cli.hub.card import model_card

    card = model_card(cfg)
    assert "## Self-training" in card and "| decoder | levels 0, 1 plus the head's, 64 channels |" in card
    assert "## Training (the contrastive stage)" in card
    assert f"| seed | {cfg.self_train.seed} |" in card.split("## Self-training")[1].split("## Metrics")[0]
    tensors = load_file(str(path))
    teacher_tensors = load_file(str(root / "teacher" / "model.safetensors"))
    assert any(k.startswith("decoder.") for k in tensors)
    assert all(torch.equal(tensors[k], v) for k, v in teacher_tensors.items())  # backbone and head frozen


def test_fine_tuned_levels_train_with_the_decoder_and_the_rest_stays_the_teachers(weak, tmp_path):
    root, truth = weak
    path = self_train(root / "images", tmp_path / "run", _config(root, finetune_levels=1), pseudo_masks=root / "pseudo",
                      device="cpu", progress=False)
    predictor = Predictor(str(path), device="cpu", batch_size=8)
    student = [_iou(predictor.predict(root / "images" / rel).map >= 0.5, gt) for rel, gt in truth.items()]
    teacher = [_iou(np.asarray(Image.open(root / "pseudo" / rel)) >= 128, gt) for rel, gt in truth.items()]
    assert np.mean(student) > np.mean(teacher) + 0.1, (np.mean(student), np.mean(teacher))
    tensors, before = load_file(str(path)), load_file(str(root / "teacher" / "model.safetensors"))
    changed = {k for k, v in before.items() if not torch.equal(tensors[k], v)}
    model = C2AM.from_file(root / "teacher" / "model.safetensors")
    model.backbone.freeze_before_level(1)  # the same split as the stage's: what it leaves frozen must be unchanged
    frozen = {f"backbone.{n}" for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert changed and not changed & frozen
    assert any(k.startswith("head.") for k in changed) and any(k.startswith("backbone.") for k in changed)
    assert all(torch.equal(tensors[k], before[k]) for k in before if k.endswith("running_mean"))  # BatchNorm frozen
    from c2am_cli.hub.card import model_card

    assert "last 1 feature level and the activation head trained along" in model_card(read_config(path))
    with pytest.raises(C2AMError, match=r"--finetune-levels 9: .*or 0 to keep it frozen"):
        SelfTrainer(root / "images", tmp_path / "r9", _config(root, finetune_levels=9), root / "pseudo", device="cpu")


def test_a_self_trained_model_teaches_a_new_decoder(weak, tmp_path):
    root, _ = weak
    first = self_train(root / "images", tmp_path / "first", _config(root, epochs=1), pseudo_masks=root / "pseudo",
                       device="cpu", progress=False)
    second = self_train(root / "images", tmp_path / "second", _config(root, teacher=str(first), epochs=1,
                                                                      decoder_levels=(1,)),
                        pseudo_masks=root / "pseudo", device="cpu", progress=False)
    tensors, teacher = load_file(str(second)), load_file(str(first))
    assert read_config(second).self_train.decoder_levels == (1,)
    assert all(torch.equal(tensors[k], v) for k, v in teacher.items() if not k.startswith("decoder."))


def test_confident_bce_ignores_the_uncertain_band():
    logits = torch.tensor([[[[2.0, -1.0, 0.5]]]])
    masks = torch.tensor([[[[0.9, 0.1, 0.5]]]])  # fg, bg, ignored
    expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0))) / 2  # softplus(-2) + softplus(-1), two pixels
    assert confident_bce(logits, masks, (0.3, 0.7)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("finetune_levels", [0, 1])
def test_resumed_run_equals_an_uninterrupted_one(weak, tmp_path, monkeypatch, finetune_levels):
    root, _ = weak
    cfg = _config(root, epochs=2, rounds=2, finetune_levels=finetune_levels)
    whole = self_train(root / "images", tmp_path / "whole", cfg, pseudo_masks=root / "pseudo", device="cpu",
                       progress=False)
    epochs_run = []
    original = SelfTrainer._epoch

    def stop_at_third(self, *args):
        if len(epochs_run) == 2:  # round 2, epoch 1: killed
            raise KeyboardInterrupt
        epochs_run.append(args)
        return original(self, *args)

    monkeypatch.setattr(SelfTrainer, "_epoch", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        self_train(root / "images", tmp_path / "cut", cfg, pseudo_masks=root / "pseudo", device="cpu", progress=False)
    monkeypatch.setattr(SelfTrainer, "_epoch", original)
    resumed = self_train(root / "images", tmp_path / "cut", cfg, pseudo_masks=root / "pseudo", device="cpu",
                         resume=True, progress=False)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [(r["round"], r["epoch"]) for r in log] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert (tmp_path / "cut" / "pseudo-masks" / "round-2" / "done.json").exists()  # round 2: the student's maps


def _ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def test_a_finished_run_resumed_with_more_rounds_trains_them(weak, tmp_path):
    root, _ = weak
    run = tmp_path / "run"
    self_train(root / "images", run, _config(root, epochs=1), pseudo_masks=root / "pseudo", device="cpu", progress=False)
    self_train(root / "images", run, _config(root, epochs=1, rounds=2), pseudo_masks=root / "pseudo", device="cpu",
               resume=True, progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["round"], r["epoch"]) for r in log] == [(1, 1), (2, 1)]
    assert read_config(run / "model.safetensors").self_train.rounds == 2
    assert len(list((run / "pseudo-masks" / "round-2").glob("*.png"))) == 16  # the student's relabelling


def test_cli_stage_uses_the_teachers_maps_and_its_weights_work_everywhere(weak, tmp_path):
    root, truth = weak
    run = tmp_path / "run"
    _ok("train", root / "images", "--stage", "self-train", "--init", root / "teacher", "--epochs", 1,
           "--batch-size", 4, "--image-size", SIZE, "--decoder-levels", "0,1", "--workers", 0, "--device", "cpu",
           "--out", run, "-q")
    masks = run / "pseudo-masks" / "round-1"
    assert sorted(p.name for p in masks.glob("*.png")) == sorted(truth)  # the teacher's refined maps, one per image
    cfg = read_config(run / "model.safetensors")
    assert cfg.self_train.teacher == str(root / "teacher") and cfg.self_train.epochs == 1
    out = tmp_path / "boxes.json"
    _ok("localize", root / "images", "--weights", run, "--out", out, "--maps", tmp_path / "maps", "--workers", 0,
           "--device", "cpu", "-q")
    records = json.loads(out.read_text())
    assert len(records["images"] if isinstance(records, dict) else records) == len(truth)


def test_cli_stage_refuses_bad_settings_in_one_line(weak, tmp_path):
    root, _ = weak
    common = ["train", root / "images", "--init", root / "teacher", "--out", tmp_path / "r", "--device", "cpu"]
    assert "--stage distill: use contrastive or self-train" in one_error_line(invoke(*common, "--stage", "distill"))
    assert "self_train.ignore" in one_error_line(invoke(*common, "--stage", "self-train", "--ignore", "0.8,0.2"))
    assert "no such folder" in one_error_line(invoke(*common, "--stage", "self-train", "--pseudo-masks", tmp_path / "none"))


def test_hostile_self_train_config_is_one_line(weak, tmp_path):
    root, _ = weak
    model = C2AM.from_file(SelfTrainer(root / "images", tmp_path / "r", _config(root, epochs=1), root / "pseudo",
                                       device="cpu", progress=False).run())
    model.config.self_train.decoder_channels = 10 ** 9
    from safetensors.torch import save_file

    from c2am_cli.config import METADATA_KEY

    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bad),
              metadata={METADATA_KEY: model.config.to_json()})
    with pytest.raises(C2AMError, match=r"bad.safetensors: self_train.decoder_channels is 1000000000"):
        C2AM.from_file(bad)


def test_decoder_levels_that_repeat_the_heads_are_refused():
    with pytest.raises(C2AMError, match="repeat the head's feature levels"):
        C2AM(C2AMConfig_with(decoder_levels=(3,)))


def C2AMConfig_with(**kw):
    from c2am_cli.config import C2AMConfig

    return C2AMConfig(model=ModelConfig(backbone="test_resnet", image_size=SIZE, feature_levels=(3, 4)),
                      self_train=SelfTrainConfig(**kw))


def test_bad_images_and_pseudo_masks_are_skipped_and_listed(weak, tmp_path):
    root, truth = weak
    images, masks = tmp_path / "images", tmp_path / "pseudo"
    images.mkdir()
    masks.mkdir()
    for rel in truth:
        (images / rel).symlink_to(root / "images" / rel)
        (masks / rel).symlink_to(root / "pseudo" / rel)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG header, then nothing
    (masks / "00.png").unlink()
    (masks / "00.png").write_bytes(b"not a png")  # its image is fine, its pseudo-mask is not
    result = invoke("train", images, "--stage", "self-train", "--init", root / "teacher", "--pseudo-masks", masks,
                    "--epochs", 1, "--batch-size", 4, "--image-size", SIZE, "--decoder-levels", "0,1", "--workers", 0,
                    "--device", "cpu", "--out", tmp_path / "run", "-q")
    assert result.exit_code == 3, result.output  # trained, but some files could not be read
    errors = [json.loads(line) for line in (tmp_path / "run" / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["path"] for e in errors) == ["00.png", "broken.png"]
    assert "pseudo-mask" in next(e["reason"] for e in errors if e["path"] == "00.png")
    assert (tmp_path / "run" / "model.safetensors").exists()
