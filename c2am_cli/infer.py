"""Batched localisation of a folder: activation maps, boxes, map files, overlays; resumable and atomic."""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from .boxes import boxes_from_map, scale_boxes
from .edges import full_size_map, uses_image
from .data import (DEFAULT_MAX_PIXELS, SquashedImages, apply_orientation, collate, decode_jpeg_bytes, load_image,
                   load_image_tensor, normalize_batch, pause_for_tests, scan_images, squash)
from .errors import C2AMError, ImageError
from .io import JsonLines, dumps, remove_stale_temps, save_npy_atomic, save_png_atomic, write_json_atomic, write_text_atomic
from .model import C2AM
from .train import _autocast, resolve_device

EXIT_SOME_FAILED = 3  # documented exit code: the run finished, but some inputs could not be read


@dataclass
class LocalizeSummary:
    out: Path
    images: int = 0  # images found
    processed: int = 0  # localised in this run
    resumed: int = 0  # already done by an earlier run, skipped
    failed: list[dict] = field(default_factory=list)  # {"path", "reason"}

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else 0


def output_names(files: list[str], suffix: str) -> dict[str, str]:
    """Output path per input: same relative path with `suffix` in place of the extension, or appended to the full
    name where that would collide (a.jpg + a.png, or a.jpg.png beside them; compared case-blind for macOS/Windows)."""
    names = {f: str(Path(f).with_suffix("")) + suffix for f in files}
    while True:
        groups: dict[str, list[str]] = {}
        for f, name in names.items():
            groups.setdefault(name.casefold(), []).append(f)
        clash = [f for group in groups.values() if len(group) > 1 for f in group if names[f] != f + suffix]
        if not clash:
            return names
        for f in clash:  # full names are unique, so this ends
            names[f] = f + suffix


def model_digest(model: C2AM) -> str:
    """A short hash of the weights and the model config, so a resumed run never mixes two models' outputs."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.config.model), sort_keys=True).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def overlay(image: Image.Image, heat: np.ndarray, boxes: list[list[int]]) -> Image.Image:
    """The image under a jet-coloured map (alpha 0.5) with its boxes drawn in green."""
    import cv2

    colour = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    out = Image.blend(image, Image.fromarray(np.ascontiguousarray(colour)), 0.5)
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 150))
    for x1, y1, x2, y2 in boxes:
        draw.rectangle([x1, y1, x2, y2], outline=(0, 255, 0), width=width)
    return out


def to_coco(records: list[dict]) -> dict:
    """COCO detection results with one category, 'object'; bbox is [x, y, w, h] with inclusive pixels."""
    images, annotations = [], []
    for i, r in enumerate(records, start=1):
        images.append({"id": i, "file_name": r["file"], "width": r["width"], "height": r["height"]})
        for box, score in zip(r["boxes"], r["scores"]):
            x1, y1, x2, y2 = box
            w, h = x2 - x1 + 1, y2 - y1 + 1
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 1, "bbox": [x1, y1, w, h],
                                "area": w * h, "score": score, "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}


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


class InOrder:
    """Per-image work (boxes, map files, overlays) on a thread pool, so that the next forward never waits for it;
    results come back in submission order, with at most `limit` in flight (memory stays flat)."""

    def __init__(self, threads: int, limit: int):
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="c2am-localize")
        self.pending: deque = deque()
        self.limit = limit

    def submit(self, key, fn, *args) -> None:
        self.pending.append((key, self.pool.submit(fn, *args)))

    def ready(self, wait_all: bool = False):
        """(key, result) of the finished work at the head of the queue; waits while over the limit, or for all."""
        while self.pending and (wait_all or len(self.pending) > self.limit or self.pending[0][1].done()):
            key, future = self.pending.popleft()
            yield key, future.result()

    def close(self) -> None:
        for _, future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)


class Localizer:
    """Runs a C2AM model over image folders and writes maps, overlays and boxes.

    The pipeline streams: DataLoader workers decode (torchvision.io for JPEGs) and squash images to uint8; the batch
    is normalised on the device and goes through the model in channels_last (autocast on CUDA); boxes and files are
    made by a thread pool while the next batch runs. `gpu_decode` leaves JPEGs to nvjpeg on CUDA; `compile`
    (True, or torch.compile keyword arguments) compiles the backbone and head in place.
    """

    def __init__(self, weights=None, device: str = "auto", threshold: float | None = None, all_boxes: bool = False,
                 scales=None, flip: bool | None = None, batch_size: int = 32, num_workers: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, prefetch_factor: int = 4, compile: bool | dict = False,
                 gpu_decode: bool = False, boxes_from: str | None = None):
        self.device = distributed.init(resolve_device(device))  # under torchrun: join the group, take GPU LOCAL_RANK
        self.model = weights if isinstance(weights, C2AM) else C2AM.from_pretrained(weights)
        self.model.to(self.device).eval()
        if self.device.type in ("cuda", "cpu"):  # oneDNN and cuDNN: 1.6x (resnet50) to 2.5x (lite0) on a 2-core CPU
            self.model.to(memory_format=torch.channels_last)
        self.compiled = bool(compile)
        if compile:  # in place (nn.Module.compile): state_dict keys, and so the resume fingerprint, stay as they are
            options = compile if isinstance(compile, dict) else {}
            self.model.backbone.compile(**options)
            self.model.head.compile(**options)
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
        self.weights_name = str(weights) if not isinstance(weights, C2AM) else "<in-memory model>"

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
        with _autocast(self.device, True):
            return self.model.activation_maps(x, scales=self.scales, flip=self.flip).float()[:n]

    def run(self, image_dir, out="boxes.json", maps_dir=None, map_format: str = "npy", overlays_dir=None,
            fmt: str = "json", overwrite: bool = False, strict: bool = False, progress: bool = True) -> LocalizeSummary:
        """`_run` holding OUT.lock (each rank its part's under torchrun): a second run into the same OUT refuses."""
        from .locking import output_lock

        args = (image_dir, out, maps_dir, map_format, overlays_dir, fmt, overwrite, strict, progress)
        if Path(out).is_dir():
            return self._run(*args)  # which says why not
        mine = Path(out) if distributed.world_size() == 1 else distributed.part_path(out)
        with output_lock(mine.with_name(mine.name + ".lock"), f"--out {out}"):
            return self._run(*args)

    def _run(self, image_dir, out="boxes.json", maps_dir=None, map_format: str = "npy", overlays_dir=None,
             fmt: str = "json", overwrite: bool = False, strict: bool = False, progress: bool = True) -> LocalizeSummary:
        """Localise every image under `image_dir`, resuming from OUT.manifest.jsonl unless `overwrite`.

        Images go through the model in fixed chunks of `batch_size` of the sorted file list, and a resumed run redoes
        whole chunks, so its maps and boxes are bit-identical to those of an uninterrupted run.
        """
        image_dir, out = Path(image_dir), Path(out)
        maps_dir = None if maps_dir is None else Path(maps_dir)
        overlays_dir = None if overlays_dir is None else Path(overlays_dir)
        if fmt not in ("json", "coco"):
            raise C2AMError(f"--format {fmt}: use json or coco")
        if map_format not in ("npy", "png", "both"):
            raise C2AMError(f"--map-format {map_format}: use npy, png or both")
        if out.is_dir():
            raise C2AMError(f"--out {out}: is a folder; give a file name such as {out / 'boxes.json'}")
        if maps_dir is not None and overlays_dir is not None and map_format != "npy" and maps_dir.resolve() == overlays_dir.resolve():
            raise C2AMError(f"--maps and --overlays are both {maps_dir}: PNG maps and overlays would overwrite each other")
        scan_errors: list[tuple[str, str]] = []
        files = scan_images(image_dir, scan_errors)
        if image_dir.is_file():
            image_dir = image_dir.parent
        files = self._skip_outputs(image_dir, files, (maps_dir, overlays_dir))
        all_files, final = files, (out, fmt)
        if distributed.world_size() > 1:  # torchrun: this rank's share, into its own part files; merged at the end
            files, out, fmt = distributed.shard(files, self.batch_size), distributed.part_path(out), "json"
        summary = LocalizeSummary(out=out, images=len(files))
        manifest = JsonLines(out.with_name(out.name + ".manifest.jsonl"))
        errors = JsonLines(out.with_name(out.name + ".errors.jsonl"))
        outputs = {"maps": None if maps_dir is None else str(maps_dir.resolve()), "map_format": map_format if maps_dir else None,
                   "overlays": None if overlays_dir is None else str(overlays_dir.resolve())}
        settings = {**self.settings(), **outputs, "model": model_digest(self.model)}
        fingerprint = hashlib.sha256(json.dumps({k: v for k, v in settings.items() if k != "weights"}, sort_keys=True).encode()).hexdigest()[:16]
        for folder in (maps_dir, overlays_dir):
            if folder is not None:
                remove_stale_temps(folder)  # left by a run killed mid-write
        remove_stale_temps(out.parent, glob.escape(out.name), recursive=False)
        distributed.barrier()  # torchrun: no rank writes before every rank has removed stale temporary files
        done, failed_before = {}, {}
        if overwrite:
            manifest.reset()
        else:
            previous = manifest.read()
            if previous and previous[0].get("settings") != fingerprint:
                raise C2AMError(f"{manifest.path}: an earlier run used other weights or settings; pass --overwrite to redo it")
            for r in previous[1:]:
                if "record" in r:
                    done[r["record"]["file"]] = r["record"]
                elif "failed" in r:
                    failed_before[r["failed"]["path"]] = r["failed"]["reason"]
        errors.reset()  # this run's failures only: earlier ones are retried, and reported anew
        if not manifest.read():
            manifest.append({"settings": fingerprint, **settings})

        def fail(rel: str, reason: str, record: bool = True) -> None:
            if record:
                manifest.append({"failed": {"path": rel, "reason": reason}})
            errors.append({"path": rel, "reason": reason})
            summary.failed.append({"path": rel, "reason": reason})
            if strict:
                raise ImageError(image_dir / rel, reason)
            tqdm.write(f"warning: {rel}: {reason} (skipped)", file=sys.stderr)

        todo, work = [], None

        def drain(wait_all: bool = False) -> None:
            """Record the finished images, in order, after their files: a manifest record means all is written."""
            records = []
            try:
                for rel, record in work.ready(wait_all):
                    records.append({"record": record})
                    done[rel] = record
                    summary.processed += 1
            finally:
                manifest.extend(records)  # one fsync for them all

        try:
            for rel, reason in scan_errors:
                fail(rel, reason, record=False)
            for start in range(0, len(files), self.batch_size):
                chunk = files[start:start + self.batch_size]
                if not self._settled(image_dir, chunk, done, failed_before):
                    todo += chunk
                    continue
                for rel in chunk:
                    if rel in failed_before and rel not in done:
                        fail(rel, failed_before[rel], record=False)
            summary.resumed = sum(f in done for f in files)
            npy_names, png_names = output_names(all_files, ".npy"), output_names(all_files, ".png")
            ds = SquashedImages(image_dir, todo, self.model.config.model.image_size, self.max_pixels, self.gpu_decode)
            loader = DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                                collate_fn=collate, pin_memory=self.device.type == "cuda",
                                prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
                                worker_init_fn=_yield_to_model if self.device.type == "cpu" else None)
            work = InOrder(threads=min(4, os.cpu_count() or 1), limit=4 * self.batch_size)
            previous = None  # the last batch's maps, on their way to the host while the next batch runs

            def submit(maps, ready, indices, sizes) -> None:
                if ready is not None:
                    ready.synchronize()
                for idx, size, m in zip(indices, sizes, maps):
                    rel = todo[idx]
                    if rel not in done:  # else redone only to keep this chunk's batch as it was
                        work.submit(rel, self._one, image_dir, rel, size, m, maps_dir, map_format, overlays_dir,
                                    npy_names[rel], png_names[rel])

            with tqdm(total=len(todo), desc="localize", unit="img", disable=not progress) as bar:
                for batch in loader:
                    for idx, reason in batch.errors:
                        fail(todo[idx], reason)
                    images, indices, sizes = self._gather(batch, image_dir, todo, fail)
                    current = (*self._to_host(self.maps(images)), indices, sizes) if indices else None
                    if previous is not None:
                        submit(*previous)
                    previous = current
                    drain()
                    bar.update(len(batch) + len(batch.errors))
                    pause_for_tests()
                if previous is not None:
                    submit(*previous)
                drain(wait_all=True)
        except BaseException:
            if work is not None:  # the run stops (--strict, a write error, Ctrl-C): what the threads finished is recorded
                try:
                    drain(wait_all=True)
                except Exception:
                    pass  # the first error is the one to report
            raise
        finally:
            if work is not None:
                work.close()
            manifest.close()
            errors.close()
        records = [done[f] for f in files if f in done]
        if fmt == "coco":
            write_json_atomic(out, to_coco(records))
        else:
            write_json_atomic(out, {"version": 1, "weights": self.weights_name, "threshold": self.threshold, "images": records})
        return summary if distributed.world_size() == 1 else merge_parts(summary, all_files, *final)

    @staticmethod
    def _skip_outputs(image_dir: Path, files: list[str], folders) -> list[str]:
        """Drop files that lie in an output folder inside the input folder (a re-run would take its maps for inputs)."""
        root = image_dir.resolve()
        prefixes = []
        for folder in folders:
            if folder is not None and folder.resolve().is_relative_to(root) and folder.resolve() != root:
                prefixes.append(folder.resolve().relative_to(root).as_posix() + "/")
        kept = [f for f in files if not f.startswith(tuple(prefixes))] if prefixes else files
        if not kept:
            raise C2AMError(f"{image_dir}: no images found outside the output folders")
        return kept

    def _settled(self, image_dir: Path, chunk: list[str], done: dict, failed_before: dict) -> bool:
        """Whether an earlier run finished this chunk: every image done, or failed and still unreadable."""
        if any(f not in done and f not in failed_before for f in chunk):
            return False
        for f in chunk:
            if f in failed_before and f not in done:
                try:
                    load_image(image_dir / f, self.max_pixels)
                    return False  # readable now (fixed, or --max-pixels raised): redo its chunk
                except ImageError as e:
                    failed_before[f] = e.reason
        return True

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
        """(uint8 images, indices, sizes) of a batch's good images; with gpu_decode, its JPEGs are decoded by nvjpeg
        (batched), turned upright and squashed on the device; what nvjpeg refuses goes through load_image_tensor."""
        if not batch.encoded:
            return batch.images, batch.indices, batch.sizes
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
        images, indices, sizes = [], [], []
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
        return (torch.stack(images) if images else None), indices, sizes

    def _one(self, image_dir, rel, size, m, maps_dir, map_format, overlays_dir, npy_name, png_name) -> dict:
        w, h = size
        mc = self.model.config.model
        from_mask = self.boxes_from == "mask"
        if not from_mask:
            boxes, scores = boxes_from_map(m.cpu().numpy(), self.threshold, self.all_boxes)
            boxes = scale_boxes(boxes, (m.shape[-1], m.shape[-2]), (w, h))
        if from_mask or maps_dir is not None or overlays_dir is not None:
            img = None
            if overlays_dir is not None or uses_image(mc):
                try:
                    img = load_image(Path(image_dir) / rel, self.max_pixels)
                except ImageError:
                    pass  # it decoded a moment ago; a file changed under us only loses its overlay and refinement
            full = full_size_map(m, (w, h), img, mc)
            if from_mask:
                boxes, scores = boxes_from_map(full, self.threshold, self.all_boxes)
            if maps_dir is not None and map_format in ("npy", "both"):
                save_npy_atomic(Path(maps_dir) / npy_name, full.astype(np.float16))
            if maps_dir is not None and map_format in ("png", "both"):
                save_png_atomic(Path(maps_dir) / png_name, Image.fromarray((full * 255 + 0.5).astype(np.uint8), mode="L"))
            if overlays_dir is not None and img is not None:
                save_png_atomic(Path(overlays_dir) / png_name, overlay(img, full, boxes))
        return {"file": rel, "width": w, "height": h, "boxes": boxes, "scores": scores}


def merge_parts(part: LocalizeSummary, files: list[str], out: Path, fmt: str) -> LocalizeSummary:
    """torchrun: once every rank has written its part (OUT with .rankR-of-N before the suffix), rank 0 writes OUT and
    OUT.errors.jsonl in the order of `files`, as one process would; every rank returns the summary of the whole run."""
    parts = distributed.gather_objects(part)  # also the barrier: every part file is complete
    order = {f: i for i, f in enumerate(files)}
    failed = sorted({f["path"]: f for p in parts for f in p.failed}.values(), key=lambda f: order.get(f["path"], -1))
    summary = LocalizeSummary(out=out, images=len(files), processed=sum(p.processed for p in parts),
                              resumed=sum(p.resumed for p in parts), failed=failed)
    if distributed.is_main():
        payloads = [json.loads(p.out.read_text(encoding="utf-8")) for p in parts]
        found = {r["file"]: r for payload in payloads for r in payload["images"]}
        records = [found[f] for f in files if f in found]
        write_json_atomic(out, to_coco(records) if fmt == "coco" else {**payloads[0], "images": records})
        errors = out.with_name(out.name + ".errors.jsonl")
        errors.unlink(missing_ok=True)
        if failed:
            write_text_atomic(errors, "".join(dumps(f) + "\n" for f in failed))
    distributed.barrier()
    return summary


def localize(image_dir, out="boxes.json", weights=None, **kwargs) -> LocalizeSummary:
    """Localise every image under `image_dir` with C2AM weights (default: the embedded model)."""
    run_keys = {"maps_dir", "map_format", "overlays_dir", "fmt", "overwrite", "strict", "progress"}
    run_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in run_keys}
    if not Path(image_dir).exists():  # before loading the weights: a typo should fail at once
        raise C2AMError(f"{image_dir}: no such folder")
    return Localizer(weights, **kwargs).run(image_dir, out, **run_kwargs)
