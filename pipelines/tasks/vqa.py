"""VQA v2: questions + annotations json; soft scores over the answer list; one example per question.

`shard` builds the answer list from the training split (or reuses `--answers`) and stores each
question's in-list answers as `labels` / soft `scores`; the dataset turns them into `vqa_target`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.annotations.common import Annotation
from pipelines.annotations.vqa import read_vqa
from pipelines.fileio import write_jsonl
from pipelines.tasks import DataTask, answer_target, example_base, lists
from pipelines.vqa_answers import answer_targets, build_answer_vocab

log = logging.getLogger(__name__)

VQA_ANSWERS_PER_QUESTION = 10  # VQA v2: ten human answers, which the official accuracy's average assumes


def answer_count_report(anns: Sequence[Annotation]) -> list[dict[str, Any]]:
    """Questions whose annotation has other than ten answers (questions without annotations are left out)."""
    return [
        {"question_id": a.record["question_id"], "answers": len(a.record["answers"])}
        for a in anns
        if a.extra.get("annotated", True) and len(a.record["answers"]) != VQA_ANSWERS_PER_QUESTION
    ]


def answer_vocab_of(anns: Sequence[Annotation], answers: list[str] | None, split: str, build: Any) -> list[str]:
    """The given answer list, else `build()` (with a warning when it is built from a split other than train)."""
    if answers:
        return list(answers)
    if not split.startswith("train"):
        log.warning("building the answer vocabulary from split %r; pass --answers TRAINDIR/answers.json", split)
    return build()


class VQATask(DataTask):
    """Open-ended questions scored against ten human answers (soft targets over an answer list)."""

    name = "vqa"
    answer_vocab = True
    swap = "regions"
    # per-question fields that batches carry as lists (question_id is a tensor for VQA)
    list_fields: tuple[str, ...] = ("answers", "answer_type", "question_type", "question")

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """Questions joined with their annotations (a questions file alone: no answers)."""
        return read_vqa(paths)

    def attach_targets(
        self, anns: Sequence[Annotation], answers: list[str] | None, min_count: int, split: str
    ) -> list[str]:
        """Answer list of normalised answers of min_count+ questions (or `answers`); labels/scores per question."""
        vocab = answer_vocab_of(anns, answers, split, lambda: build_answer_vocab(
            ({"question_id": a.record["question_id"], "answers": [{"answer": x} for x in a.record["answers"]],
              **({"multiple_choice_answer": a.record["multiple_choice_answer"]}
                 if "multiple_choice_answer" in a.record else {})}
             for a in anns if a.record["answers"]),
            min_count=min_count,
        ))  # fmt: skip
        answer_to_id = {a: i for i, a in enumerate(vocab)}
        for ann in anns:
            ann.record.pop("multiple_choice_answer", None)  # not part of the ann.json record
            ann.record["labels"], ann.record["scores"] = answer_targets(ann.record["answers"], answer_to_id)
        return vocab

    def shard_report(self, anns: Sequence[Annotation], report_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """Questions without ten answers: listed in answer_counts.jsonl, counted, and warned about."""
        odd = answer_count_report(anns)
        write_jsonl(report_dir / "answer_counts.jsonl", odd)
        warnings = []
        if odd:
            n = VQA_ANSWERS_PER_QUESTION
            warnings.append(
                f"{len(odd)} question(s) have other than the {n} answers of VQA v2 (first: question_id "
                f"{odd[0]['question_id']} with {odd[0]['answers']}); the official accuracy averages over "
                f"leave-one-out subsets of {n - 1}, so their scores are not comparable "
                f"(list: {report_dir / 'answer_counts.jsonl'})"
            )
            log.warning("%s", warnings[-1])
        return {"questions_without_10_answers": len(odd)}, warnings

    def fields(self, record: dict[str, Any]) -> dict[str, Any]:
        """What an example keeps of its record besides the question text and target."""
        return {"question_id": record["question_id"], "answers": record["answers"],
                "answer_type": record["answer_type"], "question_type": record.get("question_type", ""),
                "question": record["question"]}  # fmt: skip

    def examples(self, ds: Any, items: Iterator[tuple[str, list[dict], Any]], rng: random.Random) -> Iterator[dict]:
        """One example per question: its text and the soft scores over `ds.num_answers` answers."""
        for key, records, regions in items:
            for r in records:
                yield {**example_base(ds, key, regions), "texts": [ds.tokenizer.encode(r["question"])],
                       "vqa_target": answer_target(r, ds.num_answers), **self.fields(r)}  # fmt: skip

    def question_ids(self, examples: Sequence[dict[str, Any]]) -> Any:
        """question_id (B,) long."""
        return torch.tensor([ex["question_id"] for ex in examples], dtype=torch.long)

    def collate(self, examples: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        """vqa_target (B,A), question_id, and the per-question lists."""
        batch["vqa_target"] = torch.from_numpy(np.stack([ex["vqa_target"] for ex in examples]))
        batch["question_id"] = self.question_ids(examples)
        lists(examples, batch, self.list_fields)


TASK = VQATask()
