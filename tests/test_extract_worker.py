"""One shard without Ray (pipelines.worker): decode failures, detector failures isolated, fsspec inputs."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.planner import plan_shards
from pipelines.sources import list_sources
from pipelines.worker import ShardSettings, iter_decoded, process_shard


class ConstantDetector:
    """Detections whose values encode the image size; raises on images 13 pixels wide."""

    info = {"feature_dim": 1024}

    def __init__(self) -> None:
        self.batches: list[int] = []

    def detect(self, images):
        self.batches.append(len(images))
        if any(im.size[0] == 13 for im in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        out = []
        for im in images:
            w, h = im.size
            k = 2

            class D:
                pass

            d = D()
            d.boxes = np.array([[0, 0, w, h]] * k, np.float32)
            d.features = np.full((k, 1024), w + h / 1000, np.float32)
            d.spatial = np.zeros((k, 5), np.float32)
            d.cls_prob = np.zeros((k, 1601), np.float32)
            d.object_ids, d.object_conf = np.array([1, 2]), np.array([0.5, 0.5], np.float32)
            d.attr_ids, d.attr_conf = np.array([3, 4]), np.array([0.1, 0.1], np.float32)
            d.image_w, d.image_h = w, h
            out.append(d)
        return out


def _noise_png() -> bytes:
    """A 40x40 noise PNG (big enough that a cut lands inside the pixel data)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w, h, 0)).save(buf, "PNG")
    return buf.getvalue()


def _png_folder(root: Path, widths: list[int], height: int = 9) -> Path:
    """PNGs 0.png, 1.png, ... of the given widths in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for i, w in enumerate(widths):
        (root / f"{i}.png").write_bytes(_png(w, height))
    return root


def test_shard_rows_follow_input_order_with_decode_and_detect_failures(tmp_path: Path) -> None:
    import webdataset as wds

    src = tmp_path / "in"
    src.mkdir()
    files = {
        "a.png": _png(10, 7),
        "b.png": b"",
        "c.png": _png(13, 5),
        "d.png": _png(11, 6),
        "e.png": _noise_png()[:300],
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    (plan,) = plan_shards(list_sources(src), 10)
    det = ConstantDetector()
    seen: list[tuple[int, int]] = []
    stats = process_shard(
        plan, det, tmp_path, ShardSettings(batch_size=2), lambda ok, bad: seen.append((ok, bad))
    )

    rows = pq.read_table(tmp_path / "features-000000.parquet").to_pylist()
    assert [(r["image_id"], r["status"], r["reason"]) for r in rows] == [
        ("a", "ok", None),
        ("b", "failed", "empty"),
        ("c", "failed", "detect_error"),  # the batch [a, c] failed; a alone succeeded, c alone failed
        ("d", "ok", None),
        ("e", "failed", "truncated"),
    ]
    assert "out of memory" in rows[2]["error"] and (rows[2]["width"], rows[2]["height"]) == (13, 5)
    assert det.batches == [2, 1, 1, 1]  # [a, c] fails, then a, c one by one, then [d]
    assert stats["ok"] == 2 and stats["failed_by_reason"] == {"detect_error": 1, "empty": 1, "truncated": 1}
    assert seen[-1] == (2, 3) and all(a <= b for a, b in zip(seen, seen[1:], strict=False))

    samples = {
        s["__key__"]: s
        for s in wds.WebDataset(str(tmp_path / "features-000000.tar"), shardshuffle=False).decode()
    }
    assert list(samples) == ["a", "d"]
    assert samples["d"]["features.npy"][0, 0] == np.float16(11 + 6 / 1000)
    assert samples["a"]["json"]["width"] == 10 and samples["a"]["json"]["height"] == 7


def test_fsspec_inputs_are_read_and_missing_files_become_read_errors(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/wbucket/p/x.png": _png(20, 10), "/wbucket/p/y.png": _png(12, 9)})
    items = list_sources("memory://wbucket/p")
    fs.rm("/wbucket/p/y.png")  # vanished between listing and reading
    (plan,) = plan_shards(items, 5)
    process_shard(plan, ConstantDetector(), tmp_path, ShardSettings(batch_size=4))
    rows = pq.read_table(tmp_path / "features-000000.parquet").to_pylist()
    assert [(r["image_id"], r["status"], r["reason"]) for r in rows] == [
        ("x", "ok", None),
        ("y", "failed", "read_error"),
    ]
    assert rows[0]["bytes"] == len(_png(20, 10))


def test_decoding_runs_ahead_in_another_thread_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from pipelines import worker

    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(_png(5 + i, 5))
    calls: list[tuple[str, str]] = []
    real = worker.decode_item

    def recording(item):
        calls.append((item.image_id, threading.current_thread().name))
        return real(item)

    monkeypatch.setattr(worker, "decode_item", recording)
    it = iter_decoded(list_sources(tmp_path), prefetch=3)
    first = next(it)
    deadline = time.monotonic() + 5
    while len(calls) < 4 and time.monotonic() < deadline:  # decodes 1..3 proceed while nobody asks
        time.sleep(0.01)
    assert first.item.image_id == "0" and [c[0] for c in calls] == ["0", "1", "2", "3"]
    assert all(name.startswith("decode") for _, name in calls)
    rest = list(it)
    assert [d.image.size[0] for d in [first, *rest]] == [5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_does_not_change_what_is_written(tmp_path: Path, batch_size: int) -> None:
    (plan,) = plan_shards(list_sources(_png_folder(tmp_path / "in", [20, 21, 22, 23])), 4)
    det = ConstantDetector()
    process_shard(plan, det, tmp_path, ShardSettings(batch_size=batch_size))
    assert det.batches == ([1, 1, 1, 1] if batch_size == 1 else [3, 1])
    rows = pq.read_table(tmp_path / "features-000000.parquet").to_pylist()
    assert [r["width"] for r in rows] == [20, 21, 22, 23]


class SizedDetector(ConstantDetector):
    """ConstantDetector with the detector's bucket key: images batch together only when equally sized."""

    def __init__(self) -> None:
        super().__init__()
        self.widths: list[list[int]] = []

    def input_size(self, image):
        return image.size[::-1]

    def detect(self, images):
        self.widths.append([im.size[0] for im in images])
        return super().detect(images)


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        # A A B A B A C (widths 10, 10, 12, 10, 12, 10, 14), batch size 2, worked out by hand
        (8, [[10, 10], [12, 12], [10, 10], [14]]),
        (1, [[10, 10], [12], [10], [12], [10], [14]]),  # nobody waits more than one input
    ],
)
def test_batches_hold_one_input_size_and_samples_stay_in_input_order(
    tmp_path: Path, window: int, expected: list[list[int]]
) -> None:
    import webdataset as wds

    widths = [10, 10, 12, 10, 12, 10, 14]
    (plan,) = plan_shards(list_sources(_png_folder(tmp_path / "in", widths)), 10)
    (tmp_path / "b").mkdir()
    (tmp_path / "one").mkdir()
    det = SizedDetector()
    process_shard(plan, det, tmp_path / "b", ShardSettings(batch_size=2, bucket_window=window))
    assert det.widths == expected
    # one image at a time writes the same bytes: batching changes neither the order nor the content
    process_shard(plan, SizedDetector(), tmp_path / "one", ShardSettings(batch_size=1))
    tar = "features-000000.tar"
    assert (tmp_path / "b" / tar).read_bytes() == (tmp_path / "one" / tar).read_bytes()
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "b" / tar), shardshuffle=False)]
    assert keys == [str(i) for i in range(7)]
    rows = pq.read_table(tmp_path / "b" / "features-000000.parquet").to_pylist()
    assert [r["width"] for r in rows] == widths


def test_a_full_disk_stops_the_shard_in_one_line_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from pipelines.fileio import DiskFullError
    from pipelines.formats import features as writers

    (plan,) = plan_shards(list_sources(_png_folder(tmp_path / "in", [20, 21, 22])), 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "features-000007.tar").write_bytes(b"a finished shard of the same job")
    real = writers.FeatureShardWriter.write_sample

    def fills_up(self, key, members):
        if key == "1":  # the disk is full from the second sample on
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, members)

    monkeypatch.setattr(writers.FeatureShardWriter, "write_sample", fills_up)
    with pytest.raises(DiskFullError) as err:
        process_shard(plan, ConstantDetector(), out, ShardSettings(batch_size=1))
    message = str(err.value)
    assert message.startswith(f"no space left on the device of {out} (") and "MB free" in message
    assert "features-000000" in message and "\n" not in message
    assert sorted(p.name for p in out.iterdir()) == ["features-000007.tar"]  # no temporary, nothing half-done
