"""Visual Genome QA: reader (question_answers.json), answer normalisation, split by image id, shard,
a few training steps, and exact-match accuracy per W-type against a hand-worked example."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.annotations import AnnotationError
from pipelines.shard_job import run_shard
from pipelines.tasks.vgqa import normalize_vg_answer, read_vg_qa
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.tasks import get_task
from vilbert_core.training.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["what", "is", "the", "man", "wearing", "where", "who", "how", "many", "color", "shirt", "a", "red"]


def qa(qa_id: int, image: int, question: str, answer: str) -> dict:
    """One VG QA pair as question_answers.json writes it."""
    return {"a_objects": [], "question": question, "image_id": image, "qa_id": qa_id, "answer": answer,
            "q_objects": []}  # fmt: skip


# images 2 and 3 are train (last digit 2..9), 11 val, 20 test; image 5 has no questions
QAS = {
    3: [qa(31, 3, "What is the man wearing?", "A red shirt. "), qa(30, 3, "Where is the man?", "On the beach.")],
    2: [qa(20, 2, "What color is the shirt?", "Red."), qa(21, 2, "Who is wearing a shirt?", "The man."),
        qa(22, 2, "How many men?", "2")],
    5: [],
    11: [qa(110, 11, "What color is the shirt?", "red")],
    20: [qa(200, 20, "Who is there?", "a man.")],
}  # fmt: skip


def write_vg(path: Path, qas: dict[int, list[dict]]) -> Path:
    """question_answers.json: a list of {"id", "qas"}, images in the release's (unsorted) order."""
    path.write_text(json.dumps([{"id": i, "qas": q} for i, q in qas.items()]))
    return path


@pytest.fixture(scope="module")
def vg(tmp_path_factory) -> dict[str, Path]:
    """Features of images 2, 3, 11 (VG_100K and VG_100K_2 folders), the train split sharded, a vocab."""
    root = tmp_path_factory.mktemp("vgqa")
    images = [make_image(str(i), f"{folder}/{i}.jpg", k=4 + n, dim=16, seed=n)
              for n, (i, folder) in enumerate([(2, "VG_100K"), (3, "VG_100K_2"), (11, "VG_100K")])]  # fmt: skip
    feats = write_feature_set(root / "feats", images)
    ann = write_vg(root / "question_answers.json", QAS)
    train = root / "train"
    run_shard(feats, "vgqa", [ann], "train", train, shard_size=2, min_answer_count=1, progress=False)
    return {"feats": feats, "train": train, "root": root, "ann": ann, "vocab": write_vocab(root / "vocab.txt", WORDS)}


def test_normalisation_rule() -> None:
    assert normalize_vg_answer("  A red  shirt.. ") == "a red shirt"
    assert normalize_vg_answer("On the beach.") == "on the beach"
    assert normalize_vg_answer("3.5") == "3.5"  # only trailing stops go


def test_reader_selects_splits_by_image_id_and_normalises(tmp_path: Path) -> None:
    path = write_vg(tmp_path / "question_answers.json", QAS)
    train = read_vg_qa([path], "train")
    assert [a.record["question_id"] for a in train] == [20, 21, 22, 30, 31]  # image then qa_id order
    assert [a.record["answers"] for a in train] == [["red"], ["the man"], ["2"], ["on the beach"], ["a red shirt"]]
    assert [a.record["question_type"] for a in train] == ["what", "who", "how", "where", "what"]
    assert train[0].ref.path == "2.jpg" and train[0].ref.numeric_id == 2
    assert [a.record["question_id"] for a in read_vg_qa([path], "val")] == [110]
    assert [a.record["question_id"] for a in read_vg_qa([path], "test")] == [200]
    assert len(read_vg_qa([path], "all")) == 7
    with pytest.raises(AnnotationError, match="splits are train, val, test, all"):
        read_vg_qa([path], "minival")
    broken = write_vg(tmp_path / "bad.json", {4: [{"qa_id": 9, "question": "What?"}]})
    with pytest.raises(AnnotationError, match=r"bad\.json: image 4 qa 9: missing field\(s\) answer"):
        read_vg_qa([broken], "train")


def test_shard_builds_the_answer_list_of_normalised_answers(vg: dict[str, Path]) -> None:
    answers = json.loads((vg["train"] / "answers.json").read_text())
    assert answers == sorted(["red", "the man", "2", "on the beach", "a red shirt"])  # one each: alphabetical
    info = json.loads((vg["train"] / "task.json").read_text())
    assert info["task"] == "vgqa" and info["counts"]["records"] == 5
    samples = read_task_samples(vg["train"])
    assert sorted(samples) == ["2", "3"]
    records = {r["question_id"]: r for s in samples.values() for r in json.loads(s["ann.json"])}
    assert records[31]["labels"] == [answers.index("a red shirt")] and records[31]["scores"] == [1.0]


def test_metric_against_a_hand_worked_example() -> None:
    spec = get_task("vgqa")
    questions = [{"question_id": 1, "answers": ["red"], "question_type": "what"},
                 {"question_id": 2, "answers": ["a red shirt"], "question_type": "what"},
                 {"question_id": 3, "answers": ["the man"], "question_type": "who"},
                 {"question_id": 4, "answers": ["2"], "question_type": "how"}]  # fmt: skip
    predictions = {1: "red", 2: "red shirt", 3: "the man", 4: "two"}  # exact match: "two" != "2"
    got = spec.accuracy(predictions, questions)
    assert got["overall"] == 50.0 and got["num_questions"] == 4
    assert got["per_question_type"] == {"how": 0.0, "what": 50.0, "who": 100.0}
    assert spec.submission({5: "a", 1: "b"}) == [{"qa_id": 1, "answer": "b"}, {"qa_id": 5, "answer": "a"}]


def test_train_a_few_steps_then_eval(vg: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = run_train(task="vgqa", data=str(vg["train"]), out=str(run), vocab=str(vg["vocab"]), config="tiny",
                        steps=3, batch_size=4, lr=1e-3, warmup=0.0, num_workers=0, progress=False, device="cpu",
                        max_text_len=16)  # fmt: skip
    assert summary["steps"] == 3
    val = vg["root"] / "val"
    info = run_shard(vg["feats"], "vgqa", [vg["ann"]], "val", val, answers=vg["train"] / "answers.json",
                     progress=False)  # fmt: skip
    assert info["counts"]["records"] == 1
    res = run_eval("vgqa", run, vg["train"], tmp_path / "report", batch_size=2, device="cpu", progress=False,
                   train_data=vg["train"])  # fmt: skip
    split = res["splits"]["train"]
    sub = json.loads((tmp_path / "report" / "vgqa_predictions_train.json").read_text())
    truth = {q["qa_id"]: normalize_vg_answer(q["answer"]) for qs in QAS.values() for q in qs}
    assert sorted(p["qa_id"] for p in sub) == [20, 21, 22, 30, 31]
    assert split["overall"] == pytest.approx(100 * sum(p["answer"] == truth[p["qa_id"]] for p in sub) / len(sub))
    assert set(split["per_question_type"]) == {"what", "who", "how", "where"}
    # every training wording is unique: the prior answers each with its own answer
    assert split["baselines"]["question_prior"]["overall"] == 100.0
    assert "shuffled_images" in split
    assert "VG QA accuracy" in (tmp_path / "report" / "report.md").read_text()
