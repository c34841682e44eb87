"""`run_extract`: images -> WebDataset feature shards + `dataset.json` (the `vilbert-data extract` job).

The job lists and sorts the inputs, plans numbered shards, skips the shards a previous run finished
(resume), runs the rest on Ray detector actors, then writes `dataset.json` with the detector info,
settings, counts and a summary. `OUT/_job.json` pins the settings and the input list of a job so that
a rerun into the same folder continues the same job, or stops with a clear message.

Exit codes used by the CLI: 0 every image ok; 3 the job finished but some images failed (see the
parquet index / `vilbert-data inspect`); 1 the job could not finish; 2 bad arguments, input source,
--out or --ray-address, or a device this machine lacks (all found before Ray starts).

One job at a time writes into a folder: `OUT/_lock.json` (pipelines.folder_lock) is held from the
first file written to the last.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from extract.config import AUTOCAST_DTYPES, FEATURE_DIMS, DetectorConfig
from pipelines.fileio import (
    DiskFullError,
    atomic_write_json,
    check_out_dir,
    disk_full_error,
    is_disk_full,
    make_out_dir,
    remove_stale_temps,
)
from pipelines.folder_lock import FolderLock, FolderLockedError
from pipelines.formats.features import (
    DATASET_FILE,
    DTYPES,
    FEATURES_FORMAT,
    FEATURES_VERSION,
    SHARD_PREFIX,
    STATS_SUFFIX,
)
from pipelines.planner import inputs_fingerprint, plan_shards, read_shard_stats, split_done
from pipelines.sources import list_sources

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_SOME_FAILED = 3

JOB_FILE = "_job.json"
GPU_BATCH_SIZE = 4  # default --batch-size on GPUs; on CPUs batching gains nothing, so 1


@dataclass
class ExtractOptions:
    """Every setting of an extraction job (CLI options map one to one; --precision sets `autocast`, fp32 = None)."""

    weights: str | None = None  # detector checkpoint; None = random weights (previews and tests only)
    feature_layer: str = DetectorConfig.feature_layer
    min_boxes: int = DetectorConfig.min_boxes
    max_boxes: int = DetectorConfig.max_boxes
    conf_thresh: float = DetectorConfig.conf_thresh
    min_size: int = DetectorConfig.min_size
    max_size: int = DetectorConfig.max_size
    dtype: str = "float16"  # storage dtype of features.npy and cls_prob.npy
    batch_size: int | None = None  # images of one input size per forward pass; None: 1 on CPUs, 4 on GPUs
    workers: int | None = None  # default: one per GPU, or one CPU worker using every core
    gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs (and device != cpu)
    device: str = "auto"
    shard_size: int = 256
    ray_address: str | None = None
    overwrite: bool = False
    limit: int | None = None
    depth: int = DetectorConfig.depth  # ResNet depth; 50 with random weights is a fast preview
    max_proposals: int | None = None  # RPN proposals kept after NMS (default post_nms_topk); fewer = faster
    autocast: str | None = DetectorConfig.autocast  # --precision bf16 / fp16: mixed precision inside the detector
    progress: bool = True
    detector_extra: dict = field(default_factory=dict)  # further DetectorConfig fields, verbatim

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        if self.feature_layer not in FEATURE_DIMS:
            raise ValueError(f"--feature-layer must be res4 or res5, got {self.feature_layer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ValueError(f"need 1 <= --min-boxes <= --max-boxes, got {self.min_boxes}, {self.max_boxes}")
        if not 0.0 <= self.conf_thresh <= 1.0:
            raise ValueError(f"--conf-thresh must be in [0, 1], got {self.conf_thresh}")
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(f"need 1 <= --min-size <= --max-size, got {self.min_size}, {self.max_size}")
        if (self.batch_size is not None and self.batch_size < 1) or self.shard_size < 1:
            raise ValueError(
                f"--batch-size and --shard-size must be >= 1, got {self.batch_size}, {self.shard_size}"
            )
        from pipelines.distributor import check_worker_request

        check_worker_request(self.workers, self.gpus_per_worker, self.device)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {self.autocast!r}")
        if self.weights is not None and "://" not in self.weights and not Path(self.weights).is_file():
            raise ValueError(f"--weights {self.weights}: no such file")
        if self.max_proposals is not None and self.max_proposals < 1:
            raise ValueError(f"--max-proposals must be >= 1, got {self.max_proposals}")
        # The detector's own checks (depth, extra fields) run here too, so that a bad setting is a
        # bad argument (exit 2) now, not a detector that fails to load in every Ray actor (exit 1).
        try:
            DetectorConfig(**{**self.detector_config(), "feature_layer": self.feature_layer})
        except TypeError as exc:  # an unknown field in detector_extra
            raise ValueError(f"detector settings: {exc}") from exc

    def detector_config(self) -> dict:
        """The DetectorConfig fields these options set."""
        config: dict[str, Any] = {
            "depth": self.depth,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "conf_thresh": self.conf_thresh,
            "min_boxes": self.min_boxes,
            "max_boxes": self.max_boxes,
        }
        if self.max_proposals is not None:
            # Keep the pre-NMS pool proportional so that a small preview stays fast end to end.
            config["post_nms_topk"] = self.max_proposals
            config["pre_nms_topk"] = min(DetectorConfig.pre_nms_topk, 20 * self.max_proposals)
        if self.autocast is not None:
            config["autocast"] = self.autocast
        config.update(self.detector_extra)
        return config

    def output_settings(self) -> dict:
        """Settings that decide the bytes of the output (a resumed job must keep them)."""
        keep = ("weights", "feature_layer", "dtype", "batch_size", "shard_size")
        return {**{k: getattr(self, k) for k in keep}, "detector": self.detector_config()}


@dataclass
class ExtractResult:
    """Outcome of a finished job: `dataset.json` content and the exit code the CLI returns."""

    out: Path
    dataset: dict
    exit_code: int

    @property
    def summary(self) -> dict:
        """The job summary (also in dataset.json)."""
        return self.dataset["summary"]


def run_extract(
    images: str | Path,
    out: str | Path,
    options: ExtractOptions | None = None,
    detector_factory: Callable[[], Any] | None = None,
) -> ExtractResult:
    """Extract region features of every image in `images` into WebDataset shards under `out`.

    `detector_factory` (a picklable zero-argument callable returning an object with `detect(images)`
    and `info`) replaces the default `extract.Detector` recipe built from `options`.
    Raises ValueError / SourceError for bad arguments, inputs or machine (all checked before Ray
    starts) and `ExtractJobError` when the job cannot finish (another job holds OUT, the disk is full, ...).
    """
    from pipelines.distributor import ExtractJobError

    opts = options or ExtractOptions()
    opts.validate()
    out_dir = check_out_dir(out)
    items = list_sources(images, opts.limit)
    check_machine(opts.ray_address, opts.device, opts.gpus_per_worker)
    make_out_dir(out)
    plans = plan_shards(items, opts.shard_size)
    try:
        with FolderLock(out_dir):
            return _run_locked(images, out_dir, items, plans, opts, detector_factory)
    except FolderLockedError as err:
        raise ExtractJobError(str(err)) from err
    except (DiskFullError, OSError) as err:
        if not isinstance(err, DiskFullError):
            if not is_disk_full(err):
                raise
            err = disk_full_error(out_dir, "the job's files")
        raise ExtractJobError(f"{err}; {_space_advice(out_dir, plans)}") from err


def check_machine(ray_address: str | None, device: str, gpus_per_worker: float | None = None) -> None:
    """Checks of this machine and of --ray-address, before Ray starts: raise ValueError naming the option."""
    address = ray_address or os.environ.get("RAY_ADDRESS")
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return  # a Ray this process already joined: its resources are checked once the job plans workers
    if address:
        from pipelines.distributor import check_ray_address

        check_ray_address(address)
        return  # the GPUs are the cluster's, not this machine's
    if device == "cuda" or (gpus_per_worker or 0) > 0:
        import torch

        if not torch.cuda.is_available():
            option = "--device cuda" if device == "cuda" else f"--gpus-per-worker {gpus_per_worker:g}"
            raise ValueError(
                f"{option}: this machine has no CUDA device that torch can use; use --device cpu (or auto), "
                "or --ray-address to join a cluster with GPUs"
            )


def _space_advice(out_dir: Path, plans: list) -> str:
    """What a rerun after a full disk needs: the space for the images left, estimated from finished shards."""
    done = [read_shard_stats(out_dir, p) for p in split_done(out_dir, plans)[0]]
    written = sum(s["count"] for s in done)
    left = sum(len(p.items) for p in plans) - written
    advice = "finished shards are kept; free some space and rerun the same command"
    if written and left:
        per_image = sum(s["tar_bytes"] for s in done) / written
        advice = (
            f"about {left * per_image / 1e6:.1f} MB more are needed for the {left} images left "
            f"({per_image / 1e3:.0f} KB per image so far); " + advice
        )
    return advice


def _run_locked(
    images: str | Path,
    out_dir: Path,
    items: list,
    plans: list,
    opts: ExtractOptions,
    detector_factory: Callable[[], Any] | None,
) -> ExtractResult:
    """The job proper, run while this process holds the output folder's lock."""
    from pipelines.distributor import ExtractJobError, connect_ray, disconnect_ray, plan_workers, run_shards
    from pipelines.worker import DetectorSpec, ShardSettings

    if opts.overwrite:
        clear_feature_set(out_dir)
    remove_stale_temps(out_dir)  # safe: the lock says no other job writes here
    job = open_job(out_dir, images, items, opts, len(plans))
    done, pending = split_done(out_dir, plans)

    t0 = time.perf_counter()
    t_ready = t0  # when the detector actors were up: what comes after is the steady extraction rate
    report = None
    if pending:
        (out_dir / DATASET_FILE).unlink(missing_ok=True)  # dataset.json means "complete"; not until the end
        connected = connect_ray(opts.ray_address)
        try:
            import ray

            worker_plan = plan_workers(
                ray.cluster_resources(), opts.workers, opts.gpus_per_worker, opts.device
            )
            batch_size = opts.batch_size or (GPU_BATCH_SIZE if worker_plan.device == "cuda" else 1)
            settings = ShardSettings(
                batch_size=batch_size, dtype=opts.dtype, feature_layer=opts.feature_layer
            )
            factory = detector_factory or DetectorSpec(
                opts.weights,
                worker_plan.device,
                opts.feature_layer,
                {**opts.detector_config(), "batch_size": batch_size},
            )

            def on_info(info: dict) -> None:
                nonlocal t_ready
                t_ready = time.perf_counter()
                check_job_detector(out_dir, job, info)
                if info.get("random_weights"):
                    from tqdm.auto import tqdm

                    tqdm.write(
                        "WARNING: the detector has RANDOM weights (no --weights): the features are meaningless."
                    )

            with ProgressBar(sum(len(p.items) for p in pending), opts.progress) as bar:
                report = run_shards(pending, out_dir, factory, settings, worker_plan, bar, on_info)
        finally:
            if connected:
                disconnect_ray()
            remove_stale_temps(out_dir)  # left by actors that died mid-shard; every actor is stopped now
    elif "detector" not in job:
        raise ExtractJobError(f"{out_dir / JOB_FILE} lacks the detector info; rerun with --overwrite")
    seconds = time.perf_counter() - t0

    all_stats = [read_shard_stats(out_dir, p) for p in plans]
    timing = {"seconds": seconds, "startup_seconds": t_ready - t0 if report else 0.0}
    dataset = dataset_json(out_dir, images, opts, job, plans, all_stats, report, timing, len(done))
    atomic_write_json(out_dir / DATASET_FILE, dataset)
    failed = dataset["counts"]["failed"]
    return ExtractResult(out_dir, dataset, EXIT_SOME_FAILED if failed else EXIT_OK)


def clear_feature_set(out_dir: Path) -> None:
    """Delete the files a previous job wrote in `out_dir` (and nothing else)."""
    for p in out_dir.glob(f"{SHARD_PREFIX}*"):
        if p.suffix in (".tar", ".parquet", ".json") and p.is_file():
            p.unlink()
    for name in (JOB_FILE, DATASET_FILE):
        (out_dir / name).unlink(missing_ok=True)


def open_job(out_dir: Path, images: str | Path, items: list, opts: ExtractOptions, num_shards: int) -> dict:
    """Create `_job.json`, or check that the existing one describes this same job."""
    from pipelines.distributor import ExtractJobError

    job = {
        "images": str(images),
        "inputs_sha256": inputs_fingerprint(items),
        "num_inputs": len(items),
        "num_shards": num_shards,
        "settings": json.loads(json.dumps(opts.output_settings())),
    }
    path = out_dir / JOB_FILE
    if path.exists():
        old = json.loads(path.read_text())
        # A job that finished no shard yet may change its settings and simply start afresh.
        if any(out_dir.glob(f"{SHARD_PREFIX}*{STATS_SUFFIX}")):
            for key, what in (("settings", "settings"), ("inputs_sha256", "input list")):
                if old.get(key) != job[key]:
                    raise ExtractJobError(
                        f"{out_dir} holds a job with another {what} ({_diff(old.get(key), job[key])}); "
                        "use --overwrite to start again, or another --out"
                    )
            return old
        clear_feature_set(out_dir)  # only unfinished leftovers of the old job
    elif any(out_dir.glob(f"{SHARD_PREFIX}*.tar")):
        raise ExtractJobError(f"{out_dir} already holds feature shards of an unknown job; use --overwrite")
    atomic_write_json(path, job)
    return job


def check_job_detector(out_dir: Path, job: dict, info: dict) -> None:
    """Pin the detector of a job; a resumed job must use the same checkpoint bytes."""
    from pipelines.distributor import ExtractJobError

    if "detector" in job and job["detector"].get("sha256") != info.get("sha256"):
        raise ExtractJobError(
            f"{out_dir} was started with detector sha256 {job['detector'].get('sha256')}, now {info.get('sha256')}; "
            "use --overwrite"
        )
    job["detector"] = json.loads(json.dumps(info, default=str))
    atomic_write_json(out_dir / JOB_FILE, job)


def _diff(old: Any, new: Any) -> str:
    """A short description of what differs between two settings dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4])
    return "changed"


class ProgressBar:
    """A tqdm bar fed with cumulative (ok, failed) counts; a no-op when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str = "extract"):
        from pipelines.progress import progress_bar

        self.bar = progress_bar(total, desc, "img", enabled, dynamic_ncols=True)
        self.failed = -1

    def __call__(self, ok: int, failed: int) -> None:
        if ok + failed != self.bar.n:  # an unchanged bar is not redrawn (quiet logs)
            self.bar.update(ok + failed - self.bar.n)
        if failed != self.failed:
            self.failed = failed
            self.bar.set_postfix(failed=failed, refresh=False)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def boxes_histogram(out_dir: str | Path, shard_names: list[str]) -> dict[int, int]:
    """{K: number of ok images with K boxes} over the given shards' parquet indexes."""
    import pyarrow.parquet as pq

    hist: Counter = Counter()
    for name in shard_names:
        table = pq.read_table(Path(out_dir) / f"{name}.parquet", columns=["status", "num_boxes"])
        for status, k in zip(
            table.column("status").to_pylist(), table.column("num_boxes").to_pylist(), strict=True
        ):
            if status == "ok":
                hist[int(k)] += 1
    return dict(sorted(hist.items()))


def dataset_json(
    out_dir: Path,
    images: str | Path,
    opts: ExtractOptions,
    job: dict,
    plans: list,
    stats: list[dict],
    report: Any,
    timing: dict[str, float],
    resumed: int,
) -> dict:
    """Assemble dataset.json (contract section 2)."""
    reasons: Counter = Counter()
    for s in stats:
        reasons.update(s["failed_by_reason"])
    ok = sum(s["ok"] for s in stats)
    failed = sum(s["failed"] for s in stats)
    hist = boxes_histogram(out_dir, [p.name for p in plans])
    processed = sum(s["count"] for s in report.stats) if report else 0
    total_boxes = sum(k * n for k, n in hist.items())
    info = report.detector_info if report else job["detector"]
    summary = {
        "images": ok + failed,
        "ok": ok,
        "failed": failed,
        "failed_by_reason": dict(sorted(reasons.items())),
        "boxes_per_image": {
            "mean": round(total_boxes / ok, 3) if ok else 0.0,
            "min": min(hist) if hist else 0,
            "max": max(hist) if hist else 0,
            "histogram": {str(k): n for k, n in hist.items()},
        },
        "shards": len(plans),
        "shards_resumed": resumed,
        "images_this_run": processed,
        "seconds": round(timing["seconds"], 3),
        "startup_seconds": round(timing["startup_seconds"], 3),
        "images_per_s": _rate(processed, timing["seconds"]),
        "images_per_s_after_startup": _rate(processed, timing["seconds"] - timing["startup_seconds"]),
        "actors_replaced": report.actors_replaced if report else 0,
        "shard_retries": report.shard_retries if report else 0,
    }
    return {
        "format": FEATURES_FORMAT,
        "version": FEATURES_VERSION,
        "feature_layer": opts.feature_layer,
        "feature_dim": int(info.get("feature_dim", FEATURE_DIMS[opts.feature_layer])),
        "dtype": opts.dtype,
        "detector": json.loads(json.dumps(info, default=str)),
        "settings": {**asdict(opts), "images": str(images), "detector_config": opts.detector_config()},
        "counts": {
            "images": ok + failed,
            "ok": ok,
            "failed": failed,
            "failed_by_reason": summary["failed_by_reason"],
        },
        "summary": summary,
        "shards": [p.tar_name for p in plans],
    }


def _rate(n: int, seconds: float) -> float | None:
    """Images per second, None when nothing was processed."""
    return round(n / seconds, 3) if n and seconds > 0 else None


def format_summary(dataset: dict) -> str:
    """A few terminal lines summarising a finished job."""
    s = dataset["summary"]
    b = s["boxes_per_image"]
    lines = [
        f"images: {s['images']}  ok: {s['ok']}  failed: {s['failed']}  shards: {s['shards']}"
        f" (resumed {s['shards_resumed']})",
        f"boxes per image: mean {b['mean']}  min {b['min']}  max {b['max']}",
    ]
    if s["failed_by_reason"]:
        lines.append("failed by reason: " + ", ".join(f"{r}={n}" for r, n in s["failed_by_reason"].items()))
    if s["images_per_s"] is not None:
        lines.append(
            f"speed: {s['images_per_s']} images/s ({s['images_this_run']} images in {s['seconds']} s; "
            f"{s['images_per_s_after_startup']} images/s after {s['startup_seconds']} s of start-up)"
        )
    if s["actors_replaced"]:
        lines.append(f"workers replaced after dying: {s['actors_replaced']}")
    return "\n".join(lines)
