"""GuessWhat?! answers: yes, no or N/A from the three-way head (the reference's vil_tri_prediction).

Training: cross-entropy over the three answers; evaluation: accuracy overall and per gold answer beside
chance and shuffled images; predictions [{"question_id", "prediction", "probs"}].
"""

from __future__ import annotations

from pipelines.tasks.guesswhat import GUESSWHAT_ANSWERS
from vilbert_core.tasks import TaskDefaults
from vilbert_core.tasks._labels import LabelTask


class GuessWhatTask(LabelTask):
    """The GuessWhat?! oracle: a question's answer about the image."""

    name = "guesswhat"
    shard_task = "guesswhat"
    heads = "a three-way head"
    # assumed: the reference trains its classification tasks at lr 2e-5 for 20 epochs
    defaults = TaskDefaults(batch_size=256, lr=2e-5, epochs=20, metric="accuracy")
    classes = GUESSWHAT_ANSWERS
    id_field = "question_id"
    title = "GuessWhat?! answer accuracy"


TASK = GuessWhatTask()
