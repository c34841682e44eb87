"""Vision must reach the answer: shard -> train -> eval on synthetic features where only the image knows.

Every image's answer (its colour) is coded in one direction of its region features, on top of a large
component that every region of every image shares, as with real detector features (there, an image's
mean feature differs from the feature set's mean by about 10% of its length; here by about 3%). Each
question string is asked of every colour, so the question-only prior is at chance. A model that uses
the image reaches the top; one that does not stays at the prior, and with another image's regions the
good model falls to the prior too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import FakeImage, write_feature_set, write_vocab

from pipelines.shard_job import run_shard
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.training import run_train
from vilbert_core.training.metrics_log import read_metrics

COLORS = ["red", "green", "blue", "yellow", "white", "black", "pink", "brown"]
QUESTIONS = ("what color is the shape?", "what color is it?")
D, K, N_TRAIN, N_VAL = 32, 8, 160, 48

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(i: int, colour: int, rng: np.random.Generator, shared: np.ndarray, dirs: np.ndarray) -> FakeImage:
    """K regions: shared component + per-region noise + the colour's direction (norm 4/3 per region)."""
    feats = shared + rng.uniform(0, 1.0, (K, D)) + 4.0 / 3.0 * dirs[colour]
    x1, y1 = rng.uniform(0, 60, K), rng.uniform(0, 40, K)
    boxes = np.stack([x1, y1, x1 + 30, y1 + 30], 1).astype(np.float32)
    spatial = np.concatenate([boxes / [100, 80, 100, 80], np.full((K, 1), 900 / 8000)], 1).astype(np.float32)
    prob = np.full((K, 1601), 1 / 1601, np.float16)
    return FakeImage(f"img{i:04d}", f"img{i:04d}.jpg", 100, 80, boxes, feats.astype(np.float16), spatial, prob)


def _vqa_files(root: Path, split: str, ids: range, colours: np.ndarray) -> list[Path]:
    """VQA v2 questions + annotations files: both question strings for every image, ten equal answers."""
    questions, annotations = [], []
    for i in ids:
        for q in QUESTIONS:
            qid = len(questions) + 1 + 10_000 * (split == "val")
            answer = COLORS[colours[i]]
            questions.append({"image_id": i, "question": q, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": i, "question_type": "what color is the",
                                "answer_type": "other", "multiple_choice_answer": answer,
                                "answers": [{"answer": answer, "answer_id": j + 1} for j in range(10)]})  # fmt: skip
    paths = [root / f"questions_{split}.json", root / f"annotations_{split}.json"]
    paths[0].write_text(json.dumps({"questions": questions}))
    paths[1].write_text(json.dumps({"annotations": annotations}))
    return paths


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Feature set, VQA train/val task shards, vocabulary and a small (64-d) model config."""
    root = tmp_path_factory.mktemp("vision")
    rng = np.random.default_rng(0)
    shared = rng.uniform(2, 10, D)
    dirs = rng.normal(size=(len(COLORS), D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    colours = rng.integers(0, len(COLORS), N_TRAIN + N_VAL)
    images = [_image(i, c, rng, shared, dirs) for i, c in enumerate(colours)]
    write_feature_set(root / "feats", images, per_shard=64)
    train = run_shard(root / "feats", "vqa", _vqa_files(root, "train", range(N_TRAIN), colours), "train",
                      root / "train", min_answer_count=1, progress=False)  # fmt: skip
    run_shard(root / "feats", "vqa", _vqa_files(root, "val", range(N_TRAIN, N_TRAIN + N_VAL), colours), "val",
              root / "val", answers=root / "train" / "answers.json", progress=False)  # fmt: skip
    assert train["feature_stats"] == "feature_stats.json"
    vocab = write_vocab(root / "vocab.txt", ["what", "color", "is", "the", "shape", "it", *COLORS])
    config = json.loads((Path(__file__).resolve().parents[1] / "demo" / "vilbert_demo_config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "v_feature_size": D}))
    means = np.stack([im.features.astype(np.float32).mean(0) for im in images])
    ratio = np.linalg.norm(means - means.mean(0), axis=1).mean() / np.linalg.norm(means.mean(0))
    assert ratio < 0.05, ratio  # the image-specific part is small next to the shared component
    return {"root": root, "train": root / "train", "val": root / "val", "vocab": vocab, "config": root / "config.json"}


def _train_and_eval(data: dict[str, Path], name: str, feature_norm: str | None) -> tuple[dict, dict, list[dict]]:
    """100 steps of VQA with validation at 50 and 100, then `run_eval` on the held-out images."""
    run = data["root"] / name
    summary = run_train(
        task="vqa", data=str(data["train"]), val=str(data["val"]), out=str(run), vocab=str(data["vocab"]),
        config=str(data["config"]), batch_size=32, lr=3e-3, steps=100, eval_every=50, num_workers=0,
        progress=False, tensorboard=False, device="cpu", feature_norm=feature_norm,
    )  # fmt: skip
    report = run_eval("vqa", run, data["val"], data["root"] / f"{name}_report", device="cpu", progress=False)
    val_log = [r for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "val"]
    return summary, report["splits"]["val"], val_log


def test_a_standardised_model_answers_from_the_image(colour_data: dict[str, Path]) -> None:
    summary, m, val_log = _train_and_eval(colour_data, "standardised", None)
    prior = m["baselines"]["question_prior"]["overall"]
    assert prior <= 20.0  # the wording says nothing: chance is 12.5
    assert m["overall"] >= 95.0, m
    # with every question given another image's regions the model is back at the prior
    assert m["shuffled_images"]["overall"] <= prior + 10.0
    assert m["vision"]["uses_image"] is True and m["vision"]["beats_question_prior"] is True and m["warnings"] == []
    assert summary["warnings"] == []
    # training validation measured the same thing: a large gap between own and other images' regions
    assert val_log[-1]["vision_gap"] >= 0.8 and val_log[-1]["vqa_score"] >= 0.95
    # the model carries the training split's statistics (written by shard) in its own weights
    args = json.loads((colour_data["root"] / "standardised" / "train_args.json").read_text())
    assert args["feature_norm_used"] == "standardize"
    assert args["feature_stats_source"].endswith("feature_stats.json")


def test_raw_features_give_a_blind_model_and_every_report_says_so(colour_data: dict[str, Path]) -> None:
    """The reference's raw input (--feature-norm none) on the same data: the failure the fix removes."""
    summary, m, val_log = _train_and_eval(colour_data, "raw", "none")
    prior = m["baselines"]["question_prior"]["overall"]
    assert m["overall"] <= prior + 10.0
    assert m["vision"]["uses_image"] is False
    assert any("barely uses the image" in w for w in m["warnings"])
    assert any("does not beat the question-only prior" in w for w in m["warnings"]) or m["overall"] > prior
    assert any("without looking at the image" in w for w in summary["warnings"])
    assert abs(val_log[-1]["vision_gap"]) < 0.05
    report = (colour_data["root"] / "raw_report" / "report.md").read_text()
    assert "> **Warning**" in report and "question-only prior" in report
