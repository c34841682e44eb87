"""RefCOCO (refer toolkit layout): safe refs pickle, IoU targets by hand, dataset region targets."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.annotations.refer import UnsafePickleError, safe_load_pickle
from pipelines.datasets import TaskDataset
from pipelines.shard_job import run_shard
from pipelines.tokenization import TextTokenizer

BOXES = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30], [0, 0, 20, 20]], np.float32)
# IoU of each box with gt [0,0,10,10]: 1, 25/175, 0, 100/400; with gt [2,2,18,18]: 64/292, 100/256, 0, 256/400.
IOU_A = [1.0, 25 / 175, 0.0, 0.25]
IOU_B = [64 / 292, 100 / 256, 0.0, 0.64]


def refer_files(tmp: Path) -> list[Path]:
    refs = [
        {"ref_id": 0, "ann_id": 100, "image_id": 1, "split": "train", "category_id": 1,
         "file_name": "COCO_train2014_000000000001_100.jpg",
         "sentences": [{"sent_id": 0, "sent": "left dog", "raw": "Left dog!", "tokens": ["left", "dog"]},
                       {"sent_id": 1, "sent": "small dog", "raw": "small dog", "tokens": ["small", "dog"]}]},
        {"ref_id": 1, "ann_id": 101, "image_id": 1, "split": "train", "category_id": 1,
         "file_name": "COCO_train2014_000000000001_101.jpg",
         "sentences": [{"sent_id": 2, "sent": "big dog", "raw": "big dog", "tokens": ["big", "dog"]}]},
        {"ref_id": 2, "ann_id": 102, "image_id": 2, "split": "testA", "category_id": 1,
         "file_name": "COCO_train2014_000000000002_102.jpg",
         "sentences": [{"sent_id": 3, "sent": "man", "raw": "man", "tokens": ["man"]}]},
    ]  # fmt: skip
    (tmp / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": 100, "image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1},
                        {"id": 101, "image_id": 1, "bbox": [2, 2, 16, 16], "category_id": 1},
                        {"id": 102, "image_id": 2, "bbox": [1, 1, 5, 5], "category_id": 1}],
    }  # fmt: skip
    (tmp / "instances.json").write_text(json.dumps(instances))
    return [tmp / "refs(unc).p", tmp / "instances.json"]


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("feats")
    im = make_image(
        "COCO_train2014_000000000001", "train2014/COCO_train2014_000000000001.jpg", k=4, dim=4, seed=0
    )
    im.boxes = BOXES
    return write_feature_set(root, [im])


class Evil:
    """A pickle payload that would create a file when unpickled by a plain `pickle.load`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_safe_unpickler_refuses_malicious_refs_pickle(tmp_path, feats) -> None:
    target = tmp_path / "pwned"
    evil = tmp_path / "refs(unc).p"
    evil.write_bytes(pickle.dumps([{"ref_id": 0, "payload": Evil(str(target))}], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p: unsafe pickle: refused global"):
        safe_load_pickle(evil)
    assert not target.exists()  # nothing ran
    (tmp_path / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(UnsafePickleError, match="only plain containers"):
        run_shard(
            feats, "refcoco", [evil, tmp_path / "instances.json"], "train", tmp_path / "t", progress=False
        )
    assert not target.exists()
    # Plain containers still load, including a numpy-free nested structure.
    plain = tmp_path / "plain.p"
    plain.write_bytes(pickle.dumps({"a": [1, 2.5, ("x", None, True)], "b": b"raw", "c": {3}}, protocol=2))
    assert safe_load_pickle(plain) == {"a": [1, 2.5, ("x", None, True)], "b": b"raw", "c": {3}}


def test_refcoco_iou_targets_round_trip(tmp_path, feats) -> None:
    info = run_shard(feats, "refcoco", refer_files(tmp_path), "train", tmp_path / "task", progress=False)
    assert info["counts"]["records"] == 3 and info["counts"]["images"] == 1
    recs = json.loads(read_task_samples(tmp_path / "task")["COCO_train2014_000000000001"]["ann.json"])
    assert [(r["ref_id"], r["sent_id"], r["sentence"]) for r in recs] == [
        (0, 0, "left dog"), (0, 1, "small dog"), (1, 2, "big dog")]  # fmt: skip
    assert recs[0]["gt_box"] == [0.0, 0.0, 10.0, 10.0] and recs[2]["gt_box"] == [2.0, 2.0, 18.0, 18.0]
    np.testing.assert_allclose(recs[0]["iou"], IOU_A, atol=1e-6)
    np.testing.assert_allclose(recs[2]["iou"], IOU_B, atol=1e-6)

    tok = TextTokenizer.from_pretrained(write_vocab(tmp_path / "v.txt", ["left", "small", "big", "dog"]))
    batch = next(
        iter(TaskDataset(tmp_path / "task", "refcoco", tok, batch_size=4, shuffle_buffer=1, max_regions=3))
    )
    assert batch["ref_id"] == [0, 0, 1] and batch["image_feat"].shape == (3, 4, 4)
    # Region 0 is [IMG] (IoU 0); only the first 3 regions are kept; targets zero below 0.5.
    np.testing.assert_allclose(batch["region_iou"][0].numpy(), [0.0, *IOU_A[:3]], atol=1e-6)
    np.testing.assert_allclose(batch["region_target"][0].numpy(), [0.0, 1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(batch["region_iou"][2].numpy(), [0.0, *IOU_B[:3]], atol=1e-6)
    assert not batch["region_target"][2].any()  # 0.64 was the 4th region, cut by max_regions=3
    np.testing.assert_allclose(batch["gt_box"][2].numpy(), [2, 2, 18, 18])
    assert batch["input_ids"][2, :4].tolist() == [2, 7, 8, 3]  # [CLS] big dog [SEP]


def test_refcoco_unknown_split_lists_the_splits(tmp_path, feats) -> None:
    with pytest.raises(ValueError, match=r"no ref in split 'val'; splits present: testA, train"):
        run_shard(feats, "refcoco", refer_files(tmp_path), "val", tmp_path / "task", progress=False)
