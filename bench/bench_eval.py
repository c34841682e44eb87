"""Evaluation costs: retrieval pair scoring (pairs/s, Flickr30k projections) and the metrics themselves.

Full retrieval scores every (image, caption) pair, so its cost grows as images x captions: Flickr30k's
1k-image test split is 1000 x 5000 = 5M pairs. `score_all_pairs` (behind `vilbert-data eval --task
retrieval`) computes each image's region embedding and visual layers before co-attention once
(`embed_image`), each caption's text layers before co-attention once (`embed_text`), and per pair only
the co-attention part (`score_pairs`). Timed here in one process, interleaved round by round, on
batches of pairs:

- full: the whole model's forward per pair (what score_all_pairs did before issue 17);
- pairs: score_pairs on cached states (what it does per pair now); text / image: the one-side parts,
  per caption / per image;
- reference (`--compare-reference PATH`, a vilbert-multi-task checkout imported from there, never
  copied): its VILBertForVLTasks forward per pair, as its own retrieval evaluation runs it.

The Flickr30k 1k test projection is 5M / pair rate (+ 5000 captions x text cost + 1000 images x image
cost for the cached path). FLOPs per pair of both paths are counted with torch.utils.flop_counter on
the meta device: a figure no machine load can move. Then the time of the metrics on a 1000 x 5000
score matrix and of the official VQA accuracy.

    .venv/bin/python bench/bench_eval.py --rounds 3 --batch-size 32
    .venv/bin/python bench/bench_eval.py --presets vilbert-base --compare-reference ../vilbert-multi-task
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vilbert_core import ViLBERTConfig, ViLBERTForTasks  # noqa: E402
from vilbert_core.evaluation.metrics import retrieval_metrics, vqa_accuracy  # noqa: E402

FLICKR_IMAGES, FLICKR_CAPTIONS = 1000, 5000
IMAGE_KEYS = ("image_feat", "image_loc", "image_mask")
TEXT_KEYS = ("input_ids", "token_type_ids", "attention_mask")


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


def _config(preset: str) -> ViLBERTConfig:
    """The preset with the feature size of its usual features (2048-d res5 for the paper model)."""
    return ViLBERTConfig.preset(preset, v_feature_size=2048 if preset == "vilbert-base" else 48)


def flops_per_pair(preset: str, tokens: int = 20, regions: int = 37) -> dict[str, float]:
    """Forward FLOPs per pair of the full model and of score_pairs, and per caption / image of the one-side parts."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _config(preset)
    cfg.attn_implementation = "eager"  # counted as plain matmuls
    b = 4
    with torch.device("meta"):
        model = ViLBERTForTasks(cfg).eval()
        images, text = fake_inputs(b, b, cfg.v_feature_size, cfg.vocab_size, regions, tokens)
        text_states = torch.empty(b, tokens, cfg.hidden_size)
        image_states = torch.empty(b, regions, cfg.v_hidden_size)

    def count(fn: Callable[[], Any]) -> float:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        return counter.get_total_flops() / b

    return {
        "full": count(lambda: model(**text, **images).pair_logit),
        "pairs": count(lambda: model.score_pairs(text_states, image_states)),
        "text": count(lambda: model.vilbert.embed_text(**text)),
        "image": count(lambda: model.vilbert.embed_image(**images)),
    }


def bench_scoring(preset: str, batch_size: int, rounds: int, device: str, precision: str,
                  reference: str | None = None, rerank_k: int = 10) -> dict:  # fmt: skip
    """Per-pair, per-caption and per-image costs of each scoring path, interleaved round by round.

    Under bf16 the rounds also time the fp32 parts a re-ranked evaluation adds (`eval --precision bf16
    --rerank-top-k K`: each query's top K pairs rescored in fp32) and, with a reference, the
    reference in fp32 (it has no bf16 mode of its own).
    """
    cfg = _config(preset)
    torch.manual_seed(0)
    model = ViLBERTForTasks(cfg).to(device).eval()
    images, text = fake_inputs(2, batch_size, cfg.v_feature_size, cfg.vocab_size)
    images = {k: v.to(device) for k, v in images.items()}
    text = {k: v.to(device) for k, v in text.items()}
    # a batch of pairs: one image against batch_size captions (the image alternates between rounds),
    # gathered by index as score_all_pairs gathers them (an expanded stride-0 batch is slower under bf16)
    cap = torch.arange(batch_size, device=device)
    img = [torch.full((batch_size,), i, device=device) for i in (0, 1)]
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with torch.inference_mode(), autocast:
        text_states = model.vilbert.embed_text(**text)
        image_states = model.vilbert.embed_image(**images)
        def pair_inputs(i: int) -> dict[str, torch.Tensor]:
            """The model inputs of round i's batch of pairs."""
            return {k: v[cap] for k, v in text.items()} | {k: v[img[i % 2]] for k, v in images.items()}

        paths: dict[str, tuple[Callable[[int], Any], int]] = {  # name: (run in round i, items it scores)
            "full": (lambda i: model(**pair_inputs(i)).pair_logit, batch_size),
            "pairs": (lambda i: model.score_pairs(text_states[cap], image_states[img[i % 2]]), batch_size),
            "text": (lambda i: model.vilbert.embed_text(**text), batch_size),
            "image": (lambda i: model.vilbert.embed_image(**images), 2),
        }
        exact = torch.autocast(device, enabled=False)
        if precision == "bf16":
            with exact:
                text_fp32, image_fp32 = model.vilbert.embed_text(**text), model.vilbert.embed_image(**images)

            def in_fp32(run: Callable[[int], Any]) -> Callable[[int], Any]:
                """run with autocast off."""
                def wrapped(i: int) -> Any:
                    with exact:
                        return run(i)
                return wrapped

            paths["pairs_fp32"] = (in_fp32(lambda i: model.score_pairs(text_fp32[cap], image_fp32[img[i % 2]])),
                                   batch_size)  # fmt: skip
            paths["text_fp32"] = (in_fp32(lambda i: model.vilbert.embed_text(**text)), batch_size)
        if reference:
            ref = build_reference_tasks(reference, cfg, device)
            order = ("input_ids", "image_feat", "image_loc", "token_type_ids", "attention_mask", "image_mask")
            paths["reference"] = (lambda i: ref(*(pair_inputs(i)[k] for k in order)), batch_size)
            if precision == "bf16":
                paths["reference_fp32"] = (in_fp32(paths["reference"][0]), batch_size)
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        names = list(paths)
        for i in range(rounds + 1):  # round 0 warms up
            for name in names[i % len(names) :] + names[: i % len(names)]:  # a rotating order
                run, _ = paths[name]
                _sync(device)
                start = time.perf_counter()
                run(i)
                _sync(device)
                if i > 0:
                    seconds[name].append(time.perf_counter() - start)
    cost = {name: sorted(s)[len(s) // 2] / paths[name][1] for name, s in seconds.items()}  # s per item
    flickr = {
        "full": FLICKR_IMAGES * FLICKR_CAPTIONS * cost["full"],
        "cached": FLICKR_IMAGES * FLICKR_CAPTIONS * cost["pairs"] + FLICKR_CAPTIONS * cost["text"]
        + FLICKR_IMAGES * cost["image"],
    }
    if precision == "bf16":
        # each query's top k rescored in fp32: at most k x (images + captions) pairs, plus every caption's
        # text layers in fp32 (images' fp32 part is negligible)
        flickr[f"cached_rerank{rerank_k}"] = (flickr["cached"] + FLICKR_CAPTIONS * cost["text_fp32"]
                                              + rerank_k * (FLICKR_IMAGES + FLICKR_CAPTIONS) * cost["pairs_fp32"])  # fmt: skip
    for name in ("reference", "reference_fp32"):
        if name in cost:
            flickr[name] = FLICKR_IMAGES * FLICKR_CAPTIONS * cost[name]
    vs_ref = {f"{ours} vs {ref}": flickr[ref] / flickr[ours] for ref in ("reference", "reference_fp32")
              for ours in ("cached", f"cached_rerank{rerank_k}") if ref in flickr and ours in flickr}  # fmt: skip
    return {"preset": preset, "precision": precision, "batch_size": batch_size, "rounds": rounds,
            "seconds_per_item": cost, "pairs_per_s": {k: 1 / v for k, v in cost.items()},
            "flickr30k_1k_test_hours": {k: v / 3600 for k, v in flickr.items()},
            "speedup_cached_vs_full": flickr["full"] / flickr["cached"],
            "ratio_per_round_full_vs_pairs": [f / p for f, p in zip(seconds["full"], seconds["pairs"], strict=True)],
            "speedup_vs_reference": flickr["reference"] / flickr["cached"] if reference else None,
            "ratio_per_round_reference_vs_pairs": [r / p for r, p in zip(seconds["reference"], seconds["pairs"], strict=True)]
            if reference else None, "speedups_vs_reference": vs_ref}  # fmt: skip


def build_reference_tasks(path: str, cfg: ViLBERTConfig, device: str) -> torch.nn.Module:
    """The reference's VILBertForVLTasks with our configuration's sizes."""
    from reference_code import load_reference, reference_config

    module = load_reference(path)
    ref = module.VILBertForVLTasks(reference_config(module, cfg), num_labels=cfg.num_answers, default_gpu=False)
    return ref.to(device).eval()


def _sync(device: str) -> None:
    """Wait for queued GPU work so that timings are real."""
    if device == "cuda":
        torch.cuda.synchronize()


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


def _hours(h: float) -> str:
    """Hours, or minutes when under one."""
    return f"{h:.1f} h" if h >= 1 else f"{60 * h:.1f} min"


def main() -> None:
    """Run the benchmarks and print Markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round); medians")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default="tiny,vilbert-base")
    ap.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16 (autocast)")
    ap.add_argument("--compare-reference", default=None, metavar="PATH",
                    help="a vilbert-multi-task checkout: time its forward per pair against ours, interleaved")  # fmt: skip
    ap.add_argument("--rerank-k", type=int, default=10,
                    help="bf16 rows: project `eval --rerank-top-k K` (each query's top K rescored in fp32)")  # fmt: skip
    ap.add_argument("--skip-metrics", action="store_true", help="only the scoring benchmark")
    ap.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    a = ap.parse_args()
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), cpu)
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {a.device}, load average {os.getloadavg()[0]:.1f} at the start")  # fmt: skip
    record: dict[str, Any] = {"machine": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "load_average_start": os.getloadavg(), "scoring": [], "flops": {}}  # fmt: skip
    ref_cols = " | reference pairs/s | ours vs reference" if a.compare_reference else ""
    print(f"\n| config | precision | batch | full forward pairs/s | cached pairs/s | text/s | images/s | "
          f"Flickr30k 1k test: full | cached | speed-up | per round{ref_cols} |")  # fmt: skip
    print("|---" * (11 + 2 * bool(a.compare_reference)) + "|")
    for preset in a.presets.split(","):
        record["flops"][preset] = f = flops_per_pair(preset)
        for precision in a.precisions.split(","):
            r = bench_scoring(preset, a.batch_size, a.rounds, a.device, precision, a.compare_reference, a.rerank_k)
            record["scoring"].append(r)
            rate, hours = r["pairs_per_s"], r["flickr30k_1k_test_hours"]
            ref = (f" | {rate['reference']:.1f} | {r['speedup_vs_reference']:.2f}x" if a.compare_reference else "")
            print(f"| {preset} | {precision} | {a.batch_size} | {rate['full']:.1f} | {rate['pairs']:.1f} | "
                  f"{rate['text']:.1f} | {rate['image']:.1f} | {_hours(hours['full'])} | {_hours(hours['cached'])} | "
                  f"{r['speedup_cached_vs_full']:.2f}x | "
                  f"{', '.join(f'{x:.2f}' for x in r['ratio_per_round_full_vs_pairs'])}{ref} |", flush=True)  # fmt: skip
    extra = [(r, name, h) for r in record["scoring"] for name, h in r["flickr30k_1k_test_hours"].items()
             if name not in ("full", "cached")]  # fmt: skip
    if extra:
        print("\n| config | precision | Flickr30k 1k test, other paths | hours |")
        print("|---|---|---|---|")
        for r, name, h in extra:
            print(f"| {r['preset']} | {r['precision']} | {name} | {_hours(h)} |")
    ratios = [(r, name, x) for r in record["scoring"] for name, x in r["speedups_vs_reference"].items()]
    if ratios:
        print("\n| config | precision (ours) | ours vs reference (Flickr30k 1k test time ratio) | speed-up |")
        print("|---|---|---|---|")
        for r, name, x in ratios:
            print(f"| {r['preset']} | {r['precision']} | {name} | {x:.2f}x |")
    print("\n| config | GFLOP per pair: full forward | score_pairs | per caption: embed_text | per image: embed_image |")
    print("|---|---|---|---|---|")
    for preset, f in record["flops"].items():
        print(f"| {preset} | {f['full'] / 1e9:.2f} | {f['pairs'] / 1e9:.2f} | {f['text'] / 1e9:.2f} | {f['image'] / 1e9:.3f} |")
    if not a.skip_metrics:
        record["metrics"] = m = bench_metrics()
        print("\n| metric computation | seconds |")
        print("|---|---|")
        print(f"| retrieval R@1/5/10, full + 100-candidate, 1000 x 5000 scores | {m['retrieval_1000x5000_s']:.2f} |")
        print(f"| official VQA accuracy, 10,000 questions | {m['vqa_10k_questions_s']:.2f} |")
    record["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end {record['load_average_end'][0]:.1f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
