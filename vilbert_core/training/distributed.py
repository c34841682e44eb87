"""Process-group setup for `torchrun` launches, and the few collectives the trainer needs.

One process per device. `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
without them the trainer runs as a single process and every collective here is a no-op.
Backend: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process sits in the job: rank, world size, local rank, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (or run alone) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        ctx.initialised_here = True
    return ctx


def teardown_distributed(ctx: DistContext) -> None:
    """Leave the process group if setup_distributed() created it."""
    if ctx.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_min(ctx: DistContext, value: float) -> float:
    """The minimum of a number over all ranks (used so that every rank agrees when data runs out)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def all_reduce_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all ranks, in float64 (for validation totals and counts)."""
    if not ctx.distributed:
        return values
    values = values.detach().clone().to(ctx.device, torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_mean(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (for logging losses)."""
    return all_reduce_sum(ctx, values) / ctx.world_size if ctx.distributed else values


def gather_objects(ctx: DistContext, obj: object) -> list[object]:
    """Every rank's object, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every rank."""
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()
