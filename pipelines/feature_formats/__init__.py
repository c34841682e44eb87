"""Readers (and two writers) of the released region-feature layouts: one module per layout.

| format         | module          | reads                                                    |
|----------------|-----------------|----------------------------------------------------------|
| `butd-tsv`     | butd_tsv.py     | bottom-up-attention TSV (6 fields, +cls_prob, +attrs)    |
| `lxmert-tsv`   | lxmert_tsv.py   | LXMERT's 10-field TSV (object / attribute ids, no cls_prob) |
| `vilbert-lmdb` | vilbert_lmdb.py | vilbert-multi-task / vilbert_beta LMDB of pickled dicts  |
| `npz-dir`      | npz_dir.py      | per-image .npz / .npy (bottom-up-attention.pytorch, detectron2 extractors) |

`get_reader(name)` returns a `FeatureReader` (interface in common.py); `detect_format(sources)` is
`--format auto`. `butd-tsv` and `vilbert-lmdb` also have writers, used by `vilbert-data export`
(their table: `pipelines.formats.writers.WRITERS`).
"""

from __future__ import annotations

from pathlib import Path

from pipelines.feature_formats.common import FeatureReader, FormatError, Part, Record, RecordError
from pipelines.formats.writers import load_class

# --format name -> "module:Class"; the module is imported only when that layout is read
READERS = {
    "butd-tsv": "pipelines.feature_formats.butd_tsv:ButdTsvReader",
    "lxmert-tsv": "pipelines.feature_formats.lxmert_tsv:LxmertTsvReader",
    "vilbert-lmdb": "pipelines.feature_formats.vilbert_lmdb:VilbertLmdbReader",
    "npz-dir": "pipelines.feature_formats.npz_dir:NpzDirReader",
}
FORMATS = tuple(READERS)
LXMERT_FIELDS = 10
BUTD_FIELDS = (6, 7, 8)

__all__ = [
    "FORMATS",
    "FeatureReader",
    "FormatError",
    "Part",
    "Record",
    "RecordError",
    "detect_format",
    "get_reader",
]


def get_reader(name: str) -> FeatureReader:
    """A fresh reader of format `name`."""
    if name not in READERS:
        raise FormatError(f"--format must be auto or one of {', '.join(FORMATS)}, got {name!r}")
    return load_class(READERS[name])()


def detect_format(sources: list[str]) -> str:
    """The layout of the sources, from their paths and content (every source must have the same)."""
    if not sources:
        raise FormatError("no source given")
    found = {source: _detect_one(Path(source)) for source in sources}
    if len(set(found.values())) > 1:
        raise FormatError(
            "the sources have different layouts: " + ", ".join(f"{s} ({f})" for s, f in found.items())
        )
    return found[sources[0]]


def _detect_one(path: Path) -> str:
    """The layout of one source path."""
    from pipelines.feature_formats.tsv import first_line_fields, tsv_files

    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "data.mdb").is_file():
            return "vilbert-lmdb"
        if any(p.suffix in (".npz", ".npy") for p in path.rglob("*") if not p.name.startswith(".")):
            return "npz-dir"
        files = tsv_files([str(path)])  # raises when there are none
        return _detect_one(files[0])
    if path.suffix in (".npz", ".npy"):
        return "npz-dir"
    if path.name == "data.mdb" or path.suffix in (".lmdb", ".mdb"):
        return "vilbert-lmdb"
    fields = first_line_fields(path)
    if fields == LXMERT_FIELDS:
        return "lxmert-tsv"
    if fields in BUTD_FIELDS:
        return "butd-tsv"
    raise FormatError(
        f"{path}: cannot tell the layout (the first line has {fields} tab-separated fields: butd-tsv has "
        f"6-8, lxmert-tsv {LXMERT_FIELDS}); pass --format"
    )
