"""VCR: jsonl + metadata through `shard` with the detector's given-box mode (tiny random weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.datasets import TaskDataset
from pipelines.formats.npy import load_npy
from pipelines.shard_job import run_shard
from pipelines.tokenization import TextTokenizer

GT = [[2.0, 4.0, 30.0, 40.0], [10.0, 10.0, 60.0, 50.0]]  # two ground-truth boxes in a 64 x 48 image


def vcr_line(annot: str, answer_label: int, rationale_label: int) -> dict:
    return {
        "annot_id": annot, "movie": "m", "objects": ["person", "dog", "person"],
        "img_fn": "lsmdc_m/clip@0.jpg", "metadata_fn": "lsmdc_m/clip@0.json",
        "question": ["What", "is", [0, 2], "doing", "?"],
        "answer_choices": [[[0], "runs"], ["the", [1], "sits"], ["nothing"], ["a", "cat"]],
        "rationale_choices": [["because", [1], "is", "there"], ["no"], ["yes"], ["maybe"]],
        "answer_label": answer_label, "rationale_label": rationale_label,
    }  # fmt: skip


def test_vcr_round_trip_with_given_boxes(tmp_path) -> None:
    extract = pytest.importorskip("extract")
    images = tmp_path / "vcr1images"
    (images / "lsmdc_m").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
        images / "lsmdc_m/clip@0.jpg"
    )
    (images / "lsmdc_m/clip@0.json").write_text(
        json.dumps({"boxes": [b + [0.9] for b in GT], "names": ["person", "dog"], "width": 64, "height": 48})
    )
    (tmp_path / "val.jsonl").write_text(
        json.dumps(vcr_line("val-0", 0, 0)) + "\n" + json.dumps(vcr_line("val-1", 1, 2)) + "\n"
    )
    im = make_image("lsmdc_m_clip_0", "lsmdc_m/clip@0.jpg", k=3, dim=1024, seed=0, w=64, h=48)
    root = write_feature_set(tmp_path / "f", [im])
    cfg = extract.DetectorConfig(depth=50, min_size=48, max_size=64)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):  # no checkpoint: the detector must say so loudly
        info = run_shard(root, "vcr", [tmp_path / "val.jsonl"], "val", tmp_path / "t", images=images,
                         detector_config=cfg, device="cpu", progress=False)  # fmt: skip
    assert info["counts"]["records"] == 2 and info["counts"]["failed"] == 0
    sample = read_task_samples(tmp_path / "t")["lsmdc_m_clip_0"]
    rec = json.loads(sample["ann.json"])[1]
    assert rec == {
        "annot_id": "val-1",
        "question": "What is Casey and Jessie doing ?",  # persons 0 and 2 as names
        "answer_choices": ["Casey runs", "the dog sits", "nothing", "a cat"],
        "rationale_choices": ["because dog is there", "no", "yes", "maybe"],
        "answer_label": 1,
        "rationale_label": 2,
    }
    gt_boxes, gt_spatial = load_npy(sample["gt_boxes.npy"]), load_npy(sample["gt_spatial.npy"])
    np.testing.assert_allclose(gt_boxes, GT)
    want = [
        [b[0] / 64, b[1] / 48, b[2] / 64, b[3] / 48, (b[2] - b[0]) * (b[3] - b[1]) / (64 * 48)] for b in GT
    ]
    np.testing.assert_allclose(gt_spatial, want, rtol=1e-5)
    gt_feat = load_npy(sample["gt_features.npy"])
    assert (
        gt_feat.shape == (2, 1024) and gt_feat.dtype == np.float16
    )  # stored like the feature set's features
    assert load_npy(sample["gt_cls_prob.npy"]).shape == (2, 1601)
    np.testing.assert_allclose(load_npy(sample["gt_cls_prob.npy"]).astype(np.float32).sum(1), 1.0, atol=1e-2)

    tok = TextTokenizer.from_pretrained(
        write_vocab(tmp_path / "v.txt", "what is casey and jessie doing runs".split())
    )
    batch = next(
        iter(TaskDataset(tmp_path / "t", "vcr", tok, batch_size=8, shuffle_buffer=1, max_text_len=20))
    )
    assert batch["vcr_stage"] == ["q_a", "qa_r", "q_a", "qa_r"]
    assert batch["annot_id"] == ["val-0", "val-0", "val-1", "val-1"] and batch["label"].tolist() == [
        0,
        0,
        1,
        2,
    ]
    assert batch["input_ids"].shape[:2] == (4, 4) and batch["image_feat"].shape == (
        4,
        6,
        1024,
    )  # 1 + 2 gt + 3
    # Q->A, choice 0: [CLS] what is casey and jessie doing ? [SEP] casey runs [SEP], answer in segment 1.
    w = {t: i + 5 for i, t in enumerate("what is casey and jessie doing runs".split())}
    q = [w["what"], w["is"], w["casey"], w["and"], w["jessie"], w["doing"], 13]
    assert batch["input_ids"][0, 0, :12].tolist() == [2, *q, 3, w["casey"], w["runs"], 3]
    assert batch["token_type_ids"][0, 0, :12].tolist() == [0] * 9 + [1] * 3
    # Ground-truth regions come first, then the detected ones; [IMG] is the mean of all five.
    feats = batch["image_feat"][0].numpy()
    np.testing.assert_array_equal(feats[1:3], gt_feat.astype(np.float32))
    np.testing.assert_array_equal(feats[3:6], im.features.astype(np.float32))
    np.testing.assert_allclose(
        feats[0], np.concatenate([gt_feat, im.features]).astype(np.float32).mean(0), rtol=1e-4
    )
    np.testing.assert_allclose(batch["image_loc"][0, 1:3].numpy(), want, rtol=1e-5)
