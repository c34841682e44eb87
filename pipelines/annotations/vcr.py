"""VCR: `{train,val,test}.jsonl` + per-image metadata json (ground-truth boxes) under the images folder.

Object references in VCR text are lists of indices into the question's `objects`; they are rendered as
words: a person becomes a gender-neutral name (the r2c/ViLBERT convention, one name per object
index), any other object its class name; several objects are joined with "and".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.annotations.common import (
    Annotation,
    AnnotationError,
    ImageRef,
    bad,
    load_json,
    read_jsonl,
    require,
)

GENDER_NEUTRAL_NAMES = (
    "Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody", "Kendall",
    "Skyler", "Frankie", "Pat", "Quinn",
)  # fmt: skip
REQUIRED = ("annot_id", "objects", "img_fn", "metadata_fn", "question", "answer_choices", "rationale_choices")


def object_word(index: int, objects: Sequence[str]) -> str:
    """Word for object `index`: a name for a person, the class name otherwise."""
    name = objects[index]
    return GENDER_NEUTRAL_NAMES[index % len(GENDER_NEUTRAL_NAMES)] if name == "person" else name


def render_tokens(tokens: Sequence[Any], objects: Sequence[str]) -> str:
    """VCR mixed token list (strings and lists of object indices) to plain text."""
    words = []
    for tok in tokens:
        if isinstance(tok, list):
            words.append(" and ".join(object_word(int(i), objects) for i in tok))
        else:
            words.append(str(tok))
    return " ".join(words)


def read_vcr_metadata(path: Path) -> dict[str, Any]:
    """VCR metadata json: ground-truth boxes (x1, y1, x2, y2[, score]), names, width, height."""
    meta = load_json(path)
    require(path, "top level", meta, ["boxes", "width", "height"])
    boxes = meta["boxes"]
    if not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) >= 4 for b in boxes):
        raise bad(path, "boxes", "expected a list of [x1, y1, x2, y2(, score)]")
    return {
        "boxes": [[float(v) for v in b[:4]] for b in boxes],
        "width": meta["width"],
        "height": meta["height"],
    }


def read_vcr(paths: Sequence[Path], images_dir: str | Path | None) -> list[Annotation]:
    """One Annotation per VCR question; `extra['metadata']` is the image's metadata file path."""
    if images_dir is None:
        raise AnnotationError("vcr needs --images DIR (the vcr1images folder with the metadata json files)")
    images_dir = Path(images_dir)
    out = []
    for path in paths:
        if not path.exists():
            raise AnnotationError(f"{path}: annotation file not found")
        for lineno, rec in read_jsonl(path):
            require(path, f"line {lineno}", rec, REQUIRED)
            objects = rec["objects"]
            try:
                answers = [render_tokens(c, objects) for c in rec["answer_choices"]]
                rationales = [render_tokens(c, objects) for c in rec["rationale_choices"]]
                question = render_tokens(rec["question"], objects)
            except (IndexError, TypeError, ValueError) as exc:
                raise bad(path, f"line {lineno}", f"bad object reference: {exc}") from exc
            if len(answers) != 4 or len(rationales) != 4:
                raise bad(path, f"line {lineno}", "expected 4 answer and 4 rationale choices")
            record = {
                "annot_id": str(rec["annot_id"]),
                "question": question,
                "answer_choices": answers,
                "rationale_choices": rationales,
                "answer_label": int(rec.get("answer_label", -1)),  # -1: test split, no label
                "rationale_label": int(rec.get("rationale_label", -1)),
            }
            extra = {
                "metadata": str(images_dir / rec["metadata_fn"]),
                "image": str(images_dir / rec["img_fn"]),
            }
            out.append(Annotation(ImageRef(path=rec["img_fn"]), record, extra))
    return out
