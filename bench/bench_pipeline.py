"""Benchmark of `vilbert-data extract`: whole-job images/s vs the detector alone, 1 vs 2 workers, Ray memory.

The same generated JPEGs go through
1. the detector alone, in this process (images decoded beforehand, all cores, batched), and
2. the whole job (`run_extract`: embedded Ray, listing, decoding, detection, shard writing) with each
   worker count, started fresh each time.
The job rate is given over the whole run and after start-up (Ray + actors loading the detector);
the memory of every Ray process (driver excluded) is sampled twice a second during each job.

Random weights and a small detector setting by default, so it runs in minutes on a laptop CPU;
full-size detector figures belong to the detector benchmark. With `--device cuda` both run on the GPU
(one GPU per worker); `--photos` uses real photographs (scikit-image's, JPEG at their own sizes, so
the images fall into several input sizes as in a real folder) instead of generated noise.

Examples:
    RAY_AUTH_MODE=disabled python bench/bench_pipeline.py --images 32 --workers 1,2 --out bench/results/pipeline.json
    python bench/bench_pipeline.py --device cuda --photos --images 384 --workers 1 --depth 101 \
        --min-size 600 --max-size 1000 --max-proposals 300 --min-boxes 10 --max-boxes 36 \
        --batch-size 8 --shard-size 64 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def make_images(root: Path, n: int, width: int, height: int) -> list[Path]:
    """`n` seeded JPEGs with noise and a few filled shapes."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
            draw.rectangle(
                (x, y, x + int(rng.integers(10, 60)), y + int(rng.integers(10, 60))),
                fill=tuple(rng.integers(0, 256, 3).tolist()),
            )
        p = root / f"img{i:05d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def save_photos(root: Path, n: int) -> list[Path]:
    """`n` JPEGs cycling through scikit-image's photographs (random pixels if it is missing)."""
    from bench_detector import test_images

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(test_images(n)):
        p = root / f"img{i:05d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def descendants(pid: int) -> list[int]:
    """Every descendant process id of `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def rss_bytes(pids: list[int]) -> int:
    """Summed resident memory of `pids` (processes that vanished count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process so far (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


class MemorySampler(threading.Thread):
    """Samples RSS and CPU time of this process's descendants (the embedded Ray) every `interval` s.

    CPU time is the robust speed figure on a shared machine: wall-clock rates move with other
    people's load, CPU seconds per image much less.
    """

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.samples, self._stop_event = interval, [], threading.Event()
        self.cpu_by_pid: dict[int, float] = {}

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop_event.wait(self.interval):
            pids = descendants(os.getpid())
            for pid in pids:
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    self.cpu_by_pid[pid] = cpu
            self.samples.append((time.perf_counter() - t0, rss_bytes(pids), sum(self.cpu_by_pid.values())))

    def stop(self) -> list[tuple[float, int, float]]:
        self._stop_event.set()
        self.join()
        return self.samples


def bench_detector(paths: list[Path], config: dict, batch_size: int, device: str = "cpu") -> dict:
    """Images/s of `Detector.detect` alone on pre-decoded images (after one warm-up pass per input size).

    All images go to one `detect` call, which groups them by input size into full passes, as the job's
    workers do within a shard.
    """
    import torch

    from extract import Detector, DetectorConfig, load_image

    torch.set_num_threads(os.cpu_count() or 1)
    det = Detector.from_checkpoint(
        None, device=device, feature_layer="res4", config=DetectorConfig(**config, batch_size=batch_size)
    )
    images = [load_image(p) for p in paths]
    det.detect(list({det.input_size(im): im for im in reversed(images)}.values()))
    t, cpu = time.perf_counter(), time.process_time()
    det.detect(images)  # returns numpy arrays: the GPU work is finished when it returns
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {
        "images": len(images),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(images) / seconds, 3),
        "cpu_s_per_image": round(cpu / len(images), 3),
    }


def bench_job(src: Path, out: Path, options: dict) -> dict:
    """One fresh `run_extract` with its Ray memory series."""
    from pipelines.extract_job import ExtractOptions, run_extract

    sampler = MemorySampler()
    sampler.start()
    result = run_extract(src, out, ExtractOptions(**options, progress=False, overwrite=True))
    samples = sampler.stop()
    s = result.summary
    steady = [m for t, m, _ in samples if t >= s["startup_seconds"]] or [m for _, m, _ in samples]
    cpu_at_ready = next((c for t, _, c in samples if t >= s["startup_seconds"]), 0.0)
    cpu_end = samples[-1][2] if samples else 0.0
    quarter = max(1, len(steady) // 4)
    return {
        "workers": options["workers"],
        "images": s["images_this_run"],
        "seconds": s["seconds"],
        "startup_seconds": s["startup_seconds"],
        "images_per_s": s["images_per_s"],
        "images_per_s_after_startup": s["images_per_s_after_startup"],
        "ray_cpu_s_per_image_after_startup": round((cpu_end - cpu_at_ready) / s["images_this_run"], 3),
        "ray_rss_mib": {
            "first_quarter_median": round(statistics.median(steady[:quarter]) / 2**20),
            "last_quarter_median": round(statistics.median(steady[-quarter:]) / 2**20),
            "peak": round(max(steady) / 2**20),
            "samples": len(steady),
        },
    }


def gpu_name() -> str:
    """The name of CUDA device 0."""
    import torch

    return torch.cuda.get_device_name(0)


def main() -> None:
    """Run the benchmark and print/write the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--min-size", type=int, default=128)
    ap.add_argument("--max-size", type=int, default=192)
    ap.add_argument("--max-proposals", type=int, default=10)
    ap.add_argument("--min-boxes", type=int, default=4)
    ap.add_argument("--max-boxes", type=int, default=10)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="detector alone and the workers")
    ap.add_argument(
        "--precision", "--autocast", default="fp32", choices=["fp32", "bf16", "fp16"],
        help="mixed precision in the detector (--autocast: its old name)",
    )  # fmt: skip
    ap.add_argument("--photos", action="store_true", help="real photographs (scikit-image) instead of noise")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from extract.devices import autocast_setting

    options = dict(
        depth=args.depth, min_size=args.min_size, max_size=args.max_size, max_proposals=args.max_proposals,
        min_boxes=args.min_boxes, max_boxes=args.max_boxes, batch_size=args.batch_size,
        shard_size=args.shard_size, device=args.device, autocast=autocast_setting(args.precision),
    )  # fmt: skip
    from pipelines.extract_job import ExtractOptions

    config = ExtractOptions(**{k: v for k, v in options.items() if k != "device"}).detector_config()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images"
        if args.photos:
            paths = save_photos(src, args.images)
            size = "scikit-image photographs"
        else:
            paths = make_images(src, args.images, args.width, args.height)
            size = f"{args.width}x{args.height}"
        results = {
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
            + (f", {gpu_name()}" if args.device == "cuda" else ""),
            "load_average_at_start": os.getloadavg(),
            "settings": {**options, "images": args.images, "size": size},
            "detector_alone": bench_detector(paths, config, args.batch_size, args.device),
            "job": [],
        }
        print("detector alone:", results["detector_alone"], flush=True)
        for w in [int(x) for x in args.workers.split(",")]:
            r = bench_job(src, Path(tmp) / f"out{w}", {**options, "workers": w})
            alone = results["detector_alone"]
            r["cpu_vs_detector_alone"] = round(
                alone["cpu_s_per_image"] / r["ray_cpu_s_per_image_after_startup"], 3
            )
            r["vs_detector_alone"] = round(
                r["images_per_s_after_startup"] / results["detector_alone"]["images_per_s"], 3
            )
            results["job"].append(r)
            print(f"job, {w} worker(s):", r, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
