"""A multi-task reference checkpoint (`multi_task_model.bin` layout, tiny sizes): `eval` of several tasks
straight from it gives what the same weights give in our own format, and one task fine-tunes from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_fixtures import D, tiny, write_run, write_task_dir
from shard_fixtures import write_vocab

from vilbert_core import ViLBERTForTasks
from vilbert_core.convert import convert_project_state_dict
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.training.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["what", "color", "is", "the", "cat", "a", "dog", "red", "left", "right", "of"]
VQA_ANSWERS = ["red", "yes", "no", "two"]
GQA_ANSWERS = ["left", "right", "cat"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference file of a random tiny multi-task model (VQA and GQA heads), its own-format twin, task shards."""
    root = tmp_path_factory.mktemp("mt_ckpt")
    vocab = write_vocab(root / "vocab.txt", WORDS)
    torch.manual_seed(0)
    model = ViLBERTForTasks(tiny(vocab, num_answers=len(VQA_ANSWERS), num_gqa_answers=len(GQA_ANSWERS))).eval()
    ref = root / "reference"
    ref.mkdir()
    state, unmapped = convert_project_state_dict(model.state_dict())
    assert unmapped == [] and "vil_prediction_gqa.logit_fc.3.weight" in state and "vil_tri_prediction.weight" in state
    torch.save(state, ref / "pytorch_model.bin")
    model.config.to_json_file(ref / "config.json")
    (root / "vqa_answers.json").write_text(json.dumps(VQA_ANSWERS))
    (root / "gqa_answers.json").write_text(json.dumps(GQA_ANSWERS))

    # the same weights in our format: for GQA its answer head is the reference's GQA head
    write_run(root / "own_vqa", model, "vqa", vocab, VQA_ANSWERS)
    gqa = ViLBERTForTasks(tiny(vocab, num_answers=len(GQA_ANSWERS))).eval()
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(("vqa_head.", "gqa_head."))}
    own.update({k.replace("gqa_head.", "vqa_head."): v for k, v in model.state_dict().items() if k.startswith("gqa_head.")})
    gqa.load_state_dict(own)
    write_run(root / "own_gqa", gqa, "gqa", vocab, GQA_ANSWERS)

    def vqa(qid: int, a: str) -> dict:
        return {"question_id": qid, "question": "what color is the cat", "answers": [a] * 10, "answer_type": "other",
                "question_type": "what", "labels": [VQA_ANSWERS.index(a)], "scores": [1.0]}  # fmt: skip

    def gqa_rec(qid: int, a: str) -> dict:
        return {"question_id": str(qid), "question": "left or right of the cat", "answers": [a], "question_type": "x",
                "structural": "choose", "semantic": "rel", "full_answer": "", "labels": [GQA_ANSWERS.index(a)],
                "scores": [1.0]}  # fmt: skip

    def ref_rec(n: int) -> dict:
        return {"sentence": "the red cat", "iou": [0.9 if j == n % 4 else 0.1 for j in range(4)],
                "gt_box": [0, 0, 10, 10], "ref_id": n, "sent_id": n}  # fmt: skip

    images = [f"img{i}" for i in range(4)]
    return {
        "root": root, "vocab": vocab, "ref": ref,
        "vqa": write_task_dir(root / "vqa", "vqa", "val", [(im, 4, [vqa(i, VQA_ANSWERS[i])]) for i, im in enumerate(images)],
                              VQA_ANSWERS),
        "gqa": write_task_dir(root / "gqa", "gqa", "val", [(im, 4, [gqa_rec(i, GQA_ANSWERS[i % 3])])
                                                           for i, im in enumerate(images)], GQA_ANSWERS),
        "refcoco": write_task_dir(root / "refcoco", "refcoco", "val", [(im, 4, [ref_rec(i)]) for i, im in enumerate(images)]),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("task", "own", "answers", "predictions"),
    [("vqa", "own_vqa", "vqa_answers.json", "vqa_predictions_val.json"),
     ("gqa", "own_gqa", "gqa_answers.json", "gqa_predictions_val.json"),
     ("refcoco", "own_vqa", None, "refcoco_predictions_val.json")],
)  # fmt: skip
def test_eval_from_the_reference_file_equals_our_format(
    setup: dict[str, Path], tmp_path: Path, task: str, own: str, answers: str | None, predictions: str
) -> None:
    kw = {"device": "cpu", "progress": False, "vision_check": False}
    from_ref = run_eval(task, setup["ref"] / "pytorch_model.bin", setup[task], tmp_path / "ref", vocab=setup["vocab"],
                        answers=setup["root"] / answers if answers else None, **kw)  # fmt: skip
    from_own = run_eval(task, setup["root"] / own, setup[task], tmp_path / "own", **kw)
    assert from_ref["splits"]["val"] == from_own["splits"]["val"]
    a = json.loads((tmp_path / "ref" / predictions).read_text())
    b = json.loads((tmp_path / "own" / predictions).read_text())
    assert a == b and len(a) == 4


def test_fine_tune_one_task_from_the_reference_file(setup: dict[str, Path], tmp_path: Path) -> None:
    summary = run_train(task="gqa", data=str(setup["gqa"]), out=str(tmp_path / "run"), vocab=str(setup["vocab"]),
                        init_from=str(setup["ref"] / "pytorch_model.bin"), steps=2, batch_size=2, lr=1e-3, warmup=0,
                        num_workers=0, progress=False, tensorboard=False, device="cpu", max_text_len=12)  # fmt: skip
    assert summary["steps"] == 2
    model = ViLBERTForTasks.from_pretrained(tmp_path / "run")
    start = torch.load(setup["ref"] / "pytorch_model.bin", weights_only=True)
    assert model.config.num_answers == len(GQA_ANSWERS) and model.config.v_feature_size == D
    # it started from the reference's GQA head, not a fresh one: the trained head is a small step away from it
    moved = (model.vqa_head.classifier.weight.detach() - start["vil_prediction_gqa.logit_fc.3.weight"]).abs().max()
    assert 0 < float(moved) < 0.05
