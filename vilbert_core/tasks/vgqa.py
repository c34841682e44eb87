"""Visual Genome QA: VQA's answer classifier over the training answers, scored by exact match.

Training and validation are GQA's (BCE on the one-hot target; the top answer's score, i.e. accuracy).
Evaluation: exact-match accuracy of the normalised answer (pipelines/tasks/vgqa.py) overall and per
W-question type (what, where, when, who, why, how), beside the same model given other images'
regions and the blind baselines (the question-only prior over the normalised answers; the majority
answer). VG has no submission server: the predictions file is [{"qa_id", "answer"}].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vilbert_core.tasks import TaskDefaults
from vilbert_core.tasks.gqa import GQATask


class VGQATask(GQATask):
    """Free-form questions on Visual Genome images answered by a classifier over the training answers."""

    name = "vgqa"
    shard_task = "vgqa"
    # VQA's recipe (no paper setting for VG QA alone); the multi-task reference shares VQA's answer head
    defaults = TaskDefaults(batch_size=256, lr=4e-5, epochs=20, metric="vqa_score")
    reference_answer_head = "vil_prediction"
    title = "VG QA accuracy"
    groups = (("per_question_type", "q: "),)
    plot_name = "accuracy_by_question_type"
    question_fields = ("answers", "question", "question_type")

    def submission(self, predictions: Mapping[Any, str]) -> Any:
        """The predictions file: [{"qa_id", "answer"}] sorted by id."""
        return [{"qa_id": q, "answer": predictions[q]} for q in sorted(predictions)]


TASK = VGQATask()
