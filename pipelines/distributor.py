"""Run shards on Ray: long-lived detector actors, one shard per task, dead actors replaced.

- No address and no RAY_ADDRESS: an embedded local Ray instance sized to the machine (all CPUs,
  the GPUs Ray detects, a small object store: shards go straight to disk, not through Ray).
- `--ray-address` / RAY_ADDRESS: join that cluster. The output folder must then be visible to every
  node (a shared filesystem), because workers write their shards themselves.
- GPUs asked for but absent fail fast with a message instead of a stage that waits forever.
- Each actor loads the detector once; the driver hands out shards one at a time. When an actor dies
  (killed, out of memory, segfault) its shard is given to a fresh actor and redone from scratch;
  half-written files of the dead one only ever have temporary names.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from pipelines.planner import ShardPlan
from pipelines.worker import ShardSettings, process_shard

EMBEDDED_OBJECT_STORE_BYTES = 512 * 1024**2


class ExtractJobError(RuntimeError):
    """The job cannot finish (no GPUs, detector does not load, a shard keeps failing)."""


@dataclass(frozen=True)
class WorkerPlan:
    """How many detector actors, and what each one reserves."""

    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    threads: int  # torch intra-op threads per CPU actor
    device: str  # "cuda" or "cpu", what the actor's detector runs on


def connect_ray(address: str | None = None) -> bool:
    """Join `address` / RAY_ADDRESS, or start an embedded local instance.

    Returns True when this call connected, so the caller shuts down (stops the embedded instance, or
    just disconnects from a joined cluster). A Ray already initialised in this process (a test
    fixture, a notebook) is reused as it is and False returned.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    if address:
        try:
            ray.init(address=address, **quiet)
        except Exception as err:
            raise ExtractJobError(f"cannot join the Ray cluster at {address!r}: {err}") from err
        return True
    # A laptop run needs no set-up: Ray 2.60's default token auth would demand a token file.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
        **quiet,
    )
    return True


def plan_workers(
    resources: dict[str, float], workers: int | None, gpus_per_worker: float | None, device: str
) -> WorkerPlan:
    """Decide actor count and reservations from the cluster's resources; fail fast on missing GPUs."""
    total_gpus = float(resources.get("GPU", 0.0))
    total_cpus = float(resources.get("CPU", 1.0))
    if device not in ("auto", "cpu", "cuda"):
        raise ExtractJobError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        if gpus_per_worker:
            raise ExtractJobError("--device cpu contradicts --gpus-per-worker > 0")
        gpus = 0.0
    elif gpus_per_worker is None:
        gpus = 1.0 if (device == "cuda" or total_gpus > 0) else 0.0
    else:
        gpus = float(gpus_per_worker)
    if device == "cuda" and gpus == 0:
        raise ExtractJobError("--device cuda needs --gpus-per-worker > 0 (Ray hands GPUs to actors)")
    if gpus < 0 or (workers is not None and workers < 1):
        raise ExtractJobError(f"--workers must be >= 1 and --gpus-per-worker >= 0, got {workers}, {gpus}")
    if gpus > 0:
        if total_gpus < gpus:
            raise ExtractJobError(
                f"asked for {gpus:g} GPU(s) per worker but the Ray cluster has {total_gpus:g} GPUs; "
                "use --device cpu, or join a cluster with GPUs with --ray-address"
            )
        n = workers or max(1, math.floor(total_gpus / gpus))
        if n * gpus > total_gpus:
            raise ExtractJobError(
                f"{n} workers x {gpus:g} GPUs = {n * gpus:g} GPUs, but the cluster has {total_gpus:g}; "
                "lower --workers or --gpus-per-worker"
            )
        return WorkerPlan(n, gpus, 1.0 if total_cpus >= n else total_cpus / n, 1, "cuda")
    n = workers or 1
    share = total_cpus / n
    cpus = math.floor(share) if share >= 1 else share
    return WorkerPlan(n, 0.0, cpus, max(1, math.floor(share)), "cpu")


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Images done per shard, reported by workers; a redone shard's counts replace the old ones."""

    def __init__(self) -> None:
        self.by_shard: dict[int, tuple[int, int, int]] = {}

    def update(self, shard: int, attempt: int, ok: int, failed: int) -> None:
        """Record cumulative counts of one attempt at a shard (older attempts are ignored)."""
        if shard not in self.by_shard or attempt >= self.by_shard[shard][0]:
            self.by_shard[shard] = (attempt, ok, failed)

    def totals(self) -> tuple[int, int]:
        """(images ok, images failed) over all shards."""
        return sum(v[1] for v in self.by_shard.values()), sum(v[2] for v in self.by_shard.values())


class ShardActor:
    """A detector loaded once, then used for one shard after another."""

    def __init__(self, factory: Callable[[], Any], out_dir: str, settings: ShardSettings, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.detector = factory()
        self.out_dir = out_dir
        self.settings = settings

    def info(self) -> dict:
        """The detector's `info` (checkpoint, sha256, settings); also proves the actor is up."""
        return dict(self.detector.info)

    def run(self, plan: ShardPlan, attempt: int, progress: Any) -> dict:
        """Process one shard and return its stats."""

        def report(ok: int, failed: int) -> None:
            progress.update.remote(plan.index, attempt, ok, failed)

        if hasattr(self.detector, "write_shard"):  # a convert job's worker: it writes the shard itself
            return self.detector.write_shard(plan, self.out_dir, report)
        return process_shard(plan, self.detector, self.out_dir, self.settings, report)


@dataclass
class RunReport:
    """What `run_shards` did: stats of the shards it wrote, detector info, actors replaced."""

    stats: list[dict]
    detector_info: dict
    actors_replaced: int
    shard_retries: int


def run_shards(
    plans: list[ShardPlan],
    out_dir: str | Path,
    factory: Callable[[], Any],
    settings: ShardSettings,
    worker_plan: WorkerPlan,
    on_progress: Callable[[int, int], None] | None = None,
    on_info: Callable[[dict], None] | None = None,
    max_attempts: int = 3,
) -> RunReport:
    """Process `plans` on a pool of detector actors; returns once every shard is written."""
    actor_cls = ray.remote(ShardActor).options(
        num_cpus=worker_plan.cpus_per_worker, num_gpus=worker_plan.gpus_per_worker, max_restarts=0
    )
    out = str(Path(out_dir).resolve())

    actors: list[Any] = []  # every actor started, so that all are stopped at the end

    def new_actor() -> Any:
        actors.append(actor_cls.remote(factory, out, settings, worker_plan.threads))
        return actors[-1]

    progress = ProgressCounter.remote()
    for _ in range(min(worker_plan.workers, len(plans))):
        new_actor()
    try:
        try:
            infos = ray.get([a.info.remote() for a in actors])
        except ray.exceptions.RayError as err:
            raise ExtractJobError(f"the detector workers could not start: {_cause(err)}") from err
        if on_info:
            on_info(infos[0])

        queue = deque(plans)
        attempts = dict.fromkeys((p.index for p in plans), 0)
        idle = list(actors)
        running: dict[Any, tuple[Any, ShardPlan]] = {}
        stats: list[dict] = []
        replaced = retries = 0
        while queue or running:
            while queue and idle:
                plan, actor = queue.popleft(), idle.pop()
                attempts[plan.index] += 1
                running[actor.run.remote(plan, attempts[plan.index], progress)] = (actor, plan)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                actor, plan = running.pop(ref)
                try:
                    stats.append(ray.get(ref))
                    idle.append(actor)
                    continue
                except ray.exceptions.RayActorError as err:
                    # The process is gone (killed, OOM, segfault): a fresh actor takes its place.
                    replaced += 1
                    ray.kill(actor)
                    idle.append(new_actor())
                    error = err
                except ray.exceptions.RayTaskError as err:
                    idle.append(actor)
                    error = err
                if attempts[plan.index] >= max_attempts:
                    raise ExtractJobError(
                        f"shard {plan.name} failed {attempts[plan.index]} times; last error: {_cause(error)}"
                    ) from error
                retries += 1
                queue.appendleft(plan)
            if on_progress:
                on_progress(*ray.get(progress.totals.remote()))
        return RunReport(stats, infos[0], replaced, retries)
    finally:
        for a in actors:
            ray.kill(a)
        ray.kill(progress)


def _cause(err: BaseException) -> str:
    """The last lines of a Ray error (where the original exception is), joined on one line."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return " | ".join(lines[-3:]) if lines else type(err).__name__
