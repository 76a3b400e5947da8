"""torchrun: the global-batch contrast under DDP equals one process on the same batch; a 2-process training
epoch checkpoints and resumes; sharded localize equals a single-process run. 2 processes, gloo backend, CPU."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from typer.testing import CliRunner

from c2am_cli import C2AM, ModelConfig
from c2am_cli.runtime import distributed
from c2am_cli.cli import app
from c2am_cli.predict.localize import to_coco
from c2am_cli.runtime.io import JsonLines
from synthetic import make_folder

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m c2am_cli ARGS` on 127.0.0.1, one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "c2am_cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "C2AM_TEST_SLEEP_PER_BATCH"):
        env.pop(key, None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def global_batch() -> torch.Tensor:
    return torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def tiny_model() -> C2AM:
    torch.manual_seed(0)
    return C2AM(ModelConfig(backbone="test_resnet", image_size=SIZE)).eval()  # eval: BatchNorm per image, not per batch


def gathered_loss_worker(rank: int, port: int, folder: str) -> None:
    """One rank: its rows of the global batch through DDP, the loss on the embeddings gathered from all ranks."""
    from torch.nn.parallel import DistributedDataParallel

    from c2am_cli.models.loss import ContrastiveLoss
    from c2am_cli.models.c2am import C2AMOutput
    from c2am_cli.training.trainer import TrainView

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    assert distributed.init(torch.device("cpu")) == torch.device("cpu") and distributed.world_size() == WORLD
    model = tiny_model()
    view = DistributedDataParallel(TrainView(model))
    rows = global_batch()[:3] if rank == 0 else global_batch()[3:]  # 3 + 2 rows: unequal shards are padded
    out = C2AMOutput(*view(rows))
    fg, bg = distributed.gather_with_grad(out.fg), distributed.gather_with_grad(out.bg)
    loss = ContrastiveLoss(0.25)(fg, bg)["loss"]
    loss.backward()
    local = ContrastiveLoss(0.25)(out.fg, out.bg)["loss"]
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.detach(), "local": local.detach(), "fg": fg.detach(), **grads}, Path(folder) / f"rank{rank}.pt")
    distributed.cleanup()


def test_gathered_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path):
    from c2am_cli.models.loss import ContrastiveLoss

    torch.multiprocessing.spawn(gathered_loss_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model, threads = tiny_model(), torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: CPU kernels sum in another order with other thread counts
    try:
        out = model(global_batch())
        loss = ContrastiveLoss(0.25)(out.fg, out.bg)["loss"]
        loss.backward()
    finally:
        torch.set_num_threads(threads)
    want = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert len(want) > 10
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got.pop("fg"), out.fg.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.pop("loss"), loss.detach(), rtol=1e-6, atol=1e-6)
        assert abs(float(got.pop("local")) - loss.item()) > 1e-3  # a rank's own rows alone give another loss
        assert got.keys() == want.keys()
        for k in want:  # DDP's average of the ranks' gradients is the one-process gradient
            scale = float(want[k].abs().max())
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{k}: {m}")


def test_shard_deals_whole_batches_round_robin(monkeypatch):
    items = [f"f{i:02d}" for i in range(11)]
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(items, 2))
        assert distributed.part_path("out/boxes.json").as_posix() == f"out/boxes.rank{r}-of-3.json"
    # batches of 2: [0 1] [2 3] [4 5] [6 7] [8 9] [10] dealt to ranks 0 1 2 0 1 2
    assert parts == [["f00", "f01", "f06", "f07"], ["f02", "f03", "f08", "f09"], ["f04", "f05", "f10"]]


def test_train_one_epoch_under_torchrun_checkpoints_and_resumes(tmp_path):
    images, run = tmp_path / "images", tmp_path / "run"
    make_folder(images, 10, seed=4, size=72)
    common = ["--backbone", "test_resnet", "--batch-size", 2, "--image-size", SIZE, "--workers", 0, "--device", "cpu",
              "--seed", 3, "-q", "--out", run]
    r = torchrun("train", images, "--epochs", 1, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f"wrote {run / 'model.safetensors'}") == 1  # rank 0 reports
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        state = json.loads(f.metadata()["state"])
    assert (state["epoch"], state["step"]) == (1, 10 // WORLD // 2)  # global batch 4: 2 steps per epoch
    model = C2AM.from_file(run / "model.safetensors")
    assert model.config.data["processes"] == WORLD and model.config.train.local_contrast is False
    assert [rec["epoch"] for rec in JsonLines(run / "log.jsonl").read()] == [1]
    assert not (run / "errors.jsonl").exists()

    r = torchrun("train", images, "--epochs", 2, "--resume", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f"resuming {run} after epoch 1") == 1
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        state = json.loads(f.metadata()["state"])
    assert (state["epoch"], state["step"]) == (2, 4)
    assert [rec["epoch"] for rec in JsonLines(run / "log.jsonl").read()] == [1, 2]
    trained = C2AM.from_file(run / "model.safetensors").state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in model.state_dict().items())


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sharded_localize_equals_one_process(tmp_path):
    images = tmp_path / "images"
    make_folder(images, 13, seed=3, size=72, subdirs=True)
    shutil.copy(images / "sub1" / "img_001.jpg", images / "sub1" / "img_003.jpg")  # name clash across shards
    (images / "sub0" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    torch.manual_seed(0)
    weights = C2AM(ModelConfig(backbone="test_resnet", image_size=SIZE)).save(tmp_path / "model.safetensors")

    def args(name: str, *extra):
        d = tmp_path / name
        return ["localize", images, "--weights", weights, "--out", d / "boxes.json", "--maps", d / "maps",
                "--batch-size", 2, "--workers", 0, "--device", "cpu", "-q", *extra]

    one = CliRunner().invoke(app, [str(a) for a in args("one")])
    assert one.exit_code == 3, one.output
    r = torchrun(*args("sharded"))
    assert r.returncode != 0 and "exitcode  : 3" in r.stderr, r.stderr[-3000:]  # torchrun reports rank 0's code 3
    assert r.stdout.count("wrote ") == 1 and "14 localised, 0 from an earlier run, 1 failed" in r.stdout, r.stdout
    a, b = _tree(tmp_path / "one"), _tree(tmp_path / "sharded")
    parts = {k for k in b if ".rank" in k}
    assert {k.split(".json")[0] for k in parts} == {f"boxes.rank{r}-of-{WORLD}" for r in range(WORLD)}
    assert len([k for k in a if k.endswith(".npy")]) == 14 and {"maps/sub1/img_003.png.npy", "maps/sub1/img_003.jpg.npy"} <= a.keys()
    b = {k: v for k, v in b.items() if k not in parts}
    a.pop("boxes.json.manifest.jsonl")
    assert a.keys() == b.keys()
    assert a == b  # boxes.json, every map and the errors file: byte for byte

    r = torchrun(*args("sharded", "--format", "coco"))  # resumes every rank's part, merges as COCO
    assert "0 localised, 14 from an earlier run, 1 failed" in r.stdout, r.stderr[-3000:]
    records = json.loads((tmp_path / "one" / "boxes.json").read_text())["images"]
    assert json.loads((tmp_path / "sharded" / "boxes.json").read_text()) == to_coco(records)
