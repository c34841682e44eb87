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

from extract.devices import resolve_device


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
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # one GPU per process of the node
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        ctx.initialised_here = True
    return ctx


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: taskset, cgroups cpusets, Slurm)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def thread_budget(num_workers: int, cores: int | None = None, local_processes: int | None = None) -> int:
    """Intra-op threads that, beside `num_workers` DataLoader processes, do not oversubscribe this process's cores.

    The cores are shared by the training processes of this node (torchrun's LOCAL_WORLD_SIZE); each
    DataLoader worker keeps one busy. Oversubscribed, every parallel region waits for a descheduled thread.
    """
    cores = usable_cores() if cores is None else cores
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_processes is None else local_processes
    return max(1, cores // max(1, local) - num_workers)


def configure_threads(num_workers: int, requested: int | None = None) -> int:
    """Set torch's intra-op threads and return the number: `requested`, else OMP_NUM_THREADS, else the budget.

    Without either knob the current setting is only ever lowered, to thread_budget(num_workers).
    """
    if requested is None and os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()  # torch read OMP_NUM_THREADS at start-up
    n = requested if requested is not None else min(torch.get_num_threads(), thread_budget(num_workers))
    torch.set_num_threads(n)
    return n


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
