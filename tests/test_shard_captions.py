"""Captions (pretraining): COCO json / TSV / JSONL through `shard` and the dataset, checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.annotations import AnnotationError
from pipelines.datasets import TaskDataset
from pipelines.shard_job import run_shard
from pipelines.tokenization import TextTokenizer

WORDS = ["a", "dog", "runs", "brown", "two", "cats", "broken", "photo", "lost"]
SRC = "train2014/COCO_train2014_{:012d}.jpg"


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("feats")
    images = [
        make_image("train2014_COCO_train2014_000000000001", SRC.format(1), k=5, dim=8, seed=1),
        make_image("train2014_COCO_train2014_000000000002", SRC.format(2), k=40, dim=8, seed=2),
        make_image("train2014_COCO_train2014_000000000003", SRC.format(3), k=3, dim=8, seed=3),
    ]
    write_feature_set(root, images, failed=(SRC.format(9),))
    return root, {im.image_id: im for im in images}


def write_coco(path: Path) -> Path:
    files = {i: SRC.format(i).split("/")[1] for i in (1, 2, 7, 9)}
    caps = [
        (1, "A dog runs."),
        (2, "two cats"),
        (1, "a brown dog"),
        (9, "a broken photo"),
        (7, "a lost photo"),
    ]
    path.write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": f} for i, f in files.items()],
                "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(caps)],
            }
        )
    )
    return path


def test_coco_captions_round_trip(tmp_path, feats) -> None:
    root, images = feats
    ann = write_coco(tmp_path / "captions_train2014.json")
    info = run_shard(root, "captions", [ann], "train", tmp_path / "task", shard_size=1, progress=False)
    c = info["counts"]
    assert (c["images"], c["records"], c["annotations"], c["annotations_without_features"]) == (2, 3, 5, 2)
    assert c["images_without_annotations"] == 1 and info["shards"] == ["task-000000.tar", "task-000001.tar"]
    assert info["features"]["feature_dim"] == 8 and info["features"]["feature_layer"] == "res4"
    samples = read_task_samples(tmp_path / "task")
    a, b = "train2014_COCO_train2014_000000000001", "train2014_COCO_train2014_000000000002"
    assert sorted(samples) == [a, b]
    assert json.loads(samples[a]["ann.json"]) == [{"caption": "A dog runs."}, {"caption": "a brown dog"}]
    assert json.loads(samples[b]["ann.json"]) == [{"caption": "two cats"}]
    assert json.loads(samples[a]["meta.json"]) == {"image_id": a, "width": 100, "height": 80, "num_boxes": 5}
    from pipelines.formats.npy import load_npy

    np.testing.assert_array_equal(load_npy(samples[b]["features.npy"]), images[b].features)
    np.testing.assert_array_equal(load_npy(samples[b]["cls_prob.npy"]), images[b].cls_prob)
    # The missing-image report: the failed image and the one never extracted, by name, with the text.
    missing = [
        json.loads(line) for line in (tmp_path / "task/report/missing_images.jsonl").read_text().splitlines()
    ]
    assert sorted((m["image"], m["reason"], m["text"]) for m in missing) == [
        ("COCO_train2014_000000000007.jpg", "missing", "a lost photo"),
        ("COCO_train2014_000000000009.jpg", "missing", "a broken photo"),
    ]
    no_ann = (tmp_path / "task/report/images_without_annotations.txt").read_text()
    assert no_ann == "train2014_COCO_train2014_000000000003\n"


def test_tsv_and_jsonl_give_the_same_samples(tmp_path, feats) -> None:
    root, _ = feats
    tsv = tmp_path / "cc.tsv"
    tsv.write_text(
        "caption\turl\n"
        "A dog runs.\thttp://host/x/COCO_train2014_000000000001.jpg\n"
        "two cats\tCOCO_train2014_000000000002.jpg\n"
        "a brown dog\ttrain2014/COCO_train2014_000000000001.jpg\n"
    )
    jsonl = tmp_path / "caps.jsonl"
    rows = [
        {"image": "COCO_train2014_000000000001.jpg", "caption": "A dog runs."},
        {"image": 2, "caption": "two cats"},  # a numeric COCO id
        {"image": "train2014/COCO_train2014_000000000001", "caption": "a brown dog"},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_shard(root, "captions", [tsv], "train", tmp_path / "t1", progress=False)
    run_shard(root, "captions", [jsonl], "train", tmp_path / "t2", progress=False)
    s1, s2 = read_task_samples(tmp_path / "t1"), read_task_samples(tmp_path / "t2")
    assert {k: json.loads(v["ann.json"]) for k, v in s1.items()} == {
        "train2014_COCO_train2014_000000000001": [{"caption": "A dog runs."}, {"caption": "a brown dog"}],
        "train2014_COCO_train2014_000000000002": [{"caption": "two cats"}],
    }
    assert {k: v["ann.json"] for k, v in s1.items()} == {k: v["ann.json"] for k, v in s2.items()}


def test_malformed_files_name_the_file_and_first_bad_record(tmp_path, feats) -> None:
    root, _ = feats
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"images": [], "annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 2}]})
    )
    with pytest.raises(AnnotationError, match=r"bad\.json: annotations\[1\]: missing field\(s\) caption"):
        run_shard(root, "captions", [bad], "train", tmp_path / "t", progress=False)
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("a dog\tx.jpg\nno tab here\n")
    with pytest.raises(AnnotationError, match=r"bad\.tsv: line 2"):
        run_shard(root, "captions", [tsv], "train", tmp_path / "t", progress=False)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", "caption": \n')
    with pytest.raises(AnnotationError, match=r"bad\.jsonl: line 2: not valid JSON"):
        run_shard(root, "captions", [jsonl], "train", tmp_path / "t", progress=False)


def test_dataset_batch_regions_text_and_masks(tmp_path, feats) -> None:
    root, images = feats
    run_shard(root, "captions", [write_coco(tmp_path / "c.json")], "train", tmp_path / "task", progress=False)
    vocab = write_vocab(tmp_path / "vocab.txt", WORDS)
    tok = TextTokenizer.from_pretrained(vocab)
    ds = TaskDataset(tmp_path / "task", "captions", tok, batch_size=8, shuffle_buffer=1, seed=0)
    batch = next(iter(ds))
    assert batch["input_ids"].shape[0] == 3 and batch["image_feat"].shape == (3, 37, 8)
    ids = {w: i + 5 for i, w in enumerate(WORDS)}
    expected_text = {
        "A dog runs.": [2, ids["a"], ids["dog"], ids["runs"], 5 + len(WORDS), 3],
        "a brown dog": [2, ids["a"], ids["brown"], ids["dog"], 3],
        "two cats": [2, ids["two"], ids["cats"], 3],
    }
    own = {
        "train2014_COCO_train2014_000000000001": {"A dog runs.", "a brown dog"},
        "train2014_COCO_train2014_000000000002": {"two cats"},
    }
    for i, image_id in enumerate(batch["image_id"]):
        n_tok = int(batch["attention_mask"][i].sum())
        toks = batch["input_ids"][i, :n_tok].tolist()
        assert batch["input_ids"][i, n_tok:].eq(0).all() and batch["token_type_ids"][i].eq(0).all()
        caption = next(c for c, t in expected_text.items() if t == toks)
        assert (caption in own[image_id]) == bool(batch["align_label"][i])
        im = images[image_id]
        k = min(im.features.shape[0], 36)
        feat = batch["image_feat"][i].numpy()
        np.testing.assert_allclose(
            feat[0], im.features.astype(np.float32).mean(0), rtol=1e-5
        )  # over ALL regions
        np.testing.assert_array_equal(feat[1 : k + 1], im.features[:k].astype(np.float32))
        assert not feat[k + 1 :].any()
        assert batch["image_mask"][i].tolist() == [1] * (k + 1) + [0] * (36 - k)
        loc = batch["image_loc"][i].numpy()
        np.testing.assert_array_equal(loc[0], [0, 0, 1, 1, 1])
        np.testing.assert_array_equal(loc[1 : k + 1], im.spatial[:k])
        target = batch["image_target"][i].numpy()
        assert not target[0].any() and not target[k + 1 :].any()
        np.testing.assert_array_equal(target[1 : k + 1], im.cls_prob[:k].astype(np.float32))


def test_alignment_negatives_are_other_images_captions(tmp_path) -> None:
    words = [f"w{i}" for i in range(40)]
    images = [make_image(f"img{i:02d}", f"img{i:02d}.jpg", k=2, dim=4, seed=i) for i in range(40)]
    root = write_feature_set(tmp_path / "f", images, per_shard=10)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"image": f"img{i:02d}.jpg", "caption": f"w{i}"}) + "\n" for i in range(40))
    )
    run_shard(root, "captions", [jsonl], "train", tmp_path / "task", progress=False)
    tok = TextTokenizer.from_pretrained(write_vocab(tmp_path / "v.txt", words))
    labels = []
    for seed in (0, 1):
        ds = TaskDataset(tmp_path / "task", "captions", tok, batch_size=None, shuffle_buffer=8, seed=seed)
        run = [(ex["image_id"], ex["texts"][0][0][1] - 5, ex["align_label"]) for ex in ds]
        assert sorted(r[0] for r in run) == [f"img{i:02d}" for i in range(40)]  # one example per caption
        for image_id, word, aligned in run:
            assert (word == int(image_id[3:])) == bool(aligned)  # a negative never uses its own caption
        labels.append([r[2] for r in run])
    assert 10 <= sum(labels[0]) <= 30  # about half replaced
    assert labels[0] != labels[1]  # seeded: another seed draws other pairs
    again = [ex["align_label"] for ex in TaskDataset(tmp_path / "task", "captions", tok, batch_size=None,
                                                       shuffle_buffer=8, seed=0)]  # fmt: skip
    assert again == labels[0]


def test_vocab_without_bert_specials_is_a_clear_error(tmp_path: Path) -> None:
    """A vocab.txt lacking [SEP]/[CLS] is a ValueError naming the file, not a tokenizers TypeError."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "a", "red", "circle"]) + "\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        TextTokenizer.from_pretrained(vocab)
