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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..runtime import distributed
from ..maps.edges import uses_image
from ..data.images import load_image, pause_for_tests, scan_images
from ..runtime.errors import C2AMError, ImageError
from ..runtime.io import JsonLines, dumps, remove_stale_temps, save_npy_atomic, save_png_atomic, write_json_atomic, write_text_atomic
from ..models.c2am import C2AM
from ..runtime.exits import EXIT_SOME_FAILED, RunSummary  # noqa: F401  (EXIT_SOME_FAILED: re-exported)
from .predictor import Prediction, Predictor, default_workers  # noqa: F401  (default_workers: re-exported)



@dataclass(kw_only=True)
class LocalizeSummary(RunSummary):
    """`processed`: localised in this run; `failed`: {"path", "reason"} per unreadable image."""

    images: int = 0  # images found
    resumed: int = 0  # already done by an earlier run, skipped


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


def changed_settings(before: dict, now: dict) -> str:
    """The settings of a run's manifest that differ from this run's, as 'name: old -> new'; other weights as their
    names and model digests."""
    parts = []
    for key, value in now.items():
        value, old = json.loads(dumps(value)), before.get(key, "(unset)")
        if key in ("weights", "settings") or value == old:
            continue
        if key == "model":
            parts.append(f"weights: {before.get('weights')} (model {old}) -> {now.get('weights')} (model {value})")
        else:
            parts.append(f"{key}: {old} -> {value}")
    return "; ".join(parts) or "its fingerprint"


def overlay(image: Image.Image, heat: np.ndarray, legend: str, boxes: list[list[int]]) -> Image.Image:
    """The image under a jet-coloured map (alpha 0.5), the boxes of that very map in green, and a legend at the top
    left saying which map it is."""
    import cv2

    colour = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    out = Image.blend(image, Image.fromarray(np.ascontiguousarray(colour)), 0.5)
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 150))
    for x1, y1, x2, y2 in boxes:
        draw.rectangle([x1, y1, x2, y2], outline=(0, 255, 0), width=width)
    left, top, right, bottom = draw.textbbox((4, 4), legend)
    draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=(0, 0, 0))
    draw.text((4, 4), legend, fill=(255, 255, 255))
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


@dataclass
class Outputs:
    """Where one run writes per image: map files (npy, png or both) and overlays, and each input's output names."""

    maps_dir: Path | None
    map_format: str
    overlays_dir: Path | None
    npy_names: dict[str, str]
    png_names: dict[str, str]


@dataclass
class _Job:
    """One run's bookkeeping: the manifest and errors file it appends to, what is done, and the work in flight."""

    image_dir: Path
    summary: LocalizeSummary
    manifest: JsonLines
    errors: JsonLines
    strict: bool
    done: dict
    todo: list = dataclasses.field(default_factory=list)
    work: InOrder | None = None

    def fail(self, rel: str, reason: str, record: bool = True) -> None:
        if record:
            self.manifest.append({"failed": {"path": rel, "reason": reason}})
        self.errors.append({"path": rel, "reason": reason})
        self.summary.failed.append({"path": rel, "reason": reason})
        if self.strict:
            raise ImageError(self.image_dir / rel, reason)
        tqdm.write(f"warning: {rel}: {reason} (skipped)", file=sys.stderr)

    def drain(self, wait_all: bool = False) -> None:
        """Record the finished images, in order, after their files: a manifest record means all is written."""
        records = []
        try:
            for rel, record in self.work.ready(wait_all):
                records.append({"record": record})
                self.done[rel] = record
                self.summary.processed += 1
        finally:
            self.manifest.extend(records)  # one fsync for them all


class Localizer(Predictor):
    """Runs a C2AM model over image folders and writes maps, overlays and boxes (the folder job over a Predictor).

    The pipeline streams: the Predictor's loader decodes (torchvision.io for JPEGs) and squashes images to uint8;
    the batch is normalised on the device and goes through the model in channels_last (autocast on CUDA); boxes and
    files are made by a thread pool while the next batch runs; a manifest records them, so a killed run resumes.
    """

    def run(self, image_dir, out="boxes.json", maps_dir=None, map_format: str = "npy", overlays_dir=None,
            fmt: str = "json", overwrite: bool = False, strict: bool = False, progress: bool = True) -> LocalizeSummary:
        """`_run` holding OUT.lock (each rank its part's under torchrun): a second run into the same OUT refuses."""
        from ..runtime.locking import output_lock

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
                raise C2AMError(f"{manifest.path}: an earlier run used other weights or settings "
                                f"({changed_settings(previous[0], settings)}); pass --overwrite to redo it")
            for r in previous[1:]:
                if "record" in r:
                    done[r["record"]["file"]] = r["record"]
                elif "failed" in r:
                    failed_before[r["failed"]["path"]] = r["failed"]["reason"]
        errors.reset()  # this run's failures only: earlier ones are retried, and reported anew
        if not manifest.read():
            manifest.append({"settings": fingerprint, **settings})
        job = _Job(image_dir, summary, manifest, errors, strict, done)
        outputs = Outputs(maps_dir, map_format, overlays_dir, output_names(all_files, ".npy"),
                          output_names(all_files, ".png"))
        try:
            for rel, reason in scan_errors:
                job.fail(rel, reason, record=False)
            for start in range(0, len(files), self.batch_size):
                chunk = files[start:start + self.batch_size]
                if not self._settled(image_dir, chunk, done, failed_before):
                    job.todo += chunk
                    continue
                for rel in chunk:
                    if rel in failed_before and rel not in done:
                        job.fail(rel, failed_before[rel], record=False)
            summary.resumed = sum(f in done for f in files)
            self._stream(job, outputs, progress)
        except BaseException:
            if job.work is not None:  # the run stops (--strict, a write error, Ctrl-C): what the threads finished is recorded
                try:
                    job.drain(wait_all=True)
                except Exception:
                    pass  # the first error is the one to report
            raise
        finally:
            if job.work is not None:
                job.work.close()
            manifest.close()
            errors.close()
        records = [done[f] for f in files if f in done]
        if fmt == "coco":
            write_json_atomic(out, to_coco(records))
        else:
            write_json_atomic(out, {"version": 1, "weights": self.weights_name, "weights_sha256": self.weights_sha256, "threshold": self.threshold, "images": records})
        return summary if distributed.world_size() == 1 else merge_parts(summary, all_files, *final)

    def _stream(self, job: _Job, outputs: Outputs, progress: bool) -> None:
        """The images to do through the model, batch after batch; each batch's per-image work (boxes, files) is
        queued while the next batch runs, and what is finished is recorded."""
        photo = self.needs_photo(maps=outputs.maps_dir is not None, overlays=outputs.overlays_dir is not None)
        loader = self.loader(job.image_dir, job.todo, photos=photo)
        job.work = InOrder(threads=min(4, os.cpu_count() or 1), limit=4 * self.batch_size)
        previous = None  # the last batch's maps, on their way to the host while the next batch runs
        with tqdm(total=len(job.todo), desc="localize", unit="img", disable=not progress) as bar:
            for batch in loader:
                for idx, reason in batch.errors:
                    job.fail(job.todo[idx], reason)
                images, indices, sizes, photos = self._gather(batch, job.image_dir, job.todo, job.fail)
                current = (*self._to_host(self.maps(images)), indices, sizes, photos) if indices else None
                if previous is not None:
                    self._submit(job, outputs, *previous)
                previous = current
                job.drain()
                bar.update(len(batch) + len(batch.errors))
                pause_for_tests()
            if previous is not None:
                self._submit(job, outputs, *previous)
            job.drain(wait_all=True)

    def _submit(self, job: _Job, outputs: Outputs, maps, ready, indices, sizes, photos) -> None:
        if ready is not None:
            ready.synchronize()
        for idx, size, m, photo in zip(indices, sizes, maps, photos):
            rel = job.todo[idx]
            if rel not in job.done:  # else redone only to keep this chunk's batch as it was
                job.work.submit(rel, self._one, job.image_dir, rel, size, m, outputs, photo)

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

    def _one(self, image_dir, rel, size, m, outputs: Outputs, photo=None) -> dict:
        """Boxes, map files and the overlay of one image; `photo` is its decoded full-size image, if the loader kept it."""
        maps_dir, map_format, overlays_dir = outputs.maps_dir, outputs.map_format, outputs.overlays_dir
        npy_name, png_name = outputs.npy_names[rel], outputs.png_names[rel]
        prediction = Prediction(0, size, m, photo)
        if self.boxes_from == "mask" or maps_dir is not None or overlays_dir is not None:
            img = prediction.image()  # the pixels of load_image
            if img is None and (overlays_dir is not None or uses_image(self.model.config.model)):
                try:
                    img = load_image(Path(image_dir) / rel, self.max_pixels)
                except ImageError:
                    pass  # it decoded a moment ago; a file changed under us only loses its overlay and refinement
            full = self.full_map(prediction, image=img)
            boxes, scores = self.boxes(prediction, full)
            if maps_dir is not None and map_format in ("npy", "both"):
                save_npy_atomic(Path(maps_dir) / npy_name, full.astype(np.float16))
            if maps_dir is not None and map_format in ("png", "both"):
                save_png_atomic(Path(maps_dir) / png_name, Image.fromarray((full * 255 + 0.5).astype(np.uint8), mode="L"))
            if overlays_dir is not None and img is not None:
                save_png_atomic(Path(overlays_dir) / png_name, overlay(img, *self.box_map(prediction, full), boxes))
        else:
            boxes, scores = self.boxes(prediction)
        w, h = size
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
