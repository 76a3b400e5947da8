"""Throughput benchmark: `c2am localize` end to end against the bare backbone forward and grad-cam's EigenCAM,
a C2AM training step against a bare forward+backward+SGD step, and peak RSS of streaming runs of 1,000 and 10,000 images.

Usage (1.5 to 3.5 minutes on a 2-core CPU; every number of one run comes from the same images and the same model):
    python bench/throughput.py --backbone tf_efficientnet_lite0 --images 256
    python bench/throughput.py --backbone resnet50 --images 2048 --rounds 3 --device cuda --gpu-decode   # bigger runs

(a) bare backbone forward on pre-decoded, pre-resized, normalised tensors already on the device (the limit), in the
    faster memory format, over the same test-time views as (b) (one forward per image unless --tta);
(b) Localizer.run end to end: scan, decode, resize, forward, activation map, boxes, manifest, boxes.json; reported
    for whole runs and as the streaming rate past a run's fixed costs ((N - n0) / (t(N) - t(n0)), n0 = --head-images);
(c) grad-cam's EigenCAM (`pip install c2am[bench]`) as its README shows, on timm's classifier of the same backbone
    (the C2AM backbone's weights where names match), target layer its last conv layer, batches of the same
    pre-decoded tensors: no decoding, boxes or writing, so b/c is generous to grad-cam;
(d) the library's C2AM training step (Trainer._step: head, embeddings, contrastive loss, 4 parameter groups) against
    the same backbone's forward + mean() + backward + SGD step, alternating step by step.
(e) the embedded default as shipped (weights/default: its test-time scales and flip, its box rule), `localize`
    boxes only and then with --maps (its calibration and dense CRF at image size), against the bare forwards of the
    same scales and flip, in the same run; and the map refinement alone, timed image by image with nothing to hide
    behind, so that the note can say what --maps costs per image and how much of it the forward hides.
(a) is timed just before and just after each (b) and each ratio is the median of its per-round ratios; CPU time
(this process's threads and its reaped workers) is reported beside wall time: on a shared machine the wall time of one
measurement depends on what else runs, its CPU time much less.
The RSS runs are subprocesses localising 1,000 and 10,000 names (hard links to a few distinct small JPEGs) at
--rss-image-size; memory must not grow with the number of images.
Targets: b/a >= 0.9 (batch 32, 224, tf_efficientnet_lite0 and resnet50), b/c >= 5, d >= 0.85, RSS(10k) within 10%
of RSS(1k), and for the shipped default (e) boxes/a >= 0.85.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # synthetic.py: textured images with one object

from synthetic import make_image  # noqa: E402

from c2am_cli import C2AM, Localizer, ModelConfig, TrainConfig  # noqa: E402
from c2am_cli.data.images import ImageFolder, collate, eval_transform, scan_images  # noqa: E402
from c2am_cli.config import read_config  # noqa: E402
from c2am_cli.runtime.device import autocast  # noqa: E402
from c2am_cli.training.trainer import Trainer, set_train_mode  # noqa: E402

DEFAULT_WEIGHTS = REPO / "weights" / "default" / "model.safetensors"


# -- images ---------------------------------------------------------------------------------
def write_images(folder: Path, n: int, distinct: int, size: tuple[int, int], seed: int = 0, quality: int = 90) -> Path:
    """`n` JPEG names in `folder`: `distinct` synthetic images written once beside it, then hard-linked (or
    symlinked where links are refused) round-robin, so that 10,000 names cost 64 files."""
    src = folder.with_name(folder.name + "_distinct")
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = []
    for i in range(min(distinct, n)):
        path = src / f"{i:03d}.jpg"
        if not path.exists():
            img, _, _ = make_image(rng, max(size))
            img.resize(size).save(path, quality=quality)
        sources.append(path)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = folder / f"img_{i:06d}.jpg"
        if not name.exists():
            try:
                os.link(sources[i % len(sources)], name)
            except OSError:
                name.symlink_to(sources[i % len(sources)])
    return folder


# -- model ----------------------------------------------------------------------------------
def build_model(backbone: str, image_size: int, weights: str | None) -> tuple[C2AM, str]:
    """The given weights; else weights/default/model.safetensors if it has this backbone; else (or with weights
    'untrained') an untrained C2AM: the timing is the same, nothing data-dependent runs in the forward."""
    path = Path(weights) if weights and weights != "untrained" else DEFAULT_WEIGHTS
    if weights != "untrained" and (weights or (path.exists() and read_config(path).model.backbone == backbone)):
        model = C2AM.from_pretrained(str(path))
        model.config.model.image_size = image_size
        return model, str(path)
    torch.manual_seed(0)
    return C2AM(ModelConfig(backbone=backbone, image_size=image_size)), f"untrained {backbone}"


def localizer_options(args) -> dict:
    """Options of the issue-7 pipeline, passed only where asked so that the script also runs on older versions;
    one forward per image (scale 1, no flip) unless --tta keeps the test-time scales and flip stored with the weights."""
    opts = {} if args.tta else {"scales": (1.0,), "flip": False}
    if args.compile:
        opts["compile"] = True
    if args.gpu_decode:
        opts["gpu_decode"] = True
    if args.prefetch is not None:
        opts["prefetch_factor"] = args.prefetch
    return opts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predecode(root: Path, files: list[str], model: C2AM, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The benchmark images decoded, squashed and normalised exactly as `localize` feeds them, in batches on the device."""
    mc = model.config.model
    ds = ImageFolder(root, files, eval_transform(mc.image_size, mc.mean, mc.std))
    batches = []
    for start in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        batches.append(batch.images.to(device))
    return batches


class Clock:
    """Wall time, and CPU time of this process (all its threads) plus its reaped children (DataLoader workers): on a
    shared machine the wall time of one measurement depends on what else runs, its CPU time much less."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _cpu() -> float:
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + ch.ru_utime + ch.ru_stime

    def __enter__(self):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu


def rates(n: int, clock: Clock) -> dict:
    """Images per second of wall time, and per second of CPU time."""
    return {"wall": n / clock.wall, "cpu": n / clock.cpu}


def cycle(batches: list[torch.Tensor], n: int):
    """Batches from the pool, round and round, until `n` images have gone by."""
    seen = 0
    while seen < n:
        for x in batches:
            if seen >= n:
                return
            yield x
            seen += len(x)


# -- (a) bare forward ---------------------------------------------------------------------
def views(x: torch.Tensor, scales, flip: bool):
    """The test-time views activation_maps runs: each scale, and its mirror image with flip."""
    for s in scales:
        v = x if s == 1 else torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        yield v
        if flip:
            yield v.flip(-1)


@torch.inference_mode()
def backbone_rate(model: C2AM, batches, n: int, device: torch.device, fmt, scales=(1.0,), flip: bool = False) -> dict:
    body = model.backbone
    weight = next(p for p in body.parameters() if p.ndim == 4)
    own = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    body.to(memory_format=fmt)  # weights and input alike: a mix runs in channels_last
    count = 0
    try:
        with Clock(device) as clock:
            for x in cycle(batches, n):
                with autocast(device, True):
                    for v in views(x, scales, flip):
                        body(v.contiguous(memory_format=fmt))
                count += len(x)
    finally:
        body.to(memory_format=own)
    return rates(count, clock)


# -- (b) localize end to end -----------------------------------------------------------------
def localize_rate(loc: Localizer, root: Path, out: Path, n: int, maps: Path | None) -> dict:
    with Clock(loc.device) as clock:
        summary = loc.run(root, out=out, maps_dir=maps, overwrite=True, progress=False)
    if summary.processed != n or summary.failed:
        raise SystemExit(f"localize: {summary.processed} of {n} images localised, {len(summary.failed)} failed")
    return rates(n, clock)


# -- (e) the embedded default as shipped -------------------------------------------------------
def refinement_seconds(loc: Localizer, root: Path, files: list[str]) -> float:
    """Seconds per image of what --maps adds after the forward (the map at image size, calibrated and CRF-refined
    as the weights say), image by image, with no forward to hide behind; decoding and the forward are not timed."""
    total, n = 0.0, 0
    for predictions, _ in loc.batches(root, files, photos=loc.needs_photo(maps=True)):
        for p in predictions:
            t = time.perf_counter()
            loc.full_map(p)
            total, n = total + time.perf_counter() - t, n + 1
    return total / max(n, 1)


def shipped_default(args, tmp: Path, root: Path, files: list[str], a_format, say) -> dict | None:
    """(e): per round, bare forwards (its scales and flip) before and after, localize boxes only, localize --maps."""
    if not DEFAULT_WEIGHTS.exists():
        return None
    loc = Localizer(C2AM.from_pretrained(str(DEFAULT_WEIGHTS)), device=args.device, batch_size=args.batch_size,
                    num_workers=args.workers)  # the weights' own scales, flip and box rule
    device = loc.device
    pool = predecode(root, files[: min(len(files), args.pool)], loc.model, args.batch_size, device)
    out, maps = tmp / "e" / "boxes.json", tmp / "e" / "maps"
    localize_rate(loc, tmp / "warm", tmp / "warm_e" / "boxes.json", args.batch_size, maps)  # warm-up
    bare = lambda: backbone_rate(loc.model, pool, args.images, device, a_format, loc.scales, loc.flip)  # noqa: E731
    rounds = []
    for r in range(args.rounds):
        before = bare()
        row = {"boxes": localize_rate(loc, root, out, args.images, None),
               "maps": localize_rate(loc, root, out, args.images, maps)}
        after = bare()
        rounds.append({"a": {c: (before[c] + after[c]) / 2 for c in before}, **row})
        say(f"(e) round {r + 1}: " + ", ".join(f"{k} {v['wall']:.1f} img/s" for k, v in rounds[-1].items()))
    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    med = {k: {c: statistics.median(x[k][c] for x in rounds) for c in clocks} for k in rounds[0]}
    ratio = {f"{k}/a": {c: statistics.median(x[k][c] / x["a"][c] for x in rounds) for c in clocks} for k in ("boxes", "maps")}
    refine = refinement_seconds(loc, root, files[: min(len(files), 64)])
    cost = 1 / med["maps"]["wall"] - 1 / med["boxes"]["wall"]  # wall seconds per image that --maps adds
    mc = loc.model.config.model
    return {"scales": list(loc.scales), "flip": loc.flip, "crf_iterations": mc.crf_iterations, "clocks": clocks,
            "rounds": rounds, "medians": med, "ratios": ratio, "refine_ms": 1000 * refine, "maps_cost_ms": 1000 * cost,
            "hidden": min(1.0, max(0.0, 1 - cost / refine)) if refine > 0 else None}


def print_shipped_default(e: dict) -> None:
    print(f"\n(e) the embedded default as shipped: scales {e['scales']}, flip {e['flip']}, dense CRF "
          f"{e['crf_iterations']} iterations; (a) its bare forwards of the same views")
    for key, label in (("a", "(a) bare forwards, same scales and flip"), ("boxes", "localize, boxes only"),
                       ("maps", "localize --maps (calibrated, CRF)")):
        vals = "".join(f"{e['medians'][key][c]:11.2f}" for c in e["clocks"])
        tail = ""
        if key != "a":
            r = e["ratios"][f"{key}/a"]
            tail = f"   {key}/a " + "".join(f"{r[c]:8.3f}" for c in e["clocks"])
            if key == "boxes":
                tail += "   >= 0.85 " + "/".join(verdict(r[c], 0.85) for c in e["clocks"])
        print(f"  {label:56}{vals}{tail}")
    hidden = "n/a" if e["hidden"] is None else f"{e['hidden']:.0%}"
    print(f"  --maps adds {e['maps_cost_ms']:.1f} ms of wall time per image; the refinement alone takes "
          f"{e['refine_ms']:.1f} ms per image (one image at a time): {hidden} of it hides behind the forward")


# -- (c) grad-cam EigenCAM -------------------------------------------------------------------
def last_conv_layer(classifier) -> str:
    """grad-cam's README rule, the last convolutional layer: ResNets layer4[-1]; timm EfficientNets bn2 (conv_head's
    BatchNorm and activation, the map that is pooled); otherwise timm's last feature level."""
    names = dict(classifier.named_modules())
    if "layer4" in names:
        return f"layer4.{len(names['layer4']) - 1}"
    if "conv_head" in names and "bn2" in names:
        return "bn2"
    return classifier.feature_info[-1]["module"]


class GradCamEigen:
    """EigenCAM as grad-cam's README uses it: EigenCAM(model, target_layers), then cam(input_tensor=batch)."""

    def __init__(self, model: C2AM, device: torch.device, layer: str | None = None):
        import timm
        from pytorch_grad_cam import EigenCAM

        self.classifier = timm.create_model(model.config.model.backbone, pretrained=False).to(device).eval()
        self.classifier.load_state_dict(model.backbone.body.state_dict(), strict=False)  # same weights where names match
        self.layer = layer or last_conv_layer(self.classifier)
        self.cam = EigenCAM(model=self.classifier, target_layers=[self.classifier.get_submodule(self.layer)])
        self.blas_threads = None  # numpy's BLAS threads for its SVDs: chosen as the faster in warm_up

    def _blas(self):
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=self.blas_threads, user_api="blas")

    def rate(self, batches, n: int, device: torch.device) -> dict:
        count = 0
        with self._blas(), Clock(device) as clock:
            for x in cycle(batches, n):
                maps = self.cam(input_tensor=x, targets=None)  # (N, H, W) in [0, 1]; None: top class (unused by EigenCAM)
                assert maps.shape[0] == len(x)
                count += len(x)
        return rates(count, clock)

    def warm_up(self, batch: torch.Tensor, device: torch.device) -> None:
        """A few images with numpy's default BLAS threads and with a single thread; keep the faster (images/s): a
        busy machine makes OpenBLAS's spinning threads very slow, an idle one rewards them."""
        speeds = {}
        for threads in (None, 1):
            self.blas_threads = threads
            self.rate([batch[:2]], 2, device)  # first call of each setting: allocations, thread pools
            speeds[threads] = self.rate([batch[:4]], 4, device)["wall"]
        self.blas_threads = max(speeds, key=speeds.get)


# -- (d) training step -----------------------------------------------------------------------
def train_rates(root: Path, run: Path, args, device: torch.device, batch: torch.Tensor, steps: int) -> tuple[dict, dict]:
    """(C2AM step, bare step) in images/s, alternating step by step, after one warm-up step each."""
    mc = ModelConfig(backbone=args.backbone, image_size=args.image_size)
    tc = TrainConfig(batch_size=len(batch), num_workers=0, epochs=1)
    trainer = Trainer(root, run, model_config=mc, train_config=tc, device=args.device, progress=False)
    set_train_mode(trainer.model, trainer.cfg)
    x = trainer._images_to_device(batch)
    bare = copy.deepcopy(getattr(trainer.model, "module", trainer.model).backbone)  # same mode: BatchNorm frozen
    opt = torch.optim.SGD([p for p in bare.parameters() if p.requires_grad], lr=tc.lr, momentum=tc.momentum,
                          weight_decay=tc.weight_decay)

    def c2am_step():
        with autocast(trainer.device, tc.amp):
            out = trainer.model(x)
        trainer._step(out, max_step=10**9)

    def bare_step():
        with autocast(trainer.device, tc.amp):
            loss = bare(x).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())  # the C2AM step reads its loss terms too

    wall, cpu = {c2am_step: 0.0, bare_step: 0.0}, {c2am_step: 0.0, bare_step: 0.0}
    for i in range(steps + 1):
        for step in (c2am_step, bare_step) if i % 2 == 0 else (bare_step, c2am_step):
            with Clock(device) as clock:
                step()
            if i > 0:
                wall[step] += clock.wall
                cpu[step] += clock.cpu
    n = steps * len(batch)
    return ({"wall": n / wall[c2am_step], "cpu": n / cpu[c2am_step]},
            {"wall": n / wall[bare_step], "cpu": n / cpu[bare_step]})


# -- RSS -------------------------------------------------------------------------------------
def peak_rss_mib(pid: int | str = "self") -> float:
    """VmHWM, the peak resident set of one process (unlike ru_maxrss it is not inherited across fork and exec)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if pid == "self" else 0.0


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: 5 > /proc/self/clear_refs), so that each phase's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class WorkerPeak(threading.Thread):
    """Polls the peak RSS of this process's children (the DataLoader workers) while they live."""

    def __init__(self, every: float = 0.25):
        super().__init__(daemon=True)
        self.every, self.peaks, self.stop = every, {}, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            for tasks in Path("/proc/self/task").glob("*/children"):
                for pid in tasks.read_text().split():
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), peak_rss_mib(pid))

    def peak(self) -> float:
        self.stop.set()
        self.join()
        return max(self.peaks.values(), default=0.0)


def rss_child(args) -> None:
    """Subprocess: localise args.rss_child and print one JSON line with the peak RSS of this process and its workers."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = build_model(args.backbone, args.rss_image_size, args.weights)
    loc = Localizer(model, device=str(device), batch_size=args.batch_size, num_workers=args.workers, **localizer_options(args))
    folder = Path(args.rss_child)
    workers = WorkerPeak()
    workers.start()
    t0 = time.perf_counter()
    summary = loc.run(folder, out=folder.with_name(folder.name + "_out") / "boxes.json", overwrite=True, progress=False)
    print(json.dumps({"images": summary.processed, "failed": len(summary.failed), "seconds": time.perf_counter() - t0,
                      "main_mib": peak_rss_mib(), "workers_mib": workers.peak()}))


def rss_runs(tmp: Path, args) -> dict[int, dict]:
    results = {}
    for n in args.rss_images:
        folder = write_images(tmp / f"rss_{n}", n, args.distinct, args.rss_source_size, seed=1)
        cmd = [sys.executable, __file__, "--rss-child", str(folder), "--backbone", args.backbone, "--batch-size",
               str(args.batch_size), "--device", args.device, "--rss-image-size", str(args.rss_image_size)]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        if args.weights:
            cmd += ["--weights", args.weights]
        for flag in ("compile", "gpu_decode"):
            if getattr(args, flag):
                cmd.append("--" + flag.replace("_", "-"))
        if args.prefetch is not None:
            cmd += ["--prefetch", str(args.prefetch)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"RSS run of {n} images failed:\n{proc.stderr[-3000:]}")
        results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  ... RSS run of {n:,} images: {results[n]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return results


# -- main ------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default=None, help="C2AM weights, or 'untrained' (default: weights/default if it has this backbone, "
                                                    "else an untrained model).")
    ap.add_argument("--images", type=int, default=256, help="Images per (a)/(b) measurement.")
    ap.add_argument("--pool", type=int, default=256, help="Pre-decoded images held for (a) and (c), cycled.")
    ap.add_argument("--head-images", type=int, default=64, help="(b) is also timed on the first N images: the "
                                                                 "streaming rate is (images - N) / (time - its time).")
    ap.add_argument("--gradcam-images", type=int, default=64, help="Images per (c) measurement (EigenCAM is slow).")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--source-size", default="500x375", help="WxH of the synthetic JPEGs (ImageNet-like by default).")
    ap.add_argument("--distinct", type=int, default=64, help="Distinct images behind the hard-linked names.")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the library's choice).")
    ap.add_argument("--prefetch", type=int, default=None, help="DataLoader prefetch_factor (default: the library's).")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    ap.add_argument("--compile", action="store_true", help="Localizer(compile=True): torch.compile the model.")
    ap.add_argument("--gpu-decode", action="store_true", help="Localizer(gpu_decode=True): nvjpeg on CUDA.")
    ap.add_argument("--maps", action="store_true", help="(b) also writes a .npy map per image.")
    ap.add_argument("--tta", action="store_true", help="Keep the weights' test-time scales and flip ((a) runs the same "
                                                       "views); default: one forward per image.")
    ap.add_argument("--rounds", type=int, default=2, help="Alternating (a), (b), (c) rounds; ratios are medians.")
    ap.add_argument("--train-steps", type=int, default=6, help="Timed steps of each kind in (d), alternating.")
    ap.add_argument("--train-batch", type=int, default=16, help="Batch size of the (d) steps.")
    ap.add_argument("--gradcam-layer", default=None, help="EigenCAM target layer (default: the last conv layer).")
    ap.add_argument("--rss-images", type=lambda s: [int(v) for v in s.split(",") if v], default=[1000, 10000])
    ap.add_argument("--rss-image-size", type=int, default=64, help="Model input size of the RSS runs (memory growth "
                                                                   "does not depend on it; time does).")
    ap.add_argument("--rss-source-size", default="96x96")
    ap.add_argument("--skip", default="", help="Comma-separated parts to skip: gradcam, train, rss, default.")
    ap.add_argument("--json", default=None, help="Also write the results here.")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key in ("source_size", "rss_source_size"):
        w, h = getattr(args, key).lower().split("x")
        setattr(args, key, (int(w), int(h)))
    args.skip = set(filter(None, args.skip.split(",")))
    return args


def verdict(value: float, target: float, higher: bool = True) -> str:
    return "ok" if (value >= target if higher else value <= target) else "MISSED"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args)
    tmp = Path(tempfile.mkdtemp(prefix="c2am-throughput-"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path) -> None:
    say = lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True)  # noqa: E731
    root = write_images(tmp / "images", args.images, args.distinct, args.source_size)
    files = scan_images(root)
    model, source = build_model(args.backbone, args.image_size, args.weights)
    loc = Localizer(model, device=args.device, batch_size=args.batch_size, num_workers=args.workers, **localizer_options(args))
    device = loc.device
    pool = predecode(root, files[: min(len(files), args.pool)], loc.model, args.batch_size, device)
    out, maps = tmp / "b" / "boxes.json", (tmp / "b" / "maps" if args.maps else None)

    # warm-up, and (a)'s memory format: the faster of the two (by CPU time) is the limit
    small = write_images(tmp / "warm", args.batch_size, args.distinct, args.source_size)
    localize_rate(loc, small, tmp / "warm_out" / "boxes.json", args.batch_size, None)
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    speed = {}
    for name, f in ({"channels_last": torch.channels_last} if args.compile else formats).items():  # no recompiling
        backbone_rate(loc.model, pool[:1], args.batch_size, device, f)
        speed[name] = backbone_rate(loc.model, pool[:1], args.batch_size, device, f)["cpu" if device.type == "cpu" else "wall"]
    a_format = max(speed, key=speed.get)
    gradcam = None
    if "gradcam" not in args.skip:
        gradcam = GradCamEigen(loc.model, device, args.gradcam_layer)
        gradcam.warm_up(pool[0], device)
    say(f"warmed up; (a) in {a_format} ({', '.join(f'{k} {v:.1f}' for k, v in speed.items())} img/s)")

    n0 = min(args.head_images, args.images // 2)  # (b) streaming: the rate past a run's fixed costs
    head = write_images(tmp / "images_head", n0, args.distinct, args.source_size)  # the first n0 images of `root`
    rounds, peaks = [], {"a, b": 0.0, "c": 0.0, "d": 0.0}
    for r in range(args.rounds):
        reset_peak_rss()
        bare = lambda: backbone_rate(loc.model, pool, args.images, device, formats[a_format], loc.scales, loc.flip)  # noqa: E731
        before = bare()
        row = {"b_head": localize_rate(loc, head, out, n0, maps), "b": localize_rate(loc, root, out, args.images, maps)}
        after = bare()  # (a) brackets (b): the mean of the two is what the machine gave just before and after
        row = {"a": {c: (before[c] + after[c]) / 2 for c in before}, **row}
        row["b_stream"] = {c: (args.images - n0) / (args.images / row["b"][c] - n0 / row["b_head"][c]) for c in row["b"]}
        peaks["a, b"] = max(peaks["a, b"], peak_rss_mib())
        if gradcam:
            reset_peak_rss()
            row["c"] = gradcam.rate(pool, args.gradcam_images, device)
            peaks["c"] = max(peaks["c"], peak_rss_mib())
        rounds.append(row)
        say(f"round {r + 1}: " + ", ".join(f"{k} {v['wall']:.1f} img/s ({v['cpu']:.1f} per CPU-s)" for k, v in row.items()))
    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    med = {k: {c: statistics.median(x[k][c] for x in rounds) for c in clocks} for k in rounds[0]}
    ratio = {f"{p}/{q}": {c: statistics.median(x[p][c] / x[q][c] for x in rounds) for c in clocks}
             for p, q in (("b_stream", "a"), ("b", "a"), ("b_stream", "c")) if q in rounds[0]}

    if "train" not in args.skip:
        reset_peak_rss()
        tc = predecode(root, files[: args.train_batch], loc.model, args.train_batch, torch.device("cpu"))[0]
        c2am_rate, bare_rate = train_rates(root, tmp / "train", args, device, tc, args.train_steps)
        med["d_c2am"], med["d_bare"] = c2am_rate, bare_rate
        ratio["d"] = {c: c2am_rate[c] / bare_rate[c] for c in clocks}
        say(f"train steps: c2am {c2am_rate['wall']:.2f}, bare {bare_rate['wall']:.2f} img/s")
        peaks["d"] = peak_rss_mib()
    rss = rss_runs(tmp, args) if "rss" not in args.skip else {}
    shipped = shipped_default(args, tmp, root, files, formats[a_format], say) if "default" not in args.skip else None

    threads = torch.get_num_threads()
    print(f"\nc2am throughput: {args.backbone} ({source}) at {args.image_size}, batch {args.batch_size}, "
          f"{args.images} images ({args.source_size[0]}x{args.source_size[1]} JPEG, {args.distinct} distinct)")
    print(f"test-time scales {list(loc.scales)}, flip {loc.flip}; maps and boxes at {args.image_size}"
          + (" (+ .npy maps at image size)" if maps else ""))
    print(f"device {device} ({threads} torch threads, {os.cpu_count()} CPUs), workers {loc.num_workers}, "
          f"{args.rounds} rounds (medians), options {localizer_options(args) or 'default'}; a shared machine")
    cols = "".join(f"{'img/s' if c == 'wall' else 'img/CPU-s':>11}" for c in clocks)
    rcols = "".join(f"{'wall' if c == 'wall' else 'CPU':>8}" for c in clocks)
    print(f"  {'measure':56}{cols}   {'ratio':<6}{rcols}   target")

    def line(label, key, rkey=None, target=None):
        vals = "".join(f"{med[key][c]:11.2f}" for c in clocks)
        tail = ""
        if rkey:
            tail = f"   {rkey.replace('b_stream', 'b'):<6}" + "".join(f"{ratio[rkey][c]:8.3f}" for c in clocks)
            tail += f"   >= {target} " + "/".join(verdict(ratio[rkey][c], target) for c in clocks)
        print(f"  {label:56}{vals}{tail}")

    line(f"(a) bare backbone forward ({a_format})", "a")
    line("(b) c2am localize end to end" + (" + .npy maps" if maps else "") + ", streaming", "b_stream", "b_stream/a", 0.9)
    line(f"    (b) whole runs of {args.images} images (with startup)", "b", "b/a", 0.9)
    if gradcam:
        line(f"(c) grad-cam EigenCAM ({gradcam.layer}; BLAS {gradcam.blas_threads or 'default'} thr)", "c")
        print(f"  {'':56}{'':{11 * len(clocks)}}   {'b/c':<6}" + "".join(f"{ratio['b_stream/c'][c]:8.2f}" for c in clocks)
              + "   >= 5 " + "/".join(verdict(ratio["b_stream/c"][c], 5) for c in clocks))
    if "d" in ratio:
        line(f"(d) C2AM training step (batch {args.train_batch})", "d_c2am", "d", 0.85)
        line("    bare forward+backward+SGD step", "d_bare")
    print("  peak RSS of this process, per phase: " + ", ".join(f"({k}) {v:.0f} MiB" for k, v in peaks.items() if v)
          + " (whatever the process held before included: the pre-decoded pool, the grad-cam model)")
    if rss:
        first = rss[min(rss)]
        for n, r in sorted(rss.items()):
            growth = r["main_mib"] / first["main_mib"] - 1
            print(f"  streaming localize of {n:>6,} images at {args.rss_image_size}px: peak RSS {r['main_mib']:.0f} MiB "
                  f"(each worker <= {r['workers_mib']:.0f} MiB), {n / r['seconds']:.0f} img/s"
                  + (f"; {growth:+.1%} vs {min(rss):,} (within 10%: {verdict(abs(growth), 0.10, higher=False)})"
                     if n != min(rss) else ""))
    if shipped:
        print_shipped_default(shipped)
    if args.json:
        Path(args.json).write_text(json.dumps({"shipped_default": shipped, "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
                                               "device": str(device), "threads": threads, "a_format": a_format,
                                               "rounds": rounds, "medians": med, "ratios": ratio,
                                               "peak_rss_mib": peaks, "rss": rss}, indent=2))


if __name__ == "__main__":
    main()
