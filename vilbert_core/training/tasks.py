"""Training's side of the tasks: one batch (docs/contracts.md section 4) -> losses or validation scores.

What each task computes is its spec's (`vilbert_core.tasks`); this module wraps it for the trainer:
`TaskLossModule` puts the model and its loss in one forward for DDP, and the batch helpers move and
count batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vilbert_core.tasks import get_task

from .masking import MaskingSpec

__all__ = ["MaskingSpec", "TaskLossModule", "compute_losses", "validation_scores"]


def compute_losses(
    model: nn.Module, batch: dict[str, Any], task: str, masking: MaskingSpec | None = None
) -> dict[str, torch.Tensor]:
    """Forward one batch and return {"loss": total, plus each component for pretraining}."""
    return get_task(task).loss(model, batch, masking)


class TaskLossModule(nn.Module):
    """The model plus its task loss in one forward, so that DDP sees exactly the outputs the loss uses."""

    def __init__(self, model: nn.Module, task: str, masking: MaskingSpec | None = None) -> None:
        super().__init__()
        self.model, self.task, self.masking = model, task, masking

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of one batch (see compute_losses)."""
        return compute_losses(self.model, batch, self.task, self.masking)


@torch.no_grad()
def validation_scores(model: nn.Module, batch: dict[str, Any], task: str) -> torch.Tensor:
    """Per-sample validation score in [0, 1] (higher is better); for pretraining the alignment accuracy."""
    return get_task(task).validation_score(model, batch)
