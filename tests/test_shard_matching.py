"""The image-reference -> feature image id rule (pipelines.matching), case by case."""

from __future__ import annotations

from pipelines.annotations import ImageRef
from pipelines.matching import ImageMatcher, path_parts

IMAGES = [
    ("train_0001", "train/0001.jpg"),
    ("val_0001", "val/0001.jpg"),
    ("COCO_train2014_000000000042", "/data/coco/train2014/COCO_train2014_000000000042.jpg"),
    ("a_b_c_d_x", "a/b/c/d/x.png"),
    ("e_b_c_d_x", "e/b/c/d/x.png"),
    ("clip_0", "lsmdc_m/3015_ST_00.23.57.935-00.24.00.783@0.jpg"),
    ("pic7", None),  # no source recorded: the id stands for the path
]


def test_match_rule_in_order() -> None:
    m = ImageMatcher(IMAGES)
    cases = {
        ImageRef("COCO_train2014_000000000042"): "COCO_train2014_000000000042",  # 1. a feature id
        ImageRef("val/0001.jpg"): "val_0001",  # 2. stem shared: the longer common tail decides
        ImageRef("images/train/0001.jpg"): "train_0001",
        ImageRef("COCO_train2014_000000000042.jpg"): "COCO_train2014_000000000042",
        ImageRef("x/train2014/COCO_train2014_000000000042.jpg"): "COCO_train2014_000000000042",
        ImageRef("http_dir/3015_ST_00.23.57.935-00.24.00.783@0.jpg"): "clip_0",  # dots inside the stem
        ImageRef(numeric_id=42): "COCO_train2014_000000000042",  # 3. trailing number
        ImageRef("elsewhere/unknown.jpg", numeric_id=42): "COCO_train2014_000000000042",
        ImageRef("pic7.jpg"): "pic7",
        ImageRef("a/b/c/d/x.png"): "a_b_c_d_x",
    }
    for ref, want in cases.items():
        assert m.match(ref).image_id == want, ref
    amb = m.match(ImageRef("0001.jpg"))
    assert (amb.image_id, amb.reason, amb.candidates) == (None, "ambiguous", ["train_0001", "val_0001"])
    assert m.match(ImageRef("b/c/d/x.png")).reason == "ambiguous"  # equal tails: never a guess
    assert m.match(ImageRef(numeric_id=1)).reason == "ambiguous"  # 0001 twice
    assert m.match(ImageRef("nothing.jpg")).reason == "missing"
    assert m.match(ImageRef(numeric_id=99)).reason == "missing"


def test_path_parts() -> None:
    assert path_parts("a\\b/./c.d.jpg") == ["a", "b", "c.d"]
    assert path_parts(".hidden") == [".hidden"] and path_parts("") == []
