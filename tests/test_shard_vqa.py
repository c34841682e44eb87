"""VQA v2: questions + annotations through `shard` (answer vocabulary, soft scores) and the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.datasets import TaskDataset
from pipelines.shard_job import ShardError, run_shard
from pipelines.tokenization import TextTokenizer


def vqa_files(tmp: Path, split: str, qs: list[tuple[int, int, str, list[str], str]], with_answers=True):
    """Write VQA v2 questions/annotations files: (question_id, image_id, question, answers, mc answer)."""
    questions = {"data_subtype": f"{split}2014", "questions": [
        {"question_id": q, "image_id": i, "question": text} for q, i, text, _, _ in qs]}  # fmt: skip
    anns = {"annotations": [
        {"question_id": q, "image_id": i, "question_type": "what", "answer_type": "other",
         "multiple_choice_answer": mc,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1} for n, a in enumerate(answers)]}
        for q, i, _, answers, mc in qs]}  # fmt: skip
    (tmp / f"q_{split}.json").write_text(json.dumps(questions))
    (tmp / f"a_{split}.json").write_text(json.dumps(anns))
    return [tmp / f"q_{split}.json"] + ([tmp / f"a_{split}.json"] if with_answers else [])


TRAIN = [
    (11, 1, "Is it a dog?", ["yes"] * 6 + ["Yes."] + ["no"] * 3, "yes"),
    (12, 1, "How many cats?", ["two", "2", "3", "3", "3", "three", "red", "red", "blue", "4"], "3"),
    (13, 2, "What color?", ["red"] * 10, "red"),
    (14, 5, "What color is the car?", ["blue"] * 10, "blue"),  # image 5 has no features
]


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("feats")
    images = [
        make_image(f"COCO_val2014_{i:012d}", f"COCO_val2014_{i:012d}.jpg", k=4, dim=6, seed=i)
        for i in (1, 2, 3)
    ]
    write_feature_set(root, images)
    return root, {im.image_id: im for im in images}


def test_vqa_vocab_soft_scores_and_reuse(tmp_path, feats) -> None:
    root, _ = feats
    info = run_shard(root, "vqa", vqa_files(tmp_path, "train", TRAIN), "train", tmp_path / "train",
                     min_answer_count=1, progress=False)  # fmt: skip
    vocab = json.loads((tmp_path / "train/answers.json").read_text())
    assert vocab == ["3", "blue", "red", "yes"]  # one question each: alphabetical
    assert info["answer_vocab"] == "answers.json" and info["num_answers"] == 4
    assert info["counts"]["annotations_without_features"] == 1 and info["counts"]["records"] == 3
    samples = read_task_samples(tmp_path / "train")
    recs = json.loads(samples["COCO_val2014_000000000001"]["ann.json"])
    assert recs[0] == {
        "question_id": 11, "question": "Is it a dog?", "answers": TRAIN[0][3], "answer_type": "other",
        "question_type": "what", "labels": [3], "scores": [1.0],
    }  # fmt: skip
    # "3" x4 (incl. "three") -> 1.0, "blue" x1 -> 0.3, "red" x2 -> 0.6; "2" x2 is not in the vocabulary.
    assert (recs[1]["labels"], recs[1]["scores"]) == ([0, 1, 2], [1.0, 0.3, 0.6])

    val = [(21, 2, "What color now?", ["yes"] * 3 + ["green"] * 7, "green")]
    run_shard(root, "vqa", vqa_files(tmp_path, "val", val), "val", tmp_path / "val",
              answers=tmp_path / "train/answers.json", progress=False)  # fmt: skip
    assert json.loads((tmp_path / "val/answers.json").read_text()) == vocab  # the train vocabulary, reused
    rec = json.loads(read_task_samples(tmp_path / "val")["COCO_val2014_000000000002"]["ann.json"])[0]
    assert (rec["labels"], rec["scores"]) == ([3], [0.9])

    # The default threshold (9 questions) leaves nothing here: a clear error, not an empty head.
    with pytest.raises(ShardError, match="empty answer vocabulary"):
        run_shard(root, "vqa", vqa_files(tmp_path, "train", TRAIN), "train", tmp_path / "t9", progress=False)


def test_vqa_dataset_targets(tmp_path, feats) -> None:
    root, _ = feats
    run_shard(root, "vqa", vqa_files(tmp_path, "train", TRAIN), "train", tmp_path / "train",
              min_answer_count=1, progress=False)  # fmt: skip
    tok = TextTokenizer.from_pretrained(
        write_vocab(tmp_path / "v.txt", ["is", "it", "a", "dog", "how", "many"])
    )
    batch = next(iter(TaskDataset(tmp_path / "train", "vqa", tok, batch_size=8, shuffle_buffer=1)))
    assert batch["question_id"].tolist() == [11, 12, 13]
    expected = np.array([[0, 0, 0, 1.0], [1.0, 0.3, 0.6, 0], [0, 0, 1.0, 0]], np.float32)
    np.testing.assert_allclose(batch["vqa_target"].numpy(), expected)
    assert batch["answers"][2] == ["red"] * 10 and batch["answer_type"] == ["other"] * 3
    assert batch["image_id"] == ["COCO_val2014_000000000001"] * 2 + ["COCO_val2014_000000000002"]
    # "Is it a dog?" -> [CLS] is it a dog ? [SEP]; "?" is a vocabulary entry after the words.
    assert batch["input_ids"][0, :7].tolist() == [2, 5, 6, 7, 8, 5 + 6 + 1, 3]


def test_vqa_test_split_without_annotations(tmp_path, feats) -> None:
    root, _ = feats
    run_shard(root, "vqa", vqa_files(tmp_path, "train", TRAIN), "train", tmp_path / "train",
              min_answer_count=1, progress=False)  # fmt: skip
    test = [(31, 3, "Is it a dog?", [], "")]
    run_shard(root, "vqa", vqa_files(tmp_path, "test", test, with_answers=False), "test", tmp_path / "test",
              answers=tmp_path / "train/answers.json", progress=False)  # fmt: skip
    rec = json.loads(read_task_samples(tmp_path / "test")["COCO_val2014_000000000003"]["ann.json"])[0]
    assert (rec["answers"], rec["labels"], rec["scores"]) == ([], [], [])
