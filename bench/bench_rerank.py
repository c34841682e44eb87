"""What bf16 retrieval scoring costs in recall, and what re-ranking each query's top K in fp32 buys back.

`vilbert-data eval --task retrieval --precision bf16` scores every pair under bf16 autocast (about
twice the fp32 pairs/s on this CPU); `--rerank-top-k K` rescores each query's K best pairs in fp32.
This script scores one retrieval set once in fp32 and once in bf16, re-ranks the bf16 scores at each K,
and prints R@1/5/10 of both directions for each, the share of queries whose first item differs from
fp32's, and the scoring times.

Two sources:
- `--model RUN --data TASKDIR`: a trained model (a run folder of `vilbert-data train`, or a pretraining
  run, scored zero-shot) on retrieval task shards, e.g. the demo's pretraining run on the demo's
  held-out captions sharded with `--task retrieval`;
- `--preset vilbert-base --images N --captions-per-image C` (default without --model): the paper
  configuration with random weights on random features. Its recalls mean nothing, but how often bf16
  moves fp32's first item is the paper-depth network's rounding at work; random weights give pair
  scores that differ little, so this is a worst case.

    .venv/bin/python bench/bench_rerank.py --model demo_out/runs/pretrain --data tasks/demo_retrieval
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_rerank.py --images 12 --captions-per-image 5 --ks 3,10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vilbert_core import ViLBERTConfig, ViLBERTForTasks  # noqa: E402
from vilbert_core.evaluation.loading import LoadedModel, load_model  # noqa: E402
from vilbert_core.evaluation.metrics import (  # noqa: E402
    RECALL_KS,
    image_retrieval_ranks,
    recall_at_k,
    text_retrieval_ranks,
)
from vilbert_core.tasks.retrieval import read_retrieval_set, rerank_top_k, score_all_pairs  # noqa: E402


def synthetic_set(preset: str, n_img: int, per_image: int) -> tuple[LoadedModel, dict, dict, torch.Tensor]:
    """A random-weight model of the preset and random images (36 regions + [IMG]) and captions (20 tokens)."""
    cfg = ViLBERTConfig.preset(preset, v_feature_size=2048 if preset == "vilbert-base" else 48)
    torch.manual_seed(0)
    model = ViLBERTForTasks(cfg).eval()
    g = torch.Generator().manual_seed(0)
    n_cap = n_img * per_image
    images = {"image_feat": torch.rand(n_img, 37, cfg.v_feature_size, generator=g),
              "image_loc": torch.rand(n_img, 37, 5, generator=g),
              "image_mask": torch.ones(n_img, 37, dtype=torch.long)}  # fmt: skip
    text = {"input_ids": torch.randint(5, cfg.vocab_size, (n_cap, 20), generator=g),
            "token_type_ids": torch.zeros(n_cap, 20, dtype=torch.long),
            "attention_mask": torch.ones(n_cap, 20, dtype=torch.long)}  # fmt: skip
    loaded = LoadedModel(model, "tasks", None, None, 20, 37, "retrieval", None, torch.device("cpu"))
    return loaded, images, text, torch.arange(n_cap) // per_image


def recalls(scores: torch.Tensor, own: torch.Tensor, text_scores: torch.Tensor | None = None) -> dict[str, Any]:
    """R@K of both full-set directions, and each query's first item (images per caption, captions per image)."""
    ts = scores if text_scores is None else text_scores
    return {"image": recall_at_k(image_retrieval_ranks(scores, own)), "text": recall_at_k(text_retrieval_ranks(ts, own)),
            "first": torch.cat([scores.argmax(0), ts.argmax(1)])}  # fmt: skip


def main() -> None:
    """Score once in fp32 and once in bf16, re-rank at each K, print one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a run folder or checkpoint (default: a random-weight preset)")
    ap.add_argument("--data", default=None, help="retrieval TASKDIR (with --model)")
    ap.add_argument("--preset", default="vilbert-base")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--ks", default="3,10", help="comma list of K for --rerank-top-k")
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    if a.model:
        if not a.data:
            ap.error("--model needs --data (retrieval task shards)")
        loaded = load_model(a.model, device="cpu", task="retrieval")
        images, text, own, _ = read_retrieval_set(loaded, Path(a.data))
        source = f"{a.model} on {a.data}"
    else:
        loaded, images, text, own = synthetic_set(a.preset, a.images, a.captions_per_image)
        source = f"{a.preset}, random weights, {a.images} images x {a.captions_per_image} captions"
    n_img, n_cap = images["image_feat"].shape[0], text["input_ids"].shape[0]
    print(f"{source}: {n_img} images, {n_cap} captions; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip

    t0 = time.perf_counter()
    fp32 = score_all_pairs(loaded, images, text, a.batch_size, progress=False)
    t_fp32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = score_all_pairs(loaded, images, text, a.batch_size, progress=False)
    t_bf16 = time.perf_counter() - t0
    rows = [("fp32 (exact)", recalls(fp32, own), t_fp32), ("bf16", recalls(bf16, own), t_bf16)]
    for k in (int(x) for x in a.ks.split(",")):
        image_scores, text_scores, stats = rerank_top_k(loaded, images, text, bf16, k, a.batch_size, progress=False)
        rows.append((f"bf16 + rerank top {k}", recalls(image_scores, own, text_scores), t_bf16 + stats["seconds"]))

    spread = fp32.std().item()
    print(f"fp32 score spread (std over all pairs): {spread:.4f}; bf16 - fp32: max |diff| "
          f"{(bf16 - fp32).abs().max().item():.4f}, std {(bf16 - fp32).std().item():.4f}\n")  # fmt: skip
    head = " | ".join(f"image R@{k}" for k in RECALL_KS) + " | " + " | ".join(f"text R@{k}" for k in RECALL_KS)
    print(f"| scoring | {head} | first item differs from fp32's | seconds |")
    print("|---" * (2 * len(RECALL_KS) + 3) + "|")
    first = rows[0][1]["first"]
    for name, r, seconds in rows:
        cells = [f"{r['image'][f'r{k}']:.2f}" for k in RECALL_KS] + [f"{r['text'][f'r{k}']:.2f}" for k in RECALL_KS]
        differs = 100.0 * (r["first"] != first).float().mean().item()
        print(f"| {name} | {' | '.join(cells)} | {differs:.2f}% | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
