"""The extraction job end to end on one shared Ray instance: outputs, failures, resume, dead actors.

The detector is the real `extract.Detector` with random (seeded) weights and tiny settings.
"""

from __future__ import annotations

import errno
import io
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
import pytest
from extract_fixtures import TINY, index_rows, make_good_images, tar_bytes

from pipelines.distributor import ExtractJobError, check_ray_address, plan_workers
from pipelines.extract_job import ExtractOptions, run_extract
from pipelines.worker import DetectorSpec

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the whole module (starting Ray costs seconds)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test factories travel by value
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,  # a CPU cluster on a GPU machine too: the tests expect "has 0 GPUs"
        object_store_memory=100 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _opts(**kw) -> ExtractOptions:
    return ExtractOptions(**{**TINY, "progress": False, **kw})


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
    spec = DetectorSpec(None, "cpu", "res4", {**opts.detector_config(), "batch_size": TINY["batch_size"]})
    result = run_extract(
        src, tmp_path / "out", opts, detector_factory=DyingDetector(spec, str(tmp_path / "died"))
    )
    assert (tmp_path / "died").exists()
    assert result.summary["actors_replaced"] == 1 and result.summary["shard_retries"] == 1
    assert sorted(r["image_id"] for r in index_rows(tmp_path / "out")) == [f"img{i:03d}" for i in range(4)]
    expected = {
        k: v for k, v in tar_bytes(ref_out).items() if k in ("features-000000.tar", "features-000001.tar")
    }
    assert tar_bytes(tmp_path / "out") == expected
    assert not list((tmp_path / "out").glob(".*"))  # the dead actor's temporary tar was cleaned up


@dataclass
class DiskFullAfterFirstShard:
    """Factory: a real detector in an actor whose disk is full for every shard but the first (if `full`)."""

    spec: DetectorSpec
    full: bool = True

    def __call__(self):
        import torch

        from pipelines.formats import features as writers

        torch.set_num_threads(1)  # as in the reference's 2 workers on 2 CPUs: CPU bytes depend on it
        if not self.full:
            return self.spec()

        real = writers.FeatureShardWriter.write_sample

        def fills_up(writer, key, members):
            if writer.name != "features-000000":
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(writer, key, members)

        writers.FeatureShardWriter.write_sample = fills_up  # in the actor's process only
        return self.spec()


def test_a_full_disk_stops_the_job_in_one_line_and_a_rerun_completes(reference, tmp_path: Path) -> None:
    src, ref_out = reference
    out = tmp_path / "out"
    opts = _opts(shard_size=2, workers=1)
    spec = DetectorSpec(None, "cpu", "res4", {**opts.detector_config(), "batch_size": TINY["batch_size"]})
    with pytest.raises(ExtractJobError) as err:
        run_extract(src, out, opts, detector_factory=DiskFullAfterFirstShard(spec))
    message = str(err.value)
    assert message.startswith(f"no space left on the device of {out.resolve()} (") and "\n" not in message
    assert "while writing shard features-000001" in message and "for the 6 images left" in message
    assert "finished shards are kept; free some space and rerun the same command" in message
    assert sorted(p.name for p in out.glob("*_stats.json")) == ["features-000000_stats.json"]
    assert not list(out.glob(".*")) and not (out / "_lock.json").exists()

    result = run_extract(src, out, opts, detector_factory=DiskFullAfterFirstShard(spec, full=False))
    assert result.exit_code == 0 and result.summary["shards_resumed"] == 1
    assert tar_bytes(out) == tar_bytes(ref_out)


def test_the_address_probe_accepts_a_real_ray_head(ray_cluster) -> None:
    check_ray_address(ray_cluster)  # the GCS answers the gRPC greeting, so a real cluster passes


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
    ids = [r["image_id"] for r in index_rows(out)]
    assert sorted(ids) == [f"img{i:03d}" for i in range(8)] and len(ids) == len(set(ids))
    assert tar_bytes(out) == tar_bytes(ref_out)
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
