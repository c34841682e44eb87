"""VCR's two stages as two tasks (the multi-task reference's VCR_Q-A and VCR_QA-R) on the one `vcr` shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_fixtures import tiny, write_run, write_task_dir
from shard_fixtures import write_vocab

from pipelines.datasets import TaskDataset
from vilbert_core import ViLBERTForTasks
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.training.data import count_samples
from vilbert_core.training.metrics_log import read_metrics
from vilbert_core.training.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["why", "is", "he", "happy", "because", "sad", "the", "dog", "runs", "man", "sits", "red", "cat"]


def vcr_record(n: int, known: bool = True) -> dict:
    """A VCR record: 4 answers, 4 rationales, their labels (-1 on the test split)."""
    return {"annot_id": f"val-{n}", "question": "why is he happy", "img_fn": f"img{n}.jpg",
            "answer_choices": ["the dog runs", "he is sad", "the man sits", "a red cat"],
            "rationale_choices": ["because the dog runs", "because he is sad", "because he sits", "because red"],
            "answer_label": n % 4 if known else -1, "rationale_label": (n + 1) % 4 if known else -1}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vcr_stages")
    vocab = write_vocab(root / "vocab.txt", WORDS)
    images = [(f"img{i}", 4, [vcr_record(i)]) for i in range(5)] + [("img5", 4, [vcr_record(5, known=False)])]
    data = write_task_dir(root / "vcr", "vcr", "val", images)
    torch.manual_seed(0)
    run = write_run(root / "run", ViLBERTForTasks(tiny(vocab)).eval(), "vcr", vocab)
    return {"root": root, "vocab": vocab, "data": data, "run": run}


def test_a_stage_task_reads_only_its_stage(setup: dict[str, Path]) -> None:
    def stages(keep: dict | None) -> list[tuple[str, str]]:
        ds = TaskDataset(str(setup["data"]), "vcr", setup["vocab"], batch_size=None, shuffle_buffer=1, keep=keep)
        return [(ex["annot_id"], ex["vcr_stage"]) for ex in ds]

    every = stages(None)
    assert sorted(every) == sorted([(f"val-{n}", "q_a") for n in range(6)] + [(f"val-{n}", "qa_r") for n in range(5)])
    assert sorted(stages({"vcr_stage": "q_a"})) == sorted(e for e in every if e[1] == "q_a")
    assert sorted(stages({"vcr_stage": "qa_r"})) == sorted(e for e in every if e[1] == "qa_r")
    info = json.loads((setup["data"] / "task.json").read_text())
    assert count_samples(info, "vcr") == 12 and count_samples(info, "vcr_q_a") == count_samples(info, "vcr_qa_r") == 6


def test_stage_evals_equal_the_stages_of_the_vcr_eval(setup: dict[str, Path], tmp_path: Path) -> None:
    kw = {"device": "cpu", "progress": False, "vision_check": False}
    both = run_eval("vcr", setup["run"], setup["data"], tmp_path / "vcr", **kw)["splits"]["val"]
    for task, stage in (("vcr_q_a", "q_a"), ("vcr_qa_r", "qa_r")):
        res = run_eval(task, setup["run"], setup["data"], tmp_path / task, **kw)["splits"]["val"]
        assert res["accuracy"] == pytest.approx(both[stage]) and res["num_scored"] == 5
        assert res["baselines"]["chance"]["accuracy"] == 25.0
        preds = json.loads((tmp_path / task / f"{task}_predictions_val.json").read_text())
        assert sorted(preds) == [f"val-{n}" for n in range(6 if stage == "q_a" else 5)]
        labels = {f"val-{n}": vcr_record(n)[("answer_label" if stage == "q_a" else "rationale_label")] for n in range(5)}
        hits = [max(range(4), key=preds[a][f"{stage}_probs"].__getitem__) == lab for a, lab in labels.items()]
        assert res["accuracy"] == pytest.approx(100 * sum(hits) / len(hits))


def test_train_one_stage_and_both_in_one_model(setup: dict[str, Path], tmp_path: Path) -> None:
    common = dict(vocab=str(setup["vocab"]), config="tiny", batch_size=2, lr=1e-3, warmup=0, num_workers=0,
                  progress=False, tensorboard=False, device="cpu", max_text_len=16)  # fmt: skip
    one = run_train(task="vcr_qa_r", data=str(setup["data"]), out=str(tmp_path / "qa_r"), steps=3, **common)
    assert one["steps"] == 3
    targs = json.loads((tmp_path / "qa_r" / "train_args.json").read_text())
    assert targs["total_steps"] == 3
    two = run_train(task="vcr_q_a,vcr_qa_r", data="", task_data={"vcr_q_a": str(setup["data"]),
                    "vcr_qa_r": str(setup["data"])}, out=str(tmp_path / "mt"), steps=4, **common)  # fmt: skip
    assert two["steps"] == 4
    assert [r["task"] for r in read_metrics(tmp_path / "mt" / "metrics.jsonl")] == ["vcr_q_a", "vcr_qa_r"] * 2
