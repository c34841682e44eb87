"""Visual7W pointing (`dataset_v7w_pointing.json`): one example per question; pick the answer among 4 boxes.

The official layout: {"images": [{"image_id", "filename", "split", "qa_pairs": [{"qa_id", "question",
"answer" (a box id), "multiple_choices" (3 box ids), "type"}]}], "boxes": [{"box_id", "x", "y",
"width", "height", "name"}]}. `--split` (train / val / test) selects images by their "split". The 4
candidates of a question are its answer box and its 3 multiple choices, sorted by box id (so their
order says nothing of the answer); boxes are top-left + size in pixels, used as continuous corners.
`--images` is the folder of the `v7w_<image_id>.jpg` files: the candidate boxes' features come from
the detector's given-box mode (see `_pointing.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.annotations.common import Annotation, AnnotationError, ImageRef, bad, load_json, require
from pipelines.tasks._pointing import PointingDataTask, image_path


def xywh_box(path: Path, where: str, box: Any) -> list[float]:
    """The xyxy corners of one `boxes` entry (top-left x, y + width, height)."""
    try:
        x, y, w, h = (float(box[k]) for k in ("x", "y", "width", "height"))
    except (KeyError, TypeError, ValueError):
        raise bad(path, where, "needs numeric x, y, width, height") from None
    return [x, y, x + w, y + h]


def read_visual7w_pointing(paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
    """One annotation per pointing question of the split's images, in file, image and question order."""
    out: list[Annotation] = []
    found_splits: set[str] = set()
    cache: dict[str, str] = {}
    for path in paths:
        data = load_json(path)
        require(path, "top level", data, ("images", "boxes"))
        boxes: dict[Any, list[float]] = {}
        for i, box in enumerate(data["boxes"]):
            require(path, f"boxes[{i}]", box, ("box_id",))
            boxes[box["box_id"]] = xywh_box(path, f"boxes[{i}] (box_id {box['box_id']})", box)
        for i, image in enumerate(data["images"]):
            require(path, f"images[{i}]", image, ("image_id", "filename", "split", "qa_pairs"))
            found_splits.add(image["split"])
            if image["split"] != split:
                continue
            ref = ImageRef(path=image["filename"], numeric_id=int(image["image_id"]))
            extra = {"image": image_path(images_dir, image["filename"], "visual7w_pointing", cache)}
            for j, qa in enumerate(image["qa_pairs"]):
                where = f"images[{i}].qa_pairs[{j}]"
                require(path, where, qa, ("qa_id", "question", "answer", "multiple_choices"))
                ids = sorted({qa["answer"], *qa["multiple_choices"]})
                if len(ids) != 1 + len(qa["multiple_choices"]):
                    raise bad(path, f"{where} (qa_id {qa['qa_id']})", "the answer and multiple_choices repeat a box")
                unknown = [b for b in ids if b not in boxes]
                if unknown:
                    raise bad(path, f"{where} (qa_id {qa['qa_id']})", f"box id {unknown[0]} is not in boxes")
                record = {"qa_id": qa["qa_id"], "question": qa["question"], "type": qa.get("type"),
                          "answer_id": qa["answer"], "candidate_ids": ids,
                          "candidate_boxes": [boxes[b] for b in ids], "label": ids.index(qa["answer"])}  # fmt: skip
                out.append(Annotation(ref, record, extra))
    if split not in found_splits:
        raise AnnotationError(f"{', '.join(map(str, paths))}: no images of split {split!r}; the files have "
                              f"{', '.join(sorted(found_splits)) or 'none'}")  # fmt: skip
    return out


class Visual7WPointingTask(PointingDataTask):
    """Visual7W pointing: which of 4 boxes answers the question."""

    name = "visual7w_pointing"
    split_selects_records = True
    id_key = "qa_id"

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """The split's pointing questions with their 4 candidate boxes."""
        return read_visual7w_pointing(paths, split, images_dir)

    def text(self, record: dict[str, Any]) -> str:
        """The question."""
        return record["question"]


TASK = Visual7WPointingTask()
