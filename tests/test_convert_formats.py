"""The feature-format readers without Ray: byte ranges, format detection, refused pickles, export checks."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from convert_fixtures import (
    butd_line,
    lxmert_line,
    make_images,
    npz_bytes,
    pickled,
    vilbert_value,
    write_lmdb,
)

from pipelines.convert_job import lacking_for_task
from pipelines.export_job import run_export
from pipelines.feature_formats import FormatError, RecordError, detect_format, get_reader
from pipelines.feature_formats.common import load_npy_safe
from pipelines.feature_formats.tsv import read_line


def test_byte_ranges_read_every_line_exactly_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = [
        b"%d\t" % i + b"x" * int(rng.integers(1, 300)) + (b"\r\n" if i % 5 == 0 else b"\n") for i in range(40)
    ]
    lines.insert(7, b"\n")  # a blank line is no record
    path = tmp_path / "f.tsv"
    path.write_bytes(b"".join(lines))
    reader = get_reader("butd-tsv")
    expected = [line for line in lines if line.strip()]
    for shard_size in (1, 2, 3, 7, 40, 1000):
        parts = reader.plan([str(path)], shard_size)
        got = [e.payload for p in parts for e in reader.entries(p)]
        assert got == expected, shard_size
        assert [p.start for p in parts[1:]] == [p.end for p in parts[:-1]]
    assert 9 <= len(reader.plan([str(path)], 4)) <= 11  # about 4 of the 40 lines a part
    offsets = [
        int(e.locator.rsplit("@", 1)[1]) for p in reader.plan([str(path)], 3) for e in reader.entries(p)
    ]
    assert [path.read_bytes()[o:].split(b"\t", 1)[0] for o in offsets] == [b"%d" % i for i in range(40)]


def test_an_overlong_line_is_skipped_whole() -> None:
    stream = io.BytesIO(b"a" * 50 + b"\nnext\n")
    assert read_line(stream, limit=16) == (b"", 51)
    assert read_line(stream, limit=16) == (b"next\n", 5)


def test_detect_format_from_path_and_content(tmp_path: Path) -> None:
    img = make_images(1, dim=4)[0]
    (tmp_path / "b.tsv").write_bytes(butd_line(img, cls_prob=True))
    (tmp_path / "l.tsv").write_bytes(lxmert_line(img))
    (tmp_path / "npz").mkdir()
    (tmp_path / "npz" / "a.npz").write_bytes(npz_bytes(img))
    write_lmdb(tmp_path / "db", {b"1": pickled(vilbert_value(img))}, pickled([b"1"]))
    assert detect_format([str(tmp_path / "b.tsv")]) == "butd-tsv"
    assert detect_format([str(tmp_path / "l.tsv")]) == "lxmert-tsv"
    assert detect_format([str(tmp_path / "npz")]) == "npz-dir"
    assert detect_format([str(tmp_path / "db")]) == "vilbert-lmdb"
    with pytest.raises(FormatError, match="different layouts"):
        detect_format([str(tmp_path / "b.tsv"), str(tmp_path / "l.tsv")])
    with pytest.raises(FormatError, match="no such file"):
        detect_format([str(tmp_path / "missing.tsv")])


class Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_malicious_key_list_refuses_the_source_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    img = make_images(1, dim=4)[0]
    write_lmdb(tmp_path / "db", {b"1": pickled(vilbert_value(img))}, pickle.dumps([b"1", Marker(marker)]))
    with pytest.raises(FormatError, match=r"db\[b'keys'\]: refusing to unpickle global 'posix.system'"):
        get_reader("vilbert-lmdb").plan([str(tmp_path / "db")], 10)
    assert not marker.exists()


def test_a_malicious_npy_dict_is_a_record_error_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    np.save(buf, {"features": Marker(marker)}, allow_pickle=True)
    with pytest.raises(RecordError, match="x.npy: refusing to unpickle global") as info:
        load_npy_safe(buf.getvalue(), "x.npy")
    assert info.value.reason == "unsafe_pickle" and not marker.exists()
    header_end = buf.getvalue().index(b"\n") + 1
    with pytest.raises(RecordError, match="y.npy: cannot unpickle") as info:
        load_npy_safe(buf.getvalue()[:header_end] + b"junk", "y.npy")
    assert info.value.reason == "bad_pickle"
    with pytest.raises(RecordError, match="z.npy: not a .npy file") as info:
        load_npy_safe(b"\x93NUMPY\x01\x00\x10\x00{'descr': '|O'" + b" " * 8, "z.npy")


def test_lmdb_without_a_key_list_reads_every_key(tmp_path: Path) -> None:
    imgs = make_images(3, dim=4)
    write_lmdb(tmp_path / "db", {i.image_id.encode(): pickled(vilbert_value(i)) for i in imgs}, None)
    reader = get_reader("vilbert-lmdb")
    parts = reader.plan([str(tmp_path / "db")], 2)
    records = [reader.decode(e) for p in parts for e in reader.entries(p)]
    assert [r.raw_id for r in records] == ["1", "2", "3"] and len(parts) == 2
    assert np.array_equal(records[1].features, imgs[1].features)


def test_only_pretraining_needs_class_distributions() -> None:
    converted = {"class_distributions": False, "source": {"format": "lxmert-tsv", "paths": ["/d/x.tsv"]}}
    assert "lxmert-tsv" in lacking_for_task(converted, "captions")
    assert "vilbert-data convert /d/x.tsv --out NEW_DIR --recompute-classes" in lacking_for_task(
        converted, "captions"
    )
    assert lacking_for_task(converted, "vqa") is None
    assert lacking_for_task({"format": "vilbert-data/features"}, "captions") is None  # extract's sets


def test_export_refuses_what_it_must_not_replace(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        run_export(tmp_path, "butd-tsv", tmp_path / "x.tsv", progress=False)
    (tmp_path / "feats").mkdir()
    (tmp_path / "feats" / "dataset.json").write_text('{"shards": [], "counts": {"ok": 0}}')
    (tmp_path / "precious").mkdir()
    with pytest.raises(ValueError, match="not an LMDB environment; refusing"):
        run_export(tmp_path / "feats", "vilbert-lmdb", tmp_path / "precious", overwrite=True, progress=False)
    with pytest.raises(ValueError, match="--format must be one of butd-tsv, vilbert-lmdb"):
        run_export(tmp_path / "feats", "npz-dir", tmp_path / "x", progress=False)
    assert run_export(tmp_path / "feats", "butd-tsv", tmp_path / "x.tsv", progress=False)["images"] == 0
    assert (tmp_path / "x.tsv").read_bytes() == b"" and not list(tmp_path.glob(".x.tsv*"))
