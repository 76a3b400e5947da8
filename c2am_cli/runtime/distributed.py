"""Runs launched by torchrun: process group from its environment, rank helpers, the global-batch gather and sharding.

Launched without torchrun (or with one process), every helper here is a no-op and nothing is initialised.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import C2AMError


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (from torchrun's RANK before the group is joined); 0 without torchrun."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, logs, the model and merged outputs."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU) and return this rank's device.

    Without torchrun this returns `device` unchanged. On CUDA each rank takes GPU LOCAL_RANK.
    """
    if not launched():
        return device
    if device.type not in ("cpu", "cuda"):
        raise C2AMError(f"--device {device}: runs under torchrun need CUDA or the CPU")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(cleanup)
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (at the end of a command run under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` from every rank, concatenated in rank order, with gradients flowing back to each rank's rows.

    Ranks may hold different numbers of rows (a batch that lost unreadable images): they are padded for the
    collective and trimmed after. With DistributedDataParallel's gradient averaging, a loss on the gathered
    rows gives every rank exactly the gradient of that loss computed in one process on the global batch.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    with warnings.catch_warnings():  # deprecated in favour of a private module; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_ranks_min(value: int, device: torch.device) -> int:
    """The smallest `value` over all ranks (so that every rank takes the same branch)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def all_ranks_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over all ranks."""
    if not is_distributed() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world_size()).tolist()))


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (picklable Python objects: file lists, failure records)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list, chunk: int) -> list:
    """This rank's share of `items`: whole chunks of `chunk` items dealt round-robin, so that each rank's batches
    are exactly the batches of a single-process run (and its outputs bit-identical)."""
    n = world_size()
    if n == 1:
        return list(items)
    digest = hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()
    if len(set(gather_objects((digest, len(items))))) > 1:
        raise C2AMError(f"the {n} ranks see different file lists ({len(items)} files on rank {rank()}); every node needs the same folder")
    r = rank()
    return [x for start in range(r * chunk, len(items), n * chunk) for x in items[start:start + chunk]]


def part_path(path: str | Path, part: int | None = None) -> Path:
    """Where rank `part` (default: this rank) writes its part of output `path`: boxes.json -> boxes.rank1-of-4.json."""
    path = Path(path)
    part = rank() if part is None else part
    return path.with_name(f"{path.stem}.rank{part}-of-{world_size()}{path.suffix}")
