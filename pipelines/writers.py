"""Write one feature shard: WebDataset tar + parquet index + `_stats.json`, each atomically.

Every file is written under a hidden temporary name in the output folder and renamed into place, in
the order tar -> parquet -> stats, so a crash never leaves a truncated file under a final name and a
shard with a stats file is complete (docs/contracts.md section 2). Tar members carry fixed metadata
(mtime 0, uid 0) so two runs with the same inputs give byte-identical shards.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import tarfile
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TMP_MARK = ".tmp-"
STATS_SUFFIX = "_stats.json"  # `<shard><STATS_SUFFIX>` marks a complete shard (written last)
DTYPES = {"float16": np.float16, "float32": np.float32}
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

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


class DiskFullError(RuntimeError):
    """The output folder's filesystem is full or over quota (the message names the folder and its free space)."""


# how libraries written in Rust (safetensors) report an OS error: "... No space left on device (os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def is_disk_full(err: BaseException) -> bool:
    """True for the errors of a full disk or an exhausted quota (OSError, or a library's error quoting one)."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL_ERRNOS
    return any(int(code) in DISK_FULL_ERRNOS for code in _RUST_OS_ERROR.findall(str(err)))


def disk_full_error(folder: str | Path, what: str) -> DiskFullError:
    """A one-line DiskFullError for `folder` saying what was being written and how much space is free."""
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"no space left on the device of {folder} ({free}) while writing {what}")


def check_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """`out` as a Path; a ValueError naming `flag` when it exists and is not a folder."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {out}: exists and is not a folder")
    return path


def make_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """Create the output folder (and its parents); a one-line ValueError naming `flag` when that fails."""
    path = check_out_dir(out, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {out}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: the folder is not writable")
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    """An array in numpy's .npy format (what webdataset decodes `.npy` members with)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes | bytearray) -> np.ndarray:
    """Decode .npy bytes (no pickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


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


def temp_path(final: Path) -> Path:
    """A hidden, unique temporary name next to `final` (same filesystem, so rename is atomic)."""
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def publish(tmp: Path, final: Path) -> None:
    """Flush `tmp` to disk and rename it to `final` in one atomic step."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    final = Path(path)
    tmp = temp_path(final)
    try:
        tmp.write_bytes(data)
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(
    path: str | Path, obj: Any, *, sort_keys: bool = True, default: Callable[[Any], Any] | None = None
) -> None:
    """Write `obj` as indented JSON to `path` atomically (`default` converts what json cannot)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(out_dir: str | Path) -> list[Path]:
    """Delete temporary files left in `out_dir` by a killed run; returns what was removed."""
    removed = []
    for p in Path(out_dir).glob(f".*{TMP_MARK}*"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_write_table(path: str | Path, table: Any) -> None:
    """Write a pyarrow table as parquet to `path` through a temporary file and a rename."""
    import pyarrow.parquet as pq

    final = Path(path)
    tmp = temp_path(final)
    try:
        pq.write_table(table, tmp)
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


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

    def __init__(self, out_dir: str | Path, name: str):
        self.out_dir = Path(out_dir)
        self.name = name
        self.tar_path = self.out_dir / f"{name}.tar"
        self.parquet_path = self.out_dir / f"{name}.parquet"
        self.stats_path = self.out_dir / f"{name}{STATS_SUFFIX}"
        self._tmp_tar = temp_path(self.tar_path)
        self._tar: tarfile.TarFile | None = tarfile.open(self._tmp_tar, "w", format=tarfile.GNU_FORMAT)
        self.rows: list[dict] = []
        self._keys: set[str] = set()

    def write_sample(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample (`key.member` entries, sorted by member name) to the tar."""
        if "." in key or not key:
            raise ValueError(f"WebDataset key {key!r} must be non-empty and hold no dots")
        if key in self._keys:
            raise ValueError(f"sample {key!r} written twice to {self.name}")
        self._keys.add(key)
        for member in sorted(members):
            data = members[member]
            info = tarfile.TarInfo(f"{key}.{member}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))

    def add_row(self, row: dict) -> None:
        """Record one input's index row (ok or failed)."""
        self.rows.append(row)

    def finish(self, extra_stats: dict | None = None) -> dict:
        """Publish tar, parquet, then `_stats.json` (in that order); returns the stats."""
        self._tar.close()
        self._tar = None
        publish(self._tmp_tar, self.tar_path)
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
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        self._tmp_tar.unlink(missing_ok=True)

    def __enter__(self) -> FeatureShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
