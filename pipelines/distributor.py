"""Run shards on Ray: long-lived detector actors, one shard per task, dead actors replaced.

- No address and no RAY_ADDRESS: an embedded local Ray instance sized to the machine (all CPUs,
  the GPUs Ray detects, a small object store: shards go straight to disk, not through Ray), watched
  by `pipelines.ray_reaper` so that a killed driver leaves no Ray process behind.
- `--ray-address` / RAY_ADDRESS: join that cluster, after `check_ray_address` has seen it answer
  (Ray itself would retry an unreachable address for minutes). The output folder must then be
  visible to every node (a shared filesystem), because workers write their shards themselves.
- GPUs asked for but absent fail fast with a message instead of a stage that waits forever.
- Each actor loads the detector once; the driver hands out shards one at a time. When an actor dies
  (killed, out of memory, segfault) its shard is given to a fresh actor and redone from scratch;
  half-written files of the dead one only ever have temporary names.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from pipelines.fileio import DiskFullError
from pipelines.planner import ShardPlan
from pipelines.ray_reaper import Reaper, children, start_reaper
from pipelines.worker import ShardSettings, process_shard

EMBEDDED_OBJECT_STORE_BYTES = 512 * 1024**2
PROBE_TIMEOUT_S = 4.0  # per step of check_ray_address (TCP connect, then the gRPC greeting)
# The client preface of HTTP/2 and an empty SETTINGS frame: a gRPC server (Ray's GCS, the Ray Client
# server) answers with a SETTINGS frame of its own; anything else is not a Ray port.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4

_AUTH_HINT = (
    "If the cluster uses token authentication, this process needs RAY_AUTH_MODE=token and the "
    "cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
)

_reaper: Reaper | None = None  # the watchdog of the embedded instance this process started


class ExtractJobError(RuntimeError):
    """The job cannot finish (no GPUs, detector does not load, a shard keeps failing)."""


class RayAddressError(ValueError):
    """`--ray-address` is malformed or nothing Ray-like answers there."""


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

    Returns True when this call connected, so the caller calls `disconnect_ray` (stops the embedded
    instance, or just disconnects from a joined cluster). A Ray already initialised in this process
    (a test fixture, a notebook) is reused as it is and False returned.
    """
    global _reaper
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    if address:
        try:
            ray.init(address=address, **quiet)
        except Exception as err:
            raise ExtractJobError(f"cannot join the Ray cluster at {address!r}: {err}. {_AUTH_HINT}") from err
        return True
    # A laptop run needs no set-up: Ray 2.60's default token auth would demand a token file.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    before = children(os.getpid()) if _can_reap() else set()
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
        **quiet,
    )
    if _can_reap():  # every process ray.init started is a child of this one
        _reaper = start_reaper(children(os.getpid()) - before)
    return True


def disconnect_ray() -> None:
    """Shut down what `connect_ray` started (and dismiss its watchdog), or leave a joined cluster."""
    global _reaper
    ray.shutdown()
    if _reaper is not None:
        _reaper.stop()
        _reaper = None


def _can_reap() -> bool:
    """The watchdog reads /proc: Linux only."""
    return os.path.isdir("/proc/self")


def ray_address_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) that `address` names; None for 'local'; RayAddressError when it is malformed.

    'auto' is resolved as Ray resolves it (the cluster this machine last started with `ray start`).
    """
    text = address.strip()
    if text == "local":
        return None
    if text == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            text = canonicalize_bootstrap_address("auto") or ""
        except ConnectionError as err:
            raise RayAddressError(
                "--ray-address auto: no running Ray cluster was found on this machine; start one with "
                "`ray start --head`, give its address, or omit --ray-address for an embedded Ray"
            ) from err
    text = text.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayAddressError(
            f"--ray-address {address!r}: expected HOST:PORT of the head node (e.g. 10.0.0.5:6379), "
            "ray://HOST:10001 or auto"
        )
    return host.strip("[]"), int(port)


def check_ray_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail within about 2 x `timeout` s, naming the address, when no Ray head answers at `address`."""
    endpoint = ray_address_endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    advice = (
        "check the address (`ray status` on the head node prints it; the default port is 6379, and "
        "10001 for ray://), that the head node runs (`ray start --head`) and that the port is open "
        "from here; or omit --ray-address for an embedded local Ray"
    )
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS port does not answer a plain HTTP/2 greeting
            sock.settimeout(timeout)
            sock.sendall(_H2_PREFACE)
            reply = sock.recv(9)
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise RayAddressError(
            f"--ray-address {address!r}: cannot reach {host}:{port} ({reason}); {advice}"
        ) from err
    if len(reply) < 4 or reply[3] != _H2_SETTINGS:
        raise RayAddressError(
            f"--ray-address {address!r}: {host}:{port} answers, but not as a Ray head node (no gRPC); {advice}"
        )


def plan_workers(
    resources: dict[str, float], workers: int | None, gpus_per_worker: float | None, device: str
) -> WorkerPlan:
    """Decide actor count and reservations from the cluster's resources; fail fast on missing GPUs."""
    total_gpus = float(resources.get("GPU", 0.0))
    total_cpus = float(resources.get("CPU", 1.0))
    try:
        check_worker_request(workers, gpus_per_worker, device)
    except ValueError as err:
        raise ExtractJobError(str(err)) from err
    if device == "cpu":
        gpus = 0.0
    elif gpus_per_worker is None:
        gpus = 1.0 if (device == "cuda" or total_gpus > 0) else 0.0
    else:
        gpus = float(gpus_per_worker)
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


def check_worker_request(workers: int | None, gpus_per_worker: float | None, device: str) -> None:
    """Raise ValueError naming the option when --device, --workers, --gpus-per-worker contradict."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker:g}")
    if device == "cpu" and gpus_per_worker:
        raise ValueError("--device cpu contradicts --gpus-per-worker > 0")
    if device == "cuda" and gpus_per_worker == 0:
        raise ValueError("--device cuda needs --gpus-per-worker > 0 (Ray hands GPUs to actors)")


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
                    if isinstance(getattr(err, "cause", None), DiskFullError):
                        raise err.cause from None  # every other shard would fail alike: stop now
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
