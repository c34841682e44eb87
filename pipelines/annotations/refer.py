"""RefCOCO / RefCOCO+ / RefCOCOg in the refer toolkit layout: `refs(unc|google|umd).p` + `instances.json`.

The refs pickle is read with `safe_load_pickle`, which admits plain containers (dict, list, tuple,
set, str, bytes, numbers, bool, None) and nothing else: a pickle that names any other class or
function (the way a malicious pickle runs code) is refused before anything is built.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.annotations.common import Annotation, AnnotationError, ImageRef, bad, load_json, require


class UnsafePickleError(AnnotationError):
    """A pickle that asks for a global (class or function): refused."""


# The only globals a plain-container pickle may need: protocol-2 bytes and sets. None can run code.
ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    *(
        (m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset")
    ),  # __builtin__: Python 2 name
}


class PlainContainerUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` refuses every global but those that build bytes and sets."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only `ALLOWED_GLOBALS`; refuse every other class or function."""
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def safe_load_pickle(path: str | Path) -> Any:
    """Load a pickle made only of plain containers; `UnsafePickleError` names the file otherwise."""
    data = Path(path).read_bytes()
    # refs(*).p were written by Python 2: its str objects are bytes, try UTF-8 then Latin-1.
    for encoding in ("utf-8", "latin1"):
        try:
            return PlainContainerUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except pickle.UnpicklingError as exc:
            if "refused global" in str(exc):
                raise UnsafePickleError(
                    f"{path}: unsafe pickle: {exc}; only plain containers are admitted"
                ) from exc
            raise AnnotationError(f"{path}: not a valid pickle: {exc}") from exc
        except (EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
            raise AnnotationError(f"{path}: not a valid pickle: {exc}") from exc
    raise AnnotationError(f"{path}: pickle strings are neither UTF-8 nor Latin-1")


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """COCO [x, y, w, h] to [x1, y1, x2, y2]."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def read_refer(paths: Sequence[Path], split: str) -> list[Annotation]:
    """One Annotation per referring sentence of `split`; the record carries the referred box in xyxy pixels."""
    refs_path = next((p for p in paths if p.suffix.lower() in (".p", ".pkl", ".pickle")), None)
    inst_path = next((p for p in paths if p.suffix.lower() == ".json"), None)
    if refs_path is None or inst_path is None:
        raise AnnotationError(
            f"refcoco needs a refs pickle (refs(unc).p) and instances.json, got {', '.join(map(str, paths))}"
        )
    if not refs_path.exists():
        raise AnnotationError(f"{refs_path}: annotation file not found")
    refs = safe_load_pickle(refs_path)
    if not isinstance(refs, list):
        raise bad(refs_path, "top level", f"expected a list of refs, got {type(refs).__name__}")
    inst = load_json(inst_path)
    require(inst_path, "top level", inst, ["images", "annotations"])
    images: dict[int, dict] = {}
    for i, img in enumerate(inst["images"]):
        require(inst_path, f"images[{i}]", img, ["id", "file_name"])
        images[img["id"]] = img
    boxes: dict[int, list[float]] = {}
    for i, ann in enumerate(inst["annotations"]):
        require(inst_path, f"annotations[{i}]", ann, ["id", "image_id", "bbox"])
        boxes[ann["id"]] = xywh_to_xyxy(ann["bbox"])
    seen: set[str] = set()
    out = []
    for i, ref in enumerate(refs):
        require(refs_path, f"refs[{i}]", ref, ["ref_id", "ann_id", "image_id", "split", "sentences"])
        seen.add(str(ref["split"]))
        if ref["split"] != split:
            continue
        if ref["ann_id"] not in boxes:
            raise bad(refs_path, f"refs[{i}]", f"ann_id {ref['ann_id']} not in {inst_path}")
        img = images.get(ref["image_id"])
        ref_img = ImageRef(path=img["file_name"] if img else None, numeric_id=int(ref["image_id"]))
        for j, sent in enumerate(ref["sentences"]):
            require(refs_path, f"refs[{i}].sentences[{j}]", sent, ["sent_id", "sent"])
            record = {
                "ref_id": int(ref["ref_id"]),
                "sent_id": int(sent["sent_id"]),
                "sentence": str(sent["sent"]),
                "gt_box": boxes[ref["ann_id"]],
            }
            out.append(Annotation(ref_img, record))
    if not out:
        raise bad(
            refs_path,
            "refs",
            f"no ref in split {split!r}; splits present: {', '.join(sorted(seen)) or 'none'}",
        )
    return out
