"""Box arithmetic in the Caffe "+1" convention the original extractor used.

A box [x1, y1, x2, y2] covers pixels x1..x2 inclusive, so its width is x2 - x1 + 1. Every internal box
(anchors, proposals) uses this convention; checkpoints in the continuous convention are converted on load.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import nms

# The 12 anchors of the Caffe model (sizes 64..512 x ratios 0.5, 1, 2), ratio-major, +1 style.
CAFFE_ANCHORS = (
    (-38, -16, 53, 31), (-84, -40, 99, 55), (-176, -88, 191, 103), (-360, -184, 375, 199),
    (-24, -24, 39, 39), (-56, -56, 71, 71), (-120, -120, 135, 135), (-248, -248, 263, 263),
    (-14, -36, 29, 51), (-36, -80, 51, 95), (-80, -168, 95, 183), (-168, -344, 183, 359),
)  # fmt: skip
ANCHOR_SIZES = (64, 128, 256, 512)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
FEATURE_STRIDE = 16

# Larger deltas would overflow exp(); detectron2 clamps at the same value.
_DELTA_CLAMP = math.log(1000.0 / 16)


def caffe_anchors() -> torch.Tensor:
    """The 12 Caffe anchors, (12, 4) float32, ratio-major, +1 style, centred on pixel 7.5."""
    return torch.tensor(CAFFE_ANCHORS, dtype=torch.float32)


def detectron2_anchors() -> torch.Tensor:
    """The anchors detectron2 generates, (12, 4) float32, size-major, continuous style, centred at 0."""
    rows = []
    for size in ANCHOR_SIZES:
        area = float(size) ** 2
        for ratio in ANCHOR_RATIOS:
            w = math.sqrt(area / ratio)
            h = ratio * w
            rows.append((-w / 2.0, -h / 2.0, w / 2.0, h / 2.0))
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(cell_anchors: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Anchors of every feature-map cell, (height * width * A, 4), ordered (y, x, anchor) like Caffe."""
    device = cell_anchors.device
    shift_x = torch.arange(width, device=device, dtype=torch.float32) * FEATURE_STRIDE
    shift_y = torch.arange(height, device=device, dtype=torch.float32) * FEATURE_STRIDE
    sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (shifts + cell_anchors.float()[None]).reshape(-1, 4)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Apply (dx, dy, dw, dh) deltas (N, 4) to +1-style anchors (N, 4) (Caffe bbox_transform_inv)."""
    widths, heights = box_sizes(anchors)
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw = deltas[:, 2].clamp(max=_DELTA_CLAMP)
    dh = deltas[:, 3].clamp(max=_DELTA_CLAMP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack(
        [
            pred_ctr_x - 0.5 * pred_w,
            pred_ctr_y - 0.5 * pred_h,
            pred_ctr_x + 0.5 * pred_w - 1.0,
            pred_ctr_y + 0.5 * pred_h - 1.0,
        ],
        dim=1,
    )


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip +1-style boxes (N, 4) to the pixels of a height x width image."""
    x = boxes[:, 0::2].clamp(0, width - 1)
    y = boxes[:, 1::2].clamp(0, height - 1)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def box_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Widths and heights of +1-style boxes (N, 4)."""
    return boxes[:, 2] - boxes[:, 0] + 1.0, boxes[:, 3] - boxes[:, 1] + 1.0


def plus1_to_continuous(boxes: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """+1-style boxes (N, 4) -> a copy (in `dtype`) whose continuous IoU equals their +1 IoU."""
    # Shifting x2, y2 by one pixel makes torchvision's continuous IoU equal the +1 IoU exactly.
    shifted = boxes.to(dtype=dtype, copy=True)
    shifted[:, 2:] += 1.0
    return shifted


def nms_plus1(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS with the +1 IoU of Caffe's nms; returns kept indices sorted by decreasing score."""
    return nms(plus1_to_continuous(boxes), scores, iou_threshold)


def output_boxes(boxes: torch.Tensor, scale: float, height: int, width: int) -> torch.Tensor:
    """+1-style boxes (N, 4) in input pixels -> the reported boxes in original pixels, each of positive size.

    As in the original extractor a box is reported as boxes / scale. A side under one input pixel
    (x2 - x1 < 1: only where the input is a strip one or two pixels wide, whose proposals escape the
    RPN's minimum size) would then have no extent, so it reports the span of the input pixels it
    covers instead, x2 = (x2 + 1) / scale, capped at the image side.
    """
    out = boxes / scale
    for lo, hi, limit in ((0, 2, width), (1, 3, height)):
        thin = (boxes[:, hi] - boxes[:, lo]) < 1.0
        span = ((boxes[:, hi] + 1.0) / scale).clamp(max=float(limit))
        out[:, hi] = torch.where(thin, span, out[:, hi])
    return out
