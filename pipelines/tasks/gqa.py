"""GQA (balanced questions): one answer per question, an answer list from the training answers.

The official layout is one JSON object per split, keyed by question id:
`{"201307251": {"imageId": "2354786", "question": "...", "answer": "yes", "fullAnswer": "...",
"types": {"structural": "verify", "semantic": "attr", "detailed": "..."}, ...}}`; the test and
submission files have no `answer`. Images are named `<imageId>.jpg` in the GQA release.

`shard --task gqa` keeps the answers as written (GQA scores exact matches; no VQA normalisation),
builds the answer list from the training split's answers seen `--min-answer-count`+ times (the
multi-task reference keeps 1533) or reuses `--answers`, and gives each question a one-hot target.
Everything else (examples, batches, the answer head) is VQA's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.annotations.common import Annotation, AnnotationError, ImageRef, bad, load_json, require
from pipelines.tasks.vqa import VQATask, answer_vocab_of


def read_gqa(paths: Sequence[Path]) -> list[Annotation]:
    """Questions of GQA question files ({question id: question}), in file then question-id order."""
    out: list[Annotation] = []
    for path in paths:
        data = load_json(path)
        if not isinstance(data, dict):
            raise AnnotationError(f"{path}: expected GQA questions (an object keyed by question id)")
        for qid in sorted(data):
            q = data[qid]
            where = f"question {qid}"
            require(path, where, q, ["imageId", "question"])
            answer = q.get("answer")
            if answer is not None and not isinstance(answer, str):
                raise bad(path, where, "answer must be a string")
            types = q.get("types") or {}
            if not isinstance(types, dict):
                raise bad(path, where, "types must be an object")
            image = str(q["imageId"])
            record = {
                "question_id": str(qid),
                "question": q["question"],
                "answers": [answer.strip()] if answer is not None else [],
                "full_answer": q.get("fullAnswer", ""),
                "question_type": types.get("detailed", ""),
                "structural": types.get("structural", ""),
                "semantic": types.get("semantic", ""),
            }
            ref = ImageRef(path=f"{image}.jpg", numeric_id=int(image) if image.isdigit() else None)
            out.append(Annotation(ref, record))
    return out


def build_gqa_answers(anns: Sequence[Annotation], min_count: int) -> list[str]:
    """Answers of min_count+ questions, most frequent first, then alphabetical (the same list on every run)."""
    counts = Counter(a.record["answers"][0] for a in anns if a.record["answers"])
    return sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))


class GQATask(VQATask):
    """Compositional questions on Visual Genome images, scored by exact match."""

    name = "gqa"
    list_fields = ("answers", "question_type", "question", "structural", "semantic")

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """Every question of the given GQA question files (the split name is only recorded)."""
        return read_gqa(paths)

    def attach_targets(
        self, anns: Sequence[Annotation], answers: list[str] | None, min_count: int, split: str
    ) -> list[str]:
        """The answer list (given, or built from these answers); a one-hot label per question whose answer is in it."""
        vocab = answer_vocab_of(anns, answers, split, lambda: build_gqa_answers(anns, min_count))
        answer_to_id = {a: i for i, a in enumerate(vocab)}
        for ann in anns:
            known = [answer_to_id[a] for a in ann.record["answers"] if a in answer_to_id]
            ann.record["labels"], ann.record["scores"] = known, [1.0] * len(known)
        return vocab

    def shard_report(self, anns: Sequence[Annotation], report_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """How many answered questions have an answer outside the answer list (they can never be right)."""
        unknown = sum(1 for a in anns if a.record["answers"] and not a.record["labels"])
        return {"answers_not_in_answer_list": unknown}, []

    def fields(self, record: dict[str, Any]) -> dict[str, Any]:
        """What an example keeps of its record besides the question text and target."""
        return {"question_id": record["question_id"], **{k: record[k] for k in self.list_fields}}

    def question_ids(self, examples: Sequence[dict[str, Any]]) -> Any:
        """GQA question ids are strings: a list."""
        return [ex["question_id"] for ex in examples]


TASK = GQATask()
