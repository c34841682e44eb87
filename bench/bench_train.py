"""Training throughput end to end (task shards -> DataLoader -> masking -> step) beside the model-only step.

Builds a synthetic feature set (36 regions, 2048-d float16 features, the on-disk format of
docs/contracts.md s.2, via bench_dataloader.write_features), shards it as captions with `run_shard`,
then for each config:
  * end to end: `run_train(task="pretrain")` on those shards, data loading included; the figure is
    timed samples / timed seconds from the per-step samples/s the trainer logs in metrics.jsonl;
  * model only: the same config, one batch taken from the loader beforehand, the same trainer step
    (masking, forward, the three losses, backward, clipping, AdamW) with no data loading.
The gap between the two is the pipeline's overhead. Captions are 40 words (36 tokens after
truncation) and the vocabulary has 30522 entries, the paper's sizes, so the model-only figure is
comparable to bench_model.py's.

    .venv/bin/python bench/bench_train.py --configs tiny vilbert-base --steps 6 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dataloader import write_features  # noqa: E402

WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "near", "red", "car", "two", "people"]


def build_shards(work: Path, n_images: int) -> tuple[Path, Path]:
    """Captions task shards over a synthetic 2048-d feature set, and a vocab.txt."""
    from pipelines.shard_job import run_shard

    work.mkdir(parents=True, exist_ok=True)
    vocab = work / "vocab.txt"
    # BERT-sized vocabulary (30522 entries), so that the MLM head costs what it costs in the paper model
    fillers = [f"tok{i}" for i in range(30522 - 5 - len(WORDS))]
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *fillers]) + "\n")
    write_features(work / "feats", n_images, k=36, dim=2048)
    rng = np.random.default_rng(1)
    with open(work / "caps.jsonl", "w") as f:
        for i in range(n_images):
            f.write(
                json.dumps({"image": f"img{i:07d}.jpg", "caption": " ".join(rng.choice(WORDS, 40))}) + "\n"
            )
    run_shard(
        work / "feats",
        "captions",
        [work / "caps.jsonl"],
        "train",
        work / "task",
        shard_size=64,
        progress=False,
    )
    return work / "task", vocab


def end_to_end(task_dir: Path, vocab: Path, config: str, args: argparse.Namespace, out: Path) -> float:
    """Samples/s from the trainer's own per-step log (steps after the warmup), data loading included."""
    from vilbert_core.training import TrainArgs, run_train
    from vilbert_core.training.metrics_log import read_metrics

    run_train(
        TrainArgs(task="pretrain", data=str(task_dir), out=str(out), vocab=str(vocab), config=config,
                  batch_size=args.batch_size, steps=args.warmup + args.steps, lr=1e-4, num_workers=args.workers,
                  shuffle_buffer=64, checkpoint_every=10**9, progress=False, tensorboard=False,
                  precision=args.precision, device=args.device)
    )  # fmt: skip
    rates = [r["samples_per_s"] for r in read_metrics(out / "metrics.jsonl")][args.warmup :]
    # total samples / total time (the harmonic mean of equal-batch rates): stalls count in full
    return len(rates) / sum(1.0 / r for r in rates)


def model_only(task_dir: Path, vocab: Path, config: str, args: argparse.Namespace) -> float:
    """Samples/s of the same step on one preloaded batch (no data loading)."""
    from extract.devices import autocast, resolve_device
    from pipelines.datasets import make_loader
    from pipelines.tokenization import TextTokenizer
    from vilbert_core import ViLBERTForPretraining
    from vilbert_core.batches import batch_to_device
    from vilbert_core.training.optim import build_optimizer
    from vilbert_core.training.tasks import TaskLossModule
    from vilbert_core.training.trainer import TrainArgs, masking_spec, resolve_config, resolve_precision

    device = resolve_device(args.device)
    tok = TextTokenizer.from_pretrained(vocab)
    batch = next(iter(make_loader(task_dir, "captions", tok, batch_size=args.batch_size, num_workers=0)))
    batch = batch_to_device(batch, device)
    targs = TrainArgs(
        task="pretrain", data=str(task_dir), out="", vocab=str(vocab), config=config, precision=args.precision
    )
    model = ViLBERTForPretraining(resolve_config(targs, tok.vocab_size, 2048)).to(device).train()
    step_fn = TaskLossModule(model, "pretrain", masking_spec(tok, torch.Generator().manual_seed(0)))
    opt = build_optimizer(model, lr=1e-4)
    precision = resolve_precision(targs, device)
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with autocast(precision, device.type):
            loss = step_fn(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup :]
    return args.batch_size * len(timed) / sum(timed)


def main() -> None:
    """Build shards once, then time both modes for each config."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "vilbert-base"])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="steps not timed")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the end-to-end run")
    p.add_argument("--precision", default=None, help="fp32 / bf16 / fp16 (default: the trainer's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds per mode; the best is kept")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_train_"))
    task_dir, vocab = build_shards(work, args.images)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")  # fmt: skip
    print(f"data: {args.images} images x 36 regions x 2048-d float16, captions shards; batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup}; end-to-end with {args.workers} DataLoader worker(s); "
          f"{torch.get_num_threads()} torch thread(s); load average before: {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| config | end to end (samples/s) | model-only step (samples/s) | pipeline overhead |")
    print("|---|---|---|---|")
    for config in args.configs:
        # alternate the two modes and keep each one's best round: on a shared machine the load drifts
        mo = e2e = 0.0
        for r in range(args.repeats):
            mo = max(mo, model_only(task_dir, vocab, config, args))
            e2e = max(e2e, end_to_end(task_dir, vocab, config, args, work / f"run_{config}_{r}"))
        print(f"| {config} | {e2e:.1f} | {mo:.1f} | {100 * (1 - e2e / mo):.0f}% |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
