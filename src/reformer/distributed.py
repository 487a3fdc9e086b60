"""Data-parallel training on PyTorch's own engine: the process group, the DDP wrapper, reductions.

`reformer train` under `torchrun --nproc_per_node N` (or any launcher that sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) runs one process per
rank: gloo on the CPU, NCCL on GPUs (rank r on cuda:LOCAL_RANK). Without
WORLD_SIZE, or with WORLD_SIZE=1, nothing is initialised and every helper here
is the identity.

The reversible stack hands every parameter's gradient out of one autograd
Function, exactly once (see `reformer.layers.reversible`), so DDP's hooks fire
once per parameter per backward, with or without `static_graph`.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Process:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    joined: bool = False  # this process initialised the process group (and `stop` leaves it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes metrics, plots and checkpoints."""
        return self.rank == 0


def start(device: str = "auto") -> Process:
    """This process's rank from the launcher's environment; joins the process group when there are several.

    device: "auto" (CUDA when there is one, else the CPU), "cpu" or "cuda".
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    where = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    joined = world_size > 1 and not dist.is_initialized()
    if joined:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun, which sets it")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return Process(rank=rank, world_size=world_size, local_rank=local_rank, device=where, joined=joined)


def stop(process: Process, wait: bool = True) -> None:
    """Leave the process group that `start` joined; wait: first until every rank got here (not after an error)."""
    if process.joined and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, process: Process, static_graph: bool = False) -> nn.Module:
    """The model in DistributedDataParallel when there are several processes, else the model itself."""
    if not process.distributed:
        return model
    device_ids = [process.device.index] if process.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, static_graph=static_graph)


def unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, last: bool):
    """DDP's no_sync() for every micro-step but the last of an optimizer step: one all-reduce per step.

    Not with static_graph: PyTorch's DDP then asserts in the first backward under
    no_sync, and stops reducing after it (pytorch/pytorch#143580, fix pending in
    #187732). Those replicas all-reduce every micro-step instead, which sums to
    the same gradients: the mean over ranks of (shared sum so far + own part).
    """
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if last or not ddp or model.static_graph:
        return nullcontext()
    return model.no_sync()


def sum_over_ranks(values: list[float], process: Process) -> list[float]:
    """The element-wise sum of `values` over all ranks (float64), on every rank."""
    if not process.distributed:
        return list(values)
    device = process.device if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def barrier(process: Process) -> None:
    if process.distributed:
        dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
