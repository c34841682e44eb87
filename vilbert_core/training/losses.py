"""Training losses of every ViLBERT task, as the reference computes them.

Each function takes logits and targets as tensors and returns a scalar (or a dict of scalars for
pretraining). All are safe when nothing is to be predicted (no masked token or region): they then
return a zero that still belongs to the graph, so backward and DDP gradient reduction stay uniform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masking import IGNORE_INDEX


def _zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """A scalar zero attached to t's graph (keeps every parameter in the backward pass)."""
    return t.sum() * 0.0


def mlm_loss(mlm_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled tokens (labels -100 elsewhere); 0 when none is labelled."""
    # mlm_logits: (B, T, V) with labels (B, T), or only the predicted tokens: (N, V) with labels (N,)
    flat_labels = labels.reshape(-1)
    if not (flat_labels != IGNORE_INDEX).any():
        return _zero_like_graph(mlm_logits)
    logits = mlm_logits.reshape(-1, mlm_logits.shape[-1]).float()
    return F.cross_entropy(logits, flat_labels, ignore_index=IGNORE_INDEX)


def mrm_loss(
    mrm_logits: torch.Tensor, image_target: torch.Tensor, region_labels: torch.Tensor
) -> torch.Tensor:
    """KL(detector class distribution || softmax(logits)) summed over masked regions / number masked."""
    # mrm_logits, image_target: (B, R, C) with region_labels (B, R), 1 = masked, -100 elsewhere; or only
    # the predicted regions: (N, C) with labels (N,)
    masked = region_labels == 1
    n_masked = masked.sum()
    if n_masked == 0:
        return _zero_like_graph(mrm_logits)
    log_q = F.log_softmax(mrm_logits.float(), dim=-1)
    # kl_div(log_q, p) = p * (log p - log q), defined as 0 where p == 0
    kl = F.kl_div(log_q, image_target.float(), reduction="none").sum(-1)  # (B, R)
    return (kl * masked).sum() / n_masked


def alignment_loss(align_logit: torch.Tensor, align_label: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the alignment logit against 1 = caption matches the image."""
    return F.binary_cross_entropy_with_logits(align_logit.float(), align_label.float())


def pretraining_positions(
    mlm_labels: torch.Tensor, region_labels: torch.Tensor, align_label: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,T) tokens and (B,R) regions that carry an MLM / MRM loss: masked ones of aligned pairs only."""
    aligned = align_label.bool().unsqueeze(-1)  # (B, 1): misaligned pairs contribute no MLM or MRM loss
    return (mlm_labels != IGNORE_INDEX) & aligned, (region_labels == 1) & aligned


def pretraining_losses(
    out: object,
    mlm_labels: torch.Tensor,
    region_labels: torch.Tensor,
    image_target: torch.Tensor,
    align_label: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """MLM, MRM and alignment losses and their sum; misaligned pairs contribute no MLM or MRM loss.

    out.mlm_logits / out.mrm_logits cover every position, (B,T,V) / (B,R,C), or only the positions of
    pretraining_positions(), (N,V) / (M,C), as the model computes them when given those positions.
    """
    tokens, regions = pretraining_positions(mlm_labels, region_labels, align_label)
    mlm_logits = out.mlm_logits[tokens] if out.mlm_logits.dim() == 3 else out.mlm_logits
    mrm_logits = out.mrm_logits[regions] if out.mrm_logits.dim() == 3 else out.mrm_logits
    losses = {
        "mlm": mlm_loss(mlm_logits, mlm_labels[tokens]),
        "mrm": mrm_loss(mrm_logits, image_target[regions], region_labels[regions]),
        "align": alignment_loss(out.align_logit, align_label),
    }
    losses["loss"] = losses["mlm"] + losses["mrm"] + losses["align"]
    return losses


def vqa_loss(vqa_logits: torch.Tensor, vqa_target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits on soft scores, mean over all entries times the answer count (the reference)."""
    # vqa_logits, vqa_target: (B, A)
    bce = F.binary_cross_entropy_with_logits(vqa_logits.float(), vqa_target.float())
    return bce * vqa_target.shape[1]


def multiple_choice_loss(pair_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over candidates' pair logits (VCR answers/rationales, retrieval candidates)."""
    # pair_logits: (B, C); label: (B,) index of the right candidate
    return F.cross_entropy(pair_logits.float(), label)


def refer_loss(
    region_logits: torch.Tensor, region_target: torch.Tensor, image_mask: torch.Tensor
) -> torch.Tensor:
    """BCE over real regions against IoU targets (zeroed below 0.5): sum over regions, mean over batch."""
    # region_logits, region_target, image_mask: (B, R); padded regions are left out
    bce = F.binary_cross_entropy_with_logits(region_logits.float(), region_target.float(), reduction="none")
    return (bce * image_mask.float()).sum() / region_logits.shape[0]
