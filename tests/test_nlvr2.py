"""NLVR2 through the registry: reader (official jsonl), shard (the second image's regions beside the first's),
two-image batches, training steps, eval with the leaderboard CSV, the metric against hand-worked numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.annotations import AnnotationError
from pipelines.datasets import TaskDataset
from pipelines.formats.npy import load_npy
from pipelines.shard_job import run_shard
from pipelines.tasks.nlvr2 import pair_images, read_nlvr2
from pipelines.tokenization import TextTokenizer
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.tasks._labels import class_accuracy
from vilbert_core.tasks.nlvr2 import leaderboard_csv
from vilbert_core.training.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = ["train-10171-0", "train-10171-1", "train-2-0"]
WORDS = ["there", "are", "two", "dogs", "one", "image", "has", "a", "bird", "left", "more", "cats"]
EXAMPLES = [  # (identifier, sentence, label) as in train.json
    ("train-10171-0-0", "There are two dogs.", "True"),
    ("train-10171-0-1", "One image has a bird.", "False"),
    ("train-10171-1-0", "There are two dogs.", "False"),
    ("train-2-0-0", "The left image has more cats.", "True"),
    ("train-2-0-1", "One image has a bird.", "True"),
]


def write_jsonl(path: Path, examples: list[tuple[str, str, str | None]]) -> Path:
    """NLVR2's layout: one object a line, with the urls and extra fields of the release."""
    lines = []
    for identifier, sentence, label in examples:
        rec = {"identifier": identifier, "sentence": sentence, "validation": {}, "directory": "7",
               "left_url": f"http://x/{identifier}-l.jpg", "right_url": f"http://x/{identifier}-r.jpg",
               "extra_validations": {}, "synset": "dog", "query": "dogs", "writer": "1"}  # fmt: skip
        if label is not None:
            rec["label"] = label
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def nlvr2(tmp_path_factory) -> dict:
    """Six images (three pairs; per_shard=3 puts one pair's images in two tars), the training examples sharded."""
    root = tmp_path_factory.mktemp("nlvr2")
    names = [f"{p}-img{i}" for p in PAIRS for i in (0, 1)]
    images = [make_image(n, f"nlvr2/train/7/{n}.png", k=3 + j, dim=16, seed=j) for j, n in enumerate(names)]
    feats = write_feature_set(root / "feats", images, per_shard=3)
    train = root / "train"
    run_shard(feats, "nlvr2", [write_jsonl(root / "train.json", EXAMPLES)], "train", train, shard_size=2,
              progress=False)  # fmt: skip
    return {"feats": feats, "train": train, "root": root, "images": {im.image_id: im for im in images},
            "vocab": write_vocab(root / "vocab.txt", WORDS)}  # fmt: skip


def test_reader_takes_the_official_layout(tmp_path: Path) -> None:
    assert pair_images("dev-850-0-0") == ("dev-850-0-img0.png", "dev-850-0-img1.png")
    anns = read_nlvr2([write_jsonl(tmp_path / "t.json", [*EXAMPLES[:2], ("test1-5-1-3", "A bird.", None)])])
    assert [a.ref.path for a in anns] == ["train-10171-0-img0.png", "train-10171-0-img0.png", "test1-5-1-img0.png"]
    assert anns[0].record == {"identifier": "train-10171-0-0", "sentence": "There are two dogs.", "label": 1,
                              "right_image": "train-10171-0-img1.png"}  # fmt: skip
    assert [a.record["label"] for a in anns] == [1, 0, -1]  # a test file without labels
    with pytest.raises(AnnotationError, match=r"bad\.json: line 2: label 'yes' must be"):
        read_nlvr2([write_jsonl(tmp_path / "bad.json", [EXAMPLES[0], ("dev-1-0-0", "x", "yes")])])
    (tmp_path / "id.json").write_text(json.dumps({"identifier": "dev-1", "sentence": "x"}) + "\n")
    with pytest.raises(AnnotationError, match=r"id\.json: line 1: identifier 'dev-1' is not"):
        read_nlvr2([tmp_path / "id.json"])


def test_shard_stores_the_second_image_beside_the_first(nlvr2: dict) -> None:
    samples = read_task_samples(nlvr2["train"])
    assert sorted(samples) == [f"{p}-img0" for p in PAIRS]  # examples are filed under their first image
    for key, sample in samples.items():
        right = nlvr2["images"][key[:-1] + "1"]
        np.testing.assert_array_equal(load_npy(sample["right_features.npy"]), right.features)
        np.testing.assert_array_equal(load_npy(sample["right_spatial.npy"]), right.spatial)
        records = json.loads(sample["ann.json"])
        assert {r["identifier"] for r in records} == {e[0] for e in EXAMPLES if e[0].startswith(key[:-5])}
    info = json.loads((nlvr2["train"] / "task.json").read_text())
    assert info["counts"]["records"] == len(EXAMPLES) and info["counts"]["failed"] == 0


def test_a_missing_second_image_is_a_failure_naming_it(nlvr2: dict) -> None:
    out = nlvr2["root"] / "lonely"
    run_shard(nlvr2["feats"], "nlvr2", [write_jsonl(nlvr2["root"] / "x.json", [("train-2-1-0", "x", "True")])],
              "train", out, progress=False)  # fmt: skip
    failures = [json.loads(line) for line in (out / "report" / "failures.jsonl").read_text().splitlines()]
    assert failures == []  # train-2-1-img0 has no features either: reported as missing, not failed
    feats = nlvr2["root"] / "half"
    im = nlvr2["images"]["train-2-0-img0"]
    write_feature_set(feats, [im])
    run_shard(feats, "nlvr2", [nlvr2["root"] / "train.json"], "train", out, progress=False)
    failures = [json.loads(line) for line in (out / "report" / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and "second image train-2-0-img1.png of train-2-0-0 has no features" in failures[0]["error"]


def test_batches_hold_both_images_first_image_first(nlvr2: dict) -> None:
    tok = TextTokenizer.from_pretrained(nlvr2["vocab"])
    ds = TaskDataset(nlvr2["train"], "nlvr2", tok, batch_size=5, shuffle_buffer=1, seed=0)
    batch = next(iter(ds))
    assert batch["image_feat"].shape[:2] == (5, 2) and batch["input_ids"].ndim == 2
    for i, identifier in enumerate(batch["identifier"]):
        pair = identifier.rsplit("-", 1)[0]
        for side in (0, 1):
            im = nlvr2["images"][f"{pair}-img{side}"]
            k = im.features.shape[0]
            np.testing.assert_allclose(batch["image_feat"][i, side, 1 : k + 1].numpy(), im.features.astype(np.float32))
            assert int(batch["image_mask"][i, side].sum()) == k + 1
        assert batch["label"][i].item() == {"True": 1, "False": 0}[dict((e[0], e[2]) for e in EXAMPLES)[identifier]]


def test_metric_and_leaderboard_file_against_hand_worked_examples() -> None:
    # labels False, True, True, unknown; predictions True, True, False, True -> 1 right of 3 labelled
    got = class_accuracy([1, 1, 0, 1], [0, 1, 1, -1], ("False", "True"))
    assert got == {"accuracy": pytest.approx(100 / 3), "per_class": {"False": 0.0, "True": 50.0}, "num_scored": 3}
    preds = [{"identifier": "test1-0-1-0", "prediction": "True"}, {"identifier": "test1-0-1-1", "prediction": "False"}]
    assert leaderboard_csv(preds) == "test1-0-1-0,True\ntest1-0-1-1,False\n"


def test_train_a_few_steps_then_eval_writes_the_leaderboard_csv(nlvr2: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = run_train(task="nlvr2", data=str(nlvr2["train"]), out=str(run), vocab=str(nlvr2["vocab"]),
                        config="tiny", steps=3, batch_size=2, lr=1e-3, warmup=0.0, num_workers=0, progress=False,
                        device="cpu", max_text_len=16)  # fmt: skip
    assert summary["steps"] == 3
    res = run_eval("nlvr2", run, nlvr2["train"], tmp_path / "report", batch_size=2, device="cpu", progress=False)
    split = res["splits"]["train"]
    preds = json.loads((tmp_path / "report" / "nlvr2_predictions_train.json").read_text())
    labels = {e[0]: e[2] for e in EXAMPLES}
    assert sorted(p["identifier"] for p in preds) == sorted(labels)
    hits = [p["prediction"] == labels[p["identifier"]] for p in preds]
    assert split["accuracy"] == pytest.approx(100 * sum(hits) / len(hits))
    csv = (tmp_path / "report" / "nlvr2_predictions_train.csv").read_text().splitlines()
    assert csv == [f"{p['identifier']},{p['prediction']}" for p in preds]
    assert "shuffled_images" in split and split["baselines"]["chance"]["accuracy"] == 50.0
    assert "NLVR2 accuracy" in (tmp_path / "report" / "report.md").read_text()
