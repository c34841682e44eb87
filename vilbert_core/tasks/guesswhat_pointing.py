"""GuessWhat?! guesser: which of the game's objects the dialogue is about (the region head over the objects).

Loss, validation, evaluation and predictions: `_pointing.py` (cross-entropy over the objects' region
logits; accuracy = the top object is the target; chance = the mean of 1 / objects; predictions per
game id).
"""

from __future__ import annotations

from vilbert_core.tasks import TaskDefaults
from vilbert_core.tasks._pointing import PointingTask


class GuessWhatPointingTask(PointingTask):
    """GuessWhat?! successful games."""

    name = "guesswhat_pointing"
    shard_task = "guesswhat_pointing"
    unit = "game"
    # RefCOCO's recipe; a dialogue (5 questions and answers on average) needs a longer text than a question
    defaults = TaskDefaults(batch_size=256, lr=4e-5, epochs=20, metric="accuracy", max_text_len=128)


TASK = GuessWhatPointingTask()
