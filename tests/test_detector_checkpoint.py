"""Checkpoint loaders: the three public formats built from the reference key lists, refusals and mismatches.

The test writes one set of random weights in each format with its own conventions (detector.md, "Where
the three differ"), converting independently of the loader, and checks that all three give the same
detections. Depth 50 (the key lists' res4 blocks 0-5) keeps the files and the run small.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extract import CheckpointError, Detector, DetectorConfig
from extract.checkpoint import load_checkpoint

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

CAFFE_ANCHORS = [
    [-38, -16, 53, 31], [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
    [-24, -24, 39, 39], [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
    [-14, -36, 29, 51], [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359],
]  # fmt: skip
# d2 channel k = (size s, ratio r) with k = 3 s + r; the Caffe channel of the same anchor is 4 r + s.
SIZE_MAJOR_FROM_RATIO_MAJOR = [4 * (k % 3) + k // 3 for k in range(12)]
D2_WEIGHTS = torch.tensor([10.0, 10.0, 5.0, 5.0])
# Agreement between formats does not depend on the box count: 4 proposals keep the res5 head cheap.
SMALL = DetectorConfig(
    depth=50, min_size=96, max_size=128, pre_nms_topk=200, post_nms_topk=4, min_boxes=4, max_boxes=4
)


def read_keys(name: str, depth50: bool = True) -> dict[str, tuple[int, ...]]:
    """name -> shape from a reference key list, keeping res4 blocks 0-5 for depth 50."""
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    out = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        m = re.match(r"backbone\.res4\.(\d+)\.", key)
        if depth50 and m and int(m.group(1)) >= 6:
            continue
        out[key] = () if shape == "scalar" else tuple(int(v) for v in shape.split("x"))
    return out


def dyadic(t: torch.Tensor) -> torch.Tensor:
    """Round to multiples of 2^-12 so sums and differences in the conversions are exact."""
    return torch.round(t * 4096) / 4096


def caffe_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights named and laid out as the Caffe pth (background first, 24 objectness channels)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in read_keys("detector_keys_caffe_pth.txt").items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif key.endswith("cell_anchors.0"):
            out[key] = torch.tensor(CAFFE_ANCHORS, dtype=torch.float32)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("norm.weight"):
            out[key] = torch.full(shape, 0.2 if ".conv3." in key else 1.0)
        elif key.endswith("running_mean") or key.endswith("bias"):
            out[key] = torch.randn(shape, generator=g) * 0.05
        else:
            fan_in = int(np.prod(shape[1:]))
            std = (2.0 / fan_in) ** 0.5 / (128.0 if "stem" in key else 1.0)
            if "anchor_deltas" in key:
                std = 0.1 / fan_in**0.5
            out[key] = torch.randn(shape, generator=g) * std
    for suffix in ("weight", "bias"):  # exact fg - bg
        k = f"proposal_generator.rpn_head.objectness_logits.{suffix}"
        out[k] = dyadic(out[k] * 4)
    return out


def to_d2(caffe: dict[str, torch.Tensor], with_batch_counts: bool) -> dict[str, torch.Tensor]:
    """The same weights in detectron2 conventions (background last, weighted deltas, size-major anchors)."""
    p, rpn = "roi_heads.box_predictor.", "proposal_generator.rpn_head."
    names = {"cls_embed.": "cls_embedding.", "attr_linear1.": "fc_attr.", "attr_linear2.": "attr_score."}
    out = {}
    for key, value in caffe.items():
        if key.endswith("num_batches_tracked"):
            continue
        for old, new in names.items():
            key = key.replace(p + old, p + new)
        out[key] = value.clone()
    for k in (
        "cls_score.weight",
        "cls_score.bias",
        "cls_embedding.weight",
        "attr_score.weight",
        "attr_score.bias",
    ):
        out[p + k] = torch.roll(out[p + k], -1, dims=0)
    for suffix in ("weight", "bias"):
        rows = caffe[p + f"bbox_pred.{suffix}"].reshape(1601, 4, -1)[1:]  # drop the background rows
        rows = rows * D2_WEIGHTS.view(1, 4, 1)
        out[p + f"bbox_pred.{suffix}"] = rows.reshape(6400, -1) if suffix == "weight" else rows.reshape(6400)
        obj = caffe[rpn + f"objectness_logits.{suffix}"]
        out[rpn + f"objectness_logits.{suffix}"] = (obj[12:] - obj[:12])[SIZE_MAJOR_FROM_RATIO_MAJOR]
        deltas = caffe[rpn + f"anchor_deltas.{suffix}"]
        out[rpn + f"anchor_deltas.{suffix}"] = deltas.reshape(12, 4, *deltas.shape[1:])[
            SIZE_MAJOR_FROM_RATIO_MAJOR
        ].reshape(deltas.shape)
    anchors = caffe["proposal_generator.anchor_generator.cell_anchors.0"] + torch.tensor([0.0, 0.0, 1.0, 1.0])
    out["proposal_generator.anchor_generator.cell_anchors.0"] = anchors[SIZE_MAJOR_FROM_RATIO_MAJOR]
    if with_batch_counts:
        for key in [k for k in out if k.endswith("norm.running_var")]:
            out[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One set of weights written as d2 pkl, HF bin and Caffe pth (under "model")."""
    root = tmp_path_factory.mktemp("ckpt")
    caffe = caffe_weights()
    d2 = to_d2(caffe, with_batch_counts=False)
    hf = to_d2(caffe, with_batch_counts=True)
    d2_keys = read_keys("detector_keys_d2pkl.txt")
    assert {k: tuple(v.shape) for k, v in d2.items()} == d2_keys
    assert {k: tuple(v.shape) for k, v in hf.items()} == read_keys("detector_keys_hf.txt")
    paths = {"d2_pkl": root / "faster_rcnn_from_caffe_attr.pkl", "hf_bin": root / "pytorch_model.bin"}
    paths["caffe_pth"] = root / "bua-caffe-frcn-r101-k10-100.pth"
    with open(paths["d2_pkl"], "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in d2.items()}, "__author__": "test"}, f)
    torch.save(hf, paths["hf_bin"])
    torch.save({"model": caffe}, paths["caffe_pth"])
    return paths


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A small real photograph."""
    skdata = pytest.importorskip("skimage.data")
    return Image.fromarray(skdata.chelsea()).resize((150, 100))


def test_three_formats_load_and_agree(checkpoints, photo):
    results = {}
    for fmt, path in checkpoints.items():
        det = Detector.from_checkpoint(path, device="cpu", feature_layer="res5", config=SMALL)
        assert det.info["format"] == fmt and det.info["random_weights"] is False
        assert det.info["sha256"] is not None and len(det.info["sha256"]) == 64
        results[fmt] = det.detect([photo])[0]
    ref = results["caffe_pth"]
    assert ref.num_boxes == 4 and ref.features.shape == (4, 2048)
    for fmt in ("d2_pkl", "hf_bin"):
        got = results[fmt]
        # every conversion is exact (rolls, permutations, dyadic objectness), so the bytes agree
        np.testing.assert_array_equal(got.boxes, ref.boxes, err_msg=fmt)
        np.testing.assert_array_equal(got.cls_prob, ref.cls_prob, err_msg=fmt)
        np.testing.assert_array_equal(got.features, ref.features, err_msg=fmt)
        np.testing.assert_array_equal(got.object_ids, ref.object_ids)
        np.testing.assert_array_equal(got.attr_ids, ref.attr_ids)


def test_background_column_is_normalised_to_caffe_order(checkpoints, tmp_path):
    with open(checkpoints["d2_pkl"], "rb") as f:
        blob = pickle.load(f)  # the test's own file
    bias = blob["model"]["roi_heads.box_predictor.cls_score.bias"].copy()
    bias[1600] = 50.0  # background is the LAST row in detectron2 order
    attr = blob["model"]["roi_heads.box_predictor.attr_score.bias"].copy()
    attr[400] = 60.0  # "no attribute" is last too
    blob["model"]["roi_heads.box_predictor.cls_score.bias"] = bias
    blob["model"]["roi_heads.box_predictor.attr_score.bias"] = attr
    path = tmp_path / "bg.pkl"
    path.write_bytes(pickle.dumps(blob))
    state = load_checkpoint(path).state
    assert float(state["roi_heads.box_predictor.cls_score.bias"][0]) == 50.0
    assert float(state["roi_heads.box_predictor.attr_score.bias"][0]) == 60.0
    anchors = state["proposal_generator.anchor_generator.cell_anchors.0"]
    # continuous size-major anchors became the Caffe +1 anchors of the same channels
    assert anchors.tolist() == [CAFFE_ANCHORS[j] for j in SIZE_MAJOR_FROM_RATIO_MAJOR]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"backbone.stem.conv1.weight": _Evil()}}))
    with pytest.raises(CheckpointError, match=r"refusing to unpickle global '(posix|nt|os)\.system'"):
        Detector.from_checkpoint(path, device="cpu", config=SMALL)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    # the same payload inside a torch zip file is refused by torch.load(weights_only=True)
    tpath = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Evil()}}, tpath)
    with pytest.raises(CheckpointError, match="weights_only"):
        Detector.from_checkpoint(tpath, device="cpu", config=SMALL)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_mismatched_checkpoint_lists_missing_and_misshaped(checkpoints, tmp_path):
    with open(checkpoints["d2_pkl"], "rb") as f:
        blob = pickle.load(f)
    model = blob["model"]
    del model["roi_heads.res5.2.conv3.norm.running_var"]
    model["proposal_generator.rpn_head.conv.weight"] = model["proposal_generator.rpn_head.conv.weight"][:256]
    path = tmp_path / "broken.pkl"
    path.write_bytes(pickle.dumps(blob))
    with pytest.raises(CheckpointError) as err:
        Detector.from_checkpoint(path, device="cpu", config=SMALL)
    text = str(err.value)
    assert "1 missing tensors: roi_heads.res5.2.conv3.norm.running_var" in text
    assert (
        "proposal_generator.rpn_head.conv.weight: checkpoint (256, 1024, 3, 3) vs model (512, 1024, 3, 3)"
        in text
    )
    # a depth-50 file asked to fill a depth-101 model: the 17 extra res4 blocks are missing
    with pytest.raises(CheckpointError, match=r"missing tensors: backbone\.res4\.10\."):
        Detector.from_checkpoint(checkpoints["caffe_pth"], device="cpu", config=DetectorConfig(depth=101))


def test_depth_is_inferred_without_config(checkpoints):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real checkpoint must not warn about random weights
        det = Detector.from_checkpoint(checkpoints["hf_bin"], device="cpu")
    assert det.info["depth"] == 50 and det.info["feature_layer"] == "res4" and det.info["feature_dim"] == 1024


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Detector.from_checkpoint(tmp_path / "nope.pth", device="cpu", config=SMALL)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot unpickle"):
        Detector.from_checkpoint(junk, device="cpu", config=SMALL)
    bare = tmp_path / "bare_array.pkl"
    bare.write_bytes(pickle.dumps(np.zeros(3)))
    with pytest.raises(CheckpointError, match="expected a dict of tensors, found ndarray"):
        Detector.from_checkpoint(bare, device="cpu", config=SMALL)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_numpy_pickles_load_whatever_protocol_or_numpy_version(protocol):
    from extract.checkpoint import safe_pickle_loads

    blob = {
        "model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(2.5)},
        "n": [1, (2, 3)],
    }
    data = pickle.dumps(blob, protocol=protocol)
    variants = [data]
    if protocol == 2:  # the detectron2 file was written by numpy 1.x, whose module is numpy.core
        variants.append(data.replace(b"numpy._core", b"numpy.core"))
    for raw in variants:
        out = safe_pickle_loads(raw)
        np.testing.assert_array_equal(out["model"]["w"], blob["model"]["w"])
        assert out["model"]["s"] == 2.5 and out["n"] == [1, (2, 3)]
