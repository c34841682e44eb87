"""DataLoader throughput from local task shards: samples/s at batch 64 with 2 workers.

Builds a synthetic feature set (36 regions, 2048-d float16 features, float16 class distributions,
the on-disk format of docs/contracts.md s.2), shards it with `run_shard` (captions, `--captions`
per image), then times `make_loader` over it. Samples = (image, caption) pairs.

    .venv/bin/python bench/bench_dataloader.py --images 512 --captions 1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds


def _npy(a: np.ndarray) -> bytes:
    """Array to .npy bytes."""
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_features(root: Path, n_images: int, k: int, dim: int, per_shard: int = 256) -> None:
    """Synthetic feature set in the extract job's format."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, n_images, per_shard):
        name = f"features-{s // per_shard:06d}"
        shards.append(name + ".tar")
        rows = []
        with wds.TarWriter(str(root / f"{name}.tar")) as sink:
            for i in range(s, min(s + per_shard, n_images)):
                key = f"img{i:07d}"
                boxes = np.sort(rng.uniform(0, 500, (k, 4)).astype(np.float32), axis=1)
                prob = rng.dirichlet(np.ones(1601), k).astype(np.float16)
                sink.write({
                    "__key__": key,
                    "boxes.npy": _npy(boxes),
                    "features.npy": _npy(rng.uniform(0, 10, (k, dim)).astype(np.float16)),
                    "spatial.npy": _npy(rng.uniform(0, 1, (k, 5)).astype(np.float32)),
                    "cls_prob.npy": _npy(prob),
                    "objects.npy": _npy(np.zeros((k, 2), np.float32)),
                    "attributes.npy": _npy(np.zeros((k, 2), np.float32)),
                    "json": json.dumps({"image_id": key, "source": f"{key}.jpg", "width": 500, "height": 500,
                                        "num_boxes": k, "feature_layer": "res5"}).encode(),
                })  # fmt: skip
                rows.append({"image_id": key, "source": f"{key}.jpg", "status": "ok"})
        pq.write_table(pa.Table.from_pylist(rows), root / f"{name}.parquet")
    info = {"format": "vilbert-data/features", "version": 1, "feature_layer": "res5", "feature_dim": dim,
            "dtype": "float16", "shards": shards}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(info))


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the DataLoader workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    """Build shards, then time the DataLoader."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--captions", type=int, default=1, help="captions per image (samples per decoded image)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="batches not timed (worker start, buffer fill)")
    p.add_argument("--batches", type=int, default=40, help="batches timed")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args()

    import torch

    from pipelines.datasets import make_loader
    from pipelines.shard_job import run_shard
    from pipelines.tokenization import TextTokenizer

    torch.set_num_threads(1)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_dl_"))
    work.mkdir(parents=True, exist_ok=True)
    words = ["a", "dog", "cat", "runs", "on", "the", "grass", "near", "red", "car", "two", "people"]
    (work / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    t0 = time.perf_counter()
    write_features(work / "feats", args.images, k=36, dim=2048)
    rng = np.random.default_rng(1)
    with open(work / "caps.jsonl", "w") as f:
        for i in range(args.images):
            for _ in range(args.captions):
                f.write(
                    json.dumps({"image": f"img{i:07d}.jpg", "caption": " ".join(rng.choice(words, 12))})
                    + "\n"
                )
    t1 = time.perf_counter()
    run_shard(
        work / "feats",
        "captions",
        [work / "caps.jsonl"],
        "train",
        work / "task",
        shard_size=128,
        progress=False,
    )
    t2 = time.perf_counter()
    tok = TextTokenizer.from_pretrained(work / "vocab.txt")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(f"feature set: {args.images} images x 36 regions x 2048-d float16 (written in {t1 - t0:.1f}s)")
    print(f"shard job: {args.images / (t2 - t1):.0f} images/s")
    for workers in (0, args.workers):
        # Resampled shards: an endless stream, so the figure is the steady state, not start-up.
        loader = make_loader(work / "task", "captions", tok, batch_size=args.batch_size, shuffle_buffer=256,
                             num_workers=workers, resampled=True, steps=args.warmup + args.batches)  # fmt: skip
        cpu0 = _cpu_seconds()
        stamps = []
        start = time.perf_counter()
        for batch in loader:
            assert batch["image_feat"].shape[1:] == (37, 2048)
            stamps.append(time.perf_counter())
        cpu = _cpu_seconds() - cpu0  # main process + the finished workers, start-up included
        rate = args.batch_size * args.batches / (stamps[-1] - stamps[args.warmup - 1])
        n_total = args.batch_size * (args.warmup + args.batches)
        print(
            f"DataLoader batch {args.batch_size}, {workers} worker(s), {args.captions} caption(s)/image: "
            f"{rate:.0f} samples/s steady state (first batch after {stamps[0] - start:.1f}s); "
            f"CPU {1e3 * cpu / n_total:.2f} ms/sample -> at most {max(workers, 1) * n_total / cpu:.0f} samples/s "
            f"on {max(workers, 1) if workers else 1} free core(s); load average {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
