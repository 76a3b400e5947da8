"""The one prediction path: a C2AM model with its test-time settings (scales, flip, box rule), fed by a loader that
decodes each image once. `predict` (images in memory or files, a Result each), `localize` (the folder job),
`eval --weights` and `calibrate` all run through it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..data.images import (DEFAULT_MAX_PIXELS, SquashedImages, apply_orientation, collate, decode_jpeg_bytes,
                           load_image_tensor, normalize_batch, squash)
from ..maps.boxes import binarize, boxes_from_map, normalize_map, scale_boxes
from ..maps.edges import full_size_map, uses_image
from ..hub.registry import file_sha256
from ..hub.resolve import resolve_weights
from ..models.c2am import C2AM
from ..runtime import distributed
from ..runtime.device import autocast, resolve_device
from ..runtime.errors import C2AMError, ImageError


@dataclass
class Prediction:
    """One image through the model."""

    index: int  # the image's position in the list given to `predict`
    size: tuple[int, int]  # (width, height) of the upright image
    map: torch.Tensor  # (S, S) foreground map at the model's resolution, on the model's device
    photo: torch.Tensor | None = None  # the decoded image at full size, (3, H, W) uint8, when `photos` was asked

    def image(self) -> Image.Image | None:
        """The photo as the PIL image load_image gives (the same pixels), or None."""
        if self.photo is None:
            return None
        return Image.fromarray(np.ascontiguousarray(self.photo.permute(1, 2, 0).numpy()))


ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]  # a file, a PIL image, or uint8 (H, W[, 3|4]) pixels


@dataclass
class Result:
    """What `Predictor.predict` gives per image, at the image's own size (H, W)."""

    map: np.ndarray  # float32 (H, W) in [0, 1], high = foreground, refined as the weights say (calibration, CRF)
    boxes: list[list[int]]  # [x1, y1, x2, y2] in inclusive pixels, best first (the boxes `c2am localize` writes)
    scores: list[float]  # per box: the mean normalised activation inside it
    mask: np.ndarray  # bool (H, W): P >= 0.5 of a calibrated map, else the map above tau times its max
    source: str | None = None  # the file's path, or None for an image given as pixels


def to_uint8_chw(image: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An input of `predict` as uint8 (3, H, W): files decoded upright as the folder loader does (EXIF applied),
    PIL images converted to RGB as they are, arrays taken as RGB(A) or grey pixels."""
    if isinstance(image, (str, os.PathLike)):
        return load_image_tensor(image, max_pixels)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise C2AMError(f"predict: give image paths, PIL images or uint8 arrays, not {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise C2AMError(f"predict: an array image must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {image.dtype} "
                        f"{image.shape}")
    image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # a copy: writable


def default_workers(device: torch.device) -> int:
    """DataLoader workers when none are asked for. A CPU forward already uses every core, and on a few cores worker
    processes only contend with it (measured on 2 cores: b/a 0.97 with none, 0.88 with 2): decode in-process there.
    A GPU is fed by min(8, cores / 2) workers."""
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        return 0 if cores <= 4 else 2
    return min(8, max(2, cores // 2))


def _yield_to_model(worker_id: int) -> None:
    """DataLoader workers beside a CPU forward: nice 10, so that decoding fills idle moments instead of preempting the
    model's threads (a preempted OpenMP thread stalls the whole team); on GPUs the workers keep their priority."""
    try:
        os.nice(10)
    except OSError:
        pass



class Predictor:
    """A C2AM model and its test-time settings, run on batches of decoded images.

    `gpu_decode` leaves JPEGs to nvjpeg on CUDA; `compile` (True, or torch.compile keyword arguments) compiles the
    backbone and head in place.
    """

    def __init__(self, weights=None, device: str = "auto", threshold: float | None = None, all_boxes: bool = False,
                 scales=None, flip: bool | None = None, batch_size: int = 32, num_workers: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, prefetch_factor: int = 4, compile: bool | dict = False,
                 gpu_decode: bool = False, boxes_from: str | None = None):
        self.device = distributed.init(resolve_device(device))  # under torchrun: join the group, take GPU LOCAL_RANK
        if isinstance(weights, C2AM):
            self.model, self.weights_name, self.weights_sha256 = weights, "<in-memory model>", None
        else:  # boxes.json names the weights as given ("default" for the embedded one) and by their file's sha256
            path = resolve_weights(weights)
            self.model = C2AM.from_file(path)
            self.weights_name, self.weights_sha256 = "default" if weights is None else str(weights), file_sha256(path)
        self.model.to(self.device).eval()
        if self.device.type in ("cuda", "cpu"):  # oneDNN and cuDNN: 1.6x (resnet50) to 2.5x (lite0) on a 2-core CPU
            self.model.to(memory_format=torch.channels_last)
        self.compiled = bool(compile)
        if compile:  # in place (nn.Module.compile): state_dict keys, and so the resume fingerprint, stay as they are
            options = compile if isinstance(compile, dict) else {}
            self.model.backbone.compile(**options)
            self.model.head.compile(**options)
            if self.model.decoder is not None:
                self.model.decoder.compile(**options)
        if gpu_decode and self.device.type != "cuda":
            raise C2AMError(f"--gpu-decode: decodes with nvjpeg on a CUDA device; this run is on {self.device.type}")
        self.gpu_decode, self.prefetch_factor = gpu_decode, prefetch_factor
        mc = self.model.config.model
        self.threshold = mc.box_threshold if threshold is None else float(threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise C2AMError(f"--threshold {self.threshold}: must be between 0 and 1")
        self.all_boxes = all_boxes
        self.boxes_from = boxes_from or mc.boxes_from
        if self.boxes_from not in ("map", "mask"):
            raise C2AMError(f"--boxes-from {self.boxes_from}: use map (the activation map) or mask (the refined mask)")
        self.scales = tuple(scales or mc.scales)
        if any(s <= 0 for s in self.scales):
            raise C2AMError(f"--scales {self.scales}: scales must be positive")
        self.flip = mc.flip if flip is None else flip
        self.num_workers = default_workers(self.device) if num_workers is None else num_workers
        self.batch_size, self.max_pixels = batch_size, max_pixels

    def settings(self) -> dict:
        return {"weights": self.weights_name, "threshold": self.threshold, "all_boxes": self.all_boxes,
                "boxes_from": self.boxes_from,
                "scales": list(self.scales), "flip": self.flip, "image_size": self.model.config.model.image_size}

    @torch.inference_mode()
    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """Foreground maps (N, S, S) for a batch of normalised images, or of uint8 ones (normalised here, on the device)."""
        x = images.to(self.device, non_blocking=True)
        if not x.is_floating_point():
            x = normalize_batch(x, self.model.config.model.mean, self.model.config.model.std)
        if self.device.type in ("cuda", "cpu"):
            x = x.contiguous(memory_format=torch.channels_last)
        n = len(x)
        if self.compiled and n < self.batch_size:  # the last batch, padded: one shape, no second compilation
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, True):
            return self.model.activation_maps(x, scales=self.scales, flip=self.flip).float()[:n]

    def needs_photo(self, maps: bool, overlays: bool = False) -> bool:
        """Whether the work after the forward needs the decoded photo: overlays, or maps at image size (or boxes
        from the refined mask) when the stored refinement uses it (guided filter, dense CRF)."""
        return overlays or ((maps or self.boxes_from == "mask") and uses_image(self.model.config.model))

    def loader(self, root, files: list[str], photos: bool = False) -> DataLoader:
        """Batches of `root / files`, each file decoded once: uint8 images squashed to the model's size, and with
        `photos` the full-size images beside them."""
        ds = SquashedImages(Path(root), files, self.model.config.model.image_size, self.max_pixels, self.gpu_decode,
                            keep_full=photos)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate, pin_memory=self.device.type == "cuda",
                          prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
                          worker_init_fn=_yield_to_model if self.device.type == "cpu" else None)

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> Result | list[Result]:
        """Maps, boxes and masks of images given as paths, PIL images or uint8 arrays, in batches of `batch_size`:
        each map at its image's size, refined as the weights say, with the boxes `c2am localize` writes for it.
        One image gives one Result, a list of them a list."""
        single = isinstance(images, (str, os.PathLike, Image.Image, np.ndarray))
        images = [images] if single else list(images)
        size = self.model.config.model.image_size
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            photos = [to_uint8_chw(image, self.max_pixels) for image in chunk]
            maps = self.maps(torch.stack([squash(p, size) for p in photos]))
            for image, photo, m in zip(chunk, photos, maps):
                prediction = Prediction(0, (photo.shape[2], photo.shape[1]), m, photo)
                full = self.full_map(prediction)
                boxes, scores = self.boxes(prediction, full)
                source = str(image) if isinstance(image, (str, os.PathLike)) else None
                results.append(Result(full, boxes, scores, self.mask(full), source))
        return results[0] if single else results

    def boxes(self, prediction: Prediction, full: np.ndarray | None = None) -> tuple[list[list[int]], list[float]]:
        """A prediction's boxes (and scores) in image pixels: from its model-resolution map, or with boxes_from
        'mask' from its refined map at image size (`full`, computed here if not given)."""
        if self.boxes_from == "mask":
            return boxes_from_map(self.full_map(prediction) if full is None else full, self.threshold, self.all_boxes)
        m = prediction.map
        boxes, scores = boxes_from_map(m.cpu().numpy(), self.threshold, self.all_boxes)
        return scale_boxes(boxes, (m.shape[-1], m.shape[-2]), prediction.size), scores

    def box_map(self, prediction: Prediction, full: np.ndarray) -> tuple[np.ndarray, str]:
        """The map at image size that a prediction's boxes come from, and a legend saying which it is: the refined
        map `full` with boxes_from 'mask', else the activation map brought to image size unrefined."""
        tau = f"boxes at tau {self.threshold:.2f} of its max"
        if self.boxes_from == "mask":
            return full, f"refined map (as the weights say); {tau}"
        return self.full_map(prediction, refine=False), f"activation map (unrefined); {tau}"

    def mask(self, full: np.ndarray) -> np.ndarray:
        """The foreground mask of a map at image size: P >= 0.5 where the weights are calibrated (the map is a
        probability), else the region above tau times the map's max, the one the boxes are drawn around."""
        if self.model.config.model.calibration:
            return full >= 0.5
        return binarize(normalize_map(full), self.threshold) > 0

    def batches(self, root, files: list[str], photos: bool = False) -> Iterator[tuple[list[Prediction], list[tuple[int, str]]]]:
        """Per batch: the Predictions of its good images and the (index, reason) of the unreadable ones."""
        failed: list[tuple[int, str]] = []
        for batch in self.loader(root, files, photos):
            errors = list(batch.errors)
            images, indices, sizes, kept = self._gather(batch, Path(root), files,
                                                        lambda rel, reason: failed.append((files.index(rel), reason)))
            errors += failed
            failed.clear()
            if not indices:
                yield [], errors
                continue
            maps = self.maps(images)
            yield [Prediction(i, s, m, p) for i, s, m, p in zip(indices, sizes, maps, kept)], errors

    def full_map(self, prediction: Prediction, refine: bool = True, image: Image.Image | None = None) -> np.ndarray:
        """A prediction's map at image size; refined as the weights say (calibration, guided filter, CRF) unless not
        `refine`. The photo is `image`, else the prediction's own (decoded once, by the loader)."""
        if not refine:
            return full_size_map(prediction.map, prediction.size)
        photo = image if image is not None else prediction.image()
        return full_size_map(prediction.map, prediction.size, photo, self.model.config.model)

    def _to_host(self, maps: torch.Tensor):
        """(maps on the CPU, CUDA event to wait for): on CUDA the copy is queued, so the next batch's forward can be
        queued before this one's maps are waited for."""
        if self.device.type != "cuda":
            return maps.cpu(), None
        host = torch.empty(maps.shape, dtype=maps.dtype, pin_memory=True)
        host.copy_(maps, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def _gather(self, batch, image_dir: Path, todo: list[str], fail):
        """(uint8 images, indices, sizes, full-size images or None) of a batch's good images; with gpu_decode, its
        JPEGs are decoded by nvjpeg (batched), turned upright and squashed on the device; what nvjpeg refuses goes
        through load_image_tensor. (The full-size images of JPEGs decoded on the GPU are not kept: the work after the
        forward reads those files again if it needs the photo.)"""
        photos = batch.full or [None] * len(batch.indices)
        if not batch.encoded:
            return batch.images, batch.indices, batch.sizes, photos
        size = self.model.config.model.image_size
        encoded = {slot: (data, orientation) for slot, data, orientation in batch.encoded}
        decoded = iter(batch.images if batch.images is not None else [])
        try:
            gpu = decode_jpeg_bytes([data for data, _ in encoded.values()], device=self.device)
        except RuntimeError:  # one bad file fails the whole call: one by one
            gpu = []
            for data, _ in encoded.values():
                try:
                    gpu.append(decode_jpeg_bytes([data], device=self.device)[0])
                except RuntimeError:
                    gpu.append(None)
        gpu = dict(zip(encoded, gpu))
        images, indices, sizes, kept = [], [], [], []
        for slot, idx in enumerate(batch.indices):
            if slot not in encoded:
                image = next(decoded).to(self.device, non_blocking=True)
            elif gpu[slot] is not None:
                image = squash(apply_orientation(gpu[slot], encoded[slot][1]), size)
            else:
                try:  # Pillow decodes it, or says why not
                    image = squash(load_image_tensor(image_dir / todo[idx], self.max_pixels), size).to(self.device)
                except ImageError as e:
                    fail(todo[idx], e.reason)
                    continue
            images.append(image)
            indices.append(idx)
            sizes.append(batch.sizes[slot])
            kept.append(photos[slot])
        return (torch.stack(images) if images else None), indices, sizes, kept
