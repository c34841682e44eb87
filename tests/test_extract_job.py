"""The extraction job end to end on one shared Ray instance: outputs, failures, resume, dead actors.

The detector is the real `extract.Detector` with random (seeded) weights and tiny settings.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.distributor import ExtractJobError, plan_workers
from pipelines.extract_job import ExtractOptions, run_extract
from pipelines.worker import DetectorSpec

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

TINY = dict(depth=50, min_size=64, max_size=96, max_proposals=5, min_boxes=2, max_boxes=4, batch_size=2)
MEMBERS = {
    "boxes.npy",
    "features.npy",
    "spatial.npy",
    "cls_prob.npy",
    "objects.npy",
    "attributes.npy",
    "json",
}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the whole module (starting Ray costs seconds)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test factories travel by value
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=100 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_good_images(root: Path, n: int, offset: int = 0) -> list[Path]:
    """`n` small RGB JPEGs with distinct content."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"img{i + offset:03d}.jpg"
        p.write_bytes(_jpeg(_noise(48 + 4 * (i % 3), 36, seed=i + offset)))
        paths.append(p)
    return paths


def make_odd_images(root: Path) -> dict[str, tuple[int, int]]:
    """Every kind of image the job must handle; returns {image id: (width, height) after EXIF}."""
    root.mkdir(parents=True, exist_ok=True)
    base = _noise(40, 30, seed=7)
    base.convert("L").save(root / "gray.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    (root / "cmyk.jpg").write_bytes(_jpeg(base.convert("CMYK")))
    Image.fromarray(np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).save(root / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: stored 40x30 -> shown 30x40
    (root / "exif.jpg").write_bytes(_jpeg(base, exif=exif.tobytes()))
    Image.new("RGB", (1, 1), "red").save(root / "tiny.png")
    Image.new("RGB", (1, 5000), "blue").save(root / "strip.png")
    frames = [_noise(40, 30, seed=s) for s in (1, 2)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "gray": (40, 30), "palette": (40, 30), "rgba": (40, 30), "cmyk": (40, 30), "sixteen": (40, 30),
        "exif": (30, 40), "tiny": (1, 1), "strip": (1, 5000), "anim": (40, 30),
    }  # fmt: skip


def make_bad_files(root: Path) -> dict[str, str]:
    """Files that must become failed rows; returns {image id: expected reason}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not an image\n")
    full = _jpeg(_noise(64, 64, seed=3))
    (root / "trunc.jpg").write_bytes(full[: len(full) // 2])
    Image.new("1", (10_000, 10_000)).save(root / "bomb.png")  # 100 MP > Pillow's 89.5 MP guard
    return {"empty": "empty", "text": "not_an_image", "trunc": "truncated", "bomb": "too_large"}


def _index(out: Path) -> list[dict]:
    rows = []
    for p in sorted(out.glob("features-*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


def _tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("features-*.tar"))}


def _opts(**kw) -> ExtractOptions:
    return ExtractOptions(**{**TINY, "progress": False, **kw})


def test_cli_extract_handles_every_image_kind_and_records_failures(ray_cluster, tmp_path: Path) -> None:
    import webdataset as wds
    from typer.testing import CliRunner

    from cli import app

    sizes = make_odd_images(tmp_path / "in" / "odd")
    reasons = make_bad_files(tmp_path / "in" / "bad")
    out = tmp_path / "out"
    args = [
        "extract",
        "--images",
        str(tmp_path / "in"),
        "--out",
        str(out),
        "--shard-size",
        "5",
        "--no-progress",
    ]
    for name, value in TINY.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 3, res.output  # finished, some images failed
    assert "failed: 4" in res.output and "too_large=1" in res.output

    rows = {r["image_id"]: r for r in _index(out)}
    expected_ids = {f"odd_{k}" for k in sizes} | {f"bad_{k}" for k in reasons}
    assert sorted(rows) == sorted(expected_ids) and len(_index(out)) == len(expected_ids)
    for key, reason in reasons.items():
        assert rows[f"bad_{key}"]["status"] == "failed" and rows[f"bad_{key}"]["reason"] == reason
        assert rows[f"bad_{key}"]["error"]
    for key, (w, h) in sizes.items():
        row = rows[f"odd_{key}"]
        assert row["status"] == "ok", row
        assert (row["width"], row["height"]) == (w, h) and 1 <= row["num_boxes"] <= 4

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["format"] == "vilbert-data/features" and dataset["feature_dim"] == 1024
    assert dataset["counts"] == {
        "images": 13, "ok": 9, "failed": 4,
        "failed_by_reason": {"empty": 1, "not_an_image": 1, "too_large": 1, "truncated": 1},
    }  # fmt: skip
    assert dataset["detector"]["random_weights"] is True and dataset["detector"]["max_boxes"] == 4
    assert dataset["shards"] == ["features-000000.tar", "features-000001.tar", "features-000002.tar"]
    assert sum(dataset["summary"]["boxes_per_image"]["histogram"].values()) == 9

    samples = list(wds.WebDataset([str(out / s) for s in dataset["shards"]], shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in samples) == sorted(k for k, r in rows.items() if r["status"] == "ok")
    for s in samples:
        k = rows[s["__key__"]]["num_boxes"]
        assert MEMBERS <= set(s)
        assert s["features.npy"].shape == (k, 1024) and s["features.npy"].dtype == np.float16
        assert s["cls_prob.npy"].shape == (k, 1601) and s["cls_prob.npy"].dtype == np.float16
        assert s["boxes.npy"].dtype == np.float32 and s["objects.npy"].shape == (k, 2)
        np.testing.assert_allclose(s["cls_prob.npy"].astype(np.float32).sum(1), 1.0, atol=2e-2)
        assert s["json"]["num_boxes"] == k and s["json"]["image_id"] == s["__key__"]
        w, h = s["json"]["width"], s["json"]["height"]
        assert (s["boxes.npy"][:, [0, 2]] <= w + 1e-3).all() and (s["boxes.npy"][:, [1, 3]] <= h + 1e-3).all()


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory) -> tuple[Path, Path]:
    """8 images in 4 shards extracted once by 2 workers: the expected bytes of the other tests."""
    root = tmp_path_factory.mktemp("ref")
    make_good_images(root / "in", 8)
    result = run_extract(root / "in", root / "out", _opts(shard_size=2, workers=2))
    assert result.exit_code == 0 and result.summary["ok"] == 8 and result.summary["shards"] == 4
    return root / "in", root / "out"


def test_ray_data_reads_the_shards(reference) -> None:
    _, out = reference
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = ray.data.read_webdataset(str(out / "features-000000.tar")).take_all()
    assert sorted(r["__key__"] for r in rows) == ["img000", "img001"]
    for r in rows:
        features = np.asarray(r["features.npy"])
        assert features.dtype == np.float16 and features.shape[1] == 1024
        assert features.shape[0] == np.asarray(r["boxes.npy"]).shape[0] >= 2


@dataclass
class DyingDetector:
    """Factory: a real detector whose process exits (os._exit) on its first batch, once per marker file."""

    spec: DetectorSpec
    marker: str

    def __call__(self) -> _Dying:
        return _Dying(self.spec(), self.marker)


class _Dying:
    def __init__(self, detector, marker: str):
        self.detector, self.marker, self.calls = detector, marker, 0

    @property
    def info(self) -> dict:
        return self.detector.info

    def detect(self, images):
        self.calls += 1
        if self.calls == 1:
            try:  # O_EXCL: of two actors starting together, exactly one dies
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return self.detector.detect(images)
            os._exit(1)  # the actor process dies in the middle of a shard
        return self.detector.detect(images)


def test_dead_actor_is_replaced_and_its_shard_redone(reference, tmp_path: Path) -> None:
    src, ref_out = reference
    opts = _opts(shard_size=2, workers=2, limit=4)  # the reference's first 2 shards
    spec = DetectorSpec(None, "cpu", "res4", opts.detector_config())
    result = run_extract(
        src, tmp_path / "out", opts, detector_factory=DyingDetector(spec, str(tmp_path / "died"))
    )
    assert (tmp_path / "died").exists()
    assert result.summary["actors_replaced"] == 1 and result.summary["shard_retries"] == 1
    assert sorted(r["image_id"] for r in _index(tmp_path / "out")) == [f"img{i:03d}" for i in range(4)]
    expected = {
        k: v for k, v in _tar_bytes(ref_out).items() if k in ("features-000000.tar", "features-000001.tar")
    }
    assert _tar_bytes(tmp_path / "out") == expected
    assert not list((tmp_path / "out").glob(".*"))  # the dead actor's temporary tar was cleaned up


_KILL_SCRIPT = """
import sys
from pipelines.extract_job import ExtractOptions, run_extract
opts = ExtractOptions(**{tiny!r}, shard_size=2, workers=2, ray_address=sys.argv[3], progress=False)
run_extract(sys.argv[1], sys.argv[2], opts)
"""


def test_sigkill_mid_run_then_rerun_keeps_every_input_exactly_once(
    reference, ray_cluster, tmp_path: Path
) -> None:
    src, ref_out = reference
    out = tmp_path / "out"
    script = _KILL_SCRIPT.format(tiny=TINY)
    proc = subprocess.Popen([sys.executable, "-c", script, str(src), str(out), ray_cluster])
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("*_stats.json")):
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no cleanup of any kind in the driver
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the job ended by itself before it could be killed"
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    assert 1 <= len(finished) < 4, f"the kill came at the wrong moment: {sorted(finished)}"
    assert not (out / "dataset.json").exists()

    result = run_extract(src, out, _opts(shard_size=2, workers=2))
    assert result.exit_code == 0
    assert result.summary["shards_resumed"] >= len(finished)
    for name, mtime in finished.items():  # finished shards were kept, not redone
        assert (out / name).stat().st_mtime_ns == mtime
    ids = [r["image_id"] for r in _index(out)]
    assert sorted(ids) == [f"img{i:03d}" for i in range(8)] and len(ids) == len(set(ids))
    assert _tar_bytes(out) == _tar_bytes(ref_out)
    assert not list(out.glob(".*tmp*"))

    # a different setting into the same folder is refused; --overwrite starts again
    with pytest.raises(ExtractJobError, match="max_boxes"):
        run_extract(src, out, _opts(shard_size=2, workers=2, max_boxes=3))
    again = run_extract(src, out, _opts(shard_size=2, workers=1, overwrite=True, limit=1, dtype="float32"))
    assert again.summary["shards_resumed"] == 0 and again.summary["images"] == 1
    assert sorted(p.name for p in out.glob("features-*.tar")) == ["features-000000.tar"]
    with tarfile.open(out / "features-000000.tar") as tar:
        features = np.load(io.BytesIO(tar.extractfile("img000.features.npy").read()))
    assert features.dtype == np.float32 and features.shape[1] == 1024


@pytest.mark.timeout(120)  # the failure mode is a hang (Ray waits forever for a GPU)
def test_gpus_asked_for_but_absent_fail_fast(ray_cluster, tmp_path: Path) -> None:
    make_good_images(tmp_path / "in", 1)
    with pytest.raises(ExtractJobError, match="has 0 GPUs"):
        run_extract(tmp_path / "in", tmp_path / "out", _opts(gpus_per_worker=1))
    with pytest.raises(ExtractJobError, match="has 0 GPUs"):
        run_extract(tmp_path / "in", tmp_path / "out", _opts(device="cuda"))


def test_cli_exit_status_for_a_job_that_cannot_run_and_for_bad_input(ray_cluster, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli import app

    make_good_images(tmp_path / "in", 1)
    runner = CliRunner()
    res = runner.invoke(app, ["extract", "--images", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                              "--gpus-per-worker", "1", "--no-progress"])  # fmt: skip
    assert res.exit_code == 1 and "could not finish" in res.output and "0 GPUs" in res.output
    res = runner.invoke(app, ["extract", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "nope: no such file or folder" in res.output
    res = runner.invoke(app, ["extract", "--images", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                              "--dtype", "float64"])  # fmt: skip
    assert res.exit_code == 2 and "--dtype" in res.output


@pytest.mark.parametrize(
    ("resources", "workers", "gpus", "device", "expected"),
    [
        ({"CPU": 16, "GPU": 4}, None, None, "auto", (4, 1.0, 1.0, 1, "cuda")),
        ({"CPU": 16, "GPU": 4}, None, 0.5, "auto", (8, 0.5, 1.0, 1, "cuda")),
        ({"CPU": 16, "GPU": 4}, None, None, "cpu", (1, 0.0, 16, 16, "cpu")),
        ({"CPU": 8}, 2, None, "auto", (2, 0.0, 4, 4, "cpu")),
        ({"CPU": 2}, 4, None, "auto", (4, 0.0, 0.5, 1, "cpu")),
    ],
)
def test_plan_workers(resources, workers, gpus, device, expected) -> None:
    p = plan_workers(resources, workers, gpus, device)
    assert (p.workers, p.gpus_per_worker, p.cpus_per_worker, p.threads, p.device) == expected


def test_plan_workers_rejects_impossible_requests() -> None:
    with pytest.raises(ExtractJobError, match="3 GPUs"):
        plan_workers({"CPU": 8, "GPU": 2}, 3, 1, "auto")
    with pytest.raises(ExtractJobError, match="contradicts"):
        plan_workers({"CPU": 8, "GPU": 2}, None, 1, "cpu")
