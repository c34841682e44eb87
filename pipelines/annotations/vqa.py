"""VQA v2: questions json (`questions`) + annotations json (`annotations`, ten answers each)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipelines.annotations.common import Annotation, AnnotationError, ImageRef, bad, load_json, require


def read_vqa(paths: Sequence[Path]) -> list[Annotation]:
    """Join VQA v2 questions with their annotations; a questions file alone (test splits) has no answers."""
    questions: list[tuple[Path, dict]] = []
    annotations: dict[int, dict] = {}
    ann_files: list[Path] = []
    for path in paths:
        data = load_json(path)
        if isinstance(data, dict) and "questions" in data:
            for i, q in enumerate(data["questions"]):
                require(path, f"questions[{i}]", q, ["question_id", "image_id", "question"])
                questions.append((path, q))
        elif isinstance(data, dict) and "annotations" in data:
            ann_files.append(path)
            for i, a in enumerate(data["annotations"]):
                require(path, f"annotations[{i}]", a, ["question_id", "image_id", "answers"])
                if not isinstance(a["answers"], list) or not all(
                    isinstance(x, dict) and isinstance(x.get("answer"), str) for x in a["answers"]
                ):
                    raise bad(path, f"annotations[{i}]", "answers must be a list of {'answer': str}")
                annotations[a["question_id"]] = a
        else:
            raise AnnotationError(f"{path}: not a VQA v2 file (no 'questions' or 'annotations' list)")
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
