"""Output files written safely: atomic writes, output folders, and a full disk said in one line.

Every file is written under a hidden temporary name next to its final one and renamed into place, so
a crash never leaves a truncated file under a final name (a rerun removes the leftovers with
`remove_stale_temps`). This module imports nothing of the jobs, so `vilbert_core` may use it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(RuntimeError):
    """The output folder's filesystem is full or over quota (the message names the folder and its free space)."""


# how libraries written in Rust (safetensors) report an OS error: "... No space left on device (os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def is_disk_full(err: BaseException) -> bool:
    """True for the errors of a full disk or an exhausted quota (OSError, or a library's error quoting one)."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL_ERRNOS
    return any(int(code) in DISK_FULL_ERRNOS for code in _RUST_OS_ERROR.findall(str(err)))


def disk_full_error(folder: str | Path, what: str, advice: str = "") -> DiskFullError:
    """A one-line DiskFullError for `folder` saying what was being written, how much space is free, and advice."""
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"no space left on the device of {folder} ({free}) while writing {what}"
                         + (f"; {advice}" if advice else ""))  # fmt: skip


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


def remove_stale_temps(out_dir: str | Path) -> list[Path]:
    """Delete temporary files left in `out_dir` by a killed run; returns what was removed."""
    removed = []
    for p in Path(out_dir).glob(f".*{TMP_MARK}*"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines (report files, rewritten whole by each run)."""
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
