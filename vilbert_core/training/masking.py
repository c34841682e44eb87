"""Masking for ViLBERT pretraining: masked language modelling and masked region modelling.

Text (BERT): each real, non-special token is picked with probability 0.15; of the picked ones 80%
become [MASK], 10% a random token, 10% stay unchanged. Regions: each real region other than the
global [IMG] region 0 is picked with probability 0.15; of the picked ones 90% have their feature
zeroed and 10% keep it. Labels are -100 wherever nothing is predicted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class MaskingSpec:
    """What pretraining masking needs to know about the vocabulary, and its random generator."""

    mask_token_id: int
    vocab_size: int
    special_token_ids: tuple[int, ...]
    generator: torch.Generator

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, generator: torch.Generator) -> MaskingSpec:
        """Settings from a TextTokenizer: [MASK] id, vocabulary size, never-masked ids ([PAD], [CLS], [SEP])."""
        return cls(
            mask_token_id=tokenizer.mask_id,
            vocab_size=tokenizer.vocab_size,
            special_token_ids=(tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id),
            generator=generator,
        )


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where random draws are made: on the generator's own device when there is one, else on `device`.

    The trainer's masking generator lives on the CPU (its state goes into checkpoints) and a CPU
    generator cannot draw CUDA tensors; drawing there and moving the result also gives the same masks
    on every device for one seed.
    """
    return generator.device if generator is not None else device


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Iterable[int],
    generator: torch.Generator | None = None,
    mask_prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked input_ids, MLM labels): labels hold the original id at picked positions, else -100."""
    # input_ids, attention_mask: (..., T)
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for tok in special_token_ids:
        special |= input_ids == tok
    candidates = attention_mask.bool() & ~special

    shape, device, src = input_ids.shape, input_ids.device, _draw_device(generator, input_ids.device)
    draw = torch.rand(shape, generator=generator, device=src).to(device)
    picked = (draw < mask_prob) & candidates
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    # One second uniform draw splits the picked tokens 80 / 10 / 10.
    action = torch.rand(shape, generator=generator, device=src).to(device)
    to_mask = picked & (action < 0.8)
    to_random = picked & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=src, dtype=input_ids.dtype)
    random_ids = random_ids.to(device)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mask_regions(
    image_feat: torch.Tensor,
    image_mask: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    mask_prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (image_feat with 90% of picked regions zeroed, region labels: 1 where picked, else -100)."""
    # image_feat: (B, R, D); image_mask: (B, R); region 0 is the global [IMG] region
    shape, device, src = image_mask.shape, image_feat.device, _draw_device(generator, image_feat.device)
    candidates = image_mask.bool().clone()
    candidates[..., 0] = False

    draw = torch.rand(shape, generator=generator, device=src).to(device)
    picked = (draw < mask_prob) & candidates
    action = torch.rand(shape, generator=generator, device=src).to(device)
    zeroed = picked & (action < 0.9)

    masked_feat = image_feat.masked_fill(zeroed.unsqueeze(-1), 0.0)
    labels = torch.where(picked, torch.ones(shape, dtype=torch.long, device=device), IGNORE_INDEX)
    return masked_feat, labels


def mask_batch(
    batch: dict[str, torch.Tensor], spec: MaskingSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked input_ids, MLM labels, masked image_feat, region labels) of a batch: tokens first, then regions."""
    input_ids, mlm_labels = mask_tokens(
        batch["input_ids"],
        batch["attention_mask"],
        mask_token_id=spec.mask_token_id,
        vocab_size=spec.vocab_size,
        special_token_ids=spec.special_token_ids,
        generator=spec.generator,
    )
    image_feat, region_labels = mask_regions(batch["image_feat"], batch["image_mask"], generator=spec.generator)
    return input_ids, mlm_labels, image_feat, region_labels
