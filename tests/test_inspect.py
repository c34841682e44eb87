"""`vilbert-data inspect` (pipelines.inspect): summary of a feature set and a labelled picture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from pipelines.formats.features import FeatureShardWriter, encode_detections
from pipelines.inspect import box_labels, format_summary, load_sample, load_vocabs, render_picture, summarize

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


class Det:
    """Minimal Detections with hand-chosen boxes and ids."""

    def __init__(self, boxes: list[list[float]], obj: list[int], attr: list[int], w: int = 80, h: int = 60):
        k = len(boxes)
        self.boxes = np.array(boxes, np.float32).reshape(k, 4)
        self.features = np.ones((k, 1024), np.float32)
        self.spatial = np.zeros((k, 5), np.float32)
        self.cls_prob = np.full((k, 1601), 1 / 1601, np.float32)
        self.object_ids, self.object_conf = np.array(obj), np.full(k, 0.5, np.float32)
        self.attr_ids, self.attr_conf = np.array(attr), np.full(k, 0.25, np.float32)
        self.image_w, self.image_h = w, h


def _row(image_id: str, source: str, status: str, k: int = 0, reason: str | None = None) -> dict:
    return {"image_id": image_id, "source": source, "status": status, "error": reason and f"bad: {reason}",
            "reason": reason, "num_boxes": k, "width": 80, "height": 60, "bytes": 10}  # fmt: skip


@pytest.fixture
def feature_set(tmp_path: Path) -> Path:
    """Two shards: box counts 2, 2, 1 and failures truncated x2, empty x1; one shard unfinished."""
    photo = tmp_path / "photo.png"
    Image.new("RGB", (80, 60), (0, 0, 0)).save(photo)
    out = tmp_path / "feats"
    out.mkdir()
    shards = [
        [
            ("a", [[10, 10, 40, 40], [0, 0, 79, 59]], [1, 2], [1, 3]),
            ("b", [[5, 5, 6, 6], [1, 1, 2, 2]], [3, 4], [2, 2]),
        ],
        [("c", [[20, 20, 30, 50]], [1600], [400])],
    ]
    failures = [[("x", "truncated")], [("y", "truncated"), ("z", "empty")]]
    for n, (samples, fails) in enumerate(zip(shards, failures, strict=True)):
        with FeatureShardWriter(out, f"features-{n:06d}") as w:
            for image_id, boxes, obj, attr in samples:
                w.write_sample(
                    image_id, encode_detections(image_id, str(photo), Det(boxes, obj, attr), "res4")
                )
                w.add_row(_row(image_id, str(photo), "ok", len(boxes)))
            for image_id, reason in fails:
                w.add_row(_row(image_id, f"/x/{image_id}.jpg", "failed", reason=reason))
            w.finish()
    # an interrupted third shard: tar without stats must be ignored
    (out / "features-000002.tar").write_bytes(b"partial")
    return out


def test_summary_counts_histogram_and_failures(feature_set: Path) -> None:
    s = summarize(feature_set)
    assert (s["images"], s["ok"], s["failed"], s["shards"]) == (6, 3, 3, 2)
    assert s["boxes_histogram"] == {1: 1, 2: 2}
    assert s["boxes_mean"] == round(5 / 3, 3)
    assert s["failed_by_reason"] == {"empty": 1, "truncated": 2}
    assert not s["complete"]
    text = format_summary(s, width=10)
    assert "     1 | #####      1" in text and "     2 | ########## 2" in text
    assert "failed by reason: empty=1, truncated=2" in text
    assert "z: empty: bad: empty (/x/z.jpg)" in text


def test_labels_without_and_with_vocab(feature_set: Path) -> None:
    sample = load_sample(feature_set, "c")
    assert box_labels(sample) == ["attr400 class1600 0.50"]
    assert load_sample(feature_set)["json"]["image_id"] == "a"  # first ok image by default
    with pytest.raises(KeyError, match="nope"):
        load_sample(feature_set, "nope")
    if not REFERENCE.is_dir():
        pytest.skip("shared/reference not available")
    objects, attributes = load_vocabs([REFERENCE])
    obj_lines = (REFERENCE / "vg_objects_vocab.txt").read_text().splitlines()
    attr_lines = (REFERENCE / "vg_attributes_vocab.txt").read_text().splitlines()
    expected_c = f"{attr_lines[399].split(',')[0]} {obj_lines[1599].split(',')[0]} 0.50"
    assert box_labels(sample, objects, attributes) == [expected_c]
    # files given one by one are told apart by their length (1600 objects, 400 attributes)
    objects2, attributes2 = load_vocabs(
        [REFERENCE / "vg_attributes_vocab.txt", REFERENCE / "vg_objects_vocab.txt"]
    )
    assert (objects2, attributes2) == (objects, attributes)
    # box 2 of image a: attribute 3, class 2
    assert box_labels(load_sample(feature_set, "a"), objects, attributes)[1] == "double decker goal 0.50"


def test_picture_outlines_boxes_on_the_source_image(feature_set: Path, tmp_path: Path) -> None:
    png = render_picture(feature_set, tmp_path / "pic" / "a.png", "a")
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (60, 80, 3)
    # box [10,10,40,40]: its right and bottom edges are coloured, the inside away from the label is black
    assert img[30, 40].any() and img[40, 30].any()
    assert not img[30, 25].any()
    assert (img != 0).any(axis=2).sum() < img.shape[0] * img.shape[1]  # not a blank repaint


def test_cli_inspect_prints_summary_and_writes_picture(feature_set: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(feature_set), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["boxes_histogram"] == {"1": 1, "2": 2}
    res = runner.invoke(
        app, ["inspect", str(feature_set), "--image-id", "b", "--out", str(tmp_path / "b.png")]
    )
    assert res.exit_code == 0, res.output
    assert "b (80x60, 2 boxes)" in res.output and "attr2 class3 0.50" in res.output
    assert Image.open(tmp_path / "b.png").size == (80, 60)
    res = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "no such feature set" in res.output
