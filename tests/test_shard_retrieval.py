"""Retrieval (Karpathy split json): `shard` records and the 4-candidate training batches."""

from __future__ import annotations

import json

import numpy as np
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.datasets import TaskDataset
from pipelines.shard_job import run_shard
from pipelines.tokenization import TextTokenizer

WORDS = [f"w{i}" for i in range(12)]


def test_karpathy_round_trip_and_candidates(tmp_path) -> None:
    # Flickr30k-style ids (file names are numbers); image 4 is in the val split.
    images = [
        make_image(f"{100 + i}", f"flickr30k-images/{100 + i}.jpg", k=2 + i, dim=4, seed=i) for i in range(5)
    ]
    root = write_feature_set(tmp_path / "f", images)
    karpathy = {"dataset": "flickr30k", "images": [
        {"filename": f"{100 + i}.jpg", "imgid": i, "split": "restval" if i == 3 else ("val" if i == 4 else "train"),
         "sentences": [{"raw": f"w{2 * i} ", "sentid": 2 * i, "tokens": [f"w{2 * i}"]},
                       {"raw": f"w{2 * i + 1}", "sentid": 2 * i + 1, "tokens": [f"w{2 * i + 1}"]}]}
        for i in range(5)]}  # fmt: skip
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    info = run_shard(
        root, "retrieval", [tmp_path / "dataset_flickr30k.json"], "train", tmp_path / "t", progress=False
    )
    assert info["counts"]["images"] == 4 and info["counts"]["records"] == 8  # train + restval
    samples = read_task_samples(tmp_path / "t")
    assert json.loads(samples["101"]["ann.json"]) == [
        {"caption": "w2", "sent_id": 2},
        {"caption": "w3", "sent_id": 3},
    ]
    assert info["counts"]["images_without_annotations"] == 1  # "104" is val

    tok = TextTokenizer.from_pretrained(write_vocab(tmp_path / "v.txt", WORDS))
    examples = list(TaskDataset(tmp_path / "t", "retrieval", tok, batch_size=None, shuffle_buffer=1, seed=3))
    assert len(examples) == 8  # every caption, the first image's included once a second image is seen
    batch = next(iter(TaskDataset(tmp_path / "t", "retrieval", tok, batch_size=8, shuffle_buffer=1, seed=3)))
    assert batch["input_ids"].shape == (8, 4, 3) and batch["image_feat"].shape == (
        8,
        4,
        6,
        4,
    )  # R = 1 + max K
    assert batch["label"].tolist() == [0] * 8
    by_id = {im.image_id: im for im in images}
    for b in range(8):
        own = int(batch["image_id"][b]) - 100
        words = [int(batch["input_ids"][b, c, 1]) - 5 for c in range(4)]  # the caption's single word
        assert (
            words[0] // 2 == own and words[2] == words[0]
        )  # positive caption, also paired with another image
        assert words[1] // 2 != own and words[3] // 2 != own  # negative captions come from other images
        k = by_id[batch["image_id"][b]].features.shape[0]
        own_feat = by_id[batch["image_id"][b]].features.astype(np.float32)
        for c in (0, 1, 3):
            np.testing.assert_array_equal(batch["image_feat"][b, c, 1 : k + 1].numpy(), own_feat)
            assert int(batch["image_mask"][b, c].sum()) == k + 1
        n_other = int(batch["image_mask"][b, 2].sum()) - 1
        other = [
            im for im in images if im.features.shape[0] == n_other and im.image_id != batch["image_id"][b]
        ]
        assert len(other) == 1  # the "other image" candidate is exactly one other image's regions
        np.testing.assert_array_equal(
            batch["image_feat"][b, 2, 1 : n_other + 1].numpy(), other[0].features.astype(np.float32)
        )


def test_retrieval_resampled_one_image_shards(tmp_path) -> None:
    """Resampling may draw the same one-image shard twice in a row: negatives still come from other images."""
    images = [make_image(f"{100 + i}", f"{100 + i}.jpg", k=2 + i, dim=4, seed=i) for i in range(3)]
    root = write_feature_set(tmp_path / "f", images)
    karpathy = {"images": [{"filename": f"{100 + i}.jpg", "split": "train", "sentences": [{"raw": f"w{i}", "sentid": i}]}
                           for i in range(3)]}  # fmt: skip
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    run_shard(root, "retrieval", [tmp_path / "k.json"], "train", tmp_path / "t", shard_size=1, progress=False)
    tok = TextTokenizer.from_pretrained(write_vocab(tmp_path / "v.txt", WORDS))
    ds = TaskDataset(
        tmp_path / "t", "retrieval", tok, batch_size=4, shuffle_buffer=1, resampled=True, steps=6, seed=1
    )
    batches = list(ds)
    assert len(batches) == 6
    for b in batches:
        for i, image_id in enumerate(b["image_id"]):
            own_regions = 2 + int(image_id) - 100 + 1
            assert int(b["image_mask"][i, 0].sum()) == own_regions
            assert int(b["image_mask"][i, 2].sum()) != own_regions  # another image
            assert int(b["input_ids"][i, 1, 1]) - 5 != int(image_id) - 100  # another image's caption
