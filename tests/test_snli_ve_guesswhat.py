"""SNLI-VE and GuessWhat?! answers through the registry: readers (official jsonl), shard, training steps on
the three-way head, eval (accuracy per class against a plain count over the predictions file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.annotations import AnnotationError
from pipelines.shard_job import run_shard
from pipelines.tasks.guesswhat import read_guesswhat
from pipelines.tasks.snli_ve import read_snli_ve
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.tasks import get_task
from vilbert_core.tasks._labels import class_accuracy
from vilbert_core.training.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["a", "man", "dog", "is", "it", "the", "person", "sleeping", "running", "on", "left", "red", "car"]
SNLI = [  # (pairID, image field, image, hypothesis, gold label)
    ("4564320256.jpg#0r1e", "Flikr30kID", "4564320256.jpg", "A man is running.", "entailment"),
    ("4564320256.jpg#0r1n", "Flikr30kID", "4564320256.jpg", "A man is on the left.", "neutral"),
    ("4564320256.jpg#0r1c", "Flikr30kID", "4564320256.jpg", "A man is sleeping.", "contradiction"),
    ("36979.jpg#1r1e", "Flickr30K_ID", "36979", "A dog is running.", "entailment"),
    ("36979.jpg#1r1c", "Flickr30K_ID", "36979", "A red car.", "contradiction"),
]


def write_snli(path: Path, rows: list[tuple]) -> Path:
    """SNLI-VE's layout: SNLI's fields plus the premise image."""
    lines = [json.dumps({"pairID": pid, field: image, "sentence1": "A man and a dog.", "sentence2": hyp,
                         "gold_label": label, "annotator_labels": [label], "captionID": "x#0"})
             for pid, field, image, hyp, label in rows]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def game(gid: int, image_id: int, qas: list[tuple[int, str, str]], status: str = "success") -> dict:
    """One GuessWhat?! game of the official jsonl."""
    return {"id": gid, "questioner_id": 7, "status": status, "object_id": 11, "timestamp": "2016-07-08",
            "image": {"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "width": 640, "height": 480,
                      "coco_url": "http://x", "flickr_url": "http://y"},
            "objects": [{"id": 11, "category": "person", "bbox": [1, 2, 3, 4], "category_id": 1, "segment": [],
                         "area": 12.0}],
            "qas": [{"id": qid, "question": q, "answer": a} for qid, q, a in qas]}  # fmt: skip


GAMES = [game(1, 516212, [(4988, "is it a person?", "Yes"), (4989, "is it on the left?", "No")]),
         game(2, 516212, [(5001, "is it a car?", "N/A")], status="failure"),
         game(3, 9, [(6001, "is it red?", "No"), (6002, "is it a dog?", "Yes")], status="incomplete")]  # fmt: skip


def write_games(path: Path, games: list[dict]) -> Path:
    """GuessWhat?!'s layout: one game a line."""
    path.write_text("".join(json.dumps(g) + "\n" for g in games))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Flickr30k and COCO images, both tasks' training files sharded, a vocab.txt."""
    root = tmp_path_factory.mktemp("three_way")
    images = [make_image("4564320256", "flickr30k_images/4564320256.jpg", k=4, dim=16, seed=0),
              make_image("36979", "flickr30k_images/36979.jpg", k=5, dim=16, seed=1),
              make_image("COCO_train2014_000000516212", "train2014/COCO_train2014_000000516212.jpg", k=3, dim=16, seed=2),
              make_image("COCO_train2014_000000000009", "train2014/COCO_train2014_000000000009.jpg", k=6, dim=16, seed=3)]  # fmt: skip
    feats = write_feature_set(root / "feats", images)
    out = {"root": root, "vocab": write_vocab(root / "vocab.txt", WORDS)}
    for task, path in (("snli_ve", write_snli(root / "snli_ve_train.jsonl", SNLI)),
                       ("guesswhat", write_games(root / "guesswhat.train.jsonl", GAMES))):  # fmt: skip
        out[task] = root / task
        run_shard(feats, task, [path], "train", out[task], shard_size=2, progress=False)
    return out


def test_snli_ve_reader_takes_both_image_spellings(tmp_path: Path) -> None:
    anns = read_snli_ve([write_snli(tmp_path / "t.jsonl", SNLI)])
    assert [a.ref.path for a in anns] == ["4564320256.jpg"] * 3 + ["36979.jpg"] * 2
    assert anns[3].ref.numeric_id == 36979
    assert anns[0].record == {"pair_id": "4564320256.jpg#0r1e", "hypothesis": "A man is running.",
                              "premise": "A man and a dog.", "label": 0}  # fmt: skip
    assert [a.record["label"] for a in anns] == [0, 1, 2, 0, 2]
    with pytest.raises(AnnotationError, match=r"bad\.jsonl: line 1: gold_label '-' must be one of"):
        read_snli_ve([write_snli(tmp_path / "bad.jsonl", [("p", "Flikr30kID", "1.jpg", "x", "-")])])
    (tmp_path / "noimg.jsonl").write_text(json.dumps({"sentence2": "x"}) + "\n")
    with pytest.raises(AnnotationError, match=r"noimg\.jsonl: line 1: missing field Flikr30kID or Flickr30K_ID"):
        read_snli_ve([tmp_path / "noimg.jsonl"])


def test_guesswhat_reader_gives_one_example_per_question(tmp_path: Path) -> None:
    anns = read_guesswhat([write_games(tmp_path / "g.jsonl", GAMES)])
    assert [a.record["question_id"] for a in anns] == [4988, 4989, 5001, 6001, 6002]
    assert [a.record["label"] for a in anns] == [0, 1, 2, 1, 0]  # Yes, No, N/A
    assert anns[0].ref.path == "COCO_train2014_000000516212.jpg" and anns[0].ref.numeric_id == 516212
    assert anns[2].record == {"question_id": 5001, "question": "is it a car?", "game_id": 2, "status": "failure",
                              "label": 2}  # fmt: skip
    broken = game(4, 9, [(1, "is it?", "maybe")])
    with pytest.raises(AnnotationError, match=r"bad\.jsonl: line 2: qas\[0\]: answer 'maybe' must be one of"):
        read_guesswhat([write_games(tmp_path / "bad.jsonl", [GAMES[0], broken])])


@pytest.mark.parametrize(("task", "n_records", "n_images"), [("snli_ve", 5, 2), ("guesswhat", 5, 2)])
def test_shard_groups_records_by_image(data: dict, task: str, n_records: int, n_images: int) -> None:
    info = json.loads((data[task] / "task.json").read_text())
    assert info["counts"]["records"] == n_records and info["counts"]["images"] == n_images
    records = [r for s in read_task_samples(data[task]).values() for r in json.loads(s["ann.json"])]
    assert all(r["label"] in (0, 1, 2) for r in records)


def test_metric_against_a_hand_worked_example() -> None:
    # gold: entailment, entailment, neutral, contradiction; predicted: entailment, neutral, neutral, entailment
    got = class_accuracy([0, 1, 1, 0], [0, 0, 1, 2], get_task("snli_ve").classes)
    assert got == {"accuracy": 50.0, "per_class": {"entailment": 50.0, "neutral": 100.0, "contradiction": 0.0},
                   "num_scored": 4}  # fmt: skip


@pytest.mark.parametrize(("task", "id_field"), [("snli_ve", "pair_id"), ("guesswhat", "question_id")])
def test_train_a_few_steps_then_eval(data: dict, tmp_path: Path, task: str, id_field: str) -> None:
    run = tmp_path / "run"
    summary = run_train(task=task, data=str(data[task]), out=str(run), vocab=str(data["vocab"]), config="tiny",
                        steps=2, batch_size=3, lr=1e-3, warmup=0.0, num_workers=0, progress=False, device="cpu",
                        max_text_len=16)  # fmt: skip
    assert summary["steps"] == 2
    res = run_eval(task, run, data[task], tmp_path / "report", batch_size=2, device="cpu", progress=False)
    split = res["splits"]["train"]
    preds = json.loads((tmp_path / "report" / f"{task}_predictions_train.json").read_text())
    classes = get_task(task).classes
    if task == "snli_ve":
        gold = {pid: label for pid, _, _, _, label in SNLI}
    else:
        gold = {qa["id"]: qa["answer"] for g in GAMES for qa in g["qas"]}
    assert sorted(p[id_field] for p in preds) == sorted(gold)
    hits = [p["prediction"] == gold[p[id_field]] for p in preds]
    assert split["accuracy"] == pytest.approx(100 * sum(hits) / len(hits))
    for c in classes:
        mine = [p["prediction"] == c for p in preds if gold[p[id_field]] == c]
        assert split["per_class"][c] == pytest.approx(100 * sum(mine) / len(mine))
    assert all(len(p["probs"]) == 3 and abs(sum(p["probs"]) - 1) < 1e-4 for p in preds)
    assert "shuffled_images" in split and split["baselines"]["chance"]["accuracy"] == pytest.approx(100 / 3)
