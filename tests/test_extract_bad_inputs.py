"""Every kind of bad input of `vilbert-data extract`: the image zoo in one CLI run, and the argument,
machine, address and output-folder mistakes that must fail in one line before Ray starts."""

from __future__ import annotations

import http.server
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from extract_fixtures import (
    TINY,
    index_rows,
    jpeg_bytes,
    make_bad_files,
    make_good_images,
    make_odd_images,
    noise,
)
from PIL import Image
from typer.testing import CliRunner

from cli import app
from pipelines import distributor
from pipelines.folder_lock import LOCK_FILE

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

TINY_ARGS = [arg for name, value in TINY.items() for arg in ("--" + name.replace("_", "-"), str(value))]


@pytest.fixture(autouse=True)
def no_ray_yet():
    """These tests start from a process without Ray: that is what the 'before Ray starts' checks see."""
    if ray.is_initialized():
        ray.shutdown()


def _unsupported_bmp() -> bytes:
    """A BMP whose compression field names a method Pillow does not decode."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "BMP")
    data = bytearray(buf.getvalue())
    data[30:34] = struct.pack("<I", 5)  # biCompression = BI_PNG
    return bytes(data)


def _corrupt_png() -> bytes:
    """A PNG whose compressed pixel data is scrambled."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[60:-20] = bytes(b ^ 0x5A for b in data[60:-20])
    return bytes(data)


def make_zoo(root: Path) -> dict[str, tuple[str, str | None, str | None]]:
    """Every kind of input in one folder; returns {image id: (status, reason, text the error must hold)}."""
    expected: dict[str, tuple[str, str | None, str | None]] = {}
    for key in make_odd_images(
        root / "odd"
    ):  # grey, palette, RGBA, CMYK, 16-bit, EXIF, 1x1, 1x5000, animated
        expected[f"odd_{key}"] = ("ok", None, None)
    for key, reason in make_bad_files(root / "bad").items():  # empty, text, truncated, bomb
        expected[f"bad_{key}"] = ("failed", reason, None)
    (root / "bad" / "unsupported.bmp").write_bytes(_unsupported_bmp())
    expected["bad_unsupported"] = ("failed", "unsupported", "BMP compression")
    (root / "bad" / "corrupt.png").write_bytes(_corrupt_png())
    expected["bad_corrupt"] = ("failed", "corrupt", None)
    make_good_images(root / "good", 2)
    expected.update({"good_img000": ("ok", None, None), "good_img001": ("ok", None, None)})
    links = root / "links"
    links.mkdir()
    (links / "alias.jpg").symlink_to("../good/img000.jpg")
    expected["links_alias"] = ("ok", None, None)
    (links / "loop_a.jpg").symlink_to("loop_b.jpg")  # a loop between two files
    (links / "loop_b.jpg").symlink_to("loop_a.jpg")
    expected["links_loop_a"] = expected["links_loop_b"] = ("failed", "read_error", "symlink loop")
    (links / "dangling.png").symlink_to(root / "nowhere.png")
    expected["links_dangling"] = ("failed", "read_error", "dangling symlink")
    (links / "up").symlink_to("..")  # a folder loop: listed once, with a warning
    (links / "twin").symlink_to("../good")  # a second way into a listed folder
    (root / "notes.txt").write_text("not an image extension: not listed\n")
    (root / ".hidden.jpg").write_bytes(jpeg_bytes(noise(8, 8, seed=1)))
    return expected


def _tar_members(out: Path) -> dict[str, dict[str, bytes]]:
    """{image id: {member: bytes}} over every shard of a feature set."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("features-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, member = m.name.split(".", 1)
                samples.setdefault(key, {})[member] = tar.extractfile(m).read()
    return samples


@pytest.mark.timeout(300)  # before the fix, listing the folder loop multiplied the inputs
def test_the_bad_input_zoo_in_one_cli_run(tmp_path: Path, caplog) -> None:
    import torch

    from extract import load_image
    from pipelines.extract_job import ExtractOptions
    from pipelines.formats.features import encode_detections
    from pipelines.worker import DetectorSpec

    expected = make_zoo(tmp_path / "in")
    out = tmp_path / "out"
    args = [
        "extract",
        "--images",
        str(tmp_path / "in"),
        "--out",
        str(out),
        "--shard-size",
        "5",
        "--workers",
        "1",
    ]
    with caplog.at_level("WARNING", logger="pipelines.sources"):
        res = CliRunner().invoke(app, [*args, *TINY_ARGS, "--no-progress"])
    assert res.exit_code == 3, res.output  # finished, some images failed
    failed = sum(status == "failed" for status, _, _ in expected.values())
    assert f"images: {len(expected)}  ok: {len(expected) - failed}  failed: {failed}" in res.output
    warnings = [r.getMessage() for r in caplog.records]
    assert any("symlink loop" in w and "links/up -> .." in w for w in warnings), warnings
    assert any("links/twin -> ../good" in w and "listed as good" in w for w in warnings), warnings

    rows = {r["image_id"]: r for r in index_rows(out)}
    assert len(index_rows(out)) == len(rows) == len(expected)  # each real file exactly once
    table = {k: (r["status"], r["reason"]) for k, r in rows.items()}
    assert table == {k: (status, reason) for k, (status, reason, _) in expected.items()}
    for key, (_, _, text) in expected.items():
        if text is not None:
            assert text in rows[key]["error"], rows[key]
    assert rows["links_dangling"]["source"] == str(tmp_path / "in" / "links" / "dangling.png")
    assert not (out / LOCK_FILE).exists() and not list(out.glob(".*"))

    # the bytes of every ok image are those of the same detector on that image alone
    opts = ExtractOptions(**TINY)
    detector = DetectorSpec(
        None, "cpu", "res4", {**opts.detector_config(), "batch_size": TINY["batch_size"]}
    )()
    samples = _tar_members(out)
    assert sorted(samples) == sorted(k for k, r in rows.items() if r["status"] == "ok")
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # as many as the job's one CPU worker had
    try:
        for key, members in samples.items():
            source = rows[key]["source"]
            (det,) = detector.detect([load_image(source)])
            assert members == encode_detections(key, source, det, "res4", "float16"), key
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def ray_must_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the job gets as far as starting or joining Ray."""

    def boom(*args, **kwargs):
        raise AssertionError("Ray was started before the bad argument was noticed")

    monkeypatch.setattr(distributor, "connect_ray", boom)
    monkeypatch.setattr(ray, "init", boom)


def _extract(tmp_path: Path, *extra: str) -> tuple[int, str]:
    """Run the CLI on one good image with extra arguments; (exit code, output)."""
    if not (tmp_path / "in").exists():
        make_good_images(tmp_path / "in", 1)
    out = str(tmp_path / "out")
    res = CliRunner().invoke(app, ["extract", "--images", str(tmp_path / "in"), "--out", out, *extra])
    return res.exit_code, res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
        (["--gpus-per-worker", "1"], "--gpus-per-worker 1: this machine has no CUDA device"),
        (["--device", "tpu"], "--device must be auto, cpu or cuda, got 'tpu'"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--device", "cpu", "--gpus-per-worker", "1"], "--device cpu contradicts --gpus-per-worker"),
        (["--ray-address", "headnode"], "--ray-address 'headnode': expected HOST:PORT"),
    ],
)
def test_argument_and_machine_mistakes_exit_2_in_one_line_before_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_must_not_start, args: list[str], message: str
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, output = _extract(tmp_path, *args)
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), output
    assert message in output


def test_out_that_is_a_file_exits_2_before_ray(tmp_path: Path, ray_must_not_start) -> None:
    (tmp_path / "out").write_text("my notes\n")
    code, output = _extract(tmp_path)
    assert code == 2 and output.strip() == f"error: --out {tmp_path / 'out'}: exists and is not a folder"
    assert (tmp_path / "out").read_text() == "my notes\n"
    code, output = _extract(tmp_path, "--out", str(tmp_path / "out" / "sub"))  # the later --out wins
    assert code == 2 and "cannot create the folder" in output and "\n" not in output.strip()


def _closed_port() -> int:
    """A local TCP port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(90)  # before the fix, Ray retried the address for minutes
def test_unreachable_ray_address_fails_fast_naming_it(tmp_path: Path, ray_must_not_start) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    code, output = _extract(tmp_path, "--ray-address", address)
    assert time.monotonic() - t0 < 30  # a behaviour bound, not a benchmark
    assert code == 2 and f"--ray-address '{address}': cannot reach {address}" in output
    assert "ray start --head" in output and "\n" not in output.strip()


@pytest.mark.timeout(90)
def test_an_address_that_is_not_ray_fails_fast(tmp_path: Path, ray_must_not_start) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        t0 = time.monotonic()
        code, output = _extract(tmp_path, "--ray-address", address)
    finally:
        server.shutdown()
    assert time.monotonic() - t0 < 30
    assert code == 2 and "answers, but not as a Ray head node" in output and address in output


def _children_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, start time)} from /proc (the test's own reading, not the reaper's)."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), fields[19])
    return table


def _tree(pid: int) -> dict[int, str]:
    """{pid: start time} of every process below `pid` now."""
    table, found, stack = _children_table(), {}, [pid]
    while stack:
        parent = stack.pop()
        for child, (pp, start) in table.items():
            if pp == parent and child not in found:
                found[child] = start
                stack.append(child)
    return found


def _running(procs: dict[int, str]) -> list[int]:
    """The processes of `procs` that still run (same start time, not zombies)."""
    table, out = _children_table(), []
    for pid, start in procs.items():
        if pid in table and table[pid][1] == start:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
    return out


_DRIVER = """
import time, ray
from pipelines.distributor import connect_ray

connect_ray(None)

@ray.remote
class Pinger:
    def ping(self):
        return 1

ray.get(Pinger.remote().ping.remote())  # a worker process as well as the node's own processes
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(180)
def test_embedded_ray_leaves_no_process_after_the_driver_is_killed(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    procs: dict[int, str] = {}
    names: dict[int, str] = {}
    try:
        assert driver.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # the watchdog re-reads the tree every second
        procs = _tree(driver.pid)
        names = {pid: open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip() for pid in procs}
        assert any("raylet" in n for n in names.values()) and any("Agent" in n for n in names.values()), names
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 30  # Ray alone leaves its agents for about a minute
    while _running(procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {pid: names.get(pid) for pid in _running(procs)}
    for pid in left:  # do not leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running 30 s after the driver died: {left}"


_HOLDER = """
import sys, time
from pipelines.folder_lock import FolderLock

FolderLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_job_into_a_folder_in_use_is_refused_then_a_dead_holder_is_taken_over(
    tmp_path: Path, ray_must_not_start, caplog
) -> None:
    from pipelines.folder_lock import FolderLock

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, output = _extract(tmp_path)
        lines = output.strip().splitlines()
        assert code == 1 and len(lines) == 1, output
        assert f"{out} is in use by another extract job (pid {holder.pid} on this host" in lines[0]
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_FILE).exists()  # a killed job cannot clean up: its lock is now stale
    with caplog.at_level("WARNING", logger="pipelines.folder_lock"):
        lock = FolderLock(out)
        lock.acquire()
    assert f"its process {holder.pid} on this host is gone" in caplog.text
    assert f'"pid": {os.getpid()}' in (out / LOCK_FILE).read_text()
    lock.release()
    assert not (out / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_stale_only_without_heartbeat(tmp_path: Path) -> None:
    import json

    from pipelines.folder_lock import STALE_AFTER_S, FolderLock, FolderLockedError

    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "started": "2026-01-01T00:00:00"}))
    with pytest.raises(FolderLockedError, match="pid 4242 on host gpu-node-7.*delete"):
        FolderLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(path, (old, old))  # no heartbeat for longer than the limit
    lock = FolderLock(tmp_path)
    lock.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_stale_reason_rules() -> None:
    from pipelines.folder_lock import STALE_AFTER_S, stale_reason
    from pipelines.ray_reaper import process_start

    me = socket.gethostname()
    live = {"host": me, "pid": os.getpid(), "process_start": process_start(os.getpid())}
    assert stale_reason(live, 10 * STALE_AFTER_S) is None  # a live local owner holds it however old
    assert "another process" in stale_reason({**live, "process_start": "1"}, 0)  # the pid was reused
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert "is gone" in stale_reason({"host": me, "pid": gone.pid}, 0)
    assert stale_reason({"host": "elsewhere", "pid": 1}, STALE_AFTER_S - 1) is None
    assert "no heartbeat" in stale_reason({"host": "elsewhere", "pid": 1}, STALE_AFTER_S + 1)
    assert stale_reason(None, 1.0) is None  # being written right now
    assert "unreadable" in stale_reason(None, 60.0)
