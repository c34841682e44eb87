"""Convert one part of a released feature source into one feature shard (the convert job's worker).

The worker reads the part's records one at a time, checks each (`check_record`), recomputes the
spatial vector from the boxes with `extract.spatial_features` (the one definition), and writes the
sample with the extract job's `FeatureShardWriter` and `encode_detections`, so a converted shard is
byte-for-byte what extract would write for the same arrays. A bad record becomes a failed row with a
reason; the shard goes on.

What the source lacks is not invented: a missing `cls_prob` is stored as zero rows (not a
distribution; the feature set says `class_distributions: false`), missing object / attribute ids as
[0, 0] (id 0 = none). With a `RecomputeSpec`, the detector's given-box mode is run on the original
image with the source's boxes and supplies cls_prob, object and attribute ids; the source's features
and boxes are kept as they are.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.config import CLS_PROB_DIM
from pipelines.feature_formats import get_reader
from pipelines.feature_formats.common import Entry, Record, RecordError, best_of, check_record
from pipelines.formats.features import FeatureShardWriter, encode_detections
from pipelines.planner import ShardPlan

ProgressFn = Callable[[int, int], None]


def record_image_id(raw: str) -> str:
    """Our image id for a source's id (`pipelines.sources.image_id_for`, the one rule)."""
    from pipelines.sources import image_id_for

    try:
        return image_id_for(raw)
    except ValueError:
        raise RecordError("bad_field", f"the record's image id {raw!r} is empty") from None


def to_detections(record: Record) -> Any:
    """An `extract.Detections` of a record: spatial from the boxes, zeros where the source has nothing."""
    from extract import Detections, spatial_features

    k = record.num_boxes
    cls_prob = record.cls_prob if record.cls_prob is not None else np.zeros((k, CLS_PROB_DIM), np.float32)
    if record.cls_prob is not None:  # name regions as the detector does when the distribution is there
        objects = best_of(record.cls_prob)
    else:
        objects = record.objects if record.objects is not None else np.zeros((k, 2), np.float32)
    attributes = record.attributes if record.attributes is not None else np.zeros((k, 2), np.float32)
    return Detections(
        boxes=record.boxes,
        features=record.features,
        spatial=spatial_features(record.boxes, record.width, record.height),
        cls_prob=cls_prob,
        object_ids=objects[:, 0].astype(np.int64),
        object_conf=objects[:, 1],
        attr_ids=attributes[:, 0].astype(np.int64),
        attr_conf=attributes[:, 1],
        image_w=record.width,
        image_h=record.height,
    )


@dataclass
class RecomputeSpec:
    """`--recompute-classes`: the detector recipe and the original images, as (image id, path) pairs."""

    weights: str | None
    device: str
    config: dict
    images: list[tuple[str, str]]


class ClassRecomputer:
    """Class and attribute distributions for a record's boxes, from the detector's given-box mode."""

    def __init__(self, spec: RecomputeSpec) -> None:
        from pipelines.matching import ImageMatcher
        from pipelines.worker import DetectorSpec

        self.detector = DetectorSpec(spec.weights, spec.device, "res5", spec.config)()
        self.matcher = ImageMatcher(spec.images)
        self.sources = dict(spec.images)

    def __call__(self, raw_id: str, record: Record) -> str:
        """Fill the record's cls_prob, objects and attributes; returns the image's path."""
        from pipelines.annotations import ImageRef
        from pipelines.sources import SourceItem
        from pipelines.worker import decode_item

        match = self.matcher.match(
            ImageRef(path=raw_id, numeric_id=int(raw_id) if raw_id.isdigit() else None)
        )
        if match.image_id is None:
            raise RecordError(
                "image_not_found", f"no image of --images matches the id {raw_id!r} ({match.reason})"
            )
        source = self.sources[match.image_id]
        decoded = decode_item(SourceItem(source, source, match.image_id))
        if decoded.image is None:
            raise RecordError(decoded.reason or "read_error", f"{source}: {decoded.error}")
        if decoded.image.size != (record.width, record.height):
            raise RecordError(
                "image_size_mismatch",
                f"{source} is {decoded.image.size[0]}x{decoded.image.size[1]} but the record says "
                f"{record.width}x{record.height}: its boxes are not in this image's pixels",
            )
        try:
            det = self.detector.features_for_boxes(decoded.image, record.boxes)
        except Exception as err:  # one image the detector fails on must not stop the shard
            raise RecordError("detect_error", f"{source}: {type(err).__name__}: {err}") from None
        record.cls_prob = det.cls_prob
        record.objects = np.stack([det.object_ids.astype(np.float32), det.object_conf], axis=1)
        record.attributes = np.stack([det.attr_ids.astype(np.float32), det.attr_conf], axis=1)
        return source

    @property
    def info(self) -> dict:
        """The detector's info (checkpoint, sha256, settings)."""
        return dict(self.detector.info)


@dataclass
class ConvertSpec:
    """A picklable recipe for a `ConvertWorker` (one per Ray actor)."""

    format: str
    feature_dim: int
    feature_layer: str
    dtype: str = "float32"
    recompute: RecomputeSpec | None = None
    report_every_s: float = 0.5
    extra: dict = field(default_factory=dict)

    def __call__(self) -> ConvertWorker:
        """Build the worker (opens nothing until a shard comes)."""
        return ConvertWorker(self)


class ConvertWorker:
    """Writes one feature shard per part; `info` describes the source (and detector, when recomputing)."""

    def __init__(self, spec: ConvertSpec) -> None:
        import extract.detector  # noqa: F401 (torch and the detector code load now, as actor start-up, not in a shard)

        self.spec = spec
        self.reader = get_reader(spec.format)
        self.recompute = ClassRecomputer(spec.recompute) if spec.recompute else None
        detector = self.recompute.info if self.recompute else None
        self.info = {
            "source_format": spec.format,
            "feature_dim": spec.feature_dim,
            "detector": detector,
            "sha256": detector.get("sha256") if detector else None,
        }

    def write_shard(self, plan: ShardPlan, out_dir: str | Path, report: ProgressFn | None = None) -> dict:
        """Convert the plan's part into `plan.name`.tar/.parquet/_stats.json; returns the stats."""
        t0 = last = time.perf_counter()
        (part,) = plan.items
        counts: Counter = Counter()
        seen: set[str] = set()
        with FeatureShardWriter(out_dir, plan.name) as writer:
            for entry in self.reader.entries(part):
                writer.add_row(self._convert(entry, writer, seen, counts))
                counts["source_bytes"] += entry.nbytes
                if report and time.perf_counter() - last >= self.spec.report_every_s:
                    report(counts["ok"], counts["failed"])
                    last = time.perf_counter()
            if report:
                report(counts["ok"], counts["failed"])
            extra = {
                k: counts[k] for k in ("source_bytes", "with_cls_prob", "with_objects", "with_attributes")
            }
            return writer.finish({"seconds": round(time.perf_counter() - t0, 3), **extra})

    def _convert(self, entry: Entry, writer: FeatureShardWriter, seen: set[str], counts: Counter) -> dict:
        """Convert and write one entry; returns its index row (ok, or failed with a reason)."""
        image_id, source = entry.id_hint or entry.locator, entry.locator
        try:
            record = check_record(self.reader.decode(entry), self.spec.feature_dim)
            raw_id = entry.id_hint or record.raw_id
            image_id = record_image_id(raw_id)
            if image_id in seen:
                raise RecordError(
                    "duplicate_id", f"{entry.locator}: image id {image_id} already seen in this part"
                )
            source = self.recompute(raw_id, record) if self.recompute else ""
            members = encode_detections(
                image_id, source, to_detections(record), self.spec.feature_layer, self.spec.dtype
            )
        except RecordError as err:
            counts["failed"] += 1
            message = str(err) if str(err).startswith(entry.locator) else f"{entry.locator}: {err}"
            return _row(image_id, source, "failed", err.reason, message, None, entry.nbytes)
        meta = json.loads(members["json"])
        meta["record"] = entry.locator  # where in the source this image came from
        members["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
        writer.write_sample(image_id, members)
        seen.add(image_id)
        counts["ok"] += 1
        counts["with_cls_prob"] += record.cls_prob is not None
        counts["with_objects"] += record.cls_prob is not None or record.objects is not None
        counts["with_attributes"] += record.attributes is not None
        return _row(image_id, source, "ok", None, None, record, entry.nbytes)


def _row(
    image_id: str,
    source: str,
    status: str,
    reason: str | None,
    error: str | None,
    record: Record | None,
    nbytes: int,
) -> dict:
    """One parquet index row (contracts.md section 2 columns)."""
    return {
        "image_id": image_id,
        "source": source,
        "status": status,
        "error": error,
        "reason": reason,
        "num_boxes": record.num_boxes if record else 0,
        "width": record.width if record else None,
        "height": record.height if record else None,
        "bytes": nbytes,
    }
