"""Multi-task training: the schedule, per-task lr and logs, exact resume, task tokens, eval of a multi-task
run, and 2-process gloo DDP equal to one process with equal steps per rank."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from eval_fixtures import write_task_dir
from shard_fixtures import write_vocab
from test_train_overfit import VOCAB, D, make_batch

from vilbert_core import ViLBERTConfig, ViLBERTForTasks
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.training.data import default_loader_factory
from vilbert_core.training.distributed import DistContext
from vilbert_core.training.metrics_log import read_metrics
from vilbert_core.training.multitask import TaskSchedule
from vilbert_core.training.trainer import TrainArgs, TrainingError, run_train

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ("vqa", "refcoco", "retrieval")
ANSWERS = ["red", "yes", "no", "two"]
WORDS = ["what", "color", "is", "the", "cat", "a", "dog", "red", "sits", "on", "grass", "left", "man"]


def test_round_robin_with_iteration_gaps_follows_the_rounds() -> None:
    schedule = TaskSchedule(["a", "b", "c"], "round-robin", {"b": 2, "c": 3}, {}, seed=0)
    # round r trains a always, b when 2 divides r, c when 3 divides r
    expected = ["a", "b", "c", "a", "a", "b", "a", "c", "a", "b", "a", "a", "b", "c"]
    assert [schedule.task_at(i) for i in range(len(expected))] == expected
    assert TaskSchedule(["a", "b", "c"], "round-robin", {"b": 2, "c": 3}, {}, 0).task_at(13) == "c"  # no history needed


def test_proportional_schedule_is_seeded_and_follows_the_data_sizes() -> None:
    weights = {"a": 6.0, "b": 3.0, "c": 1.0}
    one = TaskSchedule(list(weights), "proportional", {}, weights, seed=4)
    two = TaskSchedule(list(weights), "proportional", {}, weights, seed=4)
    draws = [one.task_at(i) for i in range(3000)]
    assert draws == [two.task_at(i) for i in range(3000)]
    counts = Counter(draws)
    for name, w in weights.items():
        assert counts[name] / 3000 == pytest.approx(w / 10, abs=0.03)
    other = TaskSchedule(list(weights), "proportional", {}, weights, seed=5)
    assert [other.task_at(i) for i in range(50)] != draws[:50]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """VQA, RefCOCO and retrieval TASKDIRs over the same six images, and a vocabulary."""
    root = tmp_path_factory.mktemp("multitask")
    k = 4

    def vqa(qid: int, q: str, a: str) -> dict:
        return {"question_id": qid, "question": q, "answers": [a] * 10, "answer_type": "other", "question_type": "what",
                "labels": [ANSWERS.index(a)], "scores": [1.0]}  # fmt: skip

    def ref(n: int) -> dict:
        iou = [0.9 if j == n % k else 0.1 for j in range(k)]
        return {"sentence": "the red cat", "iou": iou, "gt_box": [0, 0, 10, 10], "ref_id": n, "sent_id": n}

    images = [f"img{i}" for i in range(6)]
    out = {
        "vqa": write_task_dir(root / "vqa", "vqa", "train", [
            (im, k, [vqa(10 * i, "what color is the cat", ANSWERS[i % 4]), vqa(10 * i + 1, "is the dog red", "yes")])
            for i, im in enumerate(images)], ANSWERS),  # fmt: skip
        "refcoco": write_task_dir(root / "refcoco", "refcoco", "train", [(im, k, [ref(i)]) for i, im in enumerate(images)]),
        "retrieval": write_task_dir(root / "retrieval", "retrieval", "train", [
            (im, k, [{"caption": "a man sits on the grass" if i % 2 else "a red cat"}]) for i, im in enumerate(images)]),  # fmt: skip
        "vocab": write_vocab(root / "vocab.txt", WORDS),
        "root": root,
    }
    return out


def _args(data: dict[str, Path], out: Path, **kw) -> TrainArgs:
    base = dict(
        task=",".join(TASKS), data="", task_data={t: str(data[t]) for t in TASKS}, out=str(out),
        vocab=str(data["vocab"]), config="tiny", batch_size=4, steps=6, lr=1e-3, warmup=0, num_workers=0,
        shuffle_buffer=4, checkpoint_every=3, progress=False, tensorboard=False, device="cpu", max_text_len=12, seed=1,
    )  # fmt: skip
    base.update(kw)
    return TrainArgs(**base)


def test_a_multi_task_run_trains_each_task_at_its_lr_and_logs_it(data: dict[str, Path], tmp_path: Path) -> None:
    task_lr = {"vqa": 1e-3, "refcoco": 5e-4, "retrieval": 2e-4}
    summary = run_train(_args(data, tmp_path / "mt", task_lr=task_lr, task_val={"vqa": str(data["vqa"]),
                                                                                "refcoco": str(data["refcoco"])}))  # fmt: skip
    assert summary["steps"] == 6
    records = read_metrics(tmp_path / "mt" / "metrics.jsonl")
    train = [r for r in records if r.get("split") != "val"]
    assert [r["task"] for r in train] == list(TASKS) * 2
    assert all(f"loss_{r['task']}" in r and r[f"loss_{r['task']}"] == r["loss"] for r in train)
    # the shared schedule (here: linear decay from step 0) times each task's own peak lr
    single = run_train(task="vqa", data=str(data["vqa"]), out=str(tmp_path / "single"), vocab=str(data["vocab"]),
                       config="tiny", batch_size=4, steps=6, lr=1.0, warmup=0, num_workers=0, progress=False,
                       tensorboard=False, device="cpu", max_text_len=12)  # fmt: skip
    assert single["steps"] == 6
    factors = [r["lr"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl")]
    for r, factor in zip(train, factors, strict=True):
        assert r["lr"] == pytest.approx(task_lr[r["task"]] * factor)
    val = [r for r in records if r.get("split") == "val"]
    assert {r["task"] for r in val} == {"vqa", "refcoco", "mean"}
    assert (tmp_path / "mt" / "best" / "val_metrics.json").is_file()
    targs = json.loads((tmp_path / "mt" / "train_args.json").read_text())
    assert targs["task_data"]["refcoco"] == str(data["refcoco"]) and targs["num_answers"] == len(ANSWERS)

    # eval reads each task of the run with its own head and training data
    res = run_eval("vqa", tmp_path / "mt", data["vqa"], tmp_path / "rep_vqa", device="cpu", progress=False)
    assert res["splits"]["train"]["num_questions"] == 12
    assert "question_prior" in res["splits"]["train"]["baselines"]  # fitted on task_data["vqa"]
    res = run_eval("refcoco", tmp_path / "mt", data["refcoco"], tmp_path / "rep_ref", device="cpu", progress=False)
    assert res["splits"]["train"]["num_refs"] == 6


class _Crash(RuntimeError):
    """Stands for the process being killed."""


def _crashing_factory(args: TrainArgs, after_batches: int):
    """Every task's real shard loader, dying after `after_batches` batches in total (a killed run)."""
    real = {args.task_data[t]: default_loader_factory(args.for_task(t), DistContext()) for t in TASKS}
    count = {"n": 0}

    def factory(source, epoch, batch_size):
        for batch in real[source](source, epoch, batch_size):
            if count["n"] == after_batches:
                raise _Crash("killed")
            count["n"] += 1
            yield batch

    return factory


def test_resume_continues_the_same_tasks_and_model_with_task_tokens(data: dict[str, Path], tmp_path: Path) -> None:
    straight = run_train(_args(data, tmp_path / "straight", task_tokens=True, steps=8))
    args = _args(data, tmp_path / "killed", task_tokens=True, steps=8)
    with pytest.raises(_Crash):
        run_train(args, loader_factory=_crashing_factory(args.resolved(), after_batches=7))  # 3: feature statistics
    assert (tmp_path / "killed" / "checkpoints" / "step-3").is_dir()
    resumed = run_train(_args(data, tmp_path / "killed", task_tokens=True, steps=8, resume=True))
    assert straight["steps"] == resumed["steps"] == 8
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))  # the killed run's step 4-5 records were cut
    assert [r["task"] for r in b] == [r["task"] for r in a]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    ma = ViLBERTForTasks.from_pretrained(tmp_path / "straight")
    mb = ViLBERTForTasks.from_pretrained(tmp_path / "killed")
    assert ma.config.task_tokens == list(TASKS)
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)


def test_task_tokens_condition_the_text_stream() -> None:
    model = ViLBERTForTasks(ViLBERTConfig.preset("tiny", vocab_size=VOCAB, v_feature_size=D)).eval()
    batch = make_batch("vqa", b=2, num_answers=model.config.num_answers)
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", "image_feat", "image_loc", "image_mask")}
    plain = model(**inputs).vqa_logits
    model.add_task_tokens(["vqa", "refcoco"])
    model.set_task(None)
    torch.testing.assert_close(model(**inputs).vqa_logits, plain)  # no active task: the same model
    model.set_task("vqa")
    vqa = model(**inputs).vqa_logits
    model.set_task("refcoco")
    assert not torch.allclose(model(**inputs).vqa_logits, vqa)
    # the embedding is added at [CLS] only: the same as adding it to the word embedding of [CLS] by hand
    model.set_task(None)
    with torch.no_grad():
        row = model.vilbert.embeddings.task_embeddings.weight[1]
        cls_id = int(inputs["input_ids"][0, 0])
        model.vilbert.embeddings.word_embeddings.weight[cls_id] += row
        same = model(**inputs).vqa_logits
        model.vilbert.embeddings.word_embeddings.weight[cls_id] -= row
    model.set_task("refcoco")
    rows_with_cls = (inputs["input_ids"][:, 1:] != cls_id).all(1)  # [CLS] nowhere else in those rows
    torch.testing.assert_close(model(**inputs).vqa_logits[rows_with_cls], same[rows_with_cls])
    with pytest.raises(ValueError, match="not 'gqa'"):
        model.set_task("gqa")


def test_clear_errors(data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="no TASKDIR for retrieval"):
        run_train(_args(data, tmp_path / "e1", task_data={"vqa": str(data["vqa"]), "refcoco": str(data["refcoco"])}))
    with pytest.raises(TrainingError, match="pretraining trains another model"):
        run_train(_args(data, tmp_path / "e2", task="vqa,pretrain", task_data={"vqa": "x", "pretrain": "y"}))
    with pytest.raises(TrainingError, match="both classify with the one answer head"):
        run_train(_args(data, tmp_path / "e3", task="vqa,gqa", task_data={"vqa": "x", "gqa": "y"}))
    with pytest.raises(TrainingError, match="--schedule 'random'"):
        run_train(_args(data, tmp_path / "e4", schedule="random"))
    with pytest.raises(TrainingError, match="--task-lr: refcoco2 is not one of the tasks"):
        run_train(_args(data, tmp_path / "e5", task_lr={"refcoco2": 1e-4}))


# ---------------------------------------------------------------------------------------------- DDP
GLOBAL_BATCH = 4


def fixed_batches(source: str, epoch: int, batch_size: int):
    """This rank's slice of fixed global batches of the source's task (the folder's name)."""
    task = Path(source).name
    rank, world = 0, 1
    if torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    share = GLOBAL_BATCH // world
    for i in range(2):
        full = make_batch(task, b=GLOBAL_BATCH, seed=100 * epoch + 10 * TASKS.index(task) + i, num_answers=4)
        yield {k: v[rank * share : (rank + 1) * share] for k, v in full.items()}


def _ddp_args(data: dict[str, Path], root: Path, out: Path) -> TrainArgs:
    cfg = ViLBERTConfig.preset("tiny", vocab_size=VOCAB, v_feature_size=D, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, v_hidden_dropout_prob=0.0,
                               v_attention_probs_dropout_prob=0.0)  # fmt: skip
    cfg.to_json_file(root / "config.json")
    vocab = root / "ddp_vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]))
    return _args(data, out, config=str(root / "config.json"), vocab=str(vocab), batch_size=GLOBAL_BATCH, steps=6,
                 task_iter_gap={"retrieval": 2}, checkpoint_every=100, task_tokens=True)  # fmt: skip


def _worker(rank: int, world: int, port: int, args: TrainArgs) -> None:
    """One DDP rank, with the environment torchrun would give it."""
    import os

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    torch.set_num_threads(1)
    summary = run_train(args, loader_factory=fixed_batches)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps({"steps": summary["steps"]}))


def test_two_process_gloo_multi_task_equals_one_process(data: dict[str, Path], tmp_path: Path) -> None:
    run_train(_ddp_args(data, tmp_path, tmp_path / "one"), loader_factory=fixed_batches)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, _ddp_args(data, tmp_path, tmp_path / "two")), nprocs=2, join=True)
    assert [json.loads((tmp_path / "two" / f"rank{r}.json").read_text())["steps"] for r in (0, 1)] == [6, 6]
    a = read_metrics(tmp_path / "one" / "metrics.jsonl")
    b = read_metrics(tmp_path / "two" / "metrics.jsonl")
    # round-robin with retrieval every 2nd round: vqa refcoco retrieval | vqa refcoco | vqa ...
    assert [r["task"] for r in a] == [r["task"] for r in b] == ["vqa", "refcoco", "retrieval", "vqa", "refcoco", "vqa"]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    ma = ViLBERTForTasks.from_pretrained(tmp_path / "one").state_dict()
    mb = ViLBERTForTasks.from_pretrained(tmp_path / "two").state_dict()
    # the pair head's bias cancels in retrieval's softmax over candidates: its gradient is rounding noise,
    # which Adam scales to lr-sized steps of either sign, so it is the one tensor left out
    for name in ma:
        if name != "pair_head.bias":
            torch.testing.assert_close(ma[name], mb[name], rtol=1e-4, atol=1e-5, msg=name)


def test_cli_multi_task_options(data: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli import app

    base = ["train", "--task", "vqa,refcoco", "--vocab", str(data["vocab"]), "--config", "tiny", "--out",
            str(tmp_path / "run"), "--num-workers", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    bad = CliRunner().invoke(app, [*base, "--data", str(data["vqa"])])
    assert bad.exit_code == 2 and "expected TASK=VALUE" in bad.output
    bad = CliRunner().invoke(app, [*base, "--data", f"vqa={data['vqa']}", "--data", f"refcoco={data['refcoco']}",
                                   "--task-batch-size", "vqa=four"])  # fmt: skip
    assert bad.exit_code == 2 and "'four' is not a whole number" in bad.output
    ok = CliRunner().invoke(app, [*base, "--data", f"vqa={data['vqa']}", "--data", f"refcoco={data['refcoco']}",
                                  "--steps", "2", "--batch-size", "4", "--task-lr", "refcoco=1e-4", "--task-tokens",
                                  "--max-text-len", "12"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    targs = json.loads((tmp_path / "run" / "train_args.json").read_text())
    assert targs["task_lr"] == {"vqa": 4e-5, "refcoco": 1e-4} and targs["task_tokens"] is True
    assert [r["task"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == ["vqa", "refcoco"]


def test_curves_name_each_tasks_validation() -> None:
    from vilbert_core.training.metrics_log import curve_series

    records = [
        {"step": 1, "split": "train", "task": "vqa", "loss": 2.0, "loss_vqa": 2.0, "lr": 1e-4, "grad_norm": 1.0},
        {"step": 2, "split": "train", "task": "refcoco", "loss": 1.0, "loss_refcoco": 1.0, "lr": 1e-4, "grad_norm": 1.0},
        {"step": 2, "split": "val", "task": "vqa", "vqa_score": 0.5, "samples": 8},
        {"step": 2, "split": "val", "task": "refcoco", "accuracy": 0.25, "samples": 8},
        {"step": 2, "split": "val", "task": "mean", "mean_score": 0.375},
    ]
    panels = curve_series(records)
    assert panels["validation"] == {"mean mean_score": [(2, 0.375)], "refcoco accuracy": [(2, 0.25)],
                                    "vqa vqa_score": [(2, 0.5)]}  # fmt: skip
    assert set(panels["loss"]) == {"loss", "loss_vqa", "loss_refcoco"}


def test_updates_inside_backward_give_the_multi_task_model_of_a_step_after_backward(
    data: dict[str, Path], tmp_path: Path
) -> None:
    # each task at its own lr: the task's scale must be on the groups while backward applies the updates
    task_lr = {"vqa": 1e-3, "refcoco": 5e-4, "retrieval": 2e-4}
    weights, losses = {}, {}
    for inside in (True, False):
        out = tmp_path / f"inside_{inside}"
        summary = run_train(_args(data, out, steps=3, task_lr=task_lr, clip_grad=0, update_in_backward=inside))
        assert summary["update_in_backward"] is inside
        weights[inside] = ViLBERTForTasks.from_pretrained(out).state_dict()
        losses[inside] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r.get("split") != "val"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-5, atol=1e-6)
