"""Caption files for pretraining: COCO captions json, Conceptual Captions style TSV, plain JSONL."""

from __future__ import annotations

import csv
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipelines.annotations.common import (
    Annotation,
    AnnotationError,
    ImageRef,
    bad,
    load_json,
    read_jsonl,
    require,
)


def ref_from_value(value: object) -> ImageRef:
    """ImageRef from a JSONL/TSV image field: an int id, a digit string, a path or a URL."""
    if isinstance(value, bool):  # bool is an int subclass; never a valid image reference
        raise TypeError("boolean image reference")
    if isinstance(value, int):
        return ImageRef(numeric_id=value)
    text = str(value).strip()
    if not text:
        raise ValueError("empty image reference")
    if "://" in text:
        text = unquote(urlparse(text).path).lstrip("/") or text
    return ImageRef(path=text)


def read_coco_captions(path: Path) -> list[Annotation]:
    """COCO captions json: `images` (id, file_name) + `annotations` (image_id, caption)."""
    data = load_json(path)
    require(path, "top level", data, ["images", "annotations"])
    files: dict[int, str] = {}
    for i, img in enumerate(data["images"]):
        require(path, f"images[{i}]", img, ["id", "file_name"])
        files[img["id"]] = img["file_name"]
    out = []
    for i, ann in enumerate(data["annotations"]):
        require(path, f"annotations[{i}]", ann, ["image_id", "caption"])
        if not isinstance(ann["caption"], str):
            raise bad(path, f"annotations[{i}]", "caption is not a string")
        image_id = ann["image_id"]
        ref = ImageRef(path=files.get(image_id), numeric_id=image_id if isinstance(image_id, int) else None)
        out.append(Annotation(ref, {"caption": ann["caption"].strip()}))
    return out


def read_caption_tsv(path: Path) -> list[Annotation]:
    """Conceptual Captions style TSV: `caption<TAB>image reference` per line, optional header."""
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if lineno == 1 and [c.strip().lower() for c in row[:2]] in (
                ["caption", "url"],
                ["caption", "image"],
            ):
                continue
            if len(row) < 2 or not row[0].strip():
                raise bad(path, f"line {lineno}", "expected 'caption<TAB>image reference'")
            try:
                ref = ref_from_value(row[1])
            except (TypeError, ValueError) as exc:
                raise bad(path, f"line {lineno}", str(exc)) from exc
            out.append(Annotation(ref, {"caption": row[0].strip()}))
    return out


def read_caption_jsonl(path: Path) -> list[Annotation]:
    """Plain JSONL: one `{"image": path-or-id, "caption": str}` object per line."""
    out = []
    for lineno, rec in read_jsonl(path):
        require(path, f"line {lineno}", rec, ["image", "caption"])
        if not isinstance(rec["caption"], str):
            raise bad(path, f"line {lineno}", "caption is not a string")
        try:
            ref = ref_from_value(rec["image"])
        except (TypeError, ValueError) as exc:
            raise bad(path, f"line {lineno}", str(exc)) from exc
        out.append(Annotation(ref, {"caption": rec["caption"].strip()}))
    return out


def read_captions(path: Path) -> list[Annotation]:
    """Read one caption file, choosing the format from its extension (.json, .tsv, .jsonl)."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise AnnotationError(f"{path}: annotation file not found")
    if suffix == ".json":
        return read_coco_captions(path)
    if suffix in (".tsv", ".txt"):
        return read_caption_tsv(path)
    if suffix == ".jsonl":
        return read_caption_jsonl(path)
    raise AnnotationError(f"{path}: unknown caption format {suffix!r}; expected .json (COCO), .tsv or .jsonl")
