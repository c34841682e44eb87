"""OK-VQA and VQA-CP v2 through the VQA task: both official layouts read, shard, a few training steps,
and the official VQA accuracy against hand-worked leave-one-out numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.annotations import AnnotationError
from pipelines.annotations.vqa import read_vqa
from pipelines.shard_job import run_shard
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.tasks import get_task
from vilbert_core.training.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

# VQA-CP draws train and test questions from both COCO folders: the feature set holds both
IMAGES = [("train2014", 9), ("val2014", 42), ("train2014", 77)]
WORDS = ["what", "is", "the", "man", "holding", "how", "many", "dogs", "color", "sky", "a", "kite"]


def answers(*pairs: tuple[str, int]) -> list[dict]:
    """Ten answer records as the releases write them, from (answer, times) pairs."""
    flat = [a for a, n in pairs for _ in range(n)]
    assert len(flat) == 10
    return [{"answer": a, "raw_answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(flat)]


# (question_id, coco split, image id, question, answer type, question type, answers)
ROWS = [
    (90, "train2014", 9, "What is the man holding?", "other", "what is the man", answers(("kite", 8), ("bat", 2))),
    (91, "train2014", 9, "How many dogs?", "number", "how many", answers(("2", 6), ("3", 4))),
    (420, "val2014", 42, "What color is the sky?", "other", "what color is the", answers(("blue", 10))),
    (421, "val2014", 42, "Is the man holding a kite?", "yes/no", "is the", answers(("yes", 7), ("no", 3))),
    (770, "train2014", 77, "What is the man holding?", "other", "what is the man", answers(("bat", 5), ("kite", 5))),
]


def vqacp_files(root: Path, rows: list) -> list[Path]:
    """VQA-CP v2 files: bare JSON lists of question and annotation records with `coco_split`."""
    qs = [{"image_id": i, "question": t, "question_id": q, "coco_split": s} for q, s, i, t, *_ in rows]
    anns = [{"question_type": qt, "multiple_choice_answer": a[0]["answer"], "answers": a, "image_id": i,
             "answer_type": at, "question_id": q, "coco_split": s} for q, s, i, _, at, qt, a in rows]  # fmt: skip
    (root / "vqacp_v2_train_questions.json").write_text(json.dumps(qs))
    (root / "vqacp_v2_train_annotations.json").write_text(json.dumps(anns))
    return [root / "vqacp_v2_train_questions.json", root / "vqacp_v2_train_annotations.json"]


def okvqa_files(root: Path, rows: list) -> list[Path]:
    """OK-VQA files: VQA v2's wrappers; question_type is OK-VQA's knowledge category code, answer_type "other"."""
    qs = {"license": {}, "data_subtype": "train2014", "task_type": "Open-Ended", "questions": [
        {"image_id": i, "question": t, "question_id": q} for q, _, i, t, *_ in rows]}  # fmt: skip
    anns = {"license": {}, "data_subtype": "train2014", "annotations": [
        {"image_id": i, "answer_type": "other", "question_type": "eight", "question_id": q, "answers": a,
         "confidence": 3} for q, _, i, _, _, _, a in rows]}  # fmt: skip
    (root / "OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(qs))
    (root / "mscoco_train2014_annotations.json").write_text(json.dumps(anns))
    return [root / "OpenEnded_mscoco_train2014_questions.json", root / "mscoco_train2014_annotations.json"]


def loo_accuracy(prediction: str, human: list[str]) -> float:
    """VQA accuracy by its definition: min(1, matches/3) averaged over the ten leave-one-out subsets."""
    return sum(min(1.0, sum(h == prediction for j, h in enumerate(human) if j != i) / 3) for i in range(10)) / 10


@pytest.fixture(scope="module")
def cp(tmp_path_factory) -> dict[str, Path]:
    """A feature set over train2014 and val2014 images, VQA-CP training questions sharded, a vocab."""
    root = tmp_path_factory.mktemp("vqacp")
    images = [make_image(f"COCO_{s}_{i:012d}", f"{s}/COCO_{s}_{i:012d}.jpg", k=4 + n, dim=16, seed=n)
              for n, (s, i) in enumerate(IMAGES)]  # fmt: skip
    feats = write_feature_set(root / "feats", images)
    train = root / "train"
    run_shard(feats, "vqa", vqacp_files(root, ROWS), "train", train, shard_size=2, min_answer_count=1, progress=False)
    return {"feats": feats, "train": train, "root": root, "vocab": write_vocab(root / "vocab.txt", WORDS)}


def test_both_layouts_read_the_same_records(tmp_path: Path) -> None:
    (tmp_path / "cp").mkdir()
    (tmp_path / "ok").mkdir()
    cp = read_vqa(vqacp_files(tmp_path / "cp", ROWS))
    ok = read_vqa(okvqa_files(tmp_path / "ok", ROWS))
    assert [a.record["question_id"] for a in cp] == [r[0] for r in ROWS] == [a.record["question_id"] for a in ok]
    assert [a.ref.numeric_id for a in cp] == [r[2] for r in ROWS]
    first = cp[0].record
    assert first["answers"] == ["kite"] * 8 + ["bat"] * 2 and first["answer_type"] == "other"
    assert first["question_type"] == "what is the man" and first["multiple_choice_answer"] == "kite"
    assert ok[0].record["question_type"] == "eight" and "multiple_choice_answer" not in ok[0].record
    assert all(a.extra["annotated"] for a in cp + ok)
    # a VQA-CP test questions file alone: questions without answers
    alone = read_vqa([tmp_path / "cp" / "vqacp_v2_train_questions.json"])
    assert [a.record["answers"] for a in alone] == [[]] * len(ROWS)


def test_bad_vqacp_files_name_the_file_and_record(tmp_path: Path) -> None:
    empty = tmp_path / "vqacp_v2_test_questions.json"
    empty.write_text("[]")
    with pytest.raises(AnnotationError, match=r"vqacp_v2_test_questions\.json: not a VQA file"):
        read_vqa([empty])
    broken = tmp_path / "vqacp_v2_test_annotations.json"
    broken.write_text(json.dumps([{"question_id": 1, "image_id": 2, "answers": []},
                                  {"question_id": 3, "answers": []}]))  # fmt: skip
    with pytest.raises(AnnotationError, match=r"annotations\.json: record\[1\]: missing field\(s\) image_id"):
        read_vqa([broken])


def test_shard_reads_vqacp_images_from_both_coco_folders(cp: dict[str, Path]) -> None:
    info = json.loads((cp["train"] / "task.json").read_text())
    assert info["task"] == "vqa" and info["counts"]["records"] == len(ROWS)
    samples = read_task_samples(cp["train"])
    assert sorted(samples) == sorted(f"COCO_{s}_{i:012d}" for s, i in IMAGES)
    vocab = json.loads((cp["train"] / "answers.json").read_text())
    records = {r["question_id"]: r for s in samples.values() for r in json.loads(s["ann.json"])}
    # soft scores of the VQA rule, min(1, 0.3 * count): 8 x kite -> 1, 2 x bat -> 0.6
    assert dict(zip([vocab[i] for i in records[90]["labels"]], records[90]["scores"], strict=True)) == pytest.approx(
        {"kite": 1.0, "bat": 0.6})


def test_vqa_accuracy_against_hand_worked_leave_one_out_numbers() -> None:
    spec = get_task("vqa")
    questions = [{"question_id": q, "answers": [a["answer"] for a in ans], "answer_type": at, "question_type": qt}
                 for q, _, _, _, at, qt, ans in ROWS]  # fmt: skip
    predictions = {90: "bat", 91: "3", 420: "blue", 421: "no", 770: "dog"}
    # by hand: 2 matches -> (2 x 1/3 + 8 x 2/3) / 10 = 0.6; 4 -> 1; 10 -> 1; 3 -> (3 x 2/3 + 7 x 1) / 10 = 0.9; 0 -> 0
    assert [loo_accuracy(predictions[q["question_id"]], q["answers"]) for q in questions] == pytest.approx(
        [0.6, 1.0, 1.0, 0.9, 0.0])
    got = spec.accuracy(predictions, questions)
    assert got["overall"] == pytest.approx(100 * (0.6 + 1 + 1 + 0.9 + 0) / 5)
    # the official script rounds to two decimals
    assert got["per_answer_type"] == pytest.approx({"other": 100 * 1.6 / 3, "number": 100.0, "yes/no": 90.0}, abs=0.005)


def test_train_a_few_steps_then_eval_scores_the_submission(cp: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = run_train(task="vqa", data=str(cp["train"]), out=str(run), vocab=str(cp["vocab"]), config="tiny",
                        steps=3, batch_size=4, lr=1e-3, warmup=0.0, num_workers=0, progress=False, device="cpu",
                        max_text_len=16)  # fmt: skip
    assert summary["steps"] == 3
    res = run_eval("vqa", run, cp["train"], tmp_path / "report", batch_size=2, device="cpu", progress=False,
                   train_data=cp["train"])  # fmt: skip
    split = res["splits"]["train"]
    sub = json.loads((tmp_path / "report" / "vqa_predictions_train.json").read_text())
    assert sorted(p["question_id"] for p in sub) == sorted(r[0] for r in ROWS)
    human = {q: [a["answer"] for a in ans] for q, *_, ans in ROWS}
    expected = 100 * sum(loo_accuracy(p["answer"], human[p["question_id"]]) for p in sub) / len(sub)
    assert split["overall"] == pytest.approx(expected, abs=0.01)
    assert "shuffled_images" in split and "question_prior" in split["baselines"]
