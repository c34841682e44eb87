"""`vilbert-data demo`: the whole chain on the bundled sample, every step a printed, rerunnable command.

extract -> inspect -> vocab -> shard (captions, VQA; train and held out) -> pretrain -> eval -> VQA
fine-tuning -> eval -> explain, then a summary: where every artefact is, and the held-out VQA accuracy
beside the blind baselines and the shuffled-image run. `cli.py`'s `demo` command calls `run_demo`;
the demo ships with the checkout (beside its sample), not with the installed packages.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer

SAMPLE = Path(__file__).resolve().parent / "sample"
DEMO_CONFIG = SAMPLE.parent / "vilbert_demo_config.json"
# Fast detector settings for the random-weight preview: a real R-101 at 600/1000 takes ~10 s per image on
# two CPU cores, which would not fit the demo's few minutes; with --weights the original settings are used.
FAST_DETECTOR = ["--depth", "50", "--min-size", "224", "--max-size", "320", "--max-proposals", "12"]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast is ~2x faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def demo_steps(
    out: Path, sample: Path, weights: str | None, steps: tuple[int, int], image_id: str, question: str
) -> list[tuple[str, list[str]]]:
    """The demo's commands, in order, as (title, argv after `vilbert-data`); steps = (pretraining, VQA)."""
    feats, tasks, runs, reports = out / "features", out / "tasks", out / "runs", out / "reports"
    detector = ["--weights", weights, "--feature-layer", "res5"] if weights else FAST_DETECTOR
    if cpu_has_bf16():
        detector = [*detector, "--precision", "bf16"]
    # A small config, not `tiny` (docs/training.md): 64 wide, initialised at 0.07 = 0.02 x sqrt(768 / 64) so its
    # ReLU x ReLU fusion does not start in its flat saddle, no dropout for a short run on a small sample. It leaves
    # v_feature_size out, so the model takes the features' size: res4 1024-d here, res5 2048-d with WEIGHTS.
    config = str(DEMO_CONFIG)
    train_common = ["--vocab", str(out / "vocab"), "--config", config, "--batch-size", "32", "--lr", "1e-3",
                    "--num-workers", "0"]
    return [
        ("Extract region features (embedded local Ray, CPU)",
         ["extract", "--images", str(sample / "images"), "--out", str(feats), "--shard-size", "32", *detector]),
        ("Inspect the feature set and draw one image's detections",
         ["inspect", str(feats), "--image-id", image_id, "--out", str(out / "inspect.png")]),
        ("Train a WordPiece vocabulary from the sample text (no BERT vocabulary offline)",
         ["vocab", str(sample / "captions_train.json"), str(sample / "questions_train.json"),
          "--out", str(out / "vocab"), "--vocab-size", "300", "--min-frequency", "1"]),
        ("Shard captions (pretraining)",
         ["shard", "--features", str(feats), "--task", "captions", "--annotations",
          str(sample / "captions_train.json"), "--split", "train", "--out", str(tasks / "captions_train"),
          "--shard-size", "16"]),
        ("Shard held-out captions (to check that pretraining relates captions to images)",
         ["shard", "--features", str(feats), "--task", "captions", "--annotations",
          str(sample / "captions_val.json"), "--split", "val", "--out", str(tasks / "captions_val"),
          "--shard-size", "16"]),
        ("Shard VQA training questions (builds the answer vocabulary)",
         ["shard", "--features", str(feats), "--task", "vqa", "--annotations", str(sample / "questions_train.json"),
          str(sample / "annotations_train.json"), "--split", "train", "--out", str(tasks / "vqa_train"),
          "--min-answer-count", "1", "--shard-size", "16"]),
        ("Shard held-out VQA questions (reusing the training answers)",
         ["shard", "--features", str(feats), "--task", "vqa", "--annotations", str(sample / "questions_val.json"),
          str(sample / "annotations_val.json"), "--split", "val", "--out", str(tasks / "vqa_val"),
          "--answers", str(tasks / "vqa_train" / "answers.json"), "--shard-size", "16"]),
        ("Pretrain a small ViLBERT (masked language + region modelling, alignment)",
         ["train", "--task", "pretrain", "--data", str(tasks / "captions_train"), "--out", str(runs / "pretrain"),
          "--steps", str(steps[0]), "--checkpoint-every", str(steps[0]), *train_common]),
        ("Evaluate pretraining on the held-out captions (alignment accuracy against chance)",
         ["eval", "--task", "pretrain", "--model", str(runs / "pretrain"), "--data", str(tasks / "captions_val"),
          "--out", str(reports / "pretrain_val")]),
        ("Fine-tune it on VQA",
         ["train", "--task", "vqa", "--data", str(tasks / "vqa_train"), "--out", str(runs / "vqa"),
          "--init-from", str(runs / "pretrain"), "--steps", str(steps[1]), "--checkpoint-every", str(steps[1]),
          *train_common]),
        ("Evaluate on the held-out questions: official VQA accuracy, blind baselines, images shuffled",
         ["eval", "--task", "vqa", "--model", str(runs / "vqa"), "--data", str(tasks / "vqa_val"),
          "--out", str(reports / "vqa_val")]),
        ("Explain one answer: where the co-attention looks",
         ["explain", "--model", str(runs / "vqa"), "--features", str(feats), "--image-id", image_id,
          "--text", question, "--out", str(out / "explain.png")]),
    ]


def held_out_example(sample: Path) -> tuple[str, str]:
    """The feature image id and first question of the first held-out image (what inspect/explain show)."""
    from pipelines.sources import image_id_for

    val = json.loads((sample / "questions_val.json").read_text())["questions"]
    images = json.loads((sample / "captions_val.json").read_text())["images"]
    first = val[0]
    file_name = next(im["file_name"] for im in images if im["id"] == first["image_id"])
    return image_id_for(file_name), first["question"]


def demo_summary(split: dict, pretrain: dict) -> tuple[str, str]:
    """The held-out VQA table (model, shuffled images, blind baselines) and a verdict on vision use."""
    from vilbert_core.evaluation.evaluator import vqa_comparison

    table = vqa_comparison(split)
    titles = list(table)
    lines = ["| VQA accuracy (held out) | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for row in table["model"]:
        lines.append(f"| {row} | " + " | ".join(f"{table[t].get(row, float('nan')):.2f}" for t in titles) + " |")
    vision = split.get("vision", {})
    gain, drop = vision.get("gain_over_question_prior"), vision.get("drop_when_images_shuffled")
    if vision.get("uses_image") and vision.get("beats_question_prior"):
        verdict = (f"Vision helps: the model beats the question-only prior by {gain:.2f} points and loses "
                   f"{drop:.2f} points when every question gets another image's regions.")
    else:
        verdict = "WARNING: " + " ".join(split.get("warnings", ["the vision check did not run"]))
    chance = pretrain["baselines"]["chance"]["alignment_accuracy"]
    verdict += (f"\nPretraining: held-out caption-image alignment accuracy {pretrain['alignment_accuracy']:.2f} "
                f"(chance {chance:.2f})." + "".join(f" WARNING: {w}" for w in pretrain.get("warnings", [])))
    return "\n".join(lines), verdict


def uses_image(metrics: dict) -> bool:
    """Whether the first split of an eval metrics.json says the model uses the image and beats the prior."""
    vision = next(iter(metrics["splits"].values())).get("vision", {})
    return bool(vision.get("uses_image") and vision.get("beats_question_prior"))


def run_demo(
    out: Path, weights: str | None, sample: Path, pretrain_steps: int, steps: int, fresh: bool
) -> None:
    """Run every step as a `vilbert-data` subprocess, stop at the first failure, then print the summary."""
    if not (sample / "images").is_dir():
        raise typer.BadParameter(f"{sample}: no images/ folder (pass --sample DIR)", param_hint="--sample")
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if weights is None:
        typer.secho("NOTE: no WEIGHTS given: the detector runs with RANDOM weights, so the region features are "
                    "meaningless and only the pipeline is being shown. Use `make demo WEIGHTS=path/to/ckpt`.",
                    fg=typer.colors.YELLOW, err=True)
    exe = shutil.which("vilbert-data")
    base = [exe] if exe else [sys.executable, "-m", "cli"]
    t_start = time.time()
    steps_list = demo_steps(out, sample, weights, (pretrain_steps, steps), *held_out_example(sample))
    for i, (title, argv) in enumerate(steps_list, 1):
        typer.secho(f"\n[{i}/{len(steps_list)}] {title}", bold=True)
        typer.echo("$ vilbert-data " + shlex.join(argv))
        t0 = time.time()
        code = subprocess.call(base + argv)
        if code != 0:
            typer.secho(f"step {i} failed with exit status {code}; the command above reproduces it.",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(code)
        typer.echo(f"    done in {time.time() - t0:.0f} s")

    metrics = json.loads((out / "reports" / "vqa_val" / "metrics.json").read_text())
    pretrain = json.loads((out / "reports" / "pretrain_val" / "metrics.json").read_text())
    summary, verdict = demo_summary(next(iter(metrics["splits"].values())), next(iter(pretrain["splits"].values())))
    (out / "summary.md").write_text(summary + "\n\n" + verdict + "\n")
    typer.secho(f"\nDemo finished in {time.time() - t_start:.0f} s. Artefacts:", bold=True)
    for name, path in [("feature shards + dataset.json", out / "features"), ("detections picture", out / "inspect.png"),
                       ("task shards", out / "tasks"), ("runs (model, metrics.jsonl, curves.png)", out / "runs"),
                       ("evaluation reports", out / "reports"),
                       ("co-attention picture", out / "explain.png"), ("this table", out / "summary.md")]:
        typer.echo(f"  {name:42s} {path}")
    typer.echo("\n" + summary)
    typer.secho("\n" + verdict, fg=None if uses_image(metrics) else typer.colors.YELLOW)
    typer.echo("\nOn real data: extract with --weights <detector checkpoint> --feature-layer res5 on your images, shard "
               "your annotations, train with --config vilbert-base; on a Ray cluster add --ray-address auto; for many "
               "GPUs run `torchrun --nproc_per_node 8 -m cli train ...`. See README.md.")
