"""VQA v2 layout: questions json + annotations json (ten answers each).

Two shapes of the same records are read: VQA v2 and OK-VQA wrap them in an object
(`{"questions": [...]}`, `{"annotations": [...]}`); VQA-CP v2 (`vqacp_v2_{train,test}_questions.json`,
`..._annotations.json`) stores bare JSON lists of the same records, each with a `coco_split`
field saying which COCO folder (train2014 / val2014) its image is in. A list whose records carry
`answers` is an annotations file, else a questions file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.annotations.common import Annotation, AnnotationError, ImageRef, bad, load_json, require


def vqa_file_kind(path: Path, data: Any) -> tuple[str, list, str]:
    """("questions" | "annotations", the records, how a record is named in messages) of one VQA file."""
    if isinstance(data, dict) and "questions" in data:
        return "questions", data["questions"], "questions"
    if isinstance(data, dict) and "annotations" in data:
        return "annotations", data["annotations"], "annotations"
    if isinstance(data, list) and data:
        # VQA-CP: bare lists; annotations are the records with answers
        return ("annotations" if isinstance(data[0], dict) and "answers" in data[0] else "questions"), data, "record"
    raise AnnotationError(
        f"{path}: not a VQA file (no 'questions' or 'annotations' list, nor a non-empty VQA-CP list of records)"
    )


def read_vqa(paths: Sequence[Path]) -> list[Annotation]:
    """Join VQA questions with their annotations; a questions file alone (test splits) has no answers."""
    questions: list[tuple[Path, dict]] = []
    annotations: dict[int, dict] = {}
    ann_files: list[Path] = []
    for path in paths:
        kind, records, name = vqa_file_kind(path, load_json(path))
        if kind == "questions":
            for i, q in enumerate(records):
                require(path, f"{name}[{i}]", q, ["question_id", "image_id", "question"])
                questions.append((path, q))
            continue
        ann_files.append(path)
        for i, a in enumerate(records):
            require(path, f"{name}[{i}]", a, ["question_id", "image_id", "answers"])
            if not isinstance(a["answers"], list) or not all(
                isinstance(x, dict) and isinstance(x.get("answer"), str) for x in a["answers"]
            ):
                raise bad(path, f"{name}[{i}]", "answers must be a list of {'answer': str}")
            annotations[a["question_id"]] = a
    if not questions:
        raise AnnotationError(f"no VQA questions file among {', '.join(map(str, paths))}")
    out = []
    for path, q in questions:
        a = annotations.get(q["question_id"])
        if ann_files and a is None:
            raise bad(
                path, f"question_id {q['question_id']}", "no annotation in " + ", ".join(map(str, ann_files))
            )
        record = {
            "question_id": int(q["question_id"]),
            "question": q["question"],
            "answers": [x["answer"] for x in a["answers"]] if a else [],
            "answer_type": a.get("answer_type", "") if a else "",
            "question_type": a.get("question_type", "") if a else "",
        }
        if a and "multiple_choice_answer" in a:
            record["multiple_choice_answer"] = a["multiple_choice_answer"]
        image_id = q["image_id"]
        # "annotated": the question has human answers to check (a test split's questions file has none)
        out.append(Annotation(ImageRef(numeric_id=int(image_id)), record, extra={"annotated": a is not None}))
    return out
