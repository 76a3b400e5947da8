"""C2AM: a timm backbone cut at two feature levels, and the class-agnostic activation head."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .config import C2AMConfig, ModelConfig
from .errors import C2AMError

METADATA_KEY = "c2am_config"


class Backbone(nn.Module):
    """Any timm model as one (N, C, H, W) feature map: its chosen levels, at the finest resolution."""

    def __init__(self, name: str, feature_levels=(-2, -1), output_stride: int | None = 16, pretrained: bool = False):
        super().__init__()
        kwargs = dict(features_only=True, out_indices=tuple(feature_levels), pretrained=pretrained)
        try:
            try:
                self.body = timm.create_model(name, output_stride=output_stride, **kwargs) if output_stride else None
            except TypeError:  # this architecture has no output_stride: keep its native strides
                self.body = None
            if self.body is None:
                self.body = timm.create_model(name, **kwargs)
        except RuntimeError as e:  # timm: unknown model, or no features_only support
            raise C2AMError(f"backbone {name!r}: {e}") from None
        except IndexError:  # timm: an out_indices entry past the model's levels
            raise C2AMError(f"backbone {name!r}: feature levels {tuple(feature_levels)} are not all among its levels") from None
        fmt = getattr(self.body, "output_fmt", "NCHW")
        self.nhwc = str(getattr(fmt, "value", fmt)) == "NHWC"
        self.channels = int(sum(self.body.feature_info.channels()))
        self.reduction = int(min(self.body.feature_info.reduction()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        feats = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats]
        return torch.cat(feats, dim=1)

    def freeze_before_level(self, levels: int) -> int:
        """Partial fine-tuning: freeze every module up to the one that outputs feature level -(levels + 1) (timm's
        feature_info names it; modules come in forward order), so the stages of the last `levels` levels train.
        Returns how many parameter tensors were frozen."""
        modules = [i["module"] for i in self.body.feature_info.info]
        if not 0 < levels < len(modules):
            raise C2AMError(f"--finetune-levels {levels}: this backbone has {len(modules)} feature levels "
                            f"(use 1..{len(modules) - 1}, or 0 for the whole backbone)")
        last = modules[-levels - 1]
        frozen, inside = 0, False
        for name, module in self.body.named_modules():
            is_last = f".{last}." in f".{name}."  # the module itself or one inside it, under any prefix
            if inside and not is_last:
                break
            inside = inside or is_last
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
                frozen += 1
        return frozen

    def load_pretrained(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load weights named as timm's full classification model; every backbone tensor must be given."""
        own = self.body.state_dict()
        picked, missing = {}, []
        for key, tensor in own.items():
            src = state_dict.get(key, state_dict.get(key.removeprefix("model.")))
            if src is None or src.shape != tensor.shape:
                missing.append(key)
            else:
                picked[key] = src
        if missing:
            raise C2AMError(f"backbone weights do not fit this backbone: {len(missing)} tensors missing or of another shape (first: {missing[0]})")
        self.body.load_state_dict(picked)


class ActivationHead(nn.Module):
    """The 'disentangler': 3x3 conv to one channel (no bias), BatchNorm, sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.conv(feats)))


@dataclass
class C2AMOutput:
    fg: torch.Tensor  # (N, C) foreground embeddings
    bg: torch.Tensor  # (N, C) background embeddings
    map: torch.Tensor  # (N, 1, h, w) the head's map in [0, 1], before polarity


def embeddings(feats: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v_fg = F.A / HW and v_bg = F.(1 - A) / HW for features (N, C, h, w) and map (N, 1, h, w)."""
    n, c, h, w = feats.shape
    f = feats.flatten(2).float()  # (N, C, HW)
    a = act.flatten(2).float()  # (N, 1, HW)
    fg = (f * a).sum(-1) / (h * w)
    bg = (f * (1 - a)).sum(-1) / (h * w)
    return fg, bg


class C2AM(nn.Module):
    """Class-agnostic activation maps: `activation_maps(images)` gives (N, H, W), high = foreground."""

    def __init__(self, config: C2AMConfig | ModelConfig | None = None, pretrained: bool = False):
        super().__init__()
        if isinstance(config, ModelConfig):
            config = C2AMConfig(model=config)
        self.config = config or C2AMConfig()
        m = self.config.model
        self.backbone = Backbone(m.backbone, m.feature_levels, m.output_stride, pretrained=pretrained)
        self.head = ActivationHead(self.backbone.channels)

    # -- training view -------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> C2AMOutput:
        return self.forward_features(self.backbone(images))

    def forward_features(self, feats: torch.Tensor) -> C2AMOutput:
        act = self.head(feats)
        fg, bg = embeddings(feats, act)
        return C2AMOutput(fg, bg, act)

    # -- inference view ------------------------------------------------------------------
    def foreground(self, raw_map: torch.Tensor) -> torch.Tensor:
        """Apply the stored polarity, so that high always means foreground."""
        return raw_map if self.config.model.polarity >= 0 else 1 - raw_map

    @torch.no_grad()
    def activation_maps(self, images: torch.Tensor, scales=None, flip: bool | None = None, size=None) -> torch.Tensor:
        """Foreground probability maps (N, H, W) in [0, 1], averaged over scales and flips.

        `images` are normalised (N, 3, H, W) tensors; maps come back at `size` (default: H, W).
        """
        m = self.config.model
        scales = tuple(scales or m.scales)
        flip = m.flip if flip is None else flip
        size = tuple(size or images.shape[-2:])
        total = torch.zeros((images.shape[0], 1, *size), device=images.device, dtype=torch.float32)
        count = 0
        for s in scales:
            x = images if s == 1 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
            views = [x, x.flip(-1)] if flip else [x]
            for i, v in enumerate(views):
                a = self.forward(v).map.float()
                if i == 1:
                    a = a.flip(-1)
                total += F.interpolate(a, size=size, mode="bilinear", align_corners=False)
                count += 1
        return self.foreground(total / count).squeeze(1).clamp_(0, 1)

    def boxes(self, maps, threshold: float | None = None, all_boxes: bool = False):
        """Boxes (and scores) per map, at tau = threshold (default: the one stored with the weights)."""
        from .boxes import boxes_from_map

        tau = self.config.model.box_threshold if threshold is None else threshold
        return [boxes_from_map(mp.detach().cpu().numpy() if torch.is_tensor(mp) else mp, tau, all_boxes) for mp in maps]

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write model.safetensors (config in its metadata) and config.json beside it, atomically."""
        from safetensors.torch import save_file

        from .io import atomic_path, write_text_atomic

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.config.versions = library_versions()
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            # one metadata key: safetensors writes several in a random order, and saves should be byte-reproducible
            save_file(tensors, str(tmp), metadata={METADATA_KEY: self.config.to_json()})
        write_text_atomic(path.parent / "config.json", self.config.to_json() + "\n")
        return path

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> "C2AM":
        """Load a .safetensors file written by `save` (never a pickle)."""
        from safetensors import safe_open

        from .validate import check_finite, check_fit, check_model_config

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if METADATA_KEY not in meta:
                    raise C2AMError(f"{path}: not a c2am model (no {METADATA_KEY} in its metadata)")
                try:
                    config = C2AMConfig.from_json(meta[METADATA_KEY])
                    check_model_config(config.model)
                except C2AMError as e:
                    raise C2AMError(f"{path}: {e}") from None
                check_fit(path, cls, config, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
                state = {k: f.get_tensor(k) for k in f.keys()}
                check_finite(path, state)
        except C2AMError:
            raise
        except Exception as e:  # safetensors raises its own types for truncated or garbled files
            raise C2AMError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
        model = cls(config)
        own = model.state_dict()
        bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
        if bad or len(state) != len(own):
            raise C2AMError(f"{path}: weights do not fit backbone {config.model.backbone!r} ({len(bad)} tensors missing or of another shape)")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        return model.to(device).eval()

    @classmethod
    def from_pretrained(cls, spec: str | Path | None = None, device: str | torch.device = "cpu") -> "C2AM":
        """Load from a file, a run folder, a registry name, 'hf://org/repo[@rev]', or None for the embedded default."""
        from .hub import resolve_weights

        return cls.from_file(resolve_weights(spec), device=device)


def library_versions() -> dict[str, str]:
    from . import __version__

    return {"c2am": __version__, "torch": torch.__version__, "timm": timm.__version__}


def read_config(path: str | Path) -> C2AMConfig:
    """The config stored in a .safetensors file, without loading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return C2AMConfig.from_dict(json.loads((f.metadata() or {})[METADATA_KEY]))
