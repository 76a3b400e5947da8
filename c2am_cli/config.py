"""Typed configs stored with the weights (safetensors metadata and config.json)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .runtime.errors import C2AMError

CONFIG_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """What is needed to rebuild a C2AM model and read its maps the right way round."""

    backbone: str = "tf_efficientnet_lite0"
    feature_levels: tuple[int, ...] = (-2, -1)  # timm out_indices: the last two levels
    output_stride: int | None = 16  # asked of timm where the model supports it
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    polarity: int = 1  # +1: the head's map is foreground; -1: 1 - map is foreground
    polarity_score: float | None = None  # border minus interior activation that decided it
    box_threshold: float = 0.5  # tau (relative to the map's max) for boxes
    box_threshold_source: str = "default"  # where tau was chosen (a calibration split, ...)
    cue_threshold: float = 0.3  # background cue: map below this is background
    scales: tuple[float, ...] = (1.0,)  # default test-time scales
    flip: bool = False  # default test-time horizontal flip
    edge_radius: float = 0.0  # guided-filter maps at image size, radius as a share of the shorter side (0: off)
    edge_eps: float = 0.01  # guided-filter regularisation (larger: smoother)
    calibration: tuple[float, ...] = ()  # P(foreground) at normalised map values 0, 1/(K-1), .., 1 (empty: none)
    calibration_source: str = ""  # the images the calibration was fitted on
    crf_iterations: int = 0  # calibrated maps at image size: dense-CRF mean-field steps (0: off)
    crf_bilateral: tuple[float, float, float] = (60.0, 10.0, 5.0)  # dense CRF appearance kernel: sxy, srgb, compat
    boxes_from: str = "map"  # boxes from the activation map ("map", fast) or the refined mask ("mask", needs CRF time)


@dataclass
class TrainConfig:
    """How a model was (or will be) trained; stored with each checkpoint."""

    epochs: int = 10
    batch_size: int = 32
    alpha: float = 0.25
    lr: float = 1e-4
    momentum: float = 0.9  # the authors' code effectively used 1e-4 (see README)
    weight_decay: float = 1e-4
    head_lr_mult: float = 10.0
    poly_power: float = 0.9
    resize: int | None = None  # resize to resize x resize, then random crop; default image_size * 8 / 7
    augment: str = "crop"  # training views: "crop" (the authors': resize, flip, crop) or "strong" (+ scale, colour)
    freeze_backbone: bool = False
    finetune_levels: int = 0  # fine-tune only the backbone stages of the last K feature levels (0: all of it)
    bn_train: bool = False  # update backbone BatchNorm statistics while training
    cache_views: int = 0  # frozen backbone only: precomputed augmented views per image
    backbone_weights: str | None = None
    seed: int = 0
    num_workers: int = 2
    amp: bool = True  # used on CUDA only
    polarity_images: int = 128
    local_contrast: bool = False  # under torchrun: contrast each rank's batch only, not the global batch
    sync_bn: bool = False  # under torchrun on CUDA: SyncBatchNorm (statistics over the global batch)


@dataclass
class SelfTrainConfig:
    """The self-training stage: a light saliency decoder over several backbone levels, fitted to a teacher's refined
    maps (calibrated, CRF) used as pseudo-masks. Stored with the weights; its presence makes the decoder the map."""

    teacher: str = "default"  # the weights whose refined maps are the round-1 pseudo-masks
    teacher_sha256: str = ""
    decoder_levels: tuple[int, ...] = (1, 2)  # finer timm levels the decoder adds to the head's (stride 4 and 8)
    decoder_channels: int = 64
    epochs: int = 8  # per round
    batch_size: int = 16
    lr: float = 1e-3  # AdamW on the decoder, cosine decay
    weight_decay: float = 1e-4
    finetune_levels: int = 0  # K > 0: the backbone stages of its last K levels and the head train too (0: frozen)
    finetune_lr_scale: float = 0.1  # their learning rate: lr times this
    image_size: int = 320  # training crops and the student's inference size
    min_scale: float = 0.35  # random resized crops: smallest share of the image's area
    ignore: tuple[float, float] = (0.3, 0.7)  # pseudo-mask values inside (lo, hi) are ignored; >= hi fg, <= lo bg
    rounds: int = 1  # 2 or more: relabel the images with the student, then train it again
    relabel_crf: int = 10  # later rounds: dense-CRF iterations on the student's maps (as the teacher's; 0: off)
    seed: int = 0
    num_workers: int = 2


@dataclass
class C2AMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    self_train: SelfTrainConfig | None = None  # set: the model has a self-trained saliency decoder
    version: int = CONFIG_VERSION
    versions: dict[str, str] = field(default_factory=dict)  # library versions that wrote it
    data: dict[str, Any] = field(default_factory=dict)  # what the model was trained on, metrics

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "C2AMConfig":
        if not isinstance(d, dict):
            raise C2AMError(f"config is not a JSON object (found {type(d).__name__})")
        version = d.get("version")
        if version != CONFIG_VERSION:
            raise C2AMError(f"config version {version!r} is not supported (this c2am reads version {CONFIG_VERSION})")
        return cls(
            model=_build(ModelConfig, d.get("model", {})),
            train=_build(TrainConfig, d.get("train", {})),
            self_train=None if d.get("self_train") is None else _build(SelfTrainConfig, d["self_train"]),
            version=version,
            versions=dict(d.get("versions", {})),
            data=dict(d.get("data", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> "C2AMConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise C2AMError(f"config is not valid JSON ({e})") from None


def _build(kind, values: dict[str, Any]):
    """Build a dataclass from a dict, turning lists back into tuples and refusing unknown keys."""
    if not isinstance(values, dict):
        raise C2AMError(f"{kind.__name__} in config is not a JSON object (found {type(values).__name__})")
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise C2AMError(f"unknown {kind.__name__} fields in config: {', '.join(unknown)}")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


METADATA_KEY = "c2am_config"  # the one safetensors metadata key of a c2am model: its whole C2AMConfig as JSON


def read_config(path) -> C2AMConfig:
    """The config stored in a .safetensors file, without loading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return C2AMConfig.from_dict(json.loads((f.metadata() or {})[METADATA_KEY]))
