"""What the model takes from a batch (docs/contracts.md section 4), shared by training and evaluation.

The model sees flat (N, T) text and (N, R, ...) regions. Tasks with C candidates per sample (VCR's
choices, retrieval's pairs) fold them into the batch dim; their pair logits come back as (B, C).
"""

from __future__ import annotations

from typing import Any

import torch

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


def flatten_candidates(batch: dict[str, Any], shared_image: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Model inputs with candidates folded into the batch dim, and the candidate count C.

    Texts are (B, C, T); images (B, C, R, ...) or, with shared_image, (B, R, ...) for all C texts.
    """
    b, c, t = batch["input_ids"].shape
    inputs = {k: batch[k].reshape(b * c, t) for k in TEXT_KEYS}
    for k in IMAGE_KEYS:
        img = batch[k]
        if shared_image:  # (B, R, ...) -> (B*C, R, ...)
            img = img.unsqueeze(1).expand(b, c, *img.shape[1:])
        inputs[k] = img.reshape(b * c, *img.shape[2:])
    return inputs, c
