"""End-to-end detector runs on real photographs: the output contract, given-box mode, determinism."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from extract import Detections, Detector, DetectorConfig, spatial_features
from extract import detector as detector_module

# 10 proposals = min_boxes: the res5 head (5.9 GFLOP per box) dominates the test time
SMALL = dict(depth=50, min_size=96, max_size=160, pre_nms_topk=300, post_nms_topk=10)


def random_detector(**overrides) -> Detector:
    """A random-weight detector with the small test settings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Detector.from_checkpoint(None, device="cpu", config=DetectorConfig(**{**SMALL, **overrides}))


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Three real photographs shipped with scikit-image (no download needed)."""
    skdata = pytest.importorskip("skimage.data")
    return [
        Image.fromarray(skdata.astronaut()),
        Image.fromarray(skdata.coffee()),
        Image.fromarray(skdata.chelsea()),
    ]


@pytest.fixture(scope="module")
def detector() -> Detector:
    """res4 features (the default); building it must warn that the weights are random."""
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        return Detector.from_checkpoint(None, device="cpu", config=DetectorConfig(**SMALL))


def variant(detector: Detector, **changes) -> Detector:
    """The same weights with other settings (saves building another random model)."""
    return Detector(detector.model, replace(detector.config, **changes), detector.device)


@pytest.fixture(scope="module")
def detections(detector, photos) -> list[Detections]:
    """The three photographs in one forward pass."""
    return detector.detect(photos)


@pytest.fixture(scope="module")
def single(detector, photos) -> Detections:
    """The third photograph alone."""
    return detector.detect([photos[2]])[0]


def test_outputs_follow_the_contract(detections, photos):
    assert len(detections) == len(photos)
    for det, photo in zip(detections, photos, strict=True):
        k = det.num_boxes
        assert 10 <= k <= 36
        assert (det.image_w, det.image_h) == photo.size
        expected = {
            "boxes": ((k, 4), np.float32),
            "features": ((k, 1024), np.float32),
            "spatial": ((k, 5), np.float32),
            "cls_prob": ((k, 1601), np.float32),
            "object_ids": ((k,), np.int64),
            "object_conf": ((k,), np.float32),
            "attr_ids": ((k,), np.int64),
            "attr_conf": ((k,), np.float32),
        }
        for name, (shape, dtype) in expected.items():
            arr = getattr(det, name)
            assert arr.shape == shape and arr.dtype == dtype, name
            assert np.isfinite(arr).all(), name
        w, h = photo.size
        b = det.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        np.testing.assert_allclose(det.cls_prob.sum(axis=1), 1.0, atol=1e-5)
        # the object is the best non-background column, its confidence that column's probability
        best = det.cls_prob[:, 1:].argmax(axis=1) + 1
        np.testing.assert_array_equal(det.object_ids, best)
        np.testing.assert_array_equal(det.object_conf, det.cls_prob[np.arange(k), best])
        assert ((det.attr_ids >= 1) & (det.attr_ids <= 400)).all()
        assert ((det.attr_conf > 0) & (det.attr_conf <= 1)).all()
        np.testing.assert_array_equal(det.spatial, spatial_features(det.boxes, w, h))
        assert len({tuple(r) for r in b.tolist()}) == k  # distinct regions


def test_batch_gives_each_image_its_own_regions(detections):
    # different photographs must not share boxes or features through the batch
    assert not np.array_equal(detections[0].features[:5], detections[1].features[:5])


def test_given_boxes_reproduce_the_detected_regions(detector, single, photos):
    # the given-box path runs the same head: on the detected boxes it gives the same outputs
    photo = photos[2]
    given = detector.features_for_boxes(photo, single.boxes)
    np.testing.assert_array_equal(given.boxes, single.boxes)
    np.testing.assert_allclose(given.features, single.features, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(given.cls_prob, single.cls_prob, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(given.attr_ids, single.attr_ids)
    empty = detector.features_for_boxes(photo, np.zeros((0, 4)))
    assert empty.features.shape == (0, 1024) and empty.cls_prob.shape == (0, 1601)
    with pytest.raises(ValueError, match="shape"):
        detector.features_for_boxes(photo, [[1, 2, 3]])
    with pytest.raises(ValueError, match="x2 < x1"):
        detector.features_for_boxes(photo, [[10, 10, 5, 20]])


def test_selection_runs_on_proposals_in_original_pixels(detector, photos, monkeypatch):
    # The +1 IoU is not scale-invariant: the original runs its per-class NMS on rois / im_scale.
    calls = []
    real = detector_module.select_regions

    def spy(boxes, *args):
        keep, max_conf = real(boxes, *args)
        calls.append((boxes.clone(), keep))
        return keep, max_conf

    monkeypatch.setattr(detector_module, "select_regions", spy)
    photo = photos[2]
    (out,) = detector.detect([photo])
    (boxes, keep), = calls
    np.testing.assert_array_equal(boxes[keep].numpy(), out.boxes)


def test_res4_feature_is_the_mean_of_the_pooled_cells(detector):
    # a 112 x 112 input (scale 1) and a box covering exactly feature cells 0..6 (x2 = 96 -> cell 6):
    # RoIPool 14x14 gives each cell to 2 x 2 bins, so the feature is the plain mean of those res4 cells
    det = variant(detector, min_size=112, max_size=112)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    out = det.features_for_boxes(img, [[0.0, 0.0, 96.0, 96.0]])
    with torch.inference_mode():
        res4 = det.backbone_features(det.preprocess([img]))[0]  # (1024, 7, 7)
    assert res4.shape[1:] == (7, 7)
    expected = res4[:, :7, :7].mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(out.features[0], expected, rtol=1e-5, atol=1e-5)


def test_res5_layer_and_info(detector, photos):
    det = variant(detector, feature_layer="res5", post_nms_topk=10)
    (out,) = det.detect([photos[1]])
    assert out.features.shape == (out.num_boxes, 2048) and out.num_boxes == 10
    info = json.loads(json.dumps(det.info))
    assert info["feature_layer"] == "res5" and info["feature_dim"] == 2048 and info["random_weights"] is True
    assert info["checkpoint"] is None and info["sha256"] is None and info["depth"] == 50
    for field in ("min_size", "max_size", "pre_nms_topk", "post_nms_topk", "nms_thresh", "conf_thresh"):
        assert field in info


def test_deterministic_on_cpu(single, photos):
    # a second detector built from scratch (same fixed seed, other global RNG state) gives the same bytes
    torch.manual_seed(1234)
    again = random_detector().detect([photos[2]])[0]
    for name in ("boxes", "features", "spatial", "cls_prob", "object_conf", "attr_conf"):
        assert getattr(again, name).tobytes() == getattr(single, name).tobytes(), name


def test_bf16_autocast_on_cpu(detector, photos):
    det = variant(detector, autocast="bf16", post_nms_topk=10)
    (out,) = det.detect([photos[2]])
    assert out.features.dtype == np.float32 and np.isfinite(out.features).all()
    assert out.num_boxes == 10
    np.testing.assert_allclose(out.cls_prob.sum(axis=1), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="fp16"):
        variant(detector, autocast="fp16")


FIELDS = ("boxes", "features", "spatial", "cls_prob", "object_ids", "object_conf", "attr_ids", "attr_conf")


def assert_same_bytes(a: Detections, b: Detections) -> None:
    """Every array of two Detections is bit-for-bit equal."""
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.tobytes() == y.tobytes(), name


@pytest.mark.parametrize("batch_size", [1, 3])
def test_an_image_gives_the_same_bytes_alone_and_in_any_batch(detector, photos, batch_size):
    # 3 proposals: the res5 head is the cost, and the guarantee does not depend on how many regions
    det = variant(detector, batch_size=batch_size, pre_nms_topk=60, post_nms_topk=3, min_boxes=2, max_boxes=3)
    target = photos[2]  # 451 x 300
    same_size = [p.resize(target.size) for p in photos[:2]]  # same input size: may share its pass
    other_size = photos[0]  # 512 x 512: another input size, never in its pass
    (alone,) = det.detect([target])
    batches = [
        [same_size[0], target],
        [other_size, target, same_size[1]],
        [same_size[1], same_size[0], target, other_size, target],
    ]
    for images in batches:
        groups = det.forward_groups(images)
        position = images.index(target)
        (group,) = [g for g in groups if position in g]
        assert all(det.input_size(images[i]) == det.input_size(target) for i in group)
        if batch_size > 1:  # the target does share its pass with other images
            assert len(group) > 1
        out = det.detect(images)
        for i, image in enumerate(images):
            if image is target:
                assert_same_bytes(out[i], alone)
    assert sorted(i for g in det.forward_groups(batches[2]) for i in g) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (2, 3000)])
def test_strips_get_boxes_of_positive_size_inside_the_image(detector, size):
    w, h = size
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    (out,) = detector.detect([strip])
    b = out.boxes
    assert out.num_boxes >= 1 and (out.image_w, out.image_h) == (w, h)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert (out.spatial[:, 4] > 0).all()
    if w == 1:  # the input is one pixel wide, so every region spans the whole width
        np.testing.assert_array_equal(b[:, [0, 2]], np.tile([0.0, 1.0], (out.num_boxes, 1)))
    if h == 1:
        np.testing.assert_array_equal(b[:, [1, 3]], np.tile([0.0, 1.0], (out.num_boxes, 1)))


FEW = dict(pre_nms_topk=60, post_nms_topk=3, min_boxes=2, max_boxes=3)  # 3 regions: the res5 head is the cost


@pytest.mark.cuda
@pytest.mark.parametrize("autocast", [None, "bf16", "fp16"])
def test_cuda_matches_the_cpu_and_an_image_ignores_its_batch_mates(detector, photos, autocast):
    # the same seeded weights on the GPU (the CPU fixture's model stays on the CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpu = Detector.from_checkpoint(
            None,
            device="cuda",
            config=DetectorConfig(**{**SMALL, **FEW}, autocast=autocast, batch_size=3),
        )
    cpu = variant(detector, batch_size=3, **FEW)
    target = photos[2]
    (on_cpu,) = cpu.detect([target])
    # features of the CPU's regions computed on the GPU (TF32 convolutions in fp32; autocast rounds more)
    given = gpu.features_for_boxes(target, on_cpu.boxes)
    err = np.linalg.norm(given.features - on_cpu.features) / np.linalg.norm(on_cpu.features)
    assert err < (1e-2 if autocast is None else 5e-2), err
    np.testing.assert_allclose(given.cls_prob.sum(axis=1), 1.0, atol=1e-3)
    # detection on the GPU: the contract's shapes, finite values, and the same bytes with batch-mates
    (alone,) = gpu.detect([target])
    assert 2 <= alone.num_boxes <= 3
    assert np.isfinite(alone.features).all() and np.isfinite(alone.cls_prob).all()
    assert alone.features.dtype == np.float32 and alone.features.shape[1] == 1024
    mates = [p.resize(target.size) for p in photos[:2]]
    out = gpu.detect([mates[0], target, photos[0], mates[1]])
    assert gpu.forward_groups([mates[0], target, photos[0], mates[1]]) == [[0, 1, 3], [2]]
    assert_same_bytes(out[1], alone)
