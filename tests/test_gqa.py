"""GQA, the first task added through the registry: reader (official layout), shard, training steps,
the metric against hand-worked numbers, the blind prior and the submission format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.annotations import AnnotationError
from pipelines.shard_job import run_shard
from pipelines.tasks import data_task
from pipelines.tasks.gqa import read_gqa
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.tasks import get_task
from vilbert_core.tasks.gqa import fit_gqa_prior
from vilbert_core.training.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = ["2354786", "2368326", "2400861", "n161313"]  # GQA names Visual Genome images by number, test ones n...
WORDS = ["is", "the", "sky", "dark", "what", "color", "shirt", "who", "wears", "a", "left", "or", "right", "of"]


def question(image: str, text: str, answer: str | None, structural: str, semantic: str) -> dict:
    """One question of a GQA balanced questions file (test files have no answer)."""
    q = {"imageId": image, "question": text, "fullAnswer": f"The answer is {answer}.", "isBalanced": True,
         "types": {"structural": structural, "semantic": semantic, "detailed": f"{semantic}{structural}"},
         "groups": {"global": None, "local": "x"}, "entailed": [], "equivalent": [], "semantic": [],
         "annotations": {"answer": {}, "question": {}, "fullAnswer": {}}}  # fmt: skip
    if answer is not None:
        q["answer"] = answer
    return q


TRAIN = {
    "201307251": question("2354786", "Is the sky dark?", "yes", "verify", "attr"),
    "201307252": question("2354786", "What color is the shirt?", "t-shirt", "query", "attr"),
    "201640614": question("2368326", "Is the sky dark?", "no", "verify", "attr"),
    "201640615": question("2368326", "Who wears a shirt?", "man", "query", "rel"),
    "201640616": question("2400861", "Who wears a shirt?", "man", "query", "rel"),
    "201640617": question("2400861", "Left or right of the shirt?", "left", "choose", "rel"),
    "201640618": question("2400861", "Is the sky dark?", "yes", "verify", "attr"),
}


def write_questions(path: Path, questions: dict) -> Path:
    """A GQA questions file: one object keyed by question id."""
    path.write_text(json.dumps(questions))
    return path


@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> dict[str, Path]:
    """A feature set of four GQA images, the training questions sharded, a vocab.txt."""
    root = tmp_path_factory.mktemp("gqa")
    images = [make_image(i, f"gqa/images/{i}.jpg", k=4 + n, dim=16, seed=n) for n, i in enumerate(IMAGES)]
    feats = write_feature_set(root / "feats", images)
    train = root / "train"
    run_shard(feats, "gqa", [write_questions(root / "train_balanced_questions.json", TRAIN)], "train", train,
              shard_size=2, min_answer_count=1, progress=False)  # fmt: skip
    return {"feats": feats, "train": train, "root": root, "vocab": write_vocab(root / "vocab.txt", WORDS)}


def test_reader_takes_the_official_layout_and_test_files_without_answers(tmp_path: Path) -> None:
    path = write_questions(tmp_path / "q.json", {**TRAIN, "20000001": question("n161313", "Is it?", None, "verify", "attr")})
    anns = read_gqa([path])
    assert [a.record["question_id"] for a in anns] == sorted([*TRAIN, "20000001"])
    first = anns[0].record
    assert first == {"question_id": "20000001", "question": "Is it?", "answers": [], "full_answer": "The answer is None.",
                     "question_type": "attrverify", "structural": "verify", "semantic": "attr"}  # fmt: skip
    assert anns[0].ref.path == "n161313.jpg" and anns[0].ref.numeric_id is None
    assert anns[1].ref.numeric_id == 2354786
    bad = write_questions(tmp_path / "bad.json", {"1": {"question": "no image"}})
    with pytest.raises(AnnotationError, match=r"bad\.json: question 1: missing field\(s\) imageId"):
        read_gqa([bad])


def test_shard_builds_the_answer_list_and_one_hot_targets(gqa: dict[str, Path]) -> None:
    answers = json.loads((gqa["train"] / "answers.json").read_text())
    # most frequent first, ties alphabetical; answers as written (no VQA normalisation of "t-shirt")
    assert answers == ["man", "yes", "left", "no", "t-shirt"]
    info = json.loads((gqa["train"] / "task.json").read_text())
    assert info["task"] == "gqa" and info["counts"]["records"] == len(TRAIN)
    records = {r["question_id"]: r for s in read_task_samples(gqa["train"]).values() for r in json.loads(s["ann.json"])}
    for qid, q in TRAIN.items():
        assert records[qid]["labels"] == [answers.index(q["answer"])] and records[qid]["scores"] == [1.0]
        assert records[qid]["structural"] == q["types"]["structural"]


def test_shard_with_the_training_answers_counts_unknown_answers(gqa: dict[str, Path]) -> None:
    val = {"30000001": question("2354786", "Is the sky dark?", "yes", "verify", "attr"),
           "30000002": question("2368326", "What color is the shirt?", "blue", "query", "attr")}  # fmt: skip
    out = gqa["root"] / "val_unknown"
    run_shard(gqa["feats"], "gqa", [write_questions(gqa["root"] / "v.json", val)], "val", out,
              answers=gqa["train"] / "answers.json", progress=False)  # fmt: skip
    info = json.loads((out / "task.json").read_text())
    assert info["counts"]["answers_not_in_answer_list"] == 1


def test_metric_against_a_hand_worked_example() -> None:
    spec = get_task("gqa")
    questions = [
        {"question_id": "1", "answers": ["yes"], "structural": "verify", "semantic": "attr"},
        {"question_id": "2", "answers": ["no"], "structural": "verify", "semantic": "rel"},
        {"question_id": "3", "answers": ["man"], "structural": "query", "semantic": "rel"},
        {"question_id": "4", "answers": ["left"], "structural": "choose", "semantic": "rel"},
    ]
    predictions = {"1": "yes", "2": "yes", "3": "man", "4": "Left"}  # exact match: "Left" is wrong
    got = spec.accuracy(predictions, questions)
    assert got["overall"] == 50.0 and got["num_questions"] == 4
    assert got["per_structural"] == {"choose": 0.0, "query": 100.0, "verify": 50.0}
    assert got["per_semantic"] == {"attr": 100.0, "rel": pytest.approx(100 / 3)}
    assert spec.submission({"b": "no", "a": "yes"}) == [{"questionId": "a", "prediction": "yes"},
                                                         {"questionId": "b", "prediction": "no"}]  # fmt: skip


def test_question_prior_uses_answers_as_written() -> None:
    records = [{"question": "What is it?", "answers": ["t-shirt"], "question_type": "x"},
               {"question": "what is it", "answers": ["t-shirt"], "question_type": "x"},
               {"question": "What is it?", "answers": ["a shirt"], "question_type": "x"},
               {"question": "Is it red?", "answers": ["no"], "question_type": "y"},
               {"question": "Is it blue?", "answers": ["yes"], "question_type": "y"},
               {"question": "Test?", "answers": []}]  # fmt: skip
    prior = fit_gqa_prior(records)
    assert prior.num_train_questions == 5 and prior.majority == "t-shirt"
    assert prior.predict("what is it?") == "t-shirt"
    assert prior.predict("Is it green?", "y") == "no"  # unseen wording: its type's answer, ties alphabetical
    assert prior.predict("Never seen", None) == "t-shirt"


def test_train_a_few_steps_then_eval_with_baselines_and_submission(gqa: dict[str, Path], tmp_path: Path) -> None:
    assert data_task("gqa").answer_vocab and get_task("gqa").reference_answer_head == "vil_prediction_gqa"
    run = tmp_path / "run"
    summary = run_train(task="gqa", data=str(gqa["train"]), out=str(run), vocab=str(gqa["vocab"]), config="tiny",
                        steps=3, batch_size=4, lr=1e-3, warmup=0.0, num_workers=0, progress=False, device="cpu",
                        max_text_len=16)  # fmt: skip
    assert summary["steps"] == 3
    answers = json.loads((gqa["train"] / "answers.json").read_text())
    assert json.loads((run / "config.json").read_text())["num_answers"] == len(answers)

    res = run_eval("gqa", run, gqa["train"], tmp_path / "report", batch_size=3, device="cpu", progress=False,
                   train_data=gqa["train"])  # fmt: skip
    split = res["splits"]["train"]
    sub = json.loads((tmp_path / "report" / "gqa_predictions_train.json").read_text())
    assert sorted(p["questionId"] for p in sub) == sorted(TRAIN)
    hits = [p["prediction"] == TRAIN[p["questionId"]]["answer"] for p in sub]
    assert split["overall"] == pytest.approx(100 * sum(hits) / len(hits))
    assert set(split["per_structural"]) == {"verify", "query", "choose"}
    # the prior fitted on the split it is scored on answers every seen wording with its top answer
    assert split["baselines"]["question_prior"]["overall"] == pytest.approx(100 * 6 / 7)
    assert split["baselines"]["majority_answer"]["answer"] == "man"
    assert "shuffled_images" in split and "vision" in split
    assert "GQA accuracy" in (tmp_path / "report" / "report.md").read_text()
