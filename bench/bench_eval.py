"""Evaluation costs: retrieval pair scoring (pairs/s) and the metric computations themselves.

Full retrieval scores every (image, caption) pair, so its cost grows as images x captions: Flickr30k's
1k-image test split is 1000 x 5000 = 5M forward passes. This measures `score_all_pairs` (the batched
loop behind `vilbert-data eval --task retrieval`) for the tiny and the paper configuration and turns
pairs/s into the time of a full Flickr30k evaluation; then the time of the metrics on a 1000 x 5000
score matrix (full ranking and the 100-candidate protocol) and of the official VQA accuracy.

    .venv/bin/python bench/bench_eval.py --batches 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from vilbert_core import ViLBERTConfig, ViLBERTForTasks
from vilbert_core.evaluation.evaluator import score_all_pairs
from vilbert_core.evaluation.loading import LoadedModel
from vilbert_core.evaluation.metrics import retrieval_metrics, vqa_accuracy

FLICKR_PAIRS = 1000 * 5000


def fake_inputs(
    n_img: int, n_cap: int, dim: int, vocab: int, regions: int = 37, tokens: int = 20
) -> tuple[dict, dict]:
    """Random padded images (N_img, R, D) and captions (N_cap, T), all positions real."""
    g = torch.Generator().manual_seed(0)
    images = {
        "image_feat": torch.rand(n_img, regions, dim, generator=g),
        "image_loc": torch.rand(n_img, regions, 5, generator=g),
        "image_mask": torch.ones(n_img, regions, dtype=torch.long),
    }
    text = {
        "input_ids": torch.randint(5, vocab, (n_cap, tokens), generator=g),
        "token_type_ids": torch.zeros(n_cap, tokens, dtype=torch.long),
        "attention_mask": torch.ones(n_cap, tokens, dtype=torch.long),
    }
    return images, text


def bench_scoring(preset: str, batch_size: int, batches: int, device: str) -> dict:
    """Pairs/s of score_all_pairs for one config (one warm-up batch, then `batches` timed batches)."""
    cfg = ViLBERTConfig.preset(preset, v_feature_size=2048 if preset == "vilbert-base" else 48)
    torch.manual_seed(0)
    model = ViLBERTForTasks(cfg).to(device).eval()
    loaded = LoadedModel(model, "tasks", None, None, 20, 36, "retrieval", None, torch.device(device))
    n_cap = batch_size * batches
    images, text = fake_inputs(1, n_cap, cfg.v_feature_size, cfg.vocab_size)
    warm_img, warm_txt = fake_inputs(1, batch_size, cfg.v_feature_size, cfg.vocab_size)
    score_all_pairs(loaded, warm_img, warm_txt, batch_size, progress=False)
    t0 = time.perf_counter()
    score_all_pairs(loaded, images, text, batch_size, progress=False)
    seconds = time.perf_counter() - t0
    rate = n_cap / seconds
    return {"preset": preset, "pairs": n_cap, "seconds": seconds, "pairs_per_s": rate,
            "flickr30k_hours": FLICKR_PAIRS / rate / 3600}  # fmt: skip


def bench_metrics() -> dict:
    """Seconds of the retrieval metrics on a 1000 x 5000 matrix and of VQA accuracy on 10k questions."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1000, 5000, generator=g)
    own = torch.arange(5000) // 5
    t0 = time.perf_counter()
    retrieval_metrics(scores, own)
    t_ret = time.perf_counter() - t0
    answers = ["yes", "no", "2", "two", "red", "a dog", "Dogs.", "don't know", "3", "blue"]
    questions = [
        {"question_id": i, "answers": [answers[(i + j) % 10] for j in range(10)], "answer_type": "other"}
        for i in range(10_000)
    ]
    preds = {i: answers[i % 7] for i in range(10_000)}
    t0 = time.perf_counter()
    vqa_accuracy(preds, questions)
    t_vqa = time.perf_counter() - t0
    return {"retrieval_1000x5000_s": t_ret, "vqa_10k_questions_s": t_vqa}


def main() -> None:
    """Run the benchmarks and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default="tiny,vilbert-base")
    a = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("\n| config | batch | pairs timed | pairs/s | Flickr30k 1k test (5M pairs) |")
    print("|---|---|---|---|---|")
    for preset in a.presets.split(","):
        r = bench_scoring(preset, a.batch_size, a.batches, a.device)
        print(
            f"| {preset} | {a.batch_size} | {r['pairs']} | {r['pairs_per_s']:.1f} | {r['flickr30k_hours']:.1f} h |"
        )
    m = bench_metrics()
    print("\n| metric computation | seconds |")
    print("|---|---|")
    print(
        f"| retrieval R@1/5/10, full + 100-candidate, 1000 x 5000 scores | {m['retrieval_1000x5000_s']:.2f} |"
    )
    print(f"| official VQA accuracy, 10,000 questions | {m['vqa_10k_questions_s']:.2f} |")


if __name__ == "__main__":
    main()
