"""The tar sample reader against `tarfile`-written archives: ustar, pax and GNU long names, truncation."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipelines.formats.tar import ShardError, iter_tar_samples


def _tar(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # a non-file member: skipped
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reader_groups_members_like_webdataset(fmt) -> None:
    long_key = "k" * 90 if fmt == tarfile.USTAR_FORMAT else "k" * 150  # ustar: <= 100 chars per name
    members = [
        ("a.features.npy", b"\x01" * 700),  # spans two 512-byte blocks
        ("a.json", b"{}"),
        (f"dir/{long_key}.json", b"[1]"),
        (f"dir/{long_key}.ann.json", b""),
        ("b.txt", "é".encode()),
    ]
    got = list(iter_tar_samples(io.BytesIO(_tar(members, fmt))))
    assert [k for k, _ in got] == ["a", long_key, "b"]
    assert got[0][1] == {"features.npy": b"\x01" * 700, "json": b"{}"}
    assert got[1][1] == {"json": b"[1]", "ann.json": b""}
    assert got[2][1] == {"txt": "é".encode()}
    # `keep` skips the rejected samples' members unread, on seekable and on plain streams alike.
    for stream in (io.BytesIO(_tar(members, fmt)), io.BufferedReader(_Unseekable(_tar(members, fmt)))):
        kept = list(iter_tar_samples(stream, keep=lambda key: key == "b"))
        assert kept == [("a", {}), (long_key, {}), ("b", {"txt": "é".encode()})]


class _Unseekable(io.RawIOBase):
    """A pipe-like byte stream: readable, not seekable."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        """Always readable."""
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Read into `buf` from the wrapped bytes."""
        return self._data.readinto(buf)


def test_reader_reports_truncated_and_foreign_files() -> None:
    data = _tar([("a.json", b"x" * 600)], tarfile.USTAR_FORMAT)
    with pytest.raises(ShardError, match="s.tar: truncated tar"):
        list(iter_tar_samples(io.BytesIO(data[:1200]), "s.tar"))
    with pytest.raises(ShardError, match="s.tar: truncated tar"):  # also when the cut member is skipped
        list(iter_tar_samples(io.BytesIO(data[:1200]), "s.tar", keep=lambda key: False))
    with pytest.raises(ShardError, match="s.tar: not a tar file"):
        list(iter_tar_samples(io.BytesIO(b"PK\x03\x04" + b"\0" * 1020), "s.tar"))
