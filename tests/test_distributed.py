"""Data-parallel training: two gloo processes on the CPU train exactly as one process on the global batch.

The processes are real (torch.multiprocessing spawn, and torchrun for the
command line); each test takes a few seconds to start them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from reformer import ReformerConfig, ReformerLM
from reformer.checkpoint import latest_checkpoint
from reformer.train import TrainConfig, train

TEXT = ("The old woman was a widow, lived alone, and was very suspicious of visitors. " * 40).encode()
MODEL = dict(vocab_size=256, d_model=32, n_heads=2, d_head=16, d_ff=64, attn_layers=("lsh", "local", "lsh"),
             lsh_chunk_size=16, local_chunk_size=16, n_hashes=2, axial_shape=(8, 16), axial_dims=(8, 24),
             max_seq_len=128, dropout=0.0, reversible=True, seed=0)
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_as(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def train_rank(rank: int, world_size: int, port: int, cfg: dict, model: dict) -> None:
    join_as(rank, world_size, port)
    train(TrainConfig(**cfg), ReformerConfig(**model))


def train_rank_float64(rank: int, world_size: int, port: int, cfg: dict, model: dict) -> None:
    torch.set_default_dtype(torch.float64)  # a fresh process: nothing to restore
    train_rank(rank, world_size, port, cfg, model)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def spawn(fn, *args, world_size: int = 2) -> None:
    mp.start_processes(fn, args=(world_size, free_port(), *args), nprocs=world_size, start_method="spawn")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def train_config(out: Path, data: Path, **overrides) -> dict:
    fields = dict(out=str(out), data=str(data), steps=3, batch_size=4, seq_len=64, eval_every=3, eval_batches=1,
                  save_every=3, warmup=1, lr=3e-3, progress=False, device="cpu")
    fields.update(overrides)
    return fields


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT)
    return path


@pytest.mark.parametrize("static_graph, grad_accum", [(False, 1), (True, 2), (True, 1), (False, 2)],
                         ids=["dynamic", "static-accumulated", "static", "dynamic-accumulated"])
def test_two_processes_train_like_one_on_the_global_batch(tmp_path, text_file, static_graph, grad_accum):
    """In float64: the runs split the sums over the batch differently, and in float32 that rounding is enough
    to move an LSH bucket (a discontinuity) after a step or two, which AdamW then turns into a visible gap."""
    one = train_config(tmp_path / "one", text_file, grad_accum=grad_accum)
    two = train_config(tmp_path / "two", text_file, grad_accum=grad_accum, static_graph=static_graph)
    torch.set_num_threads(1)
    with default_dtype(torch.float64):
        train(TrainConfig(**one), ReformerConfig(**MODEL))
        initial = ReformerLM(ReformerConfig(**MODEL)).state_dict()
    spawn(train_rank_float64, two, MODEL)
    expected, actual = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name, value in expected.items():
        assert value.dtype == actual[name].dtype == torch.float64, name
        assert not torch.equal(value, initial[name]) or name.endswith("norm.bias"), f"{name} did not train"
        assert (actual[name] - value).abs().max() <= 1e-12, name
    ones, twos = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in twos] == [r["step"] for r in ones] == [1, 2, 3, 3]  # rank 0 alone wrote them
    for a, b in zip(ones, twos):
        assert b["split"] == a["split"] and abs(b["loss"] - a["loss"]) <= 1e-5  # losses over both shards


def count_reductions(rank: int, world_size: int, port: int, static_graph: bool, out: str) -> None:
    """Two steps of a DDP replica whose comm hook counts how often each parameter is all-reduced."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from reformer import distributed

    join_as(rank, world_size, port)
    process = distributed.start("cpu")
    model = ReformerLM(ReformerConfig(**MODEL)).train()
    names = {id(p): name for name, p in model.named_parameters()}
    replica = distributed.wrap(model, process, static_graph)
    counts: list[Counter] = []

    def hook(state, bucket):
        counts[-1].update(names[id(p)] for p in bucket.parameters())
        return allreduce_hook(state, bucket)

    replica.register_comm_hook(None, hook)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        counts.append(Counter())
        replica(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    Path(out, f"rank{rank}.json").write_text(json.dumps([dict(c) for c in counts]))
    distributed.stop(process)


@pytest.mark.parametrize("static_graph", [False, True], ids=["dynamic", "static"])
def test_each_parameter_is_reduced_once_per_step(tmp_path, static_graph):
    spawn(count_reductions, static_graph, str(tmp_path))
    names = [name for name, _ in ReformerLM(ReformerConfig(**MODEL)).named_parameters()]
    for rank in range(2):
        steps = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert steps == [{name: 1 for name in names}] * 2


def command(*args: str) -> list[str]:
    model = ["--d-model", "32", "--d-head", "16", "--n-heads", "2", "--d-ff", "64", "--attn-layers", "lsh,local",
             "--lsh-chunk-size", "16", "--local-chunk-size", "16", "--n-hashes", "2", "--max-seq-len", "64"]
    return [*args, "--batch-size", "4", "--seq-len", "64", "--warmup", "1", "--eval-every", "2",
            "--eval-batches", "1", "--save-every", "2", "--no-progress", "--device", "cpu", *model]


def test_torchrun_two_processes_then_resume_with_one(tmp_path, text_file):
    """`torchrun --nproc_per_node 2 -m reformer train`, then steps 3-4 again from its step-2 checkpoint, alone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    run = tmp_path / "run"
    train_args = ["train", "--data", str(text_file), "--out", str(run), "--steps", "4"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "reformer", *command(*train_args)], check=True, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.stdout.count("step 2: eval") == 1 and done.stdout.count("done: step 4") == 1  # rank 0 prints
    two_processes, two_records = final_weights(run), records(run)
    assert [r["step"] for r in two_records] == [1, 2, 2, 3, 4, 4]
    (run / "checkpoints" / "latest").write_text("step-00000002\n")  # as if stopped after step 2
    subprocess.run([sys.executable, "-m", "reformer", *command(*train_args, "--resume")],
                   check=True, env=env, capture_output=True, timeout=300)
    resumed = records(run)
    assert [r["step"] for r in resumed] == [1, 2, 2, 3, 4, 4]
    for a, b in zip(two_records, resumed):
        assert a["split"] == b["split"] and abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    after_resume = final_weights(run)
    for name, value in two_processes.items():
        assert (after_resume[name] - value).abs().max() <= 1e-6, name


def test_a_batch_that_does_not_split_is_explained(tmp_path, text_file, monkeypatch):
    from reformer import distributed
    from reformer.train import make_samplers

    cfg = TrainConfig(**train_config(tmp_path / "run", text_file, batch_size=3))
    with pytest.raises(ValueError, match="--batch-size 3 is split over 2 processes; give a multiple of 2"):
        make_samplers(cfg, ReformerConfig(**MODEL), distributed.Process(rank=1, world_size=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set; launch with torchrun"):
        distributed.start("cpu")


@pytest.mark.parametrize("device, env, message", [
    ("gpu", {}, "device must be 'auto', 'cpu' or 'cuda', got 'gpu'"),
    ("cpu", {"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE='two' is not an integer"),
])
def test_bad_devices_and_launch_environments_are_explained(monkeypatch, device, env, message):
    from reformer import distributed

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.start(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_device_is_explained():
    from reformer import distributed

    with pytest.raises(ValueError, match="--device cuda, but torch sees no CUDA device; use --device cpu"):
        distributed.start("cuda")
