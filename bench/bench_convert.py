"""Benchmark of `vilbert-data convert`: images/s and MB/s on a generated bottom-up-attention TSV, and memory.

1. A TSV of `--gb` gigabytes is generated in the released layout (36 boxes x 2048-d float32 a line by
   default, about 0.4 MB of base64 each), split over `--files` files.
2. The reader alone, in this process: every line decoded and checked (no writing) - what reading
   the layout costs, the ceiling of the job per core.
3. The whole job (`run_convert`: embedded Ray started fresh, one actor per core, shards written to
   disk), with the resident memory of every Ray process sampled twice a second: flat memory means the
   same RSS in the last quarter of the run as in the first, whatever the file size.

Example:
    RAY_AUTH_MODE=disabled python bench/bench_convert.py --gb 2 --out bench/results/convert.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_pipeline import PAGE, MemorySampler, descendants

MB = 1e6


def generate_tsv(root: Path, gb: float, files: int, boxes: int, dim: int) -> tuple[list[str], int]:
    """butd-tsv files holding about `gb` GB in total; returns (paths, number of images)."""
    from pipelines.feature_formats.butd_tsv import ButdTsvWriter

    rng = np.random.default_rng(0)
    line_bytes = 4 * (4 + dim) * boxes * 4 / 3  # base64 of float32 boxes + features
    n = max(files, int(gb * 1e9 / line_bytes))
    paths, image = [], 0
    for f in range(files):
        path = root / f"trainval_{f}.tsv"
        writer = ButdTsvWriter(path, with_cls_prob=False)
        for _ in range(n // files + (f < n % files)):
            w, h = 640, 480
            x1, y1 = rng.uniform(0, w / 2, boxes), rng.uniform(0, h / 2, boxes)
            b = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, boxes), y1 + rng.uniform(1, h / 2, boxes)], 1)
            feats = rng.random((boxes, dim), dtype=np.float32) * 8
            writer.write(str(image), w, h, b.astype(np.float32), feats, None)
            image += 1
        writer.close()
        paths.append(str(path))
    return paths, image


def bench_reader(paths: list[str], dim: int) -> dict:
    """Decode and check every line in this process, writing nothing."""
    from pipelines.feature_formats import get_reader
    from pipelines.feature_formats.common import check_record

    reader = get_reader("butd-tsv")
    t, cpu, n, nbytes = time.perf_counter(), time.process_time(), 0, 0
    for part in reader.plan(paths, 256):
        for entry in reader.entries(part):
            check_record(reader.decode(entry), dim)
            n, nbytes = n + 1, nbytes + entry.nbytes
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {
        "images": n,
        "images_per_s": round(n / seconds, 1),
        "mb_per_s": round(nbytes / MB / seconds, 1),
        "cpu_s_per_image": round(cpu / n, 5),
    }


class ActorSampler(threading.Thread):
    """RSS of each Ray actor process (title ray::ShardActor...) over time, every `interval` s."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.by_pid, self._stop_event = interval, {}, threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop_event.wait(self.interval):
            for pid in descendants(os.getpid()):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
                except (OSError, IndexError, ValueError):
                    continue
                if b"ShardActor" in title:
                    self.by_pid.setdefault(pid, []).append((time.perf_counter() - t0, rss))

    def summary(self, ready: float) -> list[dict]:
        """Per actor: RSS (MiB) when the conversion began, at its middle, at the end, and the peak."""
        self._stop_event.set()
        self.join()
        out = []
        for series in self.by_pid.values():
            steady = [r for t, r in series if t >= ready] or [series[-1][1]]
            mib = [round(r / 2**20) for r in steady]
            out.append({"start": mib[0], "middle": mib[len(mib) // 2], "end": mib[-1], "peak": max(mib)})
        return out


def bench_job(paths: list[str], out: Path, workers: int | None, shard_size: int, dtype: str) -> dict:
    """The whole convert job on a fresh embedded Ray, with the Ray processes' memory sampled."""
    from pipelines.convert_job import ConvertOptions, run_convert

    sampler, actors = MemorySampler(0.5), ActorSampler(0.5)
    sampler.start()
    actors.start()
    t = time.perf_counter()
    options = ConvertOptions(
        shard_size=shard_size, workers=workers, dtype=dtype, progress=False, overwrite=True
    )
    result = run_convert(paths, out, options)
    seconds = time.perf_counter() - t
    samples = sampler.stop()
    s = result.summary
    # from when the actors were ready (start-up imports torch in each) to the end
    ready = seconds - s["seconds"] + s["startup_seconds"]
    rss = [r for t_s, r, _ in samples if t_s >= ready] or [r for _, r, _ in samples]
    quarter = max(1, len(rss) // 4)
    # CPU time is the robust figure on a shared machine
    cpu_ready = next((c for t_s, _, c in samples if t_s >= ready), samples[-1][2] if samples else 0.0)
    steady_cpu = (samples[-1][2] - cpu_ready) if samples else None
    return {
        "command": f"vilbert-data convert {' '.join(paths)} --out {out} --shard-size {shard_size} --dtype {dtype}"
        + (f" --workers {workers}" if workers else ""),
        "images": s["images"],
        "failed": s["failed"],
        "shards": s["shards"],
        "seconds": round(seconds, 2),
        "startup_seconds": s["startup_seconds"],
        "images_per_s": s["images_per_s"],
        "images_per_s_after_startup": s["images_per_s_after_startup"],
        "mb_per_s": s["mb_per_s"],
        "mb_per_s_after_startup": s["mb_per_s_after_startup"],
        "output_bytes": sum(p.stat().st_size for p in out.glob("features-*")),
        "ray_cpu_s_per_image": round(samples[-1][2] / s["images"], 5) if samples else None,
        "ray_cpu_s_per_image_after_startup": round(steady_cpu / s["images"], 5) if steady_cpu else None,
        "ray_rss_peak_mib": round(max(rss) / 2**20) if rss else None,
        "ray_rss_first_quarter_after_startup_mib": round(statistics.mean(rss[:quarter]) / 2**20)
        if rss
        else None,
        "ray_rss_last_quarter_after_startup_mib": round(statistics.mean(rss[-quarter:]) / 2**20)
        if rss
        else None,
        "actor_rss_mib_from_ready": actors.summary(ready),
        "driver_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    """Generate, measure, print and save."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0, help="size of the generated TSV in GB")
    p.add_argument("--files", type=int, default=2, help="number of TSV files")
    p.add_argument("--boxes", type=int, default=36)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="default: one per CPU")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--workdir", default=None, help="where to put the TSV and the feature set (default: a temp dir)"
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        paths, n = generate_tsv(root, args.gb, args.files, args.boxes, args.dim)
        size = sum(Path(x).stat().st_size for x in paths)
        print(
            f"generated {n} images, {size / MB:.0f} MB in {len(paths)} files in {time.perf_counter() - t:.1f} s"
        )
        reader = bench_reader(paths, args.dim)
        print("reader alone:", json.dumps(reader))
        job = bench_job(paths, root / "feats", args.workers, args.shard_size, args.dtype)
        print("convert job:", json.dumps(job, indent=1))
        results = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
            "tsv": {"images": n, "bytes": size, "files": len(paths), "boxes": args.boxes, "dim": args.dim},
            "reader": reader,
            "job": job,
        }
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
