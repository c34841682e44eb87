"""Process one shard end to end: read and decode row by row, detect in batches, write the shard.

Decoding runs in a background thread a few images ahead of the detector, so reading and decoding
overlap with inference. A file that cannot be read or decoded, or an image on which the detector
fails, becomes a failed row with a reason; the shard goes on.

Failure reasons: the `ImageDecodeError.reason` values of `extract.load_image` (`empty`,
`truncated`, `not_an_image`, `unsupported`, `too_large`, `corrupt`), plus `read_error` (the file
could not be read) and `detect_error` (the detector raised on this image alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.planner import ShardPlan
from pipelines.sources import SourceItem, is_url
from pipelines.writers import FeatureShardWriter, encode_detections

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

    batch_size: int = 4
    dtype: str = "float16"
    feature_layer: str = "res4"
    prefetch: int | None = None  # decoded images kept ahead of the detector; default 2 batches


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


def decode_item(item: SourceItem) -> Decoded:
    """Read and decode one input; never raises for a bad file (the failure becomes the result)."""
    from extract import ImageDecodeError, load_image

    try:
        data = read_source(item.source)
    except Exception as err:  # missing file, permission, network: a failed row, not a failed job
        return Decoded(item, None, 0, "read_error", f"{type(err).__name__}: {err}")
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
    """Run one shard: decode, detect in batches of `settings.batch_size`, write tar/parquet/stats."""
    t0 = time.perf_counter()
    rows: list[dict | None] = [None] * len(plan.items)
    position = {it.image_id: i for i, it in enumerate(plan.items)}
    n_ok = n_failed = 0
    detect_s = 0.0
    prefetch = settings.prefetch or 2 * settings.batch_size

    with FeatureShardWriter(out_dir, plan.name) as writer:

        def flush(batch: list[Decoded]) -> None:
            nonlocal n_ok, n_failed, detect_s
            t = time.perf_counter()
            dets = _detect_batch(detector, batch)
            detect_s += time.perf_counter() - t
            for d, det in zip(batch, dets, strict=True):
                rows[position[d.item.image_id]] = _index_row(d, det)
                if det is None:
                    n_failed += 1
                    continue
                members = encode_detections(
                    d.item.image_id, d.item.source, det, settings.feature_layer, settings.dtype
                )
                writer.write_sample(d.item.image_id, members)
                n_ok += 1
            batch.clear()
            if on_progress:
                on_progress(n_ok, n_failed)

        batch: list[Decoded] = []
        for d in iter_decoded(plan.items, prefetch):
            if d.image is None:
                rows[position[d.item.image_id]] = _index_row(d)
                n_failed += 1
                if on_progress:
                    on_progress(n_ok, n_failed)
                continue
            batch.append(d)
            if len(batch) >= settings.batch_size:
                flush(batch)
        if batch:
            flush(batch)
        for row in rows:
            writer.add_row(row)
        return writer.finish(
            {"seconds": round(time.perf_counter() - t0, 3), "detect_seconds": round(detect_s, 3)}
        )
