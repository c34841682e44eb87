"""Per-task forward passes: turn a batch (docs/contracts.md section 4) into losses and validation scores.

How a batch becomes model inputs (candidates folded, VCR's pair logits) is in `vilbert_core.batches`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vilbert_core.batches import flatten_candidates as _flatten_candidates
from vilbert_core.batches import model_inputs as _model_inputs
from vilbert_core.batches import vcr_pair_logits

from .losses import multiple_choice_loss, pretraining_losses, pretraining_positions, refer_loss, vqa_loss
from .masking import mask_regions, mask_tokens

TASKS = ("pretrain", "vqa", "vcr", "refcoco", "retrieval")


@dataclass
class MaskingSpec:
    """What pretraining masking needs to know about the vocabulary, and its random generator."""

    mask_token_id: int
    vocab_size: int
    special_token_ids: tuple[int, ...]
    generator: torch.Generator


def compute_losses(
    model: nn.Module, batch: dict[str, Any], task: str, masking: MaskingSpec | None = None
) -> dict[str, torch.Tensor]:
    """Forward one batch and return {"loss": total, plus each component for pretraining}."""
    if task == "pretrain":
        if masking is None:
            raise ValueError("pretraining needs a MaskingSpec (mask token id, vocab size, special ids)")
        input_ids, mlm_labels = mask_tokens(
            batch["input_ids"],
            batch["attention_mask"],
            mask_token_id=masking.mask_token_id,
            vocab_size=masking.vocab_size,
            special_token_ids=masking.special_token_ids,
            generator=masking.generator,
        )
        image_feat, region_labels = mask_regions(
            batch["image_feat"], batch["image_mask"], generator=masking.generator
        )
        inputs = {**_model_inputs(batch), "input_ids": input_ids, "image_feat": image_feat}
        # the heads run only where a loss is taken: masked tokens and regions of aligned pairs
        tokens, regions = pretraining_positions(mlm_labels, region_labels, batch["align_label"])
        out = model(**inputs, mlm_positions=tokens, mrm_positions=regions)
        return pretraining_losses(out, mlm_labels, region_labels, batch["image_target"], batch["align_label"])
    if task == "vqa":
        out = model(**_model_inputs(batch))
        return {"loss": vqa_loss(out.vqa_logits, batch["vqa_target"])}
    if task in ("vcr", "retrieval"):
        inputs, c = _flatten_candidates(batch, task)
        out = model(**inputs)
        return {"loss": multiple_choice_loss(out.pair_logit.view(-1, c), batch["label"])}
    if task == "refcoco":
        out = model(**_model_inputs(batch))
        return {"loss": refer_loss(out.region_logits, batch["region_target"], batch["image_mask"])}
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


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
    if task == "pretrain":
        # only the alignment head is scored: no token or region goes through the MLM / MRM heads
        no_tokens = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        no_regions = torch.zeros_like(batch["image_mask"], dtype=torch.bool)
        out = model(**_model_inputs(batch), mlm_positions=no_tokens, mrm_positions=no_regions)
        return ((out.align_logit > 0).float() == batch["align_label"].float()).float()
    if task == "vqa":
        # VQA soft accuracy: the soft score of the predicted answer
        out = model(**_model_inputs(batch))
        pred = out.vqa_logits.argmax(-1, keepdim=True)
        return batch["vqa_target"].gather(1, pred).squeeze(1).float()
    if task == "vcr":
        return (vcr_pair_logits(model, batch).argmax(-1) == batch["label"]).float()
    if task == "retrieval":
        inputs, c = _flatten_candidates(batch, task)
        out = model(**inputs)
        return (out.pair_logit.view(-1, c).argmax(-1) == batch["label"]).float()
    if task == "refcoco":
        # correct when the top real region overlaps the ground truth with IoU >= 0.5
        out = model(**_model_inputs(batch))
        logits = out.region_logits.float().masked_fill(batch["image_mask"] == 0, float("-inf"))
        top = logits.argmax(-1, keepdim=True)
        return (batch["region_iou"].gather(1, top).squeeze(1) >= 0.5).float()
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
