"""Multi-task training step time beside single-task, per task, through the real trainer.

For each round (interleaved, so machine noise hits both modes alike): three single-task runs (vqa,
refcoco, retrieval; `--steps N` each) and one multi-task run (`--task vqa,refcoco,retrieval`,
round-robin, `--steps 3N`, with task tokens). Batches come from an in-memory synthetic loader (the
batch contract of docs/contracts.md s.4, 36 regions + [IMG], 20 tokens), so the figure is the
training step (forward, loss, backward, clipping, AdamW), not data loading. Step times are read from
the samples/s the trainer logs per step; the first step of each task is dropped (warm-up).

    .venv/bin/python bench/bench_multitask.py --config tiny --steps 8 --batch-size 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = ("vqa", "refcoco", "retrieval")
NUM_ANSWERS, TOKENS, REGIONS, DIM = 100, 20, 37, 2048


def synthetic_batch(task: str, b: int, seed: int, vocab: int) -> dict:
    """One batch of `task` in the batch contract, random but seeded."""
    g = torch.Generator().manual_seed(seed)
    c = 4 if task == "retrieval" else 1
    lead = (b, c) if c > 1 else (b,)
    batch = {
        "input_ids": torch.randint(5, vocab, (*lead, TOKENS), generator=g),
        "token_type_ids": torch.zeros(*lead, TOKENS, dtype=torch.long),
        "attention_mask": torch.ones(*lead, TOKENS, dtype=torch.long),
        "image_feat": torch.rand(*lead, REGIONS, DIM, generator=g),
        "image_loc": torch.rand(*lead, REGIONS, 5, generator=g),
        "image_mask": torch.ones(*lead, REGIONS, dtype=torch.long),
        "image_id": [f"img{i}" for i in range(b)],
    }
    if task == "vqa":
        batch["vqa_target"] = torch.zeros(b, NUM_ANSWERS).scatter_(1, torch.randint(0, NUM_ANSWERS, (b, 1), generator=g), 1.0)
    elif task == "refcoco":
        iou = torch.rand(b, REGIONS, generator=g)
        iou[:, 0] = 0
        batch["region_iou"], batch["region_target"] = iou, torch.where(iou >= 0.5, iou, 0.0)
    else:
        batch["label"] = torch.zeros(b, dtype=torch.long)
    return batch


def make_data(work: Path, vocab_size: int) -> dict[str, Path]:
    """One TASKDIR per task with only task.json (and answers.json): the loader below makes the batches."""
    dirs = {}
    for task in TASKS:
        d = work / task
        d.mkdir(parents=True, exist_ok=True)
        info = {"task": task, "counts": {"records": 10_000}, "features": {"feature_dim": DIM, "feature_layer": "res5"}}
        if task == "vqa":
            (d / "answers.json").write_text(json.dumps([f"a{i}" for i in range(NUM_ANSWERS)]))
            info["answer_vocab"] = "answers.json"
        (d / "task.json").write_text(json.dumps(info))
        dirs[task] = d
    vocab = work / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(vocab_size - 5)]]))
    dirs["vocab"] = vocab
    return dirs


def loader(vocab_size: int):
    """A loader factory: endless seeded synthetic batches of the source folder's task."""

    def factory(source: str, epoch: int, batch_size: int):
        task = Path(source).name
        for i in range(10_000):
            yield synthetic_batch(task, batch_size, 1000 * epoch + i, vocab_size)

    return factory


def main() -> None:
    """Interleaved rounds of single-task and multi-task runs; a JSON summary on stdout and in bench/results/."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="tiny, vilbert-base or a config.json")
    p.add_argument("--steps", type=int, default=8, help="steps per task and round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from vilbert_core.training.trainer import run_train

    vocab_size = 30522 if a.config == "vilbert-base" else 60
    common = dict(vocab=None, config=a.config, batch_size=a.batch_size, lr=1e-4, warmup=0, num_workers=0,
                  progress=False, tensorboard=False, device="cpu", max_text_len=TOKENS, checkpoint_every=10**6,
                  threads=a.threads, feature_norm="none")  # fmt: skip
    single: dict[str, list[float]] = {t: [] for t in TASKS}
    multi: dict[str, list[float]] = {t: [] for t in TASKS}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), vocab_size)
        common["vocab"] = str(data["vocab"])
        for rnd in range(a.rounds):
            for task in TASKS:
                out = Path(tmp) / f"{task}-{rnd}"
                run_train(task=task, data=str(data[task]), out=str(out), steps=a.steps, **common,
                          loader_factory=loader(vocab_size))  # fmt: skip
                single[task] += [s for s in _times(out)]
            out = Path(tmp) / f"multi-{rnd}"
            run_train(task=",".join(TASKS), data="", task_data={t: str(data[t]) for t in TASKS}, out=str(out),
                      steps=a.steps * len(TASKS), task_tokens=True, **common, loader_factory=loader(vocab_size))  # fmt: skip
            for task, times in _times_by_task(out).items():
                multi[task] += times
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {a.threads} thread(s)",
        "config": a.config, "batch": a.batch_size, "steps_per_task_and_round": a.steps, "rounds": a.rounds,
        "per_task": {t: {"single_task_s": statistics.median(single[t]), "multi_task_s": statistics.median(multi[t]),
                         "ratio": statistics.median(multi[t]) / statistics.median(single[t])} for t in TASKS},
    }  # fmt: skip
    text = json.dumps(result, indent=1)
    print(text)
    res = Path(__file__).resolve().parent / "results"
    res.mkdir(exist_ok=True)
    (res / f"multitask_{a.config.replace('/', '_')}.json").write_text(text + "\n")


def _records(run_dir: Path) -> list[dict]:
    """Training lines of a run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") != "val" and "samples_per_s" in r]


def _times(run_dir: Path) -> list[float]:
    """Seconds per step of a single-task run (first step dropped)."""
    recs = _records(run_dir)
    return [_seconds(r, recs) for r in recs][1:]


def _times_by_task(run_dir: Path) -> dict[str, list[float]]:
    """Seconds per step of a multi-task run by task (each task's first step dropped)."""
    recs = _records(run_dir)
    out: dict[str, list[float]] = {}
    for r in recs:
        out.setdefault(r["task"], []).append(_seconds(r, recs))
    return {t: v[1:] for t, v in out.items()}


def _seconds(record: dict, records: list[dict]) -> float:
    """A step's seconds: the samples it added over the rate the trainer logged."""
    i = records.index(record)
    samples = record["samples"] - (records[i - 1]["samples"] if i else 0)
    return samples / record["samples_per_s"]


if __name__ == "__main__":
    main()
