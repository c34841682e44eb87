"""Whole epochs under DDP: every record once per epoch across ranks, equal steps, 1 shard for N ranks."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from shard_fixtures import write_vocab
from train_fixtures import WORDS, feature_set, vqa_files

from pipelines.datasets import even_record_pieces, make_loader
from pipelines.shard_job import run_shard
from vilbert_core.training.distributed import DistContext
from vilbert_core.training.trainer import TrainArgs, default_loader_factory, run_train

pytestmark = pytest.mark.usefixtures("one_thread")

# image i has 1, 2 or 3 questions: 13 records over 7 images, which no number of ranks divides but 13
QUESTIONS = [(100 + n, i, q, "red") for n, (i, q) in enumerate(
    [(i, f"what color is the car {j}") for i in range(7) for j in range(1 + i % 3)])]  # fmt: skip
IDS = [q for q, *_ in QUESTIONS]
GLOBAL_BATCH = 4  # 2 per rank: ceil(13 / 4) = 4 steps per epoch


def test_even_record_pieces_match_a_padded_strided_plan() -> None:
    for records in ([6, 6, 1], [13], [0, 5, 0, 3], [2], [1, 1, 1, 1, 1]):
        total, starts = sum(records), [sum(records[:i]) for i in range(len(records))]
        for world in (1, 2, 3, 4):
            per_rank = -(-total // world)
            for workers in (1, 2, 3):
                for rank in range(world):
                    got = [starts[s] + i for w in range(workers)
                           for s, lo, hi in even_record_pieces(records, rank, world, w, workers) for i in range(lo, hi)]  # fmt: skip
                    # rank r: the per_rank records from r x per_rank on, wrapping to the first ones
                    assert got == [(rank * per_rank + j) % total for j in range(per_rank)], (records, world, workers)
                    assert all(records[s] > 0 and 0 <= lo < hi <= records[s]
                               for w in range(workers) for s, lo, hi in even_record_pieces(records, rank, world, w, workers))  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """The 13 VQA records as 3 uneven shards (6, 6 and 1 records) and as 1 shard, and a vocabulary."""
    root = tmp_path_factory.mktemp("epochs")
    feats = feature_set(root / "feats", 7)
    files = vqa_files(root, QUESTIONS)
    out = {"vocab": write_vocab(root / "vocab.txt", [*WORDS, "car", "0", "1", "2"]), "root": root}
    for name, size in (("uneven", 3), ("one", 100)):
        run_shard(feats, "vqa", files, "train", root / name, shard_size=size, min_answer_count=1, progress=False)
        out[name] = root / name
    assert [len(json.loads((root / "uneven" / "task.json").read_text())["shards"]),
            len(json.loads((root / "one" / "task.json").read_text())["shards"])] == [3, 1]  # fmt: skip
    return out


def test_ranks_and_workers_read_equal_shares_of_every_record(shards, monkeypatch) -> None:
    per_rank = {}
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        loader = make_loader(shards["uneven"], "vqa", shards["vocab"], batch_size=2, shuffle_buffer=4, num_workers=2,
                             even_split=True)  # fmt: skip
        per_rank[rank] = [b["question_id"].tolist() for b in loader]
    seen = Counter(q for batches in per_rank.values() for b in batches for q in b)
    assert set(seen) == set(IDS) and sum(seen.values()) == 3 * 5  # ceil(13 / 3) = 5 each; 2 padded repeats
    assert {len(batches) for batches in per_rank.values()} == {3}  # workers of 3 and 2 records: 2 + 1 batches


class Recorder:
    """The trainer's own loader, writing the question ids of every batch it hands out (per rank and epoch)."""

    def __init__(self, args: TrainArgs, log_dir: Path) -> None:
        self.args, self.log_dir = args, log_dir

    def __call__(self, source: str, epoch: int, batch_size: int):
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        real = default_loader_factory(self.args.resolved(), DistContext(rank=rank, world_size=world))
        for batch in real(source, epoch, batch_size):
            with open(self.log_dir / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch, "ids": batch["question_id"].tolist()}) + "\n")
            yield batch


def _worker(rank: int, world: int, ports: list[int], runs: list[tuple[TrainArgs, Path]]) -> None:
    """One DDP rank, with the environment torchrun would give it, for several runs in turn (one port each)."""
    import os

    torch.set_num_threads(1)
    for port, (args, log_dir) in zip(ports, runs, strict=True):
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
        run_train(args, loader_factory=Recorder(args, log_dir))


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports nobody listens on."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_two_gloo_ranks_see_every_record_once_per_epoch(shards, tmp_path) -> None:
    """3 shards of 6, 6 and 1 records (split by shards, 2/1 over the ranks) and 1 shard, one spawn for both."""
    runs = []
    for layout in ("uneven", "one"):
        (tmp_path / layout).mkdir()
        args = TrainArgs(task="vqa", data=str(shards[layout]), out=str(tmp_path / layout / "run"),
                         vocab=str(shards["vocab"]), config="tiny", batch_size=GLOBAL_BATCH, steps=8, lr=1e-3,
                         num_workers=0, shuffle_buffer=4, checkpoint_every=100, progress=False)  # fmt: skip
        runs.append((args, tmp_path / layout))
    mp.spawn(_worker, args=(2, _free_ports(len(runs)), runs), nprocs=2, join=True)
    for _, log_dir in runs:
        logs = {r: [json.loads(x) for x in (log_dir / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)}
        for epoch in (0, 1):
            batches = {r: [b["ids"] for b in logs[r] if b["epoch"] == epoch] for r in range(2)}
            assert [len(batches[0]), len(batches[1])] == [4, 4], log_dir  # the same number of steps on both ranks
            seen = Counter(q for r in range(2) for b in batches[r] for q in b)
            # every record, and one of them twice: 13 records padded to 2 x 7, as DistributedSampler pads
            assert set(seen) == set(IDS) and sorted(seen.values()) == [1] * 12 + [2], (log_dir, epoch)
        assert json.loads((log_dir / "run" / "train_args.json").read_text())["world_size"] == 2
