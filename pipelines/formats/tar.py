"""WebDataset tar shards: the one reader and the one writer of feature shards and task shards alike.

A sample is the members `KEY.SUFFIX` that share a key (the base name up to its first dot), stored one
after another. The writer gives every member fixed metadata (mtime 0, uid 0, mode 644), so two runs
with the same inputs write byte-identical shards, and writes under a hidden temporary name that is
renamed into place when the tar is complete.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

from pipelines.fileio import publish, temp_path


class ShardError(ValueError):
    """A shard, feature set or task folder that is not what it should be; the message names the file."""


class NotFoundError(ShardError, FileNotFoundError):
    """A feature set or task folder (or its description file) that is not there."""


# ----------------------------------------------------------------------------- reading


def _octal(field: bytes) -> int:
    """Number in a tar header field (octal text, or base-256 for large GNU sizes)."""
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header, if any."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def _skip(stream: IO[bytes], n: int, name: str) -> None:
    """Move `n` bytes ahead in a tar stream without keeping them (a seek where the stream can)."""
    if n <= 0:
        return
    seekable = getattr(stream, "seekable", None)
    if seekable is not None and seekable():
        stream.seek(n - 1, io.SEEK_CUR)
        if not stream.read(1):  # a seek past the end does not fail: check the last byte is there
            raise ShardError(f"{name}: truncated tar (member cut short)")
        return
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise ShardError(f"{name}: truncated tar (member cut short)")
        n -= len(chunk)


def sample_key(member: str) -> tuple[str, str]:
    """(WebDataset key, suffix) of a tar member name: the key is the base name up to its first dot."""
    key, _, suffix = member.rsplit("/", 1)[-1].partition(".")
    return key, suffix


def iter_tar_members(
    stream: IO[bytes], name: str = "<stream>", keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytearray | None]]:
    """(member name, bytes) of the regular files of an uncompressed tar stream, in order.

    A small header parser instead of `tarfile`: reading WebDataset samples is the data loader's hot
    loop and `tarfile`'s per-member Python overhead dominated it. Handles ustar (with prefix), GNU
    long names and pax path records, which is what `tarfile` and `webdataset.TarWriter` write.
    With `keep`, a member whose name it rejects is not read (skipped over) and comes with None.
    """
    long_name: str | None = None
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == b"\0" * 512:
            if 0 < len(header) < 512:
                raise ShardError(f"{name}: truncated tar (partial header)")
            return
        if header[257:262] != b"ustar":
            raise ShardError(f"{name}: not a tar file (no ustar header)")
        size = _octal(header[124:136])
        kind = header[156:157]
        padded = size + (-size % 512)  # members are padded to the next 512-byte block
        if kind not in (b"0", b"\0", b"7", b"L", b"x"):
            long_name = None
            _skip(stream, padded, name)
            continue  # directories, links, global pax headers: not sample data
        member = long_name
        if member is None:
            prefix = header[345:500].split(b"\0", 1)[0]
            base = header[0:100].split(b"\0", 1)[0]
            member = (prefix + b"/" + base if prefix else base).decode("utf-8")
        if kind not in (b"L", b"x") and keep is not None and not keep(member):
            long_name = None
            _skip(stream, padded, name)
            yield member, None
            continue
        data = bytearray(size)  # writable: the loader wraps arrays around it without a copy
        if stream.readinto(data) < size:
            raise ShardError(f"{name}: truncated tar (member cut short)")
        stream.read(padded - size)
        if kind in (b"L", b"x"):  # GNU long name / pax header: they name the next member
            long_name = bytes(data).rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(bytes(data))
            continue
        long_name = None
        yield member, data


def iter_tar_samples(
    stream: IO[bytes], name: str = "<stream>", keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytearray]]]:
    """(key, {member suffix: bytes}) for each WebDataset sample of a tar stream, in file order.

    With `keep`, the members of samples whose key it rejects are skipped unread: such a sample
    comes as (key, {}).
    """
    keep_member = None if keep is None else (lambda member: keep(sample_key(member)[0]))
    key: str | None = None
    sample: dict[str, bytearray] = {}
    for member, data in iter_tar_members(stream, name, keep_member):
        k, suffix = sample_key(member)
        if k != key:
            if key is not None:
                yield key, sample
            key, sample = k, {}
        if data is not None:
            sample[suffix] = data
    if key is not None:
        yield key, sample


def read_tar_samples(
    path: str | Path, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytearray]]]:
    """iter_tar_samples over a local tar file, named by its path in errors."""
    with open(path, "rb") as stream:
        yield from iter_tar_samples(stream, str(path), keep)


# ----------------------------------------------------------------------------- writing


class TarWriter:
    """One WebDataset tar, written under a hidden temporary name and renamed to `path` by `close`.

    `tar_format` is tarfile's: feature shards are GNU tars (long names), task shards ustar. Members
    are written in the order given. Leaving a `with` block with an exception removes the temporary
    file and publishes nothing.
    """

    def __init__(self, path: str | Path, tar_format: int = tarfile.GNU_FORMAT) -> None:
        self.path = Path(path)
        self._tmp = temp_path(self.path)
        self._tar: tarfile.TarFile | None = tarfile.open(self._tmp, "w", format=tar_format)
        self._keys: set[str] = set()

    def write(self, key: str, members: Mapping[str, bytes | bytearray]) -> None:
        """Append one sample: each member `suffix -> bytes` becomes `key.suffix`."""
        if "." in key or not key:
            raise ValueError(f"WebDataset key {key!r} must be non-empty and hold no dots")
        if key in self._keys:
            raise ValueError(f"sample {key!r} written twice to {self.path.name}")
        self._keys.add(key)
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: reruns give identical bytes
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        """Finish the tar and rename it into place."""
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        publish(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary tar without publishing anything."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is not None:
            self.abort()
        else:
            self.close()
