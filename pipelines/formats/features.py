"""Feature sets (docs/contracts.md section 2): the shard writer of extract and convert, and `FeatureSet`.

A feature set folder holds `features-NNNNNN.tar` WebDataset shards (one sample per image), each with
a parquet index (one row per input, ok or failed) and a `_stats.json` written last, so a shard with
stats is complete; `dataset.json` is written when the whole set is. Readers list shards from
`dataset.json`, or from the parquet indexes of an unfinished set, never from `*.tar` globs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.fileio import atomic_write_json, atomic_write_table
from pipelines.formats.npy import npy_bytes
from pipelines.formats.tar import NotFoundError, ShardError, TarWriter, read_tar_samples

log = logging.getLogger(__name__)

FEATURES_FORMAT = "vilbert-data/features"
FEATURES_VERSION = 1
DATASET_FILE = "dataset.json"
SHARD_PREFIX = "features-"
STATS_SUFFIX = "_stats.json"  # `<shard><STATS_SUFFIX>` marks a complete shard (written last)
DTYPES = {"float16": np.float16, "float32": np.float32}

# Column order and types of the per-shard parquet index (one row per input, ok or failed).
INDEX_COLUMNS = (
    ("image_id", "string"),
    ("source", "string"),
    ("status", "string"),
    ("error", "string"),
    ("reason", "string"),
    ("num_boxes", "int32"),
    ("width", "int32"),
    ("height", "int32"),
    ("bytes", "int64"),
)


class NoSuchImageError(KeyError):
    """An image id that the feature set does not hold (or holds as failed); str() is the message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- writing


def encode_detections(
    image_id: str, source: str, det: Any, feature_layer: str, dtype: str = "float16"
) -> dict[str, bytes]:
    """The WebDataset members of one image from a `Detections` (contract section 2 names and dtypes)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    big = DTYPES[dtype]
    k = int(det.boxes.shape[0])
    objects = np.stack(
        [det.object_ids.astype(np.float32), det.object_conf.astype(np.float32)], axis=1
    )  # (K,2)
    attributes = np.stack(
        [det.attr_ids.astype(np.float32), det.attr_conf.astype(np.float32)], axis=1
    )  # (K,2)
    meta = {
        "image_id": image_id,
        "source": source,
        "width": int(det.image_w),
        "height": int(det.image_h),
        "num_boxes": k,
        "feature_layer": feature_layer,
    }
    return {
        "boxes.npy": npy_bytes(det.boxes.astype(np.float32).reshape(k, 4)),
        "features.npy": npy_bytes(det.features.astype(big)),
        "spatial.npy": npy_bytes(det.spatial.astype(np.float32).reshape(k, 5)),
        "cls_prob.npy": npy_bytes(det.cls_prob.astype(big)),
        "objects.npy": npy_bytes(objects.reshape(k, 2)),
        "attributes.npy": npy_bytes(attributes.reshape(k, 2)),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def write_index(path: str | Path, rows: list[dict]) -> None:
    """Write the per-input parquet index atomically."""
    import pyarrow as pa

    schema = pa.schema([(name, pa.type_for_alias(t)) for name, t in INDEX_COLUMNS])
    columns = {name: [row.get(name) for row in rows] for name, _ in INDEX_COLUMNS}
    atomic_write_table(path, pa.table(columns, schema=schema))


class FeatureShardWriter:
    """Streams samples into a temporary tar; `finish` publishes tar, parquet, then stats.

    Use as a context manager: leaving the block with an exception removes the temporary tar and
    publishes nothing, so the shard stays "not done" and is redone by the next run.
    """

    def __init__(self, out_dir: str | Path, name: str) -> None:
        self.out_dir = Path(out_dir)
        self.name = name
        self.tar_path = self.out_dir / f"{name}.tar"
        self.parquet_path = self.out_dir / f"{name}.parquet"
        self.stats_path = self.out_dir / f"{name}{STATS_SUFFIX}"
        self._tar = TarWriter(self.tar_path)
        self.rows: list[dict] = []

    def write_sample(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample (`key.member` entries, sorted by member name) to the tar."""
        self._tar.write(key, dict(sorted(members.items())))

    def add_row(self, row: dict) -> None:
        """Record one input's index row (ok or failed)."""
        self.rows.append(row)

    def finish(self, extra_stats: dict | None = None) -> dict:
        """Publish tar, parquet, then `_stats.json` (in that order); returns the stats."""
        self._tar.close()
        write_index(self.parquet_path, self.rows)
        ok = [r for r in self.rows if r["status"] == "ok"]
        stats = {
            "shard": self.name,
            "count": len(self.rows),
            "ok": len(ok),
            "failed": len(self.rows) - len(ok),
            "failed_by_reason": dict(
                sorted(Counter(r["reason"] for r in self.rows if r["status"] != "ok").items())
            ),
            "num_boxes": sum(int(r["num_boxes"]) for r in ok),
            "tar_bytes": self.tar_path.stat().st_size,
            **(extra_stats or {}),
        }
        atomic_write_json(self.stats_path, stats)
        return stats

    def abort(self) -> None:
        """Drop the temporary tar without publishing anything."""
        self._tar.abort()

    def __enter__(self) -> FeatureShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is not None:
            self.abort()


# ----------------------------------------------------------------------------- reading


def indexed_shards(root: str | Path) -> list[str]:
    """Tar names of the shards of `root` that have their parquet index, sorted.

    The writer publishes the index only after its tar is complete, so these shards can be read even
    while the job that writes the set (and later its `_stats.json` and `dataset.json`) still runs.
    """
    indexes = sorted(Path(root).glob(f"{SHARD_PREFIX}*.parquet"))
    return [p.with_suffix(".tar").name for p in indexes if p.with_suffix(".tar").is_file()]


@dataclass
class FeatureSet:
    """A feature set on disk: its description (`dataset.json`, None while unfinished) and its shards."""

    root: Path
    info: dict[str, Any] | None
    sha256: str | None  # of dataset.json's bytes: task shards record which feature set they came from
    shards: list[str]  # tar names, in order

    @classmethod
    def open(cls, root: str | Path, *, unfinished: bool = False) -> FeatureSet:
        """The feature set in `root`; `unfinished=True` also opens one without dataset.json (its indexed shards)."""
        root = Path(root)
        meta_path = root / DATASET_FILE
        if not meta_path.is_file():
            if unfinished and root.is_dir():
                return cls(root, None, None, indexed_shards(root))
            raise NotFoundError(
                f"{root}: not a finished feature set (no {DATASET_FILE}); run `vilbert-data extract` "
                "(or `convert`) first"
            )
        raw = meta_path.read_bytes()
        try:
            info = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ShardError(f"{meta_path}: not valid JSON: {exc}") from exc
        shards = list(info.get("shards", []))
        for shard in shards:
            if not (root / shard).is_file():
                raise ShardError(f"{root / shard}: feature shard listed in {DATASET_FILE} is missing")
        return cls(root, info, hashlib.sha256(raw).hexdigest(), shards)

    def require(self, *fields: str) -> dict[str, Any]:
        """dataset.json, checked to be a vilbert-data feature set description holding `fields`."""
        meta_path = self.root / DATASET_FILE
        info = self.info or {}
        missing = [k for k in fields if k not in info]
        if info.get("format") != FEATURES_FORMAT or missing:
            raise ShardError(
                f"{meta_path}: not a vilbert-data feature set description (missing {missing or 'format'})"
            )
        return info

    @property
    def feature_dim(self) -> int:
        """Region feature size D."""
        return int(self.require("feature_dim")["feature_dim"])

    def index_path(self, shard: str) -> Path:
        """The parquet index of a shard (tar name)."""
        return self.root / shard.replace(".tar", ".parquet")

    def iter_index(self, columns: list[str] | None = None) -> Iterator[dict]:
        """Parquet index rows of every shard, shard by shard, each with its stem under "shard"."""
        import pyarrow.parquet as pq

        for shard in self.shards:
            for row in pq.read_table(self.index_path(shard), columns=columns).to_pylist():
                yield {**row, "shard": shard[: -len(".tar")]}

    def ok_images(self) -> list[tuple[str, str | None]]:
        """(image id, source) of every ok image, from the parquet indexes (tar headers where one is missing)."""
        import pyarrow.parquet as pq

        images: list[tuple[str, str | None]] = []
        for shard in self.shards:
            index = self.index_path(shard)
            if index.is_file():
                table = pq.read_table(index, columns=["image_id", "source", "status"]).to_pylist()
                images.extend((r["image_id"], r["source"]) for r in table if r["status"] == "ok")
            else:  # no index: list the tar's keys (headers only, features skipped)
                log.warning("%s: no parquet index, listing the tar instead", index)
                keys = read_tar_samples(self.root / shard, keep=lambda _key: False)
                images.extend((key, None) for key, _ in keys)
        return images

    def samples(self, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, dict[str, bytearray]]]:
        """(key, members) of every sample of every shard, in order; `keep` as in iter_tar_samples."""
        for shard in self.shards:
            yield from read_tar_samples(self.root / shard, keep)

    def sample(self, image_id: str | None = None) -> dict[str, bytearray]:
        """The members of one image's sample (the first ok image for None); NoSuchImageError names what is wrong.

        The parquet indexes say which shard holds the image, so only that tar is read.
        """
        known: list[str] = []
        for row in self.iter_index(["image_id", "status"]):
            if row["status"] == "ok":
                known.append(row["image_id"])
            if image_id is not None and row["image_id"] != image_id:
                continue
            if row["status"] == "ok":
                key = row["image_id"]
                for found, members in read_tar_samples(self.root / f"{row['shard']}.tar", key.__eq__):
                    if found == key:
                        return members
            elif image_id is not None:
                raise NoSuchImageError(
                    f"--image-id {image_id}: extraction failed for this image (see {row['shard']}.parquet)"
                )
        if image_id is None:
            raise NoSuchImageError(f"{self.root}: no successfully extracted image in the finished shards")
        close = difflib.get_close_matches(image_id, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise NoSuchImageError(f"--image-id {image_id}: not in the feature set {self.root}{hint}")
