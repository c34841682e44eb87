"""What the model takes from a batch (docs/contracts.md section 4), shared by training and evaluation.

The model sees flat (N, T) text and (N, R, ...) regions. VCR repeats each image for its 4 choices;
retrieval flattens its C (image, caption) candidates; the pair logits come back as (B, C).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The shard task each task reads (`vilbert-data shard --task ...`).
SHARD_TASK = {
    "pretrain": "captions",
    "vqa": "vqa",
    "vcr": "vcr",
    "refcoco": "refcoco",
    "retrieval": "retrieval",
}
TEXT_KEYS = ("input_ids", "token_type_ids", "attention_mask")
IMAGE_KEYS = ("image_feat", "image_loc", "image_mask")
MODEL_KEYS = TEXT_KEYS + IMAGE_KEYS


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to a device (lists of strings stay as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def batch_size_of(batch: dict[str, Any]) -> int:
    """Number of samples (images / questions) in a batch."""
    return int(batch["input_ids"].shape[0])


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The six model inputs of a flat batch."""
    return {k: batch[k] for k in MODEL_KEYS}


def flatten_candidates(batch: dict[str, Any], task: str) -> tuple[dict[str, torch.Tensor], int]:
    """Model inputs with candidates folded into the batch dim, and the candidate count C."""
    b, c, t = batch["input_ids"].shape  # (B, C, T)
    inputs = {k: batch[k].reshape(b * c, t) for k in TEXT_KEYS}
    for k in IMAGE_KEYS:
        img = batch[k]
        if task == "vcr":  # (B, R, ...) shared by the C choices -> (B*C, R, ...)
            img = img.unsqueeze(1).expand(b, c, *img.shape[1:])
        inputs[k] = img.reshape(b * c, *img.shape[2:])  # retrieval: already (B, C, R, ...)
    return inputs, c


def vcr_pair_logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(B, C) pair logits of a VCR batch: C texts (B, C, T) against each question's one image.

    The image's embedding and visual layers before co-attention run once per question, not once per
    choice (`embed_image`); the same logits as the model's forward on the image repeated C times.
    """
    b, c, t = batch["input_ids"].shape
    text = {k: batch[k].reshape(b * c, t) for k in TEXT_KEYS}
    image = model.vilbert.embed_image(*(batch[k] for k in IMAGE_KEYS)).repeat_interleave(c, dim=0)
    text_states = model.vilbert.embed_text(text["input_ids"], text["token_type_ids"], text["attention_mask"])
    image_mask = batch["image_mask"].repeat_interleave(c, dim=0)
    return model.score_pairs(text_states, image, text["attention_mask"], image_mask).view(b, c)
