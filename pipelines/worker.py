"""Process one shard end to end: read and decode row by row, detect in same-size batches, write the shard.

Decoding runs in a background thread a few images ahead of the detector, so reading and decoding
overlap with inference. A file that cannot be read or decoded, or an image on which the detector
fails, becomes a failed row with a reason; the shard goes on.

Failure reasons: the `ImageDecodeError.reason` values of `extract.load_image` (`empty`,
`truncated`, `not_an_image`, `unsupported`, `too_large`, `corrupt`), plus `read_error` (the file
could not be read) and `detect_error` (the detector raised on this image alone).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.fileio import disk_full_error, is_disk_full
from pipelines.formats.features import FeatureShardWriter, encode_detections
from pipelines.planner import ShardPlan
from pipelines.sources import SourceItem, is_url

ProgressFn = Callable[[int, int], None]  # (images ok so far, images failed so far) within the shard


@dataclass
class Decoded:
    """One input after reading and decoding: an RGB PIL image, or the reason it has none."""

    item: SourceItem
    image: Any | None
    nbytes: int
    reason: str | None = None
    error: str | None = None


@dataclass
class ShardSettings:
    """What a worker needs besides the detector: batching, output dtype, feature layer name."""

    batch_size: int = 1
    dtype: str = "float16"
    feature_layer: str = "res4"
    prefetch: int | None = None  # decoded images kept ahead of the detector; default 2 batches
    bucket_window: int | None = None  # longest wait of an image for same-size batch-mates; default 4 batches


@dataclass
class DetectorSpec:
    """A picklable recipe for `extract.Detector`; calling it loads the detector (once per actor)."""

    weights: str | None = None
    device: str = "auto"
    feature_layer: str = "res4"
    config: dict = field(default_factory=dict)  # DetectorConfig fields

    def __call__(self) -> Any:
        """Load the detector described by this spec."""
        from extract import Detector, DetectorConfig

        config = DetectorConfig(**{**self.config, "feature_layer": self.feature_layer})
        return Detector.from_checkpoint(
            self.weights, device=self.device, feature_layer=self.feature_layer, config=config
        )


def read_source(source: str) -> bytes:
    """The raw bytes of a local path or fsspec URL."""
    if is_url(source):
        import fsspec

        with fsspec.open(source, "rb") as f:
            return f.read()
    return Path(source).read_bytes()


def _read_error_text(source: str, err: Exception) -> str:
    """The error of an unreadable input, saying so when it is a dangling or looping symlink."""
    text = f"{type(err).__name__}: {err}"
    if not is_url(source) and os.path.islink(source):
        if getattr(err, "errno", None) == errno.ELOOP:
            return f"symlink loop: {text}"
        if isinstance(err, FileNotFoundError):
            return f"dangling symlink (its target {os.readlink(source)} does not exist): {text}"
    return text


def decode_item(item: SourceItem) -> Decoded:
    """Read and decode one input; never raises for a bad file (the failure becomes the result)."""
    from extract import ImageDecodeError, load_image

    try:
        data = read_source(item.source)
    except Exception as err:  # missing file, permission, network: a failed row, not a failed job
        return Decoded(item, None, 0, "read_error", _read_error_text(item.source, err))
    try:
        image = load_image(data)
    except ImageDecodeError as err:
        return Decoded(item, None, len(data), err.reason, str(err))
    except Exception as err:  # a decoder bug must not stop the shard either
        return Decoded(item, None, len(data), "corrupt", f"{type(err).__name__}: {err}")
    return Decoded(item, image, len(data))


def iter_decoded(items: Iterable[SourceItem], prefetch: int = 8) -> Iterator[Decoded]:
    """Decode `items` in a background thread, keeping up to `prefetch` results ready, in order."""
    items = list(items)
    prefetch = max(1, prefetch)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = [pool.submit(decode_item, it) for it in items[:prefetch]]
        next_i = len(pending)
        for k in range(len(items)):
            result = pending[k].result()
            pending[k] = None  # free the image once handed out
            if next_i < len(items):
                pending.append(pool.submit(decode_item, items[next_i]))
                next_i += 1
            yield result


def _index_row(d: Decoded, det: Any | None = None) -> dict:
    """Index row of one input: ok with its detections, or failed (no `det`) with `d.reason`."""
    if det is not None:
        k, (w, h) = int(det.boxes.shape[0]), (int(det.image_w), int(det.image_h))
    else:  # a detect_error image was decoded, so its size is known
        k, (w, h) = 0, (d.image.size if d.image is not None else (None, None))
    return {
        "image_id": d.item.image_id,
        "source": d.item.source,
        "status": "failed" if det is None else "ok",
        "error": d.error,
        "reason": d.reason,
        "num_boxes": k,
        "width": w,
        "height": h,
        "bytes": d.nbytes,
    }


def _detect_batch(detector: Any, batch: list[Decoded]) -> list[Any | None]:
    """Detections for a batch; if the batch fails, retry image by image to isolate the bad one."""
    try:
        return list(detector.detect([d.image for d in batch]))
    except Exception as err:
        if len(batch) == 1:
            batch[0].reason, batch[0].error = "detect_error", f"{type(err).__name__}: {err}"
            return [None]
    return [_detect_batch(detector, [d])[0] for d in batch]


def process_shard(
    plan: ShardPlan,
    detector: Any,
    out_dir: str | Path,
    settings: ShardSettings,
    on_progress: ProgressFn | None = None,
) -> dict:
    """Run one shard: decode, detect in batches of one input size, write tar/parquet/stats in input order.

    Decoded images wait in buckets keyed by `detector.input_size(image)` (one bucket when the detector
    has no such method) until a bucket holds `settings.batch_size` images, its oldest image is
    `settings.bucket_window` inputs behind the newest, or the shard ends; so batches need no padding
    and an image's features do not depend on the batching. Samples are written in input order.

    A full disk raises `DiskFullError` (one line: folder, free space); nothing of the shard is left
    under a final name that a rerun would take for finished.
    """
    try:
        return _process_shard(plan, detector, out_dir, settings, on_progress)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(out_dir, f"shard {plan.name}") from err
        raise


def _process_shard(
    plan: ShardPlan,
    detector: Any,
    out_dir: str | Path,
    settings: ShardSettings,
    on_progress: ProgressFn | None,
) -> dict:
    """`process_shard` without the disk-full translation."""
    t0 = time.perf_counter()
    rows: list[dict] = []
    n_ok = n_failed = 0
    detect_s = 0.0
    prefetch = settings.prefetch or 2 * settings.batch_size
    window = settings.bucket_window or 4 * settings.batch_size
    input_size = getattr(detector, "input_size", None)
    waiting: dict[Any, list[tuple[int, Decoded]]] = {}  # bucket key -> (position, input), oldest first
    results: dict[int, tuple[Decoded, Any | None]] = {}  # determined but not yet written, by position
    written = 0

    with FeatureShardWriter(out_dir, plan.name) as writer:

        def record(position: int, d: Decoded, det: Any | None) -> None:
            nonlocal n_ok, n_failed
            results[position] = (d, det)
            if det is None:
                n_failed += 1
            else:
                n_ok += 1

        def write_ready() -> None:
            nonlocal written
            while written in results:
                d, det = results.pop(written)
                rows.append(_index_row(d, det))
                if det is not None:
                    members = encode_detections(
                        d.item.image_id, d.item.source, det, settings.feature_layer, settings.dtype
                    )
                    writer.write_sample(d.item.image_id, members)
                written += 1
            if on_progress:
                on_progress(n_ok, n_failed)

        def run(key: Any) -> None:
            nonlocal detect_s
            group = waiting.pop(key)
            t = time.perf_counter()
            dets = _detect_batch(detector, [d for _, d in group])
            detect_s += time.perf_counter() - t
            for (position, d), det in zip(group, dets, strict=True):
                record(position, d, det)

        def oldest() -> Any:
            return min(waiting, key=lambda k: waiting[k][0][0])

        for position, d in enumerate(iter_decoded(plan.items, prefetch)):
            if d.image is None:
                record(position, d, None)
            else:
                key = input_size(d.image) if input_size else None
                waiting.setdefault(key, []).append((position, d))
                if len(waiting[key]) >= settings.batch_size:
                    run(key)
            while waiting and position - waiting[oldest()][0][0] >= window:
                run(oldest())
            write_ready()
        while waiting:
            run(oldest())
        write_ready()
        for row in rows:
            writer.add_row(row)
        return writer.finish(
            {"seconds": round(time.perf_counter() - t0, 3), "detect_seconds": round(detect_s, 3)}
        )
