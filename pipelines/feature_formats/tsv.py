"""What the two TSV layouts share: listing the files, cutting them into byte ranges, reading lines.

A TSV of released features has one image a line (0.4-1.6 MB of base64 each), no header. A file is
cut into byte ranges of about `shard_size` lines (the mean line length is measured on the first
lines of the first file), and a line belongs to the range its first byte falls in, so ranges can be
read in parallel and every line is read exactly once. Lines are read one at a time: memory stays flat
whatever the file size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pipelines.feature_formats.common import (
    MAX_LINE_BYTES,
    Entry,
    FeatureReader,
    FormatError,
    Part,
    RecordError,
    source_fingerprint,
)

PROBE_LINES = 16


def tsv_files(sources: list[str]) -> list[Path]:
    """The TSV files of the sources: a file as given, a folder's files named *.tsv or *.tsv.N (sorted)."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and ".tsv" in p.name and not p.name.startswith(".")
            )
            if not found:
                raise FormatError(f"{source}: a folder without *.tsv files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FormatError(f"{source}: no such file or folder")
    return files


def read_line(f: IO[bytes], limit: int = MAX_LINE_BYTES) -> tuple[bytes, int]:
    """(line, bytes consumed); a line longer than `limit` is skipped whole and returned as b"" with its size."""
    line = f.readline(limit)
    if len(line) < limit or line.endswith(b"\n"):
        return line, len(line)
    consumed = len(line)
    while True:  # drain the rest of the over-long line in bounded pieces
        chunk = f.readline(limit)
        consumed += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return b"", consumed


def first_line_fields(path: Path) -> int:
    """Number of tab-separated fields on the first line of a file (for format detection)."""
    with open(path, "rb") as f:
        line, size = read_line(f)
    if not line and size:
        raise FormatError(f"{path}: the first line is longer than {MAX_LINE_BYTES} bytes; not a TSV")
    return line.count(b"\t") + 1 if line.strip() else 0


class TsvReader(FeatureReader):
    """Byte-range planning and line listing; subclasses decode a line of their layout."""

    def plan(self, sources: list[str], shard_size: int) -> list[Part]:
        """Byte ranges of about `shard_size` lines each, file by file in the given (sorted) order."""
        files = tsv_files(sources)
        line_bytes = self._mean_line_bytes(files)
        parts: list[Part] = []
        for path in files:
            size = path.stat().st_size
            if size == 0:
                continue
            n = max(1, round(size / (line_bytes * shard_size)))
            cuts = [size * i // n for i in range(n + 1)]
            fp = source_fingerprint(path)
            parts.extend(Part(str(path.resolve()), cuts[i], cuts[i + 1], fp) for i in range(n))
        if not parts:
            raise FormatError(f"{', '.join(sources)}: the TSV files are empty")
        return parts

    @staticmethod
    def _mean_line_bytes(files: list[Path]) -> float:
        """Mean length of the first PROBE_LINES lines, over the first files that have lines."""
        total = count = 0
        for path in files:
            with open(path, "rb") as f:
                while count < PROBE_LINES:
                    _line, size = read_line(f)
                    if not size:
                        break
                    total, count = total + size, count + 1
            if count >= PROBE_LINES:
                break
        return total / count if count else 1.0

    def entries(self, part: Part) -> Iterator[Entry]:
        """Every line that starts in [start, end), with its byte offset."""
        with open(part.path, "rb") as f:
            pos = part.start
            if pos > 0:  # the line that began before this range belongs to the previous one
                f.seek(pos - 1)
                pos += read_line(f)[1] - 1
            while pos < part.end:
                line, size = read_line(f)
                if not size:
                    return
                locator = f"{part.path}@{pos}"
                pos += size
                if not line:
                    yield Entry(locator, "", None, size)  # over-long: decode() reports it
                elif line.strip():
                    yield Entry(locator, line[: line.find(b"\t")].decode("utf-8", "replace"), line, size)

    def split(self, entry: Entry, counts: tuple[int, ...]) -> list[bytes]:
        """The line's fields; bad_fields unless their number is one of `counts`."""
        if entry.payload is None:
            raise RecordError("bad_fields", f"{entry.locator}: a line longer than {MAX_LINE_BYTES} bytes")
        fields = entry.payload.rstrip(b"\r\n").split(b"\t")
        if len(fields) not in counts:
            expected = " or ".join(map(str, counts))
            raise RecordError(
                "bad_fields",
                f"{entry.locator}: {len(fields)} tab-separated fields, {self.name} has {expected}",
            )
        return fields
