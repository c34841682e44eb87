"""End-to-end `run_eval` on task shards written in the contract's on-disk format (docs/contracts.md s.3).

Models with a zeroed head make every prediction known in advance (all answers the same class, all
regions or pairs tied), so each metric can be worked out by hand from the annotations written here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from eval_fixtures import tiny, write_run, write_task_dir

from vilbert_core import ViLBERTForPretraining, ViLBERTForTasks
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.evaluation.loading import EvalError
from vilbert_core.evaluation.metrics import vqa_question_accuracy

WORDS = ["what", "is", "the", "color", "how", "many", "dogs", "a", "cat", "red", "two", "on", "grass", "sits",
         "man", "why", "because", "he", "is", "happy", "sad", "yes", "no"]  # fmt: skip


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS), "?", "."]) + "\n"
    )
    return path


def zero_linear(linear: torch.nn.Linear, bias: list[float] | float = 0.0) -> None:
    """Make a head constant: zero weights, the given bias."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.as_tensor(bias, dtype=linear.bias.dtype).expand_as(linear.bias))


def vqa_record(qid: int, answers: list[str], answer_type: str) -> dict:
    return {"question_id": qid, "question": "how many dogs ?", "answers": answers, "answer_type": answer_type,
            "question_type": "how many", "labels": [], "scores": []}  # fmt: skip


def test_eval_vqa_constant_answer(tmp_path: Path, vocab: Path) -> None:
    answers = ["yes", "no", "2", "red"]
    data = write_task_dir(
        tmp_path / "vqa_val",
        "vqa",
        "val",
        [
            (
                "img_a",
                5,
                [vqa_record(11, ["2"] * 10, "number"), vqa_record(12, ["two"] * 3 + ["3"] * 7, "number")],
            ),
            (
                "img_b",
                3,
                [vqa_record(13, ["yes"] * 10, "yes/no"), vqa_record(14, ["2"] + ["no"] * 9, "other")],
            ),
        ],
        answers,
    )
    torch.manual_seed(0)
    model = ViLBERTForTasks(tiny(vocab, num_answers=4))
    last = [m for m in model.vqa_head.modules() if isinstance(m, torch.nn.Linear)][-1]
    zero_linear(last, [0.0, 0.0, 5.0, 0.0])  # always answers "2"
    run = write_run(tmp_path / "run", model, "vqa", vocab, answers)

    res = run_eval("vqa", run, data, tmp_path / "report", batch_size=3, device="cpu", progress=False)
    m = res["splits"]["val"]
    # per question: 1 (all "2"), 0.9 (3 of 10 "two" -> "2", leave-one-out), 0 ("yes"), 0.3 (one "2")
    assert m["overall"] == 55.0
    assert m["per_answer_type"] == {"number": 95.0, "other": 30.0, "yes/no": 0.0}
    assert m["num_questions"] == 4
    # the official submission format, every question once, read back from the file
    sub = json.loads((tmp_path / "report" / "vqa_predictions_val.json").read_text())
    assert sub == [{"question_id": q, "answer": "2"} for q in (11, 12, 13, 14)]
    on_disk = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert on_disk["splits"]["val"]["overall"] == 55.0 and on_disk["model_kind"] == "tasks"
    assert "| overall | 55.00 |" in (tmp_path / "report" / "report.md").read_text()
    png = tmp_path / "report" / "accuracy_by_answer_type_val.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a constant answer ignores the image: other images' regions change nothing, and the report says so
    assert m["shuffled_images"]["overall"] == 55.0 and m["shuffled_images"]["drop"] == 0.0
    assert m["vision"] == {"drop_when_images_shuffled": 0.0, "uses_image": False}
    assert len(m["warnings"]) == 1 and "barely uses the image" in m["warnings"][0]
    assert "> **Warning**: giving every question another image's regions" in (tmp_path / "report" / "report.md").read_text()
    assert m["per_question_type"] == {"how many": 55.0}


def test_eval_vqa_blind_baselines_from_the_training_split(tmp_path: Path, vocab: Path) -> None:
    """Question-only prior and majority answer fitted on training shards, scored by hand on the val split."""
    answers = ["yes", "no", "2", "red"]

    def q(qid: int, text: str, ans: list[str], atype: str, qtype: str) -> dict:
        return {"question_id": qid, "question": text, "answers": ans, "answer_type": atype, "question_type": qtype,
                "labels": [], "scores": []}  # fmt: skip

    train = write_task_dir(tmp_path / "train", "vqa", "train", [
        ("t1", 3, [q(1, "is it red?", ["no"] * 10, "yes/no", "is it"), q(2, "how many dogs?", ["2"] * 10, "number", "how many")]),
        ("t2", 3, [q(3, "is it red?", ["no"] * 10, "yes/no", "is it"), q(4, "is it big?", ["yes"] * 10, "yes/no", "is it")]),
        ("t3", 3, [q(5, "what color?", ["red"] * 10, "other", "what color"), q(6, "is it small?", ["no"] * 10, "yes/no", "is it")]),
    ], answers)  # fmt: skip
    val = write_task_dir(tmp_path / "val", "vqa", "val", [
        ("v1", 3, [q(11, "Is it red?", ["no"] * 10, "yes/no", "is it"),  # wording -> "no": right
                   q(12, "how many cats?", ["3"] * 10, "number", "how many")]),  # type -> "2": wrong
        ("v2", 3, [q(13, "is it tall?", ["yes"] * 10, "yes/no", "is it"),  # type: no 3, yes 1 -> "no": wrong
                   q(14, "what color?", ["red"] * 7 + ["blue"] * 3, "other", "what color")]),  # -> "red": 100
    ], answers)  # fmt: skip
    torch.manual_seed(0)
    model = ViLBERTForTasks(tiny(vocab, num_answers=4))
    zero_linear([m for m in model.vqa_head.modules() if isinstance(m, torch.nn.Linear)][-1], [5.0, 0, 0, 0])
    run = write_run(tmp_path / "run", model, "vqa", vocab, answers)  # no training data recorded in the run
    res = run_eval("vqa", run, val, tmp_path / "r", device="cpu", progress=False, train_data=train)
    m = res["splits"]["val"]
    prior, majority = m["baselines"]["question_prior"], m["baselines"]["majority_answer"]
    assert prior["overall"] == 50.0 and prior["per_answer_type"] == {"number": 0.0, "other": 100.0, "yes/no": 50.0}
    assert prior["per_question_type"] == {"how many": 0.0, "is it": 50.0, "what color": 100.0}
    assert majority["answer"] == "no" and majority["overall"] == 25.0  # "no" 3 of 6 training questions
    assert m["baselines"]["train_questions"] == 6
    # the model always says "yes": right on q13 only -> 25, below the prior
    assert m["overall"] == 25.0 and m["vision"]["gain_over_question_prior"] == -25.0
    assert m["vision"]["beats_question_prior"] is False and m["vision"]["uses_image"] is False
    assert any("does not beat the question-only prior" in w for w in m["warnings"])
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| VQA accuracy | model | images shuffled | question-only prior | majority answer ('no') |" in report
    assert "| q: is it | 50.00 | 50.00 | 50.00 | 50.00 |" in report
    # without training data the baselines are skipped, not invented
    assert "baselines" not in run_eval("vqa", run, val, tmp_path / "r2", device="cpu", progress=False)["splits"]["val"]


def test_eval_refcoco_ties_pick_first_region_per_split(tmp_path: Path, vocab: Path) -> None:
    def ref(i: int, iou: list[float]) -> dict:
        return {
            "ref_id": i,
            "sent_id": i,
            "sentence": "the man on the grass",
            "gt_box": [0, 0, 10, 10],
            "iou": iou,
        }

    val = write_task_dir(
        tmp_path / "val",
        "refcoco",
        "val",
        [("a", 3, [ref(1, [0.7, 0.9, 0.1])]), ("b", 2, [ref(2, [0.3, 0.95])])],
    )
    test_a = write_task_dir(tmp_path / "testA", "refcoco", "testA", [("c", 2, [ref(3, [0.5, 0.2])])])
    torch.manual_seed(0)
    model = ViLBERTForTasks(tiny(vocab))
    zero_linear(model.region_head)  # all region scores tie: the first detected region wins
    run = write_run(tmp_path / "run", model, "refcoco", vocab)

    res = run_eval(
        "refcoco", run, [val, test_a], tmp_path / "report", batch_size=2, device="cpu", progress=False
    )
    # val: region 1 of ref 1 has IoU 0.7 (right), of ref 2 IoU 0.3 (wrong); testA: IoU exactly 0.5 (right)
    assert res["splits"]["val"]["accuracy"] == pytest.approx(50.0)
    assert res["splits"]["testA"]["accuracy"] == pytest.approx(100.0)
    assert res["splits"]["all"] == {"accuracy": pytest.approx(200 / 3), "num_refs": 3}
    preds = json.loads((tmp_path / "report" / "refcoco_predictions_val.json").read_text())
    assert [(p["ref_id"], p["region"], p["correct"]) for p in preds] == [(1, 0, True), (2, 0, False)]
    # chance: a random region of ref 1 is right 2 times in 3, of ref 2 once in 2
    assert res["splits"]["val"]["baselines"]["chance"]["accuracy"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    # constant scores ignore the appearance features: no drop, a warning; a lone image (testA) is not swapped
    assert res["splits"]["val"]["shuffled_images"]["drop"] == 0.0 and res["splits"]["val"]["warnings"]
    assert "shuffled_images" not in res["splits"]["testA"]


def test_eval_vcr_joint(tmp_path: Path, vocab: Path) -> None:
    def rec(i: int, a: int, r: int) -> dict:
        return {"annot_id": f"val-{i}", "question": "why is the man happy ?", "answer_choices": ["yes", "no", "he is", "a cat"],
                "rationale_choices": ["because", "red", "grass", "two"], "answer_label": a, "rationale_label": r}  # fmt: skip

    data = write_task_dir(
        tmp_path / "vcr",
        "vcr",
        "val",
        [("a", 4, [rec(1, 0, 0), rec(2, 0, 2)]), ("b", 3, [rec(3, 1, 0), rec(4, 3, 3)])],
    )
    torch.manual_seed(0)
    model = ViLBERTForTasks(tiny(vocab))
    zero_linear(model.pair_head)  # the 4 choices tie: choice 0 is picked at both stages
    run = write_run(tmp_path / "run", model, "vcr", vocab)
    m = run_eval("vcr", run, data, tmp_path / "report", batch_size=3, device="cpu", progress=False)["splits"][
        "val"
    ]
    # answers right for 1, 2; rationales right for 1, 3; both only for 1
    assert (m["q_a"], m["qa_r"], m["q_ar"]) == (50.0, 50.0, 25.0)
    assert m["baselines"] == {"chance": {"q_a": 25.0, "qa_r": 25.0, "q_ar": 6.25}}
    assert m["shuffled_images"]["q_a"] == 50.0 and m["shuffled_images"]["drop"] == 0.0
    preds = json.loads((tmp_path / "report" / "vcr_predictions_val.json").read_text())
    assert preds["val-1"]["q_a_probs"] == pytest.approx([0.25] * 4)
    bf16 = run_eval(
        "vcr", run, data, tmp_path / "bf16", batch_size=3, device="cpu", precision="bf16", progress=False
    )
    assert bf16["splits"]["val"] == m and bf16["precision"] == "bf16"  # a constant head ties in any precision


@pytest.mark.parametrize("kind", ["tasks", "pretraining"])
def test_eval_retrieval_ties_and_zero_shot(tmp_path: Path, vocab: Path, kind: str) -> None:
    caps = [[{"caption": "a dog sits on the grass"}, {"caption": "two dogs"}], [{"caption": "a red cat"}],
            [{"caption": "a man"}, {"caption": "the happy man"}]]  # fmt: skip
    data = write_task_dir(
        tmp_path / "ret", "retrieval", "test", [(f"im{i}", 3 + i, c) for i, c in enumerate(caps)]
    )
    torch.manual_seed(0)
    if kind == "tasks":
        model = ViLBERTForTasks(tiny(vocab))
        zero_linear(model.pair_head)
    else:
        model = ViLBERTForPretraining(tiny(vocab, v_target_size=1601))
        zero_linear(model.align_head)
    run = write_run(tmp_path / "run", model, "retrieval" if kind == "tasks" else "pretrain", vocab)
    res = run_eval("retrieval", run, data, tmp_path / "report", batch_size=4, device="cpu", progress=False)
    m = res["splits"]["test"]
    # every score ties, so ranks follow indices: captions -> images 0,0,1,2,2 rank at 0,0,1,2,2;
    # images' first own captions are captions 0, 2, 3
    assert m["image_retrieval"] == pytest.approx({"r1": 40.0, "r5": 100.0, "r10": 100.0})
    assert m["text_retrieval"] == pytest.approx({"r1": 100 / 3, "r5": 100.0, "r10": 100.0})
    assert m["image_retrieval_100cand"] == m["image_retrieval"]  # fewer than 100 candidates: all of them
    assert m["num_images"] == 3 and m["num_captions"] == 5
    assert m["baselines"]["chance"]["image_retrieval"]["r1"] == pytest.approx(100 / 3)
    assert m["zero_shot"] is (kind == "pretraining")
    assert (tmp_path / "report" / "recall_at_k_test.png").is_file()
    if kind == "tasks":
        # the first 2 images and their 3 captions: ranks 0,0,1 (image retrieval), 0,2 (text retrieval)
        sub = run_eval("retrieval", run, data, tmp_path / "sub", device="cpu", max_images=2, progress=False)
        m = sub["splits"]["test"]
        assert (m["num_images"], m["num_captions"]) == (2, 3)
        assert m["image_retrieval"]["r1"] == pytest.approx(200 / 3) and m["text_retrieval"]["r1"] == 50.0


def test_eval_retrieval_bf16_with_fp32_rerank(tmp_path: Path, vocab: Path) -> None:
    caps = [[{"caption": "a dog sits on the grass"}, {"caption": "two dogs"}], [{"caption": "a red cat"}],
            [{"caption": "a man"}, {"caption": "the happy man"}]]  # fmt: skip
    data = write_task_dir(tmp_path / "ret", "retrieval", "test", [(f"im{i}", 3 + i, c) for i, c in enumerate(caps)])
    torch.manual_seed(0)
    run = write_run(tmp_path / "run", ViLBERTForTasks(tiny(vocab)), "retrieval", vocab)
    kw = {"batch_size": 4, "device": "cpu", "progress": False}
    fp32 = run_eval("retrieval", run, data, tmp_path / "fp32", **kw)["splits"]["test"]
    # every query's whole pool (3 images, 5 captions) rescored in fp32: the fp32 ranking exactly
    res = run_eval("retrieval", run, data, tmp_path / "rr", precision="bf16", rerank_top_k=5, **kw)
    m = res["splits"]["test"]
    for name in ("image_retrieval", "text_retrieval", "image_retrieval_100cand", "text_retrieval_100cand"):
        assert m[name] == fp32[name], name
    assert m["rerank"]["top_k"] == 5 and m["rerank"]["pairs"] == 15 and res["precision"] == "bf16"
    assert "Re-ranked: each query's top 5" in (tmp_path / "rr" / "report.md").read_text()
    assert "rerank" not in fp32
    for precision, task, k, msg in (("fp32", "retrieval", 5, "already exact"), ("bf16", "vqa", 5, "ranks no pairs"),
                                    ("bf16", "retrieval", -1, "0 (off) or a positive")):  # fmt: skip
        with pytest.raises(EvalError, match=re.escape(msg)):
            run_eval(task, run, data, tmp_path / f"bad{k}{task}", precision=precision, rerank_top_k=k, **kw)
        assert not (tmp_path / f"bad{k}{task}").exists()  # refused before anything is written


def test_eval_pretrain_metrics_and_errors(tmp_path: Path, vocab: Path) -> None:
    from pipelines.datasets import TaskDataset

    caps = [[{"caption": "a dog sits on the grass"}, {"caption": "two dogs on the grass"}],
            [{"caption": "a red cat sits"}], [{"caption": "a happy man"}, {"caption": "the sad man sits"}]]  # fmt: skip
    data = write_task_dir(tmp_path / "cap", "captions", "val", [(f"im{i}", 4, c) for i, c in enumerate(caps)])
    torch.manual_seed(0)
    model = ViLBERTForPretraining(tiny(vocab, v_target_size=1601))
    zero_linear(model.align_head, 1.0)  # always "matches": alignment accuracy = share of aligned pairs
    run = write_run(tmp_path / "run", model, "pretrain", vocab)
    m = run_eval("pretrain", run, data, tmp_path / "report", batch_size=2, device="cpu", progress=False)[
        "splits"
    ]["val"]
    labels = [x for b in TaskDataset(str(data), "captions", vocab, batch_size=2, shuffle_buffer=1, max_text_len=20)
              for x in b["align_label"].tolist()]  # fmt: skip
    assert m["pairs"] == 5
    assert m["alignment_accuracy"] == pytest.approx(100.0 * sum(labels) / len(labels))
    # always "matches" is exactly what a blind model can do: at chance, flagged
    chance = 100.0 * max(sum(labels), len(labels) - sum(labels)) / len(labels)
    assert m["baselines"]["chance"]["alignment_accuracy"] == pytest.approx(chance)
    assert any("does not tell a matching caption" in w for w in m["warnings"])
    assert m["perplexity"] >= 1.0 and 0.0 <= m["masked_token_accuracy"] <= 100.0
    assert m["masked_region_kl"] >= 0.0
    again = run_eval("pretrain", run, data, tmp_path / "report2", batch_size=2, device="cpu", progress=False)
    assert again["splits"]["val"] == m  # seeded masking and negatives: the same numbers
    with pytest.raises(EvalError, match="VQA head"):
        run_eval("vqa", run, data, tmp_path / "r3", device="cpu", progress=False)
    with pytest.raises(EvalError, match="'captions'"):
        tasks_run = write_run(tmp_path / "run_t", ViLBERTForTasks(tiny(vocab)), "vcr", vocab)
        run_eval("vcr", tasks_run, data, tmp_path / "r4", device="cpu", progress=False)


def test_vqa_submission_round_trip_matches_metrics(tmp_path: Path, vocab: Path) -> None:
    """A random (untrained) head: metrics.json equals the official metric recomputed from the files."""
    answers = ["yes", "no", "2", "red"]
    recs = [vqa_record(i, ["yes"] * 4 + ["no"] * 3 + ["2"] * 3, "yes/no") for i in range(6)]
    data = write_task_dir(tmp_path / "v", "vqa", "val", [("a", 4, recs[:3]), ("b", 5, recs[3:])], answers)
    torch.manual_seed(3)
    run = write_run(tmp_path / "run", ViLBERTForTasks(tiny(vocab, num_answers=4)), "vqa", vocab, answers)
    res = run_eval("vqa", run, data, tmp_path / "rep", batch_size=4, device="cpu", progress=False)
    sub = json.loads((tmp_path / "rep" / "vqa_predictions_val.json").read_text())
    accs = [vqa_question_accuracy(p["answer"], recs[p["question_id"]]["answers"]) for p in sub]
    assert res["splits"]["val"]["overall"] == round(100 * sum(accs) / len(accs), 2)


def test_cli_eval_of_a_tiny_model_trained_by_the_trainer(tmp_path: Path, vocab: Path) -> None:
    """`vilbert-data train` library function for a few steps, then `vilbert-data eval` on its run directory."""
    from typer.testing import CliRunner

    from cli import app
    from vilbert_core.training.trainer import run_train

    answers = ["yes", "no", "2", "red"]

    def rec(qid: int, q: str, ans: str, atype: str) -> dict:
        return {"question_id": qid, "question": q, "answers": [ans] * 10, "answer_type": atype,
                "question_type": "x", "labels": [answers.index(ans)], "scores": [1.0]}  # fmt: skip

    recs = [rec(1, "how many dogs ?", "2", "number"), rec(2, "is the man happy ?", "yes", "yes/no"),
            rec(3, "what is the color ?", "red", "other"), rec(4, "is the cat sad ?", "no", "yes/no")]  # fmt: skip
    data = write_task_dir(
        tmp_path / "vqa", "vqa", "train", [("img_a", 5, recs[:2]), ("img_b", 4, recs[2:])], answers
    )
    run_train(task="vqa", data=str(data), out=str(tmp_path / "run"), vocab=str(vocab), config="tiny", steps=3,
              batch_size=4, lr=3e-3, warmup=0.0, num_workers=0, progress=False, tensorboard=False, device="cpu",
              max_text_len=20)  # fmt: skip

    report = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--task",
            "vqa",
            "--model",
            str(tmp_path / "run"),
            "--data",
            str(data),
            "--out",
            str(report),
            "--device",
            "cpu",
            "--batch-size",
            "3",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "| overall |" in result.output
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["trained_task"] == "vqa" and metrics["model_kind"] == "tasks"
    sub = json.loads((report / "vqa_predictions_train.json").read_text())
    assert [p["question_id"] for p in sub] == [1, 2, 3, 4] and all(p["answer"] in answers for p in sub)
    # every human gave the same answer: a question scores 100 exactly when the prediction is that answer
    right = [p["answer"] == recs[p["question_id"] - 1]["answers"][0] for p in sub]
    assert metrics["splits"]["train"]["overall"] == round(100 * sum(right) / 4, 2)

    bad = CliRunner().invoke(app, ["eval", "--task", "vqa", "--model", str(tmp_path / "nowhere"), "--data", str(data),
                                   "--out", str(report)])  # fmt: skip
    assert bad.exit_code == 2 and "no such file or folder" in bad.output


def test_load_model_finds_run_files(tmp_path: Path, vocab: Path) -> None:
    from vilbert_core.evaluation.loading import load_model

    torch.manual_seed(0)
    run = tmp_path / "run"
    ViLBERTForPretraining(tiny(vocab, v_target_size=1601)).save_pretrained(run / "checkpoints" / "step-4")
    ViLBERTForTasks(tiny(vocab)).save_pretrained(run / "best")
    (run / "train_args.json").write_text(
        json.dumps({"task": "refcoco", "vocab": str(vocab), "max_text_len": 12})
    )
    # a run without final weights falls back to best/; checkpoints find the run's train_args.json
    loaded = load_model(run, device="cpu")
    assert loaded.weights == run / "best" and loaded.kind == "tasks" and loaded.max_text_len == 12
    step = load_model(run / "checkpoints" / "step-4", device="cpu")
    assert step.kind == "pretraining" and step.train_task == "refcoco"  # model_class recorded in the weights
    ViLBERTForTasks(tiny(vocab)).save_pretrained(tmp_path / "bare")
    with pytest.raises(EvalError, match="pass --vocab"):
        load_model(tmp_path / "bare", device="cpu")
    assert load_model(tmp_path / "bare", vocab=vocab, device="cpu").train_task is None
    with pytest.raises(EvalError, match="no such file or folder"):
        load_model(tmp_path / "missing", device="cpu")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"junk")  # a truncated download
    with pytest.raises(EvalError, match="cannot read the weights"):
        load_model(tmp_path / "broken", vocab=vocab, device="cpu")


@pytest.mark.parametrize(
    ("keys", "kind"), [("vilbert_keys_pretraining.txt", "pretraining"), ("vilbert_keys_vltasks.txt", "tasks")]
)
def test_detect_kind_of_reference_checkpoints(tmp_path: Path, keys: str, kind: str) -> None:
    """A reference pytorch_model.bin says by its key names whether it holds task heads."""
    from vilbert_core.evaluation.loading import detect_kind

    ref = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / keys
    if not ref.is_file():
        pytest.skip("../shared/reference is not available")
    names = [line.split("\t")[0] for line in ref.read_text().splitlines() if line.strip()]
    torch.save({n: torch.zeros(1) for n in names}, tmp_path / "pytorch_model.bin")  # only the names matter
    assert detect_kind(tmp_path / "pytorch_model.bin", None) == kind
    assert detect_kind(tmp_path, None) == kind


@pytest.mark.cuda
@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_cuda_gives_the_cpu_metrics(tmp_path: Path, vocab: Path, task: str) -> None:
    # random (non-constant) heads: masking, negatives and every score must be the CPU's
    caps = [[{"caption": "a dog sits on the grass"}, {"caption": "two dogs on the grass"}],
            [{"caption": "a red cat sits"}], [{"caption": "a happy man"}, {"caption": "the sad man sits"}]]  # fmt: skip
    shard_task = "captions" if task == "pretrain" else "retrieval"
    split = "val" if task == "pretrain" else "test"
    data = write_task_dir(tmp_path / "d", shard_task, split, [(f"im{i}", 4, c) for i, c in enumerate(caps)])
    torch.manual_seed(0)
    model = ViLBERTForPretraining(tiny(vocab, v_target_size=1601))
    run = write_run(tmp_path / "run", model, "pretrain", vocab)
    m = {
        dev: run_eval(task, run, data, tmp_path / dev, batch_size=2, device=dev, progress=False)["splits"][split]
        for dev in ("cpu", "cuda")
    }
    if task == "pretrain":
        assert m["cuda"]["pairs"] == m["cpu"]["pairs"] == 5
        for key in ("perplexity", "masked_region_kl", "alignment_accuracy", "masked_token_accuracy"):
            assert m["cuda"][key] == pytest.approx(m["cpu"][key], rel=1e-3, abs=1e-4), key
    else:
        for key in ("image_retrieval", "text_retrieval"):
            assert m["cuda"][key] == pytest.approx(m["cpu"][key]), key
