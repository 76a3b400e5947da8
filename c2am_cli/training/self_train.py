"""The self-training stage (`c2am train --stage self-train`): a teacher's refined maps of a folder (calibrated, CRF,
as `c2am localize --maps` writes them) become pseudo-masks, and a light saliency decoder on the backbone (frozen, or
its last levels trained along) learns them from augmented views, confident pixels only; more rounds relabel the
images with the student. The result is an ordinary c2am model whose map is the decoder's (run `c2am calibrate` on
it, as on any new weights)."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

from ..config import SelfTrainConfig
from ..data.images import DEFAULT_MAX_PIXELS, load_image, pause_for_tests, scan_images, to_tensor_normalized
from ..hub.registry import file_sha256
from ..hub.resolve import resolve_weights
from ..models.c2am import C2AM
from ..models.validate import check_self_train_config
from ..predict.localize import localize, output_names
from ..runtime import distributed
from ..runtime.device import autocast, resolve_device
from ..runtime.errors import C2AMError, ImageError
from ..runtime.io import JsonLines, remove_stale_temps, write_json_atomic, write_text_atomic
from .checkpoint import resume_checkpoint, save_checkpoint

CHECKPOINT = "checkpoint.safetensors"
PSEUDO_MASKS = "pseudo-masks"  # OUT/pseudo-masks/round-K: the pseudo-masks of round K (PNG, 0-255 = P(foreground))


def student_from(teacher: C2AM, cfg: SelfTrainConfig) -> C2AM:
    """The teacher's backbone and head with a new decoder; inference at cfg.image_size, one scale with flip, no
    calibration or CRF yet (`c2am calibrate` chooses them for the decoder's maps)."""
    config = copy.deepcopy(teacher.config)
    config.self_train = cfg
    m = config.model
    m.image_size, m.scales, m.flip, m.edge_radius = cfg.image_size, (1.0,), True, 0.0
    m.calibration, m.calibration_source, m.crf_iterations = (), "", 0
    m.box_threshold_source = f"{m.box_threshold_source} (the teacher's; calibrate the student)"
    student = C2AM(config)
    own = {k: v for k, v in teacher.state_dict().items() if not k.startswith("decoder.")}  # a self-trained teacher's too
    missing, unexpected = student.load_state_dict(own, strict=False)
    if unexpected or any(not k.startswith("decoder.") for k in missing):
        raise C2AMError(f"teacher {cfg.teacher}: its tensors do not fit the student ({(unexpected or missing)[0]})")
    return student


def read_pseudo_mask(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A pseudo-mask file as float (1, H, W) in [0, 1] at the image's (width, height) (resized where it differs)."""
    try:
        with Image.open(path) as im:
            im = im.convert("L")
            if im.size != size:
                im = im.resize(size, Image.BILINEAR)
            return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]
    except FileNotFoundError:
        raise ImageError(path, "no pseudo-mask for this image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(path, f"cannot read its pseudo-mask ({type(e).__name__}: {e})") from None


class PseudoMaskPairs(Dataset):
    """(image, pseudo-mask) pairs through one random resized crop and flip (the same for both), colour jitter on the
    image only; a bad file yields an error record."""

    def __init__(self, root: Path, files: list[str], masks: dict[str, Path], cfg: SelfTrainConfig, mean, std,
                 max_pixels: int | None):
        self.root, self.files, self.masks, self.max_pixels = root, files, masks, max_pixels
        self.joint = T.Compose([T.RandomResizedCrop(cfg.image_size, scale=(cfg.min_scale, 1.0), antialias=True),
                                T.RandomHorizontalFlip(),
                                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)])
        self.to_tensor = to_tensor_normalized(mean, std)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        rel = self.files[i]
        try:
            img = load_image(self.root / rel, self.max_pixels)
            mask = read_pseudo_mask(self.masks[rel], img.size)
            img, mask = self.joint(tv_tensors.Image(T.functional.pil_to_tensor(img)), tv_tensors.Mask(mask))
            return {"index": i, "image": self.to_tensor(img.as_subclass(torch.Tensor)),
                    "mask": mask.as_subclass(torch.Tensor)}
        except ImageError as e:
            return {"index": i, "error": e.reason}
        except Exception as e:  # one odd image must not end a run over thousands
            return {"index": i, "error": f"cannot transform ({type(e).__name__}: {e})"}


def collate_pairs(items: list[dict]) -> dict:
    good = [it for it in items if "error" not in it]
    return {"images": torch.stack([it["image"] for it in good]) if good else None,
            "masks": torch.stack([it["mask"] for it in good]) if good else None,
            "errors": [(it["index"], it["error"]) for it in items if "error" in it]}


def confident_bce(logits: torch.Tensor, masks: torch.Tensor, ignore: tuple[float, float]) -> torch.Tensor:
    """Binary cross-entropy on the confident pixels of soft pseudo-masks: >= hi is foreground, <= lo background,
    the pixels between are ignored (the teacher is unsure there). Logits are brought to the masks' size."""
    lo, hi = ignore
    logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    weight = ((masks >= hi) | (masks <= lo)).float()
    loss = F.binary_cross_entropy_with_logits(logits, (masks >= hi).float(), weight=weight, reduction="sum")
    return loss / weight.sum().clamp_min(1.0)


class SelfTrainer:
    """One self-training run folder; `run()` returns the path of the final model.safetensors."""

    def __init__(self, image_dir, out_dir, config: SelfTrainConfig | None = None, pseudo_masks=None,
                 device: str = "auto", resume: bool = False, progress: bool = True, strict: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.image_dir, self.out_dir = Path(image_dir), Path(out_dir)
        if not self.image_dir.is_dir():
            raise C2AMError(f"{self.image_dir}: no such folder")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise C2AMError(f"--out {self.out_dir}: is a file; give a run folder")
        if distributed.world_size() > 1:
            raise C2AMError("--stage self-train runs in one process (one GPU or the CPU); start it without torchrun")
        self.device = resolve_device(device)
        self.pseudo_masks = None if pseudo_masks is None else Path(pseudo_masks)
        if self.pseudo_masks is not None and not self.pseudo_masks.is_dir():
            raise C2AMError(f"--pseudo-masks {self.pseudo_masks}: no such folder")
        self.progress, self.strict, self.max_pixels = progress, strict, max_pixels
        self._scan_errors: list[tuple[str, str]] = []
        self.files = scan_images(self.image_dir, self._scan_errors)
        self.failed: list[dict] = []
        self.state = {"round": 0, "epoch": 0, "step": 0}
        ckpt, opt_state = self.out_dir / CHECKPOINT, None
        if resume and ckpt.exists():
            self.student, opt_state = self._load_checkpoint(ckpt)
            if config is not None:  # a resumed run may only be extended: more rounds
                st = self.student.config.self_train
                st.rounds = max(st.rounds, config.rounds)
        else:
            cfg = config or SelfTrainConfig()
            check_self_train_config(cfg)
            teacher_path = resolve_weights(None if cfg.teacher == "default" else cfg.teacher)
            cfg = dataclasses.replace(cfg, teacher_sha256=file_sha256(teacher_path))
            torch.manual_seed(cfg.seed)  # the decoder's initial weights
            self.student = student_from(C2AM.from_file(teacher_path), cfg)
            self.student.config.data = {**self.student.config.data, "self_train_dir": self.image_dir.name,
                                        "self_train_images": len(self.files)}
        self.cfg = self.student.config.self_train
        if len(self.files) < 2:
            raise C2AMError(f"{self.image_dir}: {len(self.files)} image(s); self-training needs at least 2")
        self.student.to(self.device)
        self._set_trainable()
        self.optimizer = self._optimizer()
        if opt_state is not None:
            self.optimizer.load_state_dict(opt_state)
        self.errors = JsonLines(self.out_dir / "errors.jsonl")
        self.log = JsonLines(self.out_dir / "log.jsonl")

    def _set_trainable(self) -> None:
        """The decoder trains; with finetune_levels K, the backbone stages of its last K levels and the head too."""
        self.student.requires_grad_(False)
        self.student.decoder.requires_grad_(True)
        if self.cfg.finetune_levels:
            self.student.backbone.requires_grad_(True)
            self.student.backbone.freeze_before_level(self.cfg.finetune_levels, zero="0 to keep it frozen")
            self.student.head.requires_grad_(True)

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW: the decoder at lr, the fine-tuned backbone stages and head (if any) at lr x finetune_lr_scale."""
        decoder = list(self.student.decoder.parameters())
        rest = [p for n, p in self.student.named_parameters() if p.requires_grad and not n.startswith("decoder.")]
        groups = [{"params": decoder, "lr_scale": 1.0}]
        groups += [{"params": rest, "lr_scale": self.cfg.finetune_lr_scale}] if rest else []
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _load_checkpoint(self, path: Path):
        from ..config import C2AMConfig

        def restore(meta, tensors):
            model = C2AM(C2AMConfig.from_json(meta["config"]))
            model.load_state_dict(tensors)
            return model

        meta, model, opt = resume_checkpoint(path, restore)
        self.state = {k: meta[k] for k in ("round", "epoch", "step")}
        tqdm.write(f"resuming {self.out_dir}: round {meta['round'] + 1}, after epoch {meta['epoch']}")
        return model, opt

    def _fail(self, rel: str, reason: str) -> None:
        if rel in self._bad:
            return
        self._bad.add(rel)
        self.errors.append({"path": rel, "reason": reason})
        self.failed.append({"path": rel, "reason": reason})
        if self.strict:
            raise ImageError(self.image_dir / rel, reason)
        tqdm.write(f"warning: {rel}: {reason} (skipped)", file=sys.stderr)

    def _masks(self, round_: int) -> dict[str, Path]:
        """Round `round_`'s pseudo-mask per image: --pseudo-masks in round 1 where given, else the teacher's (round 1)
        or the student's (later rounds, `_relabeller`) refined maps, written once by `localize` (resumable), then
        marked done."""
        names = output_names(self.files, ".png")
        if round_ == 0 and self.pseudo_masks is not None:
            return {rel: self.pseudo_masks / names[rel] for rel in self.files}
        folder = self.out_dir / PSEUDO_MASKS / f"round-{round_ + 1}"
        done = folder / "done.json"
        if not done.exists():
            if round_ > 0:
                teacher = self._relabeller()
            else:
                teacher = None if self.cfg.teacher == "default" else self.cfg.teacher
            if self.progress:
                tqdm.write(f"round {round_ + 1}: pseudo-masks of {len(self.files)} images -> {folder}")
            summary = localize(self.image_dir, out=folder / "boxes.json", weights=teacher, maps_dir=folder,
                               map_format="png", device=str(self.device), progress=self.progress,
                               max_pixels=self.max_pixels)
            write_json_atomic(done, {"images": summary.images, "failed": summary.failed})
        for rec in json.loads(done.read_text())["failed"]:
            self._fail(rec["path"], rec["reason"])
        return {rel: folder / names[rel] for rel in self.files}

    def _relabeller(self) -> C2AM:
        """The student as the next round's teacher, refined as a teacher's maps are: its output (a probability) taken
        as calibrated (linear knots) and dense-CRF-refined with `relabel_crf` iterations and the teacher's kernel."""
        relabel = copy.deepcopy(self.student)
        m = relabel.config.model
        m.calibration, m.crf_iterations = ((0.0, 1.0), self.cfg.relabel_crf) if self.cfg.relabel_crf else ((), 0)
        return relabel

    def run(self) -> Path:
        from ..runtime.locking import output_lock

        with output_lock(self.out_dir / ".lock", f"run folder {self.out_dir}"):
            return self._run()

    def _run(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.out_dir, recursive=False)
        self._bad: set[str] = set()
        self.errors.reset()
        at = (self.state["round"], self.state["epoch"])  # a resume trims the log back to the checkpoint
        kept = [r for r in self.log.read() if (r.get("round", 1) - 1, r.get("epoch", 0)) <= at]
        write_text_atomic(self.log.path, "".join(json.dumps(r) + "\n" for r in kept))
        for rel, reason in self._scan_errors:
            self._fail(rel, reason)
        m = self.student.config.model
        if self.state["round"] >= self.cfg.rounds:  # nothing left to train: the model as the checkpoint has it
            self.student.save(self.out_dir)
        for round_ in range(self.state["round"], self.cfg.rounds):
            masks = self._masks(round_)
            ds = PseudoMaskPairs(self.image_dir, self.files, masks, self.cfg, m.mean, m.std, self.max_pixels)
            steps = max(1, len(self.files) // self.cfg.batch_size) * self.cfg.epochs
            for epoch in range(self.state["epoch"], self.cfg.epochs):
                self._epoch(ds, round_, epoch, steps)
                self.state["epoch"] = epoch + 1
                self._save(round_)
            self.state.update(round=round_ + 1, epoch=0, step=0)
            self.optimizer = self._optimizer()  # each round from a fresh schedule
            self._save(round_ + 1)
        self.errors.close()
        self.log.close()
        return self.out_dir / "model.safetensors"

    def _epoch(self, ds: PseudoMaskPairs, round_: int, epoch: int, steps: int) -> None:
        seed = self.cfg.seed * 100_003 + round_ * 1009 + epoch
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        loader = DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=True, drop_last=len(ds) > self.cfg.batch_size,
                            num_workers=self.cfg.num_workers, collate_fn=collate_pairs, generator=g,
                            pin_memory=self.device.type == "cuda")
        self.student.eval()  # the backbone's and head's BatchNorm statistics stay frozen, trained levels included
        self.student.decoder.train()
        total, n, t0 = 0.0, 0, time.time()
        bar = tqdm(loader, desc=f"round {round_ + 1} epoch {epoch + 1}/{self.cfg.epochs}", disable=not self.progress,
                   leave=False)
        for batch in bar:
            for idx, reason in batch["errors"]:
                self._fail(self.files[idx], reason)
            if batch["images"] is None:
                continue
            x = batch["images"].to(self.device, non_blocking=True)
            cosine = 0.5 * (1 + math.cos(math.pi * min(self.state["step"], steps) / steps))  # decay over the round
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.lr * group["lr_scale"] * cosine
            with autocast(self.device, True):  # frozen levels record no graph
                logits = self.student.decoder_logits(x)
            loss = confident_bce(logits, batch["masks"].to(self.device), self.cfg.ignore)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.state["step"] += 1
            total, n = total + loss.item(), n + 1
            bar.set_postfix(loss=f"{total / n:.4f}")
            pause_for_tests()
        record = {"round": round_ + 1, "epoch": epoch + 1, "step": self.state["step"],
                  "seconds": round(time.time() - t0, 2), "loss": round(total / max(n, 1), 5)}
        self.log.append(record)
        if self.progress:
            tqdm.write(" ".join(f"{k}={v}" for k, v in record.items()))

    def _save(self, round_: int) -> None:
        meta = {"config": self.student.config.to_json(), "round": round_, "epoch": self.state["epoch"],
                "step": self.state["step"]}
        save_checkpoint(self.out_dir / CHECKPOINT, self.student, self.optimizer, meta)
        self.student.save(self.out_dir)


def self_train(image_dir, out_dir, config: SelfTrainConfig | None = None, pseudo_masks=None, device: str = "auto",
               resume: bool = False, progress: bool = True, strict: bool = False,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Path:
    """Self-train a saliency decoder on a folder of unlabeled images; returns the run's model.safetensors."""
    return SelfTrainer(image_dir, out_dir, config, pseudo_masks, device, resume, progress, strict, max_pixels).run()
