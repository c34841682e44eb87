"""2-process gloo DDP == one process with the same global batch; gradient accumulation == one big batch."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train_overfit import VOCAB, D, make_batch

from vilbert_core import ViLBERTConfig, ViLBERTForTasks
from vilbert_core.training.metrics_log import read_metrics
from vilbert_core.training.trainer import TrainArgs, run_train

GLOBAL_BATCH, BATCHES_PER_EPOCH, NUM_ANSWERS = 8, 2, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def global_batches(source: str, epoch: int, batch_size: int):
    """This rank's micro-batches of fixed global batches: rank r takes the r-th slice of each."""
    rank, world = 0, 1
    if torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    share = GLOBAL_BATCH // world
    for i in range(BATCHES_PER_EPOCH):
        full = make_batch("vqa", b=GLOBAL_BATCH, seed=100 * epoch + i, num_answers=NUM_ANSWERS)
        mine = {k: v[rank * share : (rank + 1) * share] for k, v in full.items()}
        for start in range(0, share, batch_size):
            yield {k: v[start : start + batch_size] for k, v in mine.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A VQA task folder (task.json + answers.json), a vocab and a tiny config without dropout."""
    root = tmp_path_factory.mktemp("ddp")
    data = root / "vqa"
    data.mkdir()
    (data / "answers.json").write_text(json.dumps([f"ans{i}" for i in range(NUM_ANSWERS)]))
    info = {
        "task": "vqa",
        "counts": {"records": 16},
        "features": {"feature_dim": D},
        "answer_vocab": "answers.json",
    }
    (data / "task.json").write_text(json.dumps(info))
    vocab = root / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)])
    )
    # no dropout: each process draws its own dropout masks, which would differ from one process
    cfg = ViLBERTConfig.preset(
        "tiny", vocab_size=VOCAB, v_feature_size=D, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        v_hidden_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    cfg.to_json_file(root / "config.json")
    return {"data": data, "vocab": vocab, "config": root / "config.json"}


def _args(setup: dict[str, Path], out: Path, **kw) -> TrainArgs:
    """Four steps of VQA on the fixed global batches."""
    base = dict(
        task="vqa", data=str(setup["data"]), out=str(out), vocab=str(setup["vocab"]), config=str(setup["config"]),
        batch_size=GLOBAL_BATCH, steps=4, lr=2e-3, warmup=1, checkpoint_every=100, progress=False, num_workers=0,
    )  # fmt: skip
    base.update(kw)
    return TrainArgs(**base)


def _worker(rank: int, world: int, port: int, args: TrainArgs) -> None:
    """One DDP rank, with the environment torchrun would give it."""
    import os

    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )  # fmt: skip
    torch.set_num_threads(1)
    run_train(args, loader_factory=global_batches)


def _free_port() -> int:
    """A TCP port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compare(run_a: Path, run_b: Path) -> None:
    """Same logged losses and learning rates, and the same final weights."""
    a, b = read_metrics(run_a / "metrics.jsonl"), read_metrics(run_b / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["lr"] == pytest.approx(rb["lr"])
        assert ra["samples"] == rb["samples"]
    ma = ViLBERTForTasks.from_pretrained(run_a).state_dict()
    mb = ViLBERTForTasks.from_pretrained(run_b).state_dict()
    for name in ma:
        torch.testing.assert_close(ma[name], mb[name], rtol=1e-4, atol=1e-5, msg=name)
    # the run really learned something: weights moved away from the start
    assert a[-1]["loss"] < a[0]["loss"]


def test_two_process_gloo_ddp_matches_single_process(tmp_path, setup):
    run_train(_args(setup, tmp_path / "single"), loader_factory=global_batches)
    args = _args(setup, tmp_path / "ddp")
    mp.spawn(_worker, args=(2, _free_port(), args), nprocs=2, join=True)
    assert json.loads((tmp_path / "ddp" / "train_args.json").read_text())["world_size"] == 2
    _compare(tmp_path / "single", tmp_path / "ddp")


def test_gradient_accumulation_matches_one_big_batch(tmp_path, setup):
    run_train(_args(setup, tmp_path / "big"), loader_factory=global_batches)
    run_train(_args(setup, tmp_path / "accum", grad_accum=4), loader_factory=global_batches)
    _compare(tmp_path / "big", tmp_path / "accum")
