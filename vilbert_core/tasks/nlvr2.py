"""NLVR2: true or false of two images, from the two-image head (the reference's vil_binary_prediction).

The sentence runs once with each image; the head reads the two fused vectors concatenated
(`ViLBERTForTasks.image_pair_logits`). Training: cross-entropy over false/true; evaluation: accuracy
(dev, test-P) overall and per label, beside chance and shuffled image pairs; predictions as JSON and as
the leaderboard's CSV, one `identifier,True|False` line per example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vilbert_core.evaluation.common import file_safe
from vilbert_core.tasks import MODEL_KEYS, TaskDefaults
from vilbert_core.tasks._labels import LabelTask


def leaderboard_csv(predictions: list[dict[str, Any]]) -> str:
    """The NLVR2 leaderboard's predictions file: `identifier,True|False` lines, no header."""
    return "".join(f"{p['identifier']},{p['prediction']}\n" for p in predictions)


class NLVR2Task(LabelTask):
    """Two images, one sentence: true or false."""

    name = "nlvr2"
    shard_task = "nlvr2"
    heads = "a two-image head"
    # vilbert-multi-task's NLVR2 recipe: batch 64, lr 2e-5, 20 epochs (as its other classification tasks)
    defaults = TaskDefaults(batch_size=64, lr=2e-5, epochs=20, metric="accuracy")
    classes = ("False", "True")  # label 0 / 1, as the reader writes them
    id_field = "identifier"
    title = "NLVR2 accuracy"

    def logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(B,2) two-image logits: the text (B,T) with both images (B,2,R,...)."""
        return model.image_pair_logits(**{k: batch[k] for k in MODEL_KEYS})

    def write_predictions(self, split: str, extra: Any, out: Path) -> list[str]:
        """The JSON predictions and the leaderboard's CSV (`identifier,True|False`)."""
        from pipelines.fileio import atomic_write_bytes

        name = f"nlvr2_predictions_{file_safe(split)}.csv"
        atomic_write_bytes(out / name, leaderboard_csv(extra).encode("utf-8"))
        return [*super().write_predictions(split, extra, out), name]


TASK = NLVR2Task()
