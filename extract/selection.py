"""The region-selection rule of the original bottom-up-attention extractor, with batched operations.

Rule (detector.md): for each class c = 1..C, NMS(proposals, scores[:, c], 0.3); max_conf[i] = the
largest score of any class whose NMS kept proposal i; keep max_conf >= conf_thresh, clamped to
[min_boxes, max_boxes] by taking the top boxes by max_conf.

Batched form: all (proposal, class) pairs go through ONE NMS call, each class's boxes shifted by a
class-specific offset so that boxes of different classes never overlap; max_conf is then one scatter.
Pairs below a threshold t cannot change the NMS fate of pairs at or above t (a box only suppresses
lower-scored boxes), so running only the pairs >= t gives exact max_conf for every proposal whose
max_conf >= t. t = conf_thresh decides the usual case; when too few boxes pass it, t drops to a
bound that guarantees min_boxes exact values (the best proposal of each class is always kept).
"""

from __future__ import annotations

import torch
from torchvision.ops import nms

from .boxes import plus1_to_continuous
from .config import DetectorConfig  # its defaults are the original settings


def _max_conf_from_pairs(
    boxes64: torch.Tensor, cls_scores: torch.Tensor, pair_mask: torch.Tensor, nms_thresh: float
) -> torch.Tensor:
    """One offset NMS over the masked (proposal, class) pairs, then max_conf by scatter; (N,)."""
    num_boxes = cls_scores.shape[0]
    idx, cls = pair_mask.nonzero(as_tuple=True)  # (P,), (P,)
    max_conf = torch.zeros(num_boxes, dtype=cls_scores.dtype, device=cls_scores.device)
    if idx.numel() == 0:
        return max_conf
    scores = cls_scores[idx, cls]
    lo = boxes64.min()
    span = boxes64.max() - lo + 1.0
    # float64 keeps the shifted coordinates exact (float32 would round at 1600 classes x 1000 px).
    offsets = (cls.to(torch.float64) * span - lo)[:, None]
    keep = nms(boxes64[idx] + offsets, scores.to(torch.float64), nms_thresh)
    return max_conf.scatter_reduce(0, idx[keep], scores[keep], reduce="amax", include_self=True)


def max_conf_loop(
    boxes: torch.Tensor, scores: torch.Tensor, nms_thresh: float = DetectorConfig.nms_thresh
) -> torch.Tensor:
    """max_conf (N,) by the original per-class loop over classes 1..C (the reference, and the fallback)."""
    boxes64 = plus1_to_continuous(boxes, torch.float64)
    max_conf = torch.zeros(scores.shape[0], dtype=scores.dtype, device=scores.device)
    for c in range(1, scores.shape[1]):
        cls_scores = scores[:, c]
        keep = nms(boxes64, cls_scores.to(torch.float64), nms_thresh)
        max_conf[keep] = torch.maximum(max_conf[keep], cls_scores[keep])
    return max_conf


def max_conf_batched(
    boxes: torch.Tensor, scores: torch.Tensor, nms_thresh: float, conf_thresh: float, min_boxes: int
) -> torch.Tensor:
    """max_conf (N,), exact wherever the selection rule reads it (zeros stand for "below every used bound")."""
    num_boxes = scores.shape[0]
    if num_boxes == 0:
        return scores.new_zeros(0)
    if conf_thresh <= 0:  # every pair passes: nothing to prune
        return max_conf_loop(boxes, scores, nms_thresh)
    cls_scores = scores[:, 1:]  # (N, C), background dropped
    boxes64 = plus1_to_continuous(boxes, torch.float64)
    max_conf = _max_conf_from_pairs(boxes64, cls_scores, cls_scores >= conf_thresh, nms_thresh)
    if int((max_conf >= conf_thresh).sum()) >= min_boxes:
        return max_conf

    if num_boxes > min_boxes:
        # The top proposal of each class survives that class's NMS, so its score bounds max_conf from below.
        best_score, best_box = cls_scores.max(dim=0)  # (C,)
        lower = torch.zeros(num_boxes, dtype=scores.dtype, device=scores.device)
        lower = lower.scatter_reduce(0, best_box, best_score, reduce="amax", include_self=True)
        if int((lower > 0).sum()) >= min_boxes:
            bound = min(float(lower.topk(min_boxes).values[-1]), conf_thresh)
            max_conf = _max_conf_from_pairs(boxes64, cls_scores, cls_scores >= bound, nms_thresh)
            if int((max_conf >= bound).sum()) >= min_boxes:
                return max_conf
    # Few proposals or exact score ties: the exact values of every proposal are needed.
    return max_conf_loop(boxes, scores, nms_thresh)


def choose_boxes(max_conf: torch.Tensor, conf_thresh: float, min_boxes: int, max_boxes: int) -> torch.Tensor:
    """Indices kept by the threshold and the [min_boxes, max_boxes] clamp, in the original's order."""
    keep = torch.nonzero(max_conf >= conf_thresh).flatten()  # proposal order, like np.where
    if min_boxes <= keep.numel() <= max_boxes:
        return keep
    order = torch.sort(max_conf, descending=True, stable=True).indices
    return order[: min_boxes if keep.numel() < min_boxes else max_boxes]


def select_regions(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    nms_thresh: float = DetectorConfig.nms_thresh,
    conf_thresh: float = DetectorConfig.conf_thresh,
    min_boxes: int = DetectorConfig.min_boxes,
    max_boxes: int = DetectorConfig.max_boxes,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the selection rule to proposals (N, 4, +1 style) and softmax scores (N, 1 + C).

    Returns (kept indices (K,), max_conf (N,)); K = clamp(#passing, min_boxes, max_boxes) or N if fewer.
    """
    max_conf = max_conf_batched(boxes, scores, nms_thresh, conf_thresh, min_boxes)
    return choose_boxes(max_conf, conf_thresh, min_boxes, max_boxes), max_conf
