"""SNLI-VE: entailment, neutral or contradiction from the three-way head (the reference's vil_tri_prediction).

Training: cross-entropy over the three classes; evaluation: accuracy overall and per gold class beside
chance and shuffled images; predictions [{"pair_id", "prediction", "probs"}].
"""

from __future__ import annotations

from pipelines.tasks.snli_ve import SNLI_VE_CLASSES
from vilbert_core.tasks import TaskDefaults
from vilbert_core.tasks._labels import LabelTask


class SNLIVETask(LabelTask):
    """Visual entailment: the hypothesis against the image."""

    name = "snli_ve"
    shard_task = "snli_ve"
    heads = "a three-way head"
    # assumed: the reference trains its classification tasks at lr 2e-5 for 20 epochs
    defaults = TaskDefaults(batch_size=256, lr=2e-5, epochs=20, metric="accuracy")
    classes = SNLI_VE_CLASSES
    id_field = "pair_id"
    title = "SNLI-VE accuracy"


TASK = SNLIVETask()
