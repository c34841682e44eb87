"""`run_convert`: released region features (four layouts) -> a feature set exactly like extract's.

The job reuses the extract job's machinery: numbered shard plans and "done when _stats.json exists"
(`pipelines.planner`), the atomic shard writer (`pipelines.formats.features`), the Ray actors that take one
shard after another and are replaced when they die (`pipelines.distributor`), `_job.json` pinning
the settings and input (resume, or a clear refusal), and the same `dataset.json`. What differs:
a shard is a `Part` of the source (a byte range of a TSV, a slice of an LMDB's keys, a run of .npz
files) converted by `pipelines.convert_worker`, and `dataset.json` also says where the features came
from and what the source lacked:

    "source": {"format", "paths", "bytes"},
    "class_distributions": bool,   # every ok image has a real cls_prob
    "lacks": ["cls_prob", "objects", "attributes"],   # what the source did not have (zeros stored)
    "recomputed": [...],           # filled by --recompute-classes (detector's given-box mode)
    "detector": Detector.info when recomputing, else null.

Exit codes as extract: 0 every record ok, 3 some records failed, 1 the job could not finish, 2 bad input.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.config import FEATURE_DIMS
from pipelines.extract_job import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    ExtractResult,
    ProgressBar,
    check_job_detector,
    check_machine,
    clear_feature_set,
    dataset_json,
    open_job,
)
from pipelines.feature_formats import FORMATS, FormatError, Part, RecordError, detect_format, get_reader
from pipelines.fileio import atomic_write_json, check_out_dir, make_out_dir, remove_stale_temps
from pipelines.folder_lock import FolderLock, FolderLockedError
from pipelines.formats.features import DATASET_FILE, DTYPES
from pipelines.planner import ShardPlan, read_shard_stats, shard_name, split_done
from pipelines.sources import SourceItem

PROBE_RECORDS = 32  # records tried at planning time to learn the feature size
LACKABLE = ("cls_prob", "objects", "attributes")


@dataclass
class ConvertOptions:
    """Every setting of a convert job (CLI options map one to one)."""

    format: str = "auto"
    shard_size: int = 256
    dtype: str = "float32"  # storage of features.npy / cls_prob.npy; float32 keeps the source's bits
    workers: int | None = None  # default: one per CPU (or one per GPU with --recompute-classes)
    ray_address: str | None = None
    overwrite: bool = False
    recompute_classes: bool = False
    weights: str | None = None  # detector checkpoint for --recompute-classes (None: random, tests only)
    images: str | None = None  # the original images, for --recompute-classes
    device: str = "auto"
    detector_extra: dict = field(default_factory=dict)  # DetectorConfig fields for --recompute-classes
    progress: bool = True
    feature_layer: str = "res5"  # set from the source's feature size by run_convert

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"--format must be auto or one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.recompute_classes and not self.images:
            raise ValueError("--recompute-classes needs --images: the original images the features came from")
        if self.weights is not None and not Path(self.weights).is_file():
            raise ValueError(f"--weights {self.weights}: no such file")

    def detector_config(self) -> dict:
        """The DetectorConfig fields of --recompute-classes (empty otherwise)."""
        return dict(self.detector_extra) if self.recompute_classes else {}

    def output_settings(self) -> dict:
        """Settings that decide the bytes of the output (a resumed job must keep them)."""
        keep = ("format", "shard_size", "dtype", "recompute_classes", "weights", "images")
        return {**{k: getattr(self, k) for k in keep}, "detector": self.detector_config()}


ConvertResult = ExtractResult  # the same outcome: dataset.json content and the CLI's exit code


def run_convert(
    sources: list[str | Path],
    out: str | Path,
    options: ConvertOptions | None = None,
    worker_factory: Callable[[Any], Any] | None = None,
) -> ConvertResult:
    """Convert released features in `sources` into a feature set under `out` (resumable).

    `worker_factory(spec)` (picklable) replaces `spec()` to build each actor's worker (tests slow it
    down or kill it). Raises ValueError / FormatError for bad input, `ExtractJobError` when the job
    cannot finish.
    """
    from pipelines.convert_worker import ConvertSpec
    from pipelines.distributor import ExtractJobError

    opts = options or ConvertOptions()
    opts.validate()
    paths = [str(s) for s in sources]
    fmt = opts.format = detect_format(paths) if opts.format == "auto" else opts.format
    reader = get_reader(fmt)
    try:
        parts = reader.plan(paths, opts.shard_size)
        feature_dim = probe_feature_dim(reader, parts)
    finally:
        reader.close()
    opts.feature_layer = next((layer for layer, d in FEATURE_DIMS.items() if d == feature_dim), "res5")
    plans = [ShardPlan(i, shard_name(i), (part,)) for i, part in enumerate(parts)]
    spec = ConvertSpec(fmt, feature_dim, opts.feature_layer, opts.dtype, _recompute_spec(opts))

    out_dir = check_out_dir(out)
    # --ray-address and --device cuda checked before Ray starts, as extract does (no GPU per worker here)
    check_machine(opts.ray_address, opts.device if opts.recompute_classes else "cpu")
    make_out_dir(out)
    # one job per output folder, as extract: a second one would redo and race on the same shards
    try:
        with FolderLock(out_dir):
            return _convert_locked(paths, fmt, feature_dim, parts, plans, spec, out_dir, opts, worker_factory)
    except FolderLockedError as err:
        raise ExtractJobError(str(err)) from err


def _convert_locked(
    paths: list[str], fmt: str, feature_dim: int, parts: list[Part], plans: list[ShardPlan], spec: Any,
    out_dir: Path, opts: ConvertOptions, worker_factory: Callable[[Any], Any] | None,
) -> ConvertResult:  # fmt: skip
    """The conversion proper, run while this process holds the output folder's lock."""
    from pipelines.distributor import connect_ray, disconnect_ray, plan_workers, run_shards
    from pipelines.worker import ShardSettings

    if opts.overwrite:
        clear_feature_set(out_dir)
    remove_stale_temps(out_dir)  # safe: the lock says no other job writes here
    job = open_job(
        out_dir, paths, [_part_item(p, plan) for p, plan in zip(parts, plans, strict=True)], opts, len(plans)
    )
    done, pending = split_done(out_dir, plans)

    t0 = time.perf_counter()
    t_ready = t0
    report = None
    if pending:
        (out_dir / DATASET_FILE).unlink(missing_ok=True)
        connected = connect_ray(opts.ray_address)
        try:
            import ray

            resources = ray.cluster_resources()
            if opts.recompute_classes:
                worker_plan = plan_workers(resources, opts.workers, None, opts.device)
            else:  # reading and checking records is CPU work: one actor per core
                worker_plan = plan_workers(
                    resources, opts.workers or max(1, int(resources.get("CPU", 1))), 0.0, "cpu"
                )
            factory = functools.partial(worker_factory, spec) if worker_factory else spec

            def on_info(info: dict) -> None:
                nonlocal t_ready
                t_ready = time.perf_counter()
                check_job_detector(out_dir, job, info)

            # TSV ranges hold about shard_size lines each; other parts know their record count
            total = sum(min(p.items[0].end - p.items[0].start, opts.shard_size) for p in pending)
            with ProgressBar(total, opts.progress, "convert") as bar:
                settings = ShardSettings(dtype=opts.dtype, feature_layer=opts.feature_layer)
                report = run_shards(pending, out_dir, factory, settings, worker_plan, bar, on_info)
        finally:
            if connected:
                disconnect_ray()
        remove_stale_temps(out_dir)
    elif "detector" not in job:
        check_job_detector(out_dir, job, {"source_format": fmt, "feature_dim": feature_dim, "detector": None})
    seconds = time.perf_counter() - t0

    all_stats = [read_shard_stats(out_dir, p) for p in plans]
    timing = {"seconds": seconds, "startup_seconds": t_ready - t0 if report else 0.0}
    dataset = dataset_json(out_dir, paths, opts, job, plans, all_stats, report, timing, len(done))
    dataset["settings"].update(images=opts.images, sources=paths)  # `images` means the originals here
    dataset.update(_source_fields(fmt, paths, feature_dim, all_stats, report, job, dataset["counts"]["ok"]))
    dataset["summary"].update(_byte_rates(report, timing))
    atomic_write_json(out_dir / DATASET_FILE, dataset)
    return ConvertResult(out_dir, dataset, EXIT_SOME_FAILED if dataset["counts"]["failed"] else EXIT_OK)


def probe_feature_dim(reader: Any, parts: list[Part]) -> int:
    """The feature size D of the source: that of the first decodable record with boxes."""
    tried, errors = 0, []
    for part in parts:
        for entry in reader.entries(part):
            try:
                record = reader.decode(entry)
            except RecordError as err:
                errors.append(f"{entry.locator}: {err}")
            else:
                if record.num_boxes:
                    return int(record.features.shape[1])
            tried += 1
            if tried >= PROBE_RECORDS:
                break
        if tried >= PROBE_RECORDS:
            break
    detail = f"; first error: {errors[0]}" if errors else ""
    raise FormatError(
        f"{parts[0].path}: none of the first {tried} records could be read as {reader.name}{detail}"
    )


def _recompute_spec(opts: ConvertOptions) -> Any:
    """The RecomputeSpec of --recompute-classes (lists the original images once, here), else None."""
    if not opts.recompute_classes:
        return None
    from pipelines.convert_worker import RecomputeSpec
    from pipelines.sources import list_sources

    items = list_sources(opts.images)
    return RecomputeSpec(
        opts.weights, opts.device, opts.detector_config(), [(i.image_id, i.source) for i in items]
    )


def _part_item(part: Part, plan: ShardPlan) -> SourceItem:
    """A part as an input of `open_job`'s fingerprint: where it is and what its source holds."""
    return SourceItem(part.path, f"{part.path}#{part.start}-{part.end}:{part.fingerprint}", plan.name)


def _source_fields(
    fmt: str, paths: list[str], feature_dim: int, stats: list[dict], report: Any, job: dict, ok: int
) -> dict:
    """The dataset.json fields of a converted set: source, what it lacks, what was recomputed."""
    info = report.detector_info if report else job["detector"]
    have = {name: sum(s.get(f"with_{name}", 0) for s in stats) for name in LACKABLE}
    lacks = [name for name in LACKABLE if have[name] < ok or ok == 0]
    detector = info.get("detector")
    return {
        "feature_dim": feature_dim,
        "detector": detector,
        "source": {
            "format": fmt,
            "paths": [str(Path(p).resolve()) for p in paths],
            "bytes": sum(s.get("source_bytes", 0) for s in stats),
        },
        "class_distributions": "cls_prob" not in lacks,
        "lacks": lacks,
        "recomputed": list(LACKABLE) if detector else [],
    }


def _byte_rates(report: Any, timing: dict[str, float]) -> dict:
    """Source bytes read this run and MB/s (after start-up too)."""
    nbytes = sum(s.get("source_bytes", 0) for s in report.stats) if report else 0
    steady = timing["seconds"] - timing["startup_seconds"]
    return {
        "source_bytes_this_run": nbytes,
        "mb_per_s": round(nbytes / 1e6 / timing["seconds"], 3) if nbytes and timing["seconds"] > 0 else None,
        "mb_per_s_after_startup": round(nbytes / 1e6 / steady, 3) if nbytes and steady > 0 else None,
    }


def lacking_for_task(info: dict, task: str) -> str | None:
    """Why a feature set cannot serve a shard task, or None: MRM pretraining needs class distributions."""
    from pipelines.tasks import data_task

    if not data_task(task).needs_class_distributions or info.get("class_distributions", True):
        return None
    source = info.get("source", {})
    paths = " ".join(source.get("paths", [])) or "SRC"
    return (
        f"this feature set was converted from {source.get('format', 'a released layout')}, which has no class "
        "distributions (cls_prob): pretraining on `captions` shards trains masked region modelling against "
        "them, so it is refused. Add them with the detector's given-box mode on the original images: "
        f"vilbert-data convert {paths} --out NEW_DIR --recompute-classes --weights CKPT --images IMAGES_DIR"
    )


def format_source(dataset: dict) -> str:
    """One terminal line on where a converted set came from and what it lacks."""
    source = dataset.get("source", {})
    lacks = ", ".join(dataset.get("lacks", [])) or "nothing"
    line = f"source: {source.get('format')} ({source.get('bytes', 0) / 1e6:.1f} MB); lacks: {lacks}"
    if dataset.get("recomputed"):
        line += f"; recomputed by the detector: {', '.join(dataset['recomputed'])}"
    rate = dataset.get("summary", {}).get("mb_per_s")
    return line + (f"; {rate} MB/s" if rate else "")
