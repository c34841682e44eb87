"""Visual7W pointing: which of 4 candidate boxes answers the question (the region head over the candidates).

Loss, validation, evaluation and predictions: `_pointing.py` (cross-entropy over the 4 candidates'
region logits; accuracy = the top candidate is the answer box; chance 25%; predictions per qa_id).
"""

from __future__ import annotations

from vilbert_core.tasks import TaskDefaults
from vilbert_core.tasks._pointing import PointingTask


class Visual7WPointingTask(PointingTask):
    """Visual7W pointing questions."""

    name = "visual7w_pointing"
    shard_task = "visual7w_pointing"
    unit = "q"
    # RefCOCO's recipe (the multi-task reference trains its grounding tasks alike); questions are short
    defaults = TaskDefaults(batch_size=256, lr=4e-5, epochs=20, metric="accuracy", max_text_len=20)


TASK = Visual7WPointingTask()
