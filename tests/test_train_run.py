"""`run_train` end to end on real task shards: run folder, logs, resume equality, NaN stop, clear errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from train_fixtures import DIM, build_train_data

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks
from vilbert_core.training.distributed import DistContext
from vilbert_core.training.metrics_log import read_metrics
from vilbert_core.training.trainer import (
    TrainArgs,
    TrainingDiverged,
    TrainingError,
    build_model,
    default_loader_factory,
    run_train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Captions and VQA task shards over 8 images with 16-d features, and a vocab.txt."""
    return build_train_data(tmp_path_factory.mktemp("train_data"))


def _args(files: dict[str, Path], out: Path, **kw) -> TrainArgs:
    """Tiny-model pretraining arguments for the test data (overridable)."""
    base = dict(
        task="pretrain",
        data=str(files["captions"]),
        out=str(out),
        vocab=str(files["vocab"]),
        config="tiny",
        batch_size=4,
        steps=6,
        lr=1e-3,
        warmup=2,
        num_workers=0,
        shuffle_buffer=8,
        checkpoint_every=2,
        progress=False,
        seed=3,
    )
    base.update(kw)
    return TrainArgs(**base)


def test_run_folder_layout_logs_and_best(tmp_path, data):
    out = tmp_path / "run"
    summary = run_train(_args(data, out, val=str(data["captions"]), eval_every=3))
    assert summary["steps"] == 6 and summary["precision"] == "fp32"
    for name in ("config.json", "model.safetensors", "train_args.json", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    targs = json.loads((out / "train_args.json").read_text())
    assert targs["task"] == "pretrain" and targs["config_name"] == "tiny"
    assert targs["vocab"] == str(data["vocab"].resolve()) and targs["max_text_len"] == 36
    assert targs["max_regions"] == 36 and targs["num_answers"] is None and "answers_file" in targs
    assert targs["threads"] == torch.get_num_threads() == 1  # the one_thread fixture: kept, never raised

    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r.get("split", "train") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:  # the three pretraining losses are logged apart and summed
        assert r["loss"] == pytest.approx(r["loss_mlm"] + r["loss_mrm"] + r["loss_align"], rel=1e-5)
    # lr: warmup over 2 steps, then linear decay to 0 at step 6
    assert [r["lr"] for r in train] == pytest.approx([5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert [r["step"] for r in val] == [3, 6] and all(0 <= r["align_acc"] <= 1 for r in val)
    best_step = json.loads((out / "best" / "val_metrics.json").read_text())["step"]
    assert best_step in (3, 6)

    # checkpoints keep the newest two; the final model loads back with the tokenizer's vocabulary size
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]
    model = ViLBERTForPretraining.from_pretrained(out)
    assert (
        model.config.vocab_size == len(data["vocab"].read_text().split())
        and model.config.v_feature_size == DIM
    )
    ckpt = ViLBERTForPretraining.from_pretrained(out / "checkpoints" / "step-6")
    for (n, a), (_, b) in zip(model.state_dict().items(), ckpt.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


class _Crash(RuntimeError):
    """Stands for the process being killed."""


def _crashing_factory(args: TrainArgs, after_batches: int):
    """The real shard loader, which dies after `after_batches` batches in total (a killed run)."""
    real = default_loader_factory(args, DistContext())
    count = {"n": 0}

    def factory(source, epoch, batch_size):
        for batch in real(source, epoch, batch_size):
            if count["n"] == after_batches:
                raise _Crash("killed")
            count["n"] += 1
            yield batch

    return factory


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, data):
    # 16 captions / batch 4: steps 5-8 run in the second epoch, with dropout and random masking
    full = run_train(_args(data, tmp_path / "full", steps=8, checkpoint_every=3))
    args = _args(data, tmp_path / "resumed", steps=8, checkpoint_every=3)
    with pytest.raises(_Crash):
        run_train(args, loader_factory=_crashing_factory(args.resolved(), after_batches=5))
    assert (tmp_path / "resumed" / "checkpoints" / "step-3").is_dir()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = run_train(_args(data, tmp_path / "resumed", steps=8, checkpoint_every=3, resume=True))
    assert resumed["steps"] == full["steps"] == 8

    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))  # steps 4-5 of the killed run were cut
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "loss_mlm", "loss_mrm", "loss_align", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    ma = ViLBERTForPretraining.from_pretrained(tmp_path / "full").state_dict()
    mb = ViLBERTForPretraining.from_pretrained(tmp_path / "resumed").state_dict()
    for name in ma:
        torch.testing.assert_close(ma[name], mb[name], rtol=1e-6, atol=1e-7)


def test_activation_checkpointing_trains_exactly_the_same_model(tmp_path, data):
    """--activation-checkpointing recomputes activations in backward: same losses and weights (dropout on)."""
    runs = {}
    for on in (False, True):
        out = tmp_path / f"ckpt_{on}"
        run_train(_args(data, out, steps=3, checkpoint_every=10, activation_checkpointing=on))
        runs[on] = (read_metrics(out / "metrics.jsonl"), ViLBERTForPretraining.from_pretrained(out).state_dict())
    for ra, rb in zip(runs[False][0], runs[True][0], strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7), ra["step"]
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "ckpt_True" / "train_args.json").read_text())["activation_checkpointing"] is True


@pytest.mark.parametrize(("task", "checkpointing"), [("pretrain", False), ("vqa", False), ("pretrain", True)])
def test_updates_inside_backward_train_exactly_the_same_model(tmp_path, data, task, checkpointing):
    """--clip-grad 0 applies each update during backward: the losses, norms and weights of a step after it."""
    runs = {}
    kw = {"task": task, "data": str(data[task if task == "vqa" else "captions"]),
          "activation_checkpointing": checkpointing}  # fmt: skip
    for inside in (True, False):
        out = tmp_path / f"inside_{inside}"
        summary = run_train(_args(data, out, steps=4, checkpoint_every=10, clip_grad=0, update_in_backward=inside, **kw))
        assert summary["update_in_backward"] is inside
        model_cls = ViLBERTForPretraining if task == "pretrain" else ViLBERTForTasks
        runs[inside] = (read_metrics(out / "metrics.jsonl"), model_cls.from_pretrained(out).state_dict())
    for ra, rb in zip(runs[False][0], runs[True][0], strict=True):
        for key in ("loss", "grad_norm", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    assert runs[False][0][0]["grad_norm"] > 0
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-5, atol=1e-6)
    # clipping, accumulation: every gradient is needed before the first update, so the usual step runs
    for extra in ({"clip_grad": 1.0}, {"clip_grad": 0, "grad_accum": 2}):
        summary = run_train(_args(data, tmp_path / f"usual{len(extra)}", steps=1, checkpoint_every=10, **extra, **kw))
        assert summary["update_in_backward"] is False


def _nan_factory(args: TrainArgs, at_batch: int):
    """The real loader with NaN region features from batch `at_batch` on."""
    real = default_loader_factory(args, DistContext())
    count = {"n": 0}

    def factory(source, epoch, batch_size):
        for batch in real(source, epoch, batch_size):
            if count["n"] >= at_batch:
                batch["image_feat"] = torch.full_like(batch["image_feat"], float("nan"))
            count["n"] += 1
            yield batch

    return factory


@pytest.mark.parametrize("clip_grad", [1.0, 0.0])  # 0: the updates happen inside backward
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data, clip_grad):
    args = _args(data, tmp_path / "run", steps=8, checkpoint_every=2, clip_grad=clip_grad)
    with pytest.raises(TrainingDiverged, match=r"step 6.*checkpoints/step-4"):
        run_train(args, loader_factory=_nan_factory(args.resolved(), at_batch=5))
    assert (tmp_path / "run" / "checkpoints" / "step-4" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "step-6").exists()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    good = ViLBERTForPretraining.from_pretrained(tmp_path / "run" / "checkpoints" / "step-4")
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_clear_errors(tmp_path, data):
    # shards of another task
    with pytest.raises(TrainingError, match="task 'captions'.*--task vqa"):
        run_train(_args(data, tmp_path / "a", task="vqa"))
    # a checkpoint built for 2048-d res5 features, given 16-d features
    ckpt = tmp_path / "ckpt2048"
    vocab_size = len(data["vocab"].read_text().split())
    cfg = ViLBERTConfig.preset("tiny", vocab_size=vocab_size, v_feature_size=2048, v_target_size=1601)
    ViLBERTForPretraining(cfg).save_pretrained(ckpt)
    with pytest.raises(TrainingError, match=r"16-d.*v_feature_size=2048.*--feature-layer res5"):
        run_train(_args(data, tmp_path / "b", init_from=str(ckpt)))
    # a checkpoint trained with another vocabulary
    ckpt = tmp_path / "ckpt_vocab"
    ViLBERTForPretraining(ViLBERTConfig.preset("tiny", vocab_size=999, v_feature_size=DIM)).save_pretrained(
        ckpt
    )
    with pytest.raises(TrainingError, match=f"vocabulary of 999 tokens.*has {vocab_size}"):
        run_train(_args(data, tmp_path / "c", init_from=str(ckpt)))
    # a pretraining checkpoint whose region head predicts other classes than the detector's 1601
    ckpt = tmp_path / "ckpt_classes"
    ViLBERTForPretraining(ViLBERTConfig.preset("tiny", vocab_size=vocab_size, v_feature_size=DIM)).save_pretrained(ckpt)
    with pytest.raises(TrainingError, match="predicts 11 region classes.*1601"):
        run_train(_args(data, tmp_path / "c2", init_from=str(ckpt)))
    # an empty data source
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "task.json").write_text(json.dumps({"task": "captions", "counts": {"records": 0}, "shards": []}))
    with pytest.raises(TrainingError, match="no training samples"):
        run_train(_args(data, tmp_path / "d", data=str(empty)))
    # captions shards of features converted from a release without class distributions: no MRM target
    lacking = tmp_path / "lacking"
    shutil.copytree(data["captions"], lacking)
    info = json.loads((lacking / "task.json").read_text())
    info["features"]["class_distributions"] = False
    (lacking / "task.json").write_text(json.dumps(info))
    with pytest.raises(TrainingError, match="no class distributions.*--recompute-classes"):
        run_train(_args(data, tmp_path / "e", data=str(lacking)))


def test_cli_train_runs_and_reports_errors(tmp_path, data):
    from typer.testing import CliRunner

    from cli import app

    common = ["train", "--data", str(data["captions"]), "--vocab", str(data["vocab"]), "--config", "tiny",
              "--batch-size", "4", "--steps", "2", "--num-workers", "0", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(app, [*common, "--task", "pretrain", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "trained 2 steps" in res.output and (tmp_path / "run" / "model.safetensors").is_file()
    res = CliRunner().invoke(app, [*common, "--task", "refcoco", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--task refcoco needs 'refcoco' shards" in res.output


def test_vqa_fine_tuning_from_a_pretrained_model_in_bf16(tmp_path, data):
    vocab_size = len(data["vocab"].read_text().split())
    pre = tmp_path / "pretrained"
    cfg = ViLBERTConfig.preset("tiny", vocab_size=vocab_size, v_feature_size=DIM, v_target_size=1601)
    ViLBERTForPretraining(cfg).save_pretrained(pre)
    out = tmp_path / "vqa"
    summary = run_train(
        _args(data, out, task="vqa", data=str(data["vqa"]), val=str(data["vqa"]), init_from=str(pre),
              precision="bf16", steps=4, checkpoint_every=4)
    )  # fmt: skip
    assert summary["precision"] == "bf16" and summary["steps"] == 4
    answers = json.loads((data["vqa"] / "answers.json").read_text())
    targs = json.loads((out / "train_args.json").read_text())
    assert targs["num_answers"] == len(answers) == 2  # red, yes (blue is never the top answer)
    assert json.loads(Path(targs["answers_file"]).read_text()) == answers
    model = ViLBERTForTasks.from_pretrained(out)
    assert model.num_answers == 2
    records = read_metrics(out / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    val = [r for r in records if r.get("split") == "val"]
    assert val and 0.0 <= val[-1]["vqa_score"] <= 1.0 and val[-1]["samples"] == 14


@pytest.mark.parametrize("task", ["vqa", "refcoco"])
def test_checkpoint_keeps_its_answer_count_when_the_shards_give_none(tmp_path, task):
    """--init-from a tasks checkpoint whose VQA head has 7 answers, with no answers.json: it loads as is."""
    cfg = ViLBERTConfig.preset("tiny", num_answers=7)
    ViLBERTForTasks(cfg).save_pretrained(tmp_path / "ckpt")
    args = TrainArgs(
        task=task, data="unused", out="unused", vocab="vocab.txt", init_from=str(tmp_path / "ckpt")
    )
    model, _ = build_model(args, cfg.vocab_size, cfg.v_feature_size, None, None)
    assert model.num_answers == 7


@pytest.mark.cuda
@pytest.mark.parametrize("precision", [None, "fp16"])
def test_cuda_run_resumes_near_an_uninterrupted_one_and_loads_on_the_cpu(tmp_path, data, precision):
    # on CUDA the default precision is bf16 autocast; fp16 adds the gradient scaler (its state is resumed)
    kw = dict(device="cuda", precision=precision, steps=8, checkpoint_every=3, val=str(data["captions"]),
              eval_every=4)  # fmt: skip
    full = run_train(_args(data, tmp_path / "full", **kw))
    assert full["precision"] == (precision or "bf16") and full["steps"] == 8
    args = _args(data, tmp_path / "resumed", **kw)
    with pytest.raises(_Crash):
        run_train(args, loader_factory=_crashing_factory(args.resolved(), after_batches=5))
    resumed = run_train(_args(data, tmp_path / "resumed", resume=True, **kw))
    assert resumed["steps"] == 8
    a, b = (
        [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if r.get("split", "train") == "train"]
        for run in ("full", "resumed")
    )
    assert [r["step"] for r in b] == list(range(1, 9))
    # masks come from the CPU generator and dropout from the restored CUDA generator; GPU kernels
    # (atomics in the embedding gradient, autocast rounding) may still move the losses a little
    for ra, rb in zip(a, b, strict=True):
        assert math.isfinite(ra["loss"]) and rb["loss"] == pytest.approx(ra["loss"], rel=5e-2), ra["step"]
    model = ViLBERTForPretraining.from_pretrained(tmp_path / "resumed")
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())


def test_train_args_record_the_config_that_was_used(tmp_path, data):
    vocab_size = len(data["vocab"].read_text().split())
    pre = tmp_path / "pretrained"
    cfg = ViLBERTConfig.preset("tiny", vocab_size=vocab_size, v_feature_size=DIM, v_target_size=1601)
    ViLBERTForPretraining(cfg).save_pretrained(pre)
    # --config keeps its default (vilbert-base), which a run started from a checkpoint does not use
    run_train(_args(data, tmp_path / "run", config="vilbert-base", init_from=str(pre), steps=2))
    targs = json.loads((tmp_path / "run" / "train_args.json").read_text())
    assert targs["config"] == targs["config_name"] == str((pre / "config.json").resolve())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["hidden_size"] == 32  # tiny, not base
    # resuming it (again without --config) keeps that record
    run_train(_args(data, tmp_path / "run", config="vilbert-base", init_from=str(pre), steps=3, resume=True))
    assert json.loads((tmp_path / "run" / "train_args.json").read_text())["config"] == targs["config"]


def test_the_shipped_demo_config_takes_the_feature_size_of_the_data(tmp_path, data):
    shipped = Path(__file__).resolve().parents[1] / "demo" / "vilbert_demo_config.json"
    assert "v_feature_size" not in json.loads(shipped.read_text())
    run_train(_args(data, tmp_path / "run", config=str(shipped), steps=1))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["v_feature_size"], cfg["hidden_size"], cfg["initializer_range"]) == (DIM, 64, 0.07)
    # a config file that names another size: the error says which number to change, not to re-extract
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps({**json.loads(shipped.read_text()), "v_feature_size": 2048}))
    with pytest.raises(TrainingError, match=r'16-d.*v_feature_size=2048.*"v_feature_size": 16') as err:
        run_train(_args(data, tmp_path / "bad", config=str(pinned), steps=1))
    assert "--feature-layer" not in str(err.value)


def test_resume_clears_the_temp_folders_of_dead_writers_only(tmp_path, data):
    import os
    import subprocess

    out = tmp_path / "run"
    run_train(_args(data, out, steps=2, checkpoint_every=2))
    dead = subprocess.Popen(["true"])
    dead.wait()  # a writer that was killed: its process is gone
    stale = [out / "checkpoints" / f".step-9.tmp-{dead.pid}", out / f".best.tmp-{dead.pid}"]
    live = out / "checkpoints" / f".step-8.tmp-{os.getppid()}"  # a writer still running (this test's parent)
    for folder in (*stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    run_train(_args(data, out, steps=3, checkpoint_every=2, resume=True))
    assert [p.exists() for p in stale] == [False, False] and live.is_dir()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [live.name, "step-2", "step-3"]
