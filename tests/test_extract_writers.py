"""Shard writing (pipelines.formats.features): member names/dtypes, atomic publication, byte-identical output."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.fileio import remove_stale_temps
from pipelines.formats import features as writers
from pipelines.formats.features import FeatureShardWriter, encode_detections


@dataclass
class FakeDetections:
    """The fields of extract.Detections (contract section 1), filled with seeded random values."""

    boxes: np.ndarray
    features: np.ndarray
    spatial: np.ndarray
    cls_prob: np.ndarray
    object_ids: np.ndarray
    object_conf: np.ndarray
    attr_ids: np.ndarray
    attr_conf: np.ndarray
    image_w: int
    image_h: int


def fake_detections(k: int, seed: int, d: int = 1024, w: int = 64, h: int = 48) -> FakeDetections:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 30, (k, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + 10], axis=1)
    spatial = np.concatenate([boxes / [w, h, w, h], np.full((k, 1), 100 / (w * h))], axis=1).astype(
        np.float32
    )
    return FakeDetections(
        boxes=boxes,
        features=rng.standard_normal((k, d)).astype(np.float32),
        spatial=spatial,
        cls_prob=rng.dirichlet(np.ones(1601), k).astype(np.float32),
        object_ids=rng.integers(1, 1601, k),
        object_conf=rng.uniform(0, 1, k).astype(np.float32),
        attr_ids=rng.integers(1, 401, k),
        attr_conf=rng.uniform(0, 1, k).astype(np.float32),
        image_w=w,
        image_h=h,
    )


def _row(image_id: str, status: str = "ok", k: int = 3, reason: str | None = None) -> dict:
    return {
        "image_id": image_id,
        "source": f"/data/{image_id}.jpg",
        "status": status,
        "error": None if status == "ok" else f"boom: {reason}",
        "reason": reason,
        "num_boxes": k if status == "ok" else 0,
        "width": 64 if status == "ok" else None,
        "height": 48 if status == "ok" else None,
        "bytes": 1234,
    }


def _write_shard(out: Path, dtype: str = "float16") -> dict:
    with FeatureShardWriter(out, "features-000000") as w:
        for i, k in enumerate([3, 10]):
            det = fake_detections(k, seed=i)
            w.write_sample(
                f"img_{i}", encode_detections(f"img_{i}", f"/data/img_{i}.jpg", det, "res4", dtype)
            )
        for i, k in enumerate([3, 10]):
            w.add_row(_row(f"img_{i}", k=k))
        w.add_row(_row("bad", "failed", reason="truncated"))
        return w.finish({"seconds": 1.5})


def test_round_trip_through_plain_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    stats = _write_shard(tmp_path)
    assert stats["count"] == 3 and stats["ok"] == 2 and stats["failed"] == 1 and stats["num_boxes"] == 13
    assert stats["failed_by_reason"] == {"truncated": 1} and stats["seconds"] == 1.5
    assert json.loads((tmp_path / "features-000000_stats.json").read_text()) == stats

    samples = list(wds.WebDataset(str(tmp_path / "features-000000.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["img_0", "img_1"]
    for i, (s, k) in enumerate(zip(samples, [3, 10], strict=True)):
        det = fake_detections(k, seed=i)
        assert set(s) - {"__key__", "__url__", "__local_path__"} == {
            "boxes.npy", "features.npy", "spatial.npy", "cls_prob.npy", "objects.npy", "attributes.npy", "json",
        }  # fmt: skip
        assert s["boxes.npy"].dtype == np.float32 and s["boxes.npy"].shape == (k, 4)
        assert s["features.npy"].dtype == np.float16 and s["features.npy"].shape == (k, 1024)
        assert s["cls_prob.npy"].dtype == np.float16 and s["cls_prob.npy"].shape == (k, 1601)
        assert s["spatial.npy"].dtype == np.float32 and s["spatial.npy"].shape == (k, 5)
        np.testing.assert_array_equal(s["boxes.npy"], det.boxes)
        np.testing.assert_array_equal(s["features.npy"], det.features.astype(np.float16))
        for j in range(k):  # objects/attributes rows are [id, confidence]
            assert s["objects.npy"][j].tolist() == [float(det.object_ids[j]), float(det.object_conf[j])]
            assert s["attributes.npy"][j].tolist() == [float(det.attr_ids[j]), float(det.attr_conf[j])]
        assert s["json"] == {
            "image_id": f"img_{i}", "source": f"/data/img_{i}.jpg", "width": 64, "height": 48,
            "num_boxes": k, "feature_layer": "res4",
        }  # fmt: skip

    table = pq.read_table(tmp_path / "features-000000.parquet").to_pylist()
    assert [r["image_id"] for r in table] == ["img_0", "img_1", "bad"]
    assert table[2] == _row("bad", "failed", reason="truncated")
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_float32_keeps_full_precision_and_output_is_byte_identical(tmp_path: Path) -> None:
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        _write_shard(tmp_path / run, "float32")
    for name in ("features-000000.tar", "features-000000.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / "features-000000.tar") as tar:
        member = tar.extractfile("img_1.features.npy").read()
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    arr = np.load(io.BytesIO(member))
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, fake_detections(10, seed=1).features)


def test_crash_before_stats_leaves_shard_not_done_and_no_partial_final_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_index(path, rows):
        raise OSError("disk full")

    monkeypatch.setattr(writers, "write_index", broken_index)
    with pytest.raises(OSError, match="disk full"):
        _write_shard(tmp_path)
    assert not (tmp_path / "features-000000_stats.json").exists()
    assert not (tmp_path / "features-000000.parquet").exists()

    # an exception while samples are being written publishes nothing at all
    out = tmp_path / "second"
    out.mkdir()
    with pytest.raises(RuntimeError), FeatureShardWriter(out, "features-000001") as w:
        w.write_sample("x", {"json": b"{}"})
        raise RuntimeError("worker died")
    assert list(out.iterdir()) == []


def test_keys_with_dots_or_duplicates_are_rejected_and_stale_temps_removed(tmp_path: Path) -> None:
    with FeatureShardWriter(tmp_path, "features-000000") as w:
        with pytest.raises(ValueError, match="no dots"):
            w.write_sample("a.b", {"json": b"{}"})
        w.write_sample("a", {"json": b"{}"})
        with pytest.raises(ValueError, match="twice"):
            w.write_sample("a", {"json": b"{}"})
        # a temp file of a killed run (any pid) is recognised as stale; the live one too
        (tmp_path / ".features-000003.tar.tmp-999-abcd").write_bytes(b"partial")
        removed = {p.name for p in remove_stale_temps(tmp_path)}
        assert ".features-000003.tar.tmp-999-abcd" in removed
        w.abort()
    assert list(tmp_path.iterdir()) == []
