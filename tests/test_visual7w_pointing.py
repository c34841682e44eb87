"""Visual7W pointing: reader (dataset_v7w_pointing.json), shard with the candidate boxes through the detector's
given-box mode (tiny random weights), batches, a few training steps, eval, and the metric by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.annotations import AnnotationError
from pipelines.datasets import TaskDataset
from pipelines.formats.npy import load_npy
from pipelines.shard_job import run_shard
from pipelines.tasks.visual7w_pointing import read_visual7w_pointing
from pipelines.tokenization import TextTokenizer
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.tasks import MODEL_KEYS
from vilbert_core.tasks._pointing import candidate_region_logits, pointing_accuracy
from vilbert_core.tasks.visual7w_pointing import TASK
from vilbert_core.training.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["which", "is", "the", "dog", "cup", "red", "car"]
# box id -> (x, y, width, height) in a 64 x 48 image
BOXES = {11: (2, 4, 20, 10), 12: (30, 5, 10, 10), 13: (0, 0, 64, 48), 14: (10, 20, 15, 20), 15: (40, 30, 8, 8),
         16: (5, 5, 5, 5), 21: (1, 1, 30, 30), 22: (20, 10, 20, 20), 23: (33, 3, 12, 40), 24: (2, 30, 50, 10),
         31: (0, 0, 10, 10), 32: (1, 1, 10, 10), 33: (2, 2, 10, 10), 34: (3, 3, 10, 10)}  # fmt: skip
IMAGES = [  # (image id, split, [(qa_id, question, answer, multiple_choices)])
    (101, "train", [(1001, "Which is the dog?", 11, [13, 12, 14]), (1002, "Which is the cup?", 14, [16, 11, 15])]),
    (102, "train", [(1003, "Which is the red car?", 23, [24, 21, 22])]),
    (103, "val", [(1004, "Which is the cup?", 31, [32, 33, 34])]),
]  # fmt: skip
# by hand: the 4 candidates sorted by box id, and the answer's place among them
EXPECTED = {1001: ([11, 12, 13, 14], 0), 1002: ([11, 14, 15, 16], 1), 1003: ([21, 22, 23, 24], 2)}


def corners(box_id: int) -> list[float]:
    """The xyxy corners of a box of BOXES."""
    x, y, w, h = BOXES[box_id]
    return [x, y, x + w, y + h]


def write_dataset(path: Path) -> Path:
    """dataset_v7w_pointing.json in the release layout."""
    images = [{"image_id": i, "filename": f"v7w_{i}.jpg", "split": split, "height": 48, "width": 64,
               "qa_pairs": [{"qa_id": q, "image_id": i, "question": text, "answer": a, "multiple_choices": mc,
                             "type": "which"} for q, text, a, mc in qas]} for i, split, qas in IMAGES]  # fmt: skip
    boxes = [{"box_id": b, "image_id": b // 10 + 90, "x": x, "y": y, "width": w, "height": h, "name": "thing"}
             for b, (x, y, w, h) in BOXES.items()]  # fmt: skip
    path.write_text(json.dumps({"images": images, "boxes": boxes}))
    return path


@pytest.fixture(scope="module")
def v7w(tmp_path_factory) -> dict:
    """Images, their feature set, the train split sharded with a random-weight detector, a vocab."""
    extract = pytest.importorskip("extract")
    root = tmp_path_factory.mktemp("v7w")
    (root / "images").mkdir()
    feats = []
    for k, (i, _, _) in enumerate(IMAGES[:2]):
        pixels = np.random.default_rng(k).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"v7w_{i}.jpg")
        feats.append(make_image(f"v7w_{i}", f"images/v7w_{i}.jpg", k=3, dim=1024, seed=k, w=64, h=48))
    fs = write_feature_set(root / "feats", feats)
    ann = write_dataset(root / "dataset_v7w_pointing.json")
    cfg = extract.DetectorConfig(depth=50, min_size=48, max_size=64)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        info = run_shard(fs, "visual7w_pointing", [ann], "train", root / "train", shard_size=1,
                         images=root / "images", detector_config=cfg, device="cpu", progress=False)  # fmt: skip
    return {"root": root, "ann": ann, "train": root / "train", "info": info, "feats": feats,
            "vocab": write_vocab(root / "vocab.txt", WORDS)}  # fmt: skip


def test_reader_takes_the_split_and_sorts_the_candidates(v7w: dict) -> None:
    anns = read_visual7w_pointing([v7w["ann"]], "train", v7w["root"] / "images")
    assert [a.ref.path for a in anns] == ["v7w_101.jpg", "v7w_101.jpg", "v7w_102.jpg"]
    assert anns[0].ref.numeric_id == 101 and anns[0].extra["image"] == str(v7w["root"] / "images" / "v7w_101.jpg")
    for a in anns:
        ids, label = EXPECTED[a.record["qa_id"]]
        assert a.record["candidate_ids"] == ids and a.record["label"] == label
        assert a.record["candidate_boxes"] == [corners(b) for b in ids]
        assert a.record["candidate_ids"][a.record["label"]] == a.record["answer_id"]
    assert [a.record["qa_id"] for a in read_visual7w_pointing([v7w["ann"]], "val", "imgs")] == [1004]


def test_bad_inputs_name_the_file_and_record(tmp_path: Path) -> None:
    ann = write_dataset(tmp_path / "d.json")
    with pytest.raises(AnnotationError, match=r"no images of split 'testA'; the files have train, val$"):
        read_visual7w_pointing([ann], "testA", "imgs")
    with pytest.raises(AnnotationError, match="needs --images"):
        read_visual7w_pointing([ann], "train", None)
    data = json.loads(ann.read_text())
    data["images"][1]["qa_pairs"][0]["multiple_choices"] = [24, 21, 99]
    ann.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"d\.json: images\[1\]\.qa_pairs\[0\] \(qa_id 1003\): box id 99 is not"):
        read_visual7w_pointing([ann], "train", "imgs")
    data["boxes"][0]["width"] = "wide"
    ann.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"d\.json: boxes\[0\] \(box_id 11\): needs numeric x, y, width"):
        read_visual7w_pointing([ann], "train", "imgs")


def test_shard_stores_the_candidate_boxes_first_in_the_batches(v7w: dict) -> None:
    info = v7w["info"]
    assert info["counts"]["records"] == 3 and info["counts"]["failed"] == 0
    assert info["counts"]["max_candidate_boxes_per_image"] == 6 and info["counts"]["candidates_per_record"] == [4]
    samples = read_task_samples(v7w["train"])
    # image 101: the union of its two questions' candidates, sorted by box id
    np.testing.assert_allclose(load_npy(samples["v7w_101"]["gt_boxes.npy"]), [corners(b) for b in range(11, 17)])
    np.testing.assert_allclose(load_npy(samples["v7w_102"]["gt_boxes.npy"]), [corners(b) for b in range(21, 25)])
    records = {r["qa_id"]: r for r in json.loads(samples["v7w_101"]["ann.json"])}
    assert records[1001]["candidates"] == [0, 1, 2, 3] and records[1002]["candidates"] == [0, 3, 4, 5]

    tok = TextTokenizer.from_pretrained(v7w["vocab"], max_len=20)
    batch = next(iter(TaskDataset(v7w["train"], "visual7w_pointing", tok, batch_size=3, shuffle_buffer=1)))
    row = batch["record_id"].index(1002)
    assert batch["candidate_regions"][row].tolist() == [1, 4, 5, 6] and batch["label"][row] == 1
    assert batch["candidate_ids"][row] == [11, 14, 15, 16] and batch["candidate_mask"].all()
    # the regions at those places are the given boxes' features: [IMG], 6 candidate boxes, then 3 detected
    gt_feat = load_npy(samples["v7w_101"]["gt_features.npy"]).astype(np.float32)
    feats = batch["image_feat"][row].numpy()
    np.testing.assert_array_equal(feats[[1, 4, 5, 6]], gt_feat[[0, 3, 4, 5]])
    np.testing.assert_array_equal(feats[7:10], v7w["feats"][0].features.astype(np.float32))


def test_metric_and_candidate_logits_against_hand_worked_examples() -> None:
    # the top candidate: 1 (right), 0 (first of a tie; wrong), 2 (wrong) -> 1 of 3
    assert pointing_accuracy([[0.1, 0.7, 0.2], [0.5, 0.5], [0.3, 0.3, 0.4]], [1, 1, 0]) == pytest.approx(100 / 3)
    region_logits = torch.tensor([[9.0, 1.0, 2.0, 3.0], [9.0, 4.0, 5.0, 6.0]])
    batch = {"candidate_regions": torch.tensor([[3, 1], [2, 0]]), "candidate_mask": torch.tensor([[True, True],
                                                                                                   [True, False]])}  # fmt: skip
    got = candidate_region_logits(region_logits, batch)
    assert got.tolist() == [[3.0, 1.0], [5.0, float("-inf")]]


def test_loss_is_cross_entropy_over_the_candidates_only() -> None:
    class Stub(torch.nn.Module):
        def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(region_logits=torch.tensor([[9.0, 1.0, 2.0, 3.0], [9.0, 4.0, 5.0, 6.0]]))

    batch = {k: torch.zeros(1) for k in MODEL_KEYS} | {
        "candidate_regions": torch.tensor([[3, 1], [2, 0]]), "candidate_mask": torch.tensor([[True, True], [True, False]]),
        "label": torch.tensor([1, 0])}  # fmt: skip
    # row 0: -log(e^1 / (e^3 + e^1)); row 1: one real candidate, so loss 0 (the [IMG] logit 9 and padding count for nothing)
    want = (math.log(math.exp(3) + math.exp(1)) - 1 + 0.0) / 2
    assert TASK.loss(Stub(), batch)["loss"].item() == pytest.approx(want, rel=1e-6)
    assert TASK.validation_score(Stub(), batch).tolist() == [0.0, 1.0]


def test_train_a_few_steps_then_eval(v7w: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = run_train(task="visual7w_pointing", data=str(v7w["train"]), out=str(run), vocab=str(v7w["vocab"]),
                        config="tiny", steps=3, batch_size=2, lr=1e-3, warmup=0.0, num_workers=0, progress=False,
                        device="cpu")  # fmt: skip
    assert summary["steps"] == 3 and np.isfinite(summary["last"]["loss"])
    res = run_eval("visual7w_pointing", run, v7w["train"], tmp_path / "report", batch_size=2, device="cpu",
                   progress=False)  # fmt: skip
    split = res["splits"]["train"]
    preds = json.loads((tmp_path / "report" / "visual7w_pointing_predictions_train.json").read_text())
    assert sorted(preds) == ["1001", "1002", "1003"] and split["num_records"] == 3
    for qa, p in preds.items():
        ids, label = EXPECTED[int(qa)]
        assert p["answer_box_id"] == ids[label] and len(p["probs"]) == 4 and sum(p["probs"]) == pytest.approx(1)
        assert p["box_id"] == ids[int(np.argmax(p["probs"]))] and p["correct"] == (p["box_id"] == ids[label])
    assert split["accuracy"] == pytest.approx(100 * sum(p["correct"] for p in preds.values()) / 3)
    assert split["baselines"]["chance"]["accuracy"] == pytest.approx(25.0)
    assert "shuffled_images" in split
