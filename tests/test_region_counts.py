"""Task shards with up to 100 regions per image (the multi-task reference's LMDB features): any count up
to --max-regions reaches the model, plus the global [IMG] region (101 at 100)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fixtures import write_task_dir
from shard_fixtures import write_vocab

from pipelines.datasets import TaskDataset
from vilbert_core.training.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWERS = ["yes", "no"]


def _record(qid: int) -> dict:
    return {"question_id": qid, "question": "is it red", "answers": ["yes"] * 10, "answer_type": "yes/no",
            "question_type": "is", "labels": [0], "scores": [1.0]}  # fmt: skip


@pytest.mark.parametrize(("max_regions", "expected"), [(100, [101, 51]), (36, [37, 37]), (10, [11, 11])])
def test_any_region_count_up_to_the_maximum(tmp_path: Path, max_regions: int, expected: list[int]) -> None:
    data = write_task_dir(tmp_path / "vqa", "vqa", "train", [("a", 100, [_record(1)]), ("b", 50, [_record(2)])], ANSWERS)
    vocab = write_vocab(tmp_path / "vocab.txt", ["is", "it", "red"])
    ds = TaskDataset(str(data), "vqa", vocab, batch_size=2, shuffle_buffer=1, max_regions=max_regions)
    batch = next(iter(ds))
    counts = dict(zip(batch["image_id"], batch["image_mask"].sum(1).tolist(), strict=True))
    assert [counts["a"], counts["b"]] == expected
    assert batch["image_feat"].shape[1] == max(expected)
    if max_regions == 100:  # and the model trains on them
        summary = run_train(task="vqa", data=str(data), out=str(tmp_path / "run"), vocab=str(vocab), config="tiny",
                            steps=1, batch_size=2, num_workers=0, progress=False, tensorboard=False, device="cpu",
                            max_regions=100)  # fmt: skip
        assert summary["steps"] == 1
        assert json.loads((tmp_path / "run" / "train_args.json").read_text())["max_regions"] == 100
