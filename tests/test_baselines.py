"""Blind baselines against plain-loop and hand-computed values; the shuffled-image stream of the datasets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.datasets import Regions, TaskDataset, swap_regions
from pipelines.formats.tasks import iter_task_records
from vilbert_core.evaluation.baselines import (
    QuestionPrior,
    normalize_question,
    refcoco_chance,
    retrieval_chance,
    vcr_chance,
)
from vilbert_core.evaluation.metrics import recall_at_k, retrieval_ranks


def test_normalize_question() -> None:
    assert normalize_question("  What COLOR is the  dog? ") == "what color is the dog"
    assert normalize_question("is it a man's hat?") == "is it a man s hat"


def _rec(q: str, answers: list[str], qtype: str = "") -> dict:
    return {"question": q, "answers": answers, "question_type": qtype}


def test_question_prior_by_wording_then_type_then_majority() -> None:
    records = [
        _rec("What color is the car?", ["red"] * 7 + ["blue"] * 3, "what color is the"),
        _rec("what color is the car", ["blue"] * 10, "what color is the"),
        _rec("what color is the car?", ["Red"] * 6 + ["red."] * 4, "what color is the"),
        _rec("what color is the sky?", ["blue"] * 10, "what color is the"),
        _rec("is there a dog?", ["yes"] * 10, "is there a"),
        _rec("is there a cat?", ["no"] * 6 + ["yes"] * 4, "is there a"),
        _rec("how many cats?", ["2"] * 5 + ["two"] * 5, "how many"),  # "two" -> "2": one answer, ten votes
        _rec("why?", ["because"] * 10, "why"),
        _rec("unanswered (test split)?", [], "why"),
    ]
    prior = QuestionPrior.fit(records)
    # one vote per question: red x2, blue x2, yes, no, 2, because -> majority: blue/red tie -> "blue"
    assert prior.majority == "blue" and prior.num_train_questions == 8
    assert prior.predict("what color is the CAR ?") == "red"  # wording: red 2, blue 1
    assert prior.predict("what color is the bus?", "what color is the") == "blue"  # type: blue 2, red 2 -> blue
    assert prior.predict("is there a horse?", "is there a") == "no"  # type tie no/yes -> "no"
    assert prior.predict("how many cats") == "2"
    assert prior.predict("something new", "unknown type") == "blue"
    with pytest.raises(ValueError, match="no training questions"):
        QuestionPrior.fit([_rec("q?", [])])


def test_refcoco_chance_against_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    iou = torch.rand(6, 9, generator=g)
    valid = torch.rand(6, 9, generator=g) > 0.3
    valid[:, 0] = False
    got = refcoco_chance(iou, valid)
    for b in range(6):
        regions = [r for r in range(9) if valid[b, r]]
        expected = sum(iou[b, r] >= 0.5 for r in regions) / len(regions) if regions else 0.0
        assert got[b].item() == pytest.approx(float(expected))
    assert vcr_chance() == {"q_a": 25.0, "qa_r": 25.0, "q_ar": 6.25}


def test_retrieval_chance_equals_the_mean_recall_over_every_ordering() -> None:
    """Exhaustively: the mean R@K of the real rank code over all 720 orderings of 2 x 3 distinct scores."""
    caption_image = torch.tensor([0, 1, 1])  # image 0 has one caption, image 1 two
    ks = (1, 2)
    chance = retrieval_chance(caption_image, 2, num_candidates=100, ks=ks)
    totals: dict[str, dict[str, float]] = {}
    perms = list(itertools.permutations(range(6)))
    for order in perms:
        scores = torch.tensor(order, dtype=torch.float32).view(2, 3)
        for name, r in retrieval_ranks(scores, caption_image, num_candidates=100).items():
            for k, v in recall_at_k(r, ks=ks).items():
                totals.setdefault(name, {}).setdefault(k, 0.0)
                totals[name][k] += v / len(perms)
    assert set(totals) == set(chance)
    for name, rec in totals.items():
        for k, v in rec.items():
            assert v == pytest.approx(chance[name][k]), (name, k)
    # by hand: image retrieval R@1 = 1/2; text retrieval R@1 = mean(1/3, 2/3), R@2 = mean(1 - (2/3)(1/2), 1)
    assert chance["image_retrieval"]["r1"] == pytest.approx(50.0)
    assert chance["text_retrieval"]["r1"] == pytest.approx(50.0)
    assert chance["text_retrieval"]["r2"] == pytest.approx(100 * ((1 - 2 / 3 * 1 / 2) + 1) / 2)
    # a larger set with fewer candidates than images: image R@1 = 1/candidates
    big = retrieval_chance(torch.arange(300) // 3, 100, num_candidates=10)
    assert big["image_retrieval"]["r1"] == pytest.approx(1.0)
    assert big["image_retrieval_10cand"]["r5"] == pytest.approx(50.0)


def _regions(n: int, value: float) -> Regions:
    feat = np.full((n, 4), value, np.float32)
    loc = np.tile(np.array([[0.1, 0.1, 0.5, 0.5, 0.16]], np.float32), (n, 1)) * (1 + value)
    return Regions(feat, loc, np.zeros((n, 3), np.float32))


@pytest.mark.parametrize("n", [2, 3, 7])
def test_swap_regions_is_a_derangement(n: int) -> None:
    items = [(f"img{i}", [{"i": i}], _regions(3 + i, float(i))) for i in range(n)]
    out = list(swap_regions(iter(items)))
    assert sorted(k for k, _, _ in out) == [k for k, _, _ in items]  # every image once
    for key, records, regions in out:
        i = int(key[3:])
        assert records == [{"i": i}]  # the image's own records
        donor = float(regions.raw_feat[0, 0])
        assert donor != i  # never its own regions
        assert donor == (i - 1) % n  # the previous image's, the first gets the last's
    assert list(swap_regions(iter(items[:1]))) == []  # a lone image has nobody to borrow from


def test_swap_regions_features_only_keeps_own_boxes() -> None:
    items = [("a", [], _regions(5, 0.0)), ("b", [], _regions(2, 1.0))]
    out = dict((k, r) for k, _, r in swap_regions(iter(items), features_only=True))
    a, b = out["a"], out["b"]
    # a keeps its 5 boxes and gets b's 2 features repeated; b keeps its 2 boxes with a's features
    assert a.num_detected == 5 and np.array_equal(a.raw_loc, items[0][2].raw_loc)
    assert np.all(a.raw_feat == 1.0) and np.all(b.raw_feat == 0.0)
    assert np.array_equal(b.raw_loc, items[1][2].raw_loc)


def test_task_dataset_swaps_images_of_vqa_shards(tmp_path: Path) -> None:
    """Through the real dataset: every question keeps its text and answers and gets another image's regions."""
    import webdataset as wds
    from eval_fixtures import npy

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "?"]) + "\n")
    root = tmp_path / "vqa"
    root.mkdir()
    with wds.TarWriter(str(root / "task-000000.tar")) as sink:
        for i in range(4):
            k = 2 + i
            rec = [{"question_id": 10 * i + j, "question": "what ?", "answers": ["a"] * 10, "answer_type": "other",
                    "question_type": "what", "labels": [0], "scores": [1.0]} for j in range(2)]  # fmt: skip
            sink.write({"__key__": f"img{i}", "features.npy": npy(np.full((k, 4), i, np.float16)),
                        "spatial.npy": npy(np.zeros((k, 5), np.float32)), "boxes.npy": npy(np.zeros((k, 4), np.float32)),
                        "cls_prob.npy": npy(np.zeros((k, 1601), np.float16)), "ann.json": json.dumps(rec)})  # fmt: skip
    (root / "answers.json").write_text(json.dumps(["a"]))
    (root / "task.json").write_text(json.dumps({"task": "vqa", "answer_vocab": "answers.json", "shards": ["task-000000.tar"]}))
    plain = list(TaskDataset(root, "vqa", vocab, batch_size=None, shuffle_buffer=1))
    swapped = list(TaskDataset(root, "vqa", vocab, batch_size=None, shuffle_buffer=1, swap_images=True))
    assert sorted(e["question_id"] for e in swapped) == sorted(e["question_id"] for e in plain)
    for e in swapped:
        own = e["question_id"] // 10
        assert e["image_id"] == f"img{own}"
        assert float(e["regions"][0].raw_feat[0, 0]) == (own - 1) % 4
    with pytest.raises(ValueError, match="swap_images"):
        TaskDataset(root, "captions", vocab, swap_images=True)
    # the records reader for the blind baselines sees the same questions without reading features
    assert sorted(r["question_id"] for r in iter_task_records(root)) == sorted(e["question_id"] for e in plain)


def test_shuffle_drop_compares_on_the_examples_the_shuffled_pass_scored() -> None:
    from vilbert_core.evaluation.common import shuffle_drop_on_scored

    def score(probs: dict, labels: dict, keep: set | None = None) -> dict | None:
        ids = [k for k in sorted(probs) if keep is None or k in keep]
        if not ids:
            return None
        right = sum(max(range(2), key=probs[k].__getitem__) == labels[k] for k in ids)
        return {"accuracy": 100.0 * right / len(ids), "num_scored": len(ids)}

    own = ({"a": [0.9, 0.1], "b": [0.2, 0.8], "c": [0.3, 0.7]}, {"a": 0, "b": 1, "c": 0})  # right: a, b
    scores = score(*own)  # 66.67 over 3
    # "c" stood alone: the shuffled pass scored a and b only (both wrong); own score on them: 100
    metrics: dict = {}
    shuffled = ({"a": [0.1, 0.9], "b": [0.7, 0.3]}, {"a": 0, "b": 1})
    shuffle_drop_on_scored(metrics, "accuracy", score, own, scores, shuffled)
    assert metrics["shuffled_images"]["drop"] == 100.0 and metrics["shuffled_images"]["num_scored"] == 2
    # every example scored again: the model's score over all of them
    metrics = {}
    shuffled = ({"a": [0.1, 0.9], "b": [0.2, 0.8], "c": [0.3, 0.7]}, own[1])  # right: b only
    shuffle_drop_on_scored(metrics, "accuracy", score, own, scores, shuffled)
    assert metrics["shuffled_images"]["drop"] == pytest.approx(round(200 / 3 - 100 / 3, 2))
    # nothing scored again: no check, no warning
    metrics = {}
    assert shuffle_drop_on_scored(metrics, "accuracy", score, own, scores, ({}, {})) == [] and not metrics
