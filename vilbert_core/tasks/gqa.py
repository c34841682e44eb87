"""GQA: VQA's answer classifier over the training answers, scored by exact match.

Training and validation are VQA's (BCE on the one-hot target; the top answer's score, i.e. accuracy).
Evaluation: accuracy overall and per structural and semantic type, beside the same model given other
images' regions and the blind baselines (the question-only prior: most common training answer per
question wording, else per detailed type; the majority answer); the submission file in GQA's format
[{"questionId", "prediction"}]. A model converted from the multi-task reference reads its
`vil_prediction_gqa` head (1533 answers there).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vilbert_core.evaluation.baselines import QuestionPrior
from vilbert_core.evaluation.loading import EvalError
from vilbert_core.tasks import TaskDefaults
from vilbert_core.tasks.vqa import VQATask, fit_question_prior

GQA_ROWS = (("per_structural", "structural: "), ("per_semantic", "semantic: "))


def written_answer(answers: Sequence[str]) -> str | None:
    """A GQA question's one answer as written (GQA scores exact matches: no VQA normalisation)."""
    return answers[0] if answers else None


def fit_gqa_prior(records: Iterable[Mapping]) -> QuestionPrior:
    """The question-only prior on training records, over answers as written."""
    return QuestionPrior.fit(records, answer_of=written_answer)


class GQATask(VQATask):
    """Compositional questions answered by a classifier over the training answers."""

    name = "gqa"
    shard_task = "gqa"
    heads = "an answer head"
    # The paper-era multi-task recipe trains GQA like VQA (docs/tasks.md); its answer head has 1533 answers.
    defaults = TaskDefaults(batch_size=256, lr=4e-5, epochs=20, metric="vqa_score")
    reference_answer_head = "vil_prediction_gqa"
    title = "GQA accuracy"
    groups = GQA_ROWS
    plot_name = "accuracy_by_structural_type"
    question_fields = ("answers", "question", "question_type", "structural", "semantic")

    def accuracy(self, predictions: Mapping[Any, str], questions: list[dict]) -> dict:
        """Exact-match accuracy (percent) overall and per structural and semantic type."""
        if not questions:
            raise EvalError("no GQA questions with answers to score")
        hits = {q["question_id"]: float(predictions.get(q["question_id"]) == q["answers"][0]) for q in questions}
        out: dict[str, Any] = {"overall": 100.0 * sum(hits.values()) / len(hits)}
        for group, _ in self.groups:
            field = group.removeprefix("per_")
            by: dict[str, list[float]] = defaultdict(list)
            for q in questions:
                by[q[field] or "unknown"].append(hits[q["question_id"]])
            out[group] = {t: 100.0 * sum(v) / len(v) for t, v in sorted(by.items())}
        return {**out, "num_questions": len(questions)}

    def fit_prior(self, train_data: str | Path | None) -> QuestionPrior | None:
        """The question-only prior of the training split, over GQA's answers as written."""
        return fit_question_prior(train_data, answer_of=written_answer)

    def submission(self, predictions: Mapping[Any, str]) -> Any:
        """GQA's submission file: [{"questionId", "prediction"}] sorted by id."""
        return [{"questionId": str(q), "prediction": predictions[q]} for q in sorted(predictions)]


TASK = GQATask()
