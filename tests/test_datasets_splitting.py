"""Node/worker splitting (disjoint, complete), resampled equal batch counts, and the feature-size check."""

from __future__ import annotations

import json

import pytest
from shard_fixtures import make_image, write_feature_set, write_vocab

from pipelines.datasets import TaskDataset, batches_for_worker, make_loader, split_shards
from pipelines.shard_job import run_shard
from pipelines.tokenization import TextTokenizer


def test_split_shards_disjoint_and_complete() -> None:
    urls = [f"s{i}" for i in range(11)]
    for world in (1, 2, 3):
        for workers in (1, 2, 4):
            parts = [split_shards(urls, r, world, w, workers) for r in range(world) for w in range(workers)]
            flat = [u for p in parts for u in p]
            assert sorted(flat) == sorted(urls) and len(flat) == len(set(flat))
            # Plain-loop expectation: shard i goes to rank i % world, then worker (i // world) % workers.
            for r in range(world):
                for w in range(workers):
                    want = [u for i, u in enumerate(urls) if i % world == r and (i // world) % workers == w]
                    assert split_shards(urls, r, world, w, workers) == want
    assert [batches_for_worker(7, w, 3) for w in range(3)] == [3, 2, 2]


@pytest.fixture(scope="module")
def taskdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("split")
    images = [make_image(f"img{i:02d}", f"img{i:02d}.jpg", k=3, dim=4, seed=i) for i in range(10)]
    root = write_feature_set(tmp / "f", images)
    jsonl = tmp / "c.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"image": f"img{i:02d}.jpg", "caption": f"w{i}"}) + "\n" for i in range(10))
    )
    run_shard(root, "captions", [jsonl], "train", tmp / "t", shard_size=1, progress=False)  # 10 shards
    tok = TextTokenizer.from_pretrained(write_vocab(tmp / "v.txt", [f"w{i}" for i in range(10)]))
    return tmp / "t", tok


def test_ranks_and_workers_cover_every_sample_once(taskdir, monkeypatch) -> None:
    task, tok = taskdir
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = make_loader(task, "captions", tok, batch_size=2, shuffle_buffer=4, num_workers=2)
        ids = [i for batch in loader for i in batch["image_id"]]
        assert len(ids) == 5  # 5 shards per rank, one image each
        seen.append(ids)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"img{i:02d}" for i in range(10)]


def test_resampled_ranks_yield_equal_batch_counts(taskdir, monkeypatch) -> None:
    task, tok = taskdir
    runs = []
    for rank in range(3):  # 10 shards do not divide by 3 ranks x 2 workers: counts must still match
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        loader = make_loader(task, "captions", tok, batch_size=3, shuffle_buffer=2, resampled=True, steps=5,
                             num_workers=2)  # fmt: skip
        assert len(loader) == 5
        batches = list(loader)
        assert len(batches) == 5 and all(len(b["image_id"]) == 3 for b in batches)
        runs.append([i for b in batches for i in b["image_id"]])
    assert runs[0] != runs[1]  # ranks draw differently


def test_brace_pattern_and_mixed_feature_sizes(tmp_path, taskdir) -> None:
    task, tok = taskdir
    pattern = str(task / "task-{000000..000009}.tar")
    ds = TaskDataset(pattern, "captions", tok, batch_size=None, shuffle_buffer=1)
    assert sorted(ex["image_id"] for ex in ds) == [f"img{i:02d}" for i in range(10)]
    # A res5 (16-d) task dir next to the res4 (4-d) one: refused up front, naming both.
    im = make_image("big", "big.jpg", k=2, dim=16, seed=0)
    root = write_feature_set(tmp_path / "f5", [im], layer="res5")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "big.jpg", "caption": "w1"}) + "\n")
    run_shard(root, "captions", [tmp_path / "c.jsonl"], "train", tmp_path / "t5", progress=False)
    with pytest.raises(ValueError, match=r"t5/task.json: 16-d features \(res5\).*different layers"):
        TaskDataset([task, tmp_path / "t5"], "captions", tok)
    # Bare shard paths carry no task.json: the first sample sets D and a different one fails clearly.
    urls = [str(task / "task-000000.tar"), str(tmp_path / "t5/task-000000.tar")]
    with pytest.raises(ValueError, match="sample big has 16-d region features.*cannot be mixed"):
        list(TaskDataset(urls, "captions", tok, batch_size=None, shuffle_buffer=1))
