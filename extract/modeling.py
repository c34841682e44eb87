"""The bottom-up-attention Faster R-CNN (ResNet C4) as torch modules.

Parameter names follow the detectron2 port (`backbone.res4.0.conv1.norm.weight`, ...) with the Caffe
column order (background / "no attribute" in row 0) and one objectness logit per anchor; the loaders in
`checkpoint.py` normalise every public checkpoint to these names and conventions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .boxes import caffe_anchors
from .config import NUM_ATTRIBUTES, NUM_CLASSES, DetectorConfig

NORM_EPS = 1e-5
NUM_ANCHORS = 12
POOLER_RESOLUTION = 14
ATTR_EMBED_DIM = 256
ATTR_HIDDEN_DIM = 512


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (Caffe's BatchNorm + Scale at test time)."""

    def __init__(self, num_features: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel affine map (scale, shift) this norm applies."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        scale, shift = self.scale_shift()
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by a frozen norm, stored as `<name>.weight` and `<name>.norm.*`."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1
    ):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.norm: nn.Module = FrozenBatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution then norm."""
        return self.norm(super().forward(x))

    @torch.no_grad()
    def fuse_norm(self) -> None:
        """Fold the frozen norm into the convolution weight and a bias (same function, one op fewer)."""
        if not isinstance(self.norm, FrozenBatchNorm2d):
            return
        scale, shift = self.norm.scale_shift()
        self.weight.mul_(scale.view(-1, 1, 1, 1))
        self.bias = nn.Parameter(shift.clone())
        self.norm = nn.Identity()


class Bottleneck(nn.Module):
    """Caffe/MSRA bottleneck: the stride sits in the first 1x1 conv; projection shortcut when shapes change."""

    def __init__(
        self, in_ch: int, bottleneck_ch: int, out_ch: int, stride: int = 1, dilation: int = 1
    ) -> None:
        super().__init__()
        self.shortcut = (
            ConvNorm(in_ch, out_ch, 1, stride=stride) if (in_ch != out_ch or stride != 1) else None
        )
        self.conv1 = ConvNorm(in_ch, bottleneck_ch, 1, stride=stride)
        self.conv2 = ConvNorm(bottleneck_ch, bottleneck_ch, 3, padding=dilation, dilation=dilation)
        self.conv3 = ConvNorm(bottleneck_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, H / stride, W / stride)."""
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out + identity)


def make_stage(
    num_blocks: int, in_ch: int, bottleneck_ch: int, out_ch: int, stride: int, dilation: int = 1
) -> nn.Sequential:
    """A ResNet stage: the first block changes shape, the others keep it."""
    blocks = [Bottleneck(in_ch, bottleneck_ch, out_ch, stride=stride, dilation=dilation)]
    blocks += [Bottleneck(out_ch, bottleneck_ch, out_ch, dilation=dilation) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class Stem(nn.Module):
    """7x7/2 conv (64) + norm + ReLU, then Caffe's 3x3/2 max-pool with padding 0 and ceil mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, 64, 7, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 64, ~H/4, ~W/4)."""
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


class ResNetC4(nn.Module):
    """ResNet up to res4: the detector backbone, output stride 16, 1024 channels."""

    def __init__(self, res4_blocks: int) -> None:
        super().__init__()
        self.stem = Stem()
        self.res2 = make_stage(3, 64, 64, 256, stride=1)
        self.res3 = make_stage(4, 256, 128, 512, stride=2)
        self.res4 = make_stage(res4_blocks, 512, 256, 1024, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1024, H/16, W/16)."""
        return self.res4(self.res3(self.res2(self.stem(x))))


def feature_size(n: int) -> int:
    """Side of the res4 map for an input side of n pixels, as the unpadded network computes it."""
    n = (n - 1) // 2 + 1  # stem conv 7x7/2, padding 3
    n = -(-(n - 3) // 2) + 1  # max-pool 3x3/2, ceil mode
    n = (n - 1) // 2 + 1  # res3, stride 2 in a 1x1 conv
    n = (n - 1) // 2 + 1  # res4
    return max(n, 1)


class AnchorGenerator(nn.Module):
    """Holds the cell anchors as the buffer `cell_anchors.0` (+1 style, row k = RPN channel k)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell_anchors = nn.Module()
        self.cell_anchors.register_buffer("0", caffe_anchors())

    @property
    def anchors(self) -> torch.Tensor:
        """(A, 4) cell anchors."""
        return getattr(self.cell_anchors, "0")


class RPNHead(nn.Module):
    """3x3 conv (512) + ReLU, then one objectness logit and four box deltas per anchor."""

    def __init__(self, in_ch: int = 1024, hidden: int = 512, num_anchors: int = NUM_ANCHORS) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, num_anchors * 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1024, H, W) -> logits (B, A, H, W), deltas (B, 4A, H, W)."""
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class ProposalGenerator(nn.Module):
    """The RPN: head plus anchors (proposal decoding and NMS live in the detector)."""

    def __init__(self) -> None:
        super().__init__()
        self.rpn_head = RPNHead()
        self.anchor_generator = AnchorGenerator()


class BoxPredictor(nn.Module):
    """Class scores, class-specific box deltas and the attribute head on the 2048-d box feature."""

    def __init__(self, in_dim: int = 2048) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_dim, NUM_CLASSES + 1)
        # Unused by the region-selection rule (it keeps the proposals), loaded for completeness: 1601 x 4
        # rows, background first, deltas unweighted (the Caffe layout).
        self.bbox_pred = nn.Linear(in_dim, (NUM_CLASSES + 1) * 4)
        self.cls_embedding = nn.Embedding(NUM_CLASSES + 1, ATTR_EMBED_DIM)
        self.fc_attr = nn.Linear(in_dim + ATTR_EMBED_DIM, ATTR_HIDDEN_DIM)
        self.attr_score = nn.Linear(ATTR_HIDDEN_DIM, NUM_ATTRIBUTES + 1)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, 2048) -> class logits (R, 1601), attribute logits (R, 401), both Caffe order."""
        cls_logits = self.cls_score(feats)
        emb = self.cls_embedding(cls_logits.argmax(dim=1))  # (R, 256), class incl. background
        hidden = F.relu(self.fc_attr(torch.cat([feats, emb.to(feats.dtype)], dim=1)))
        return cls_logits, self.attr_score(hidden)


class RoIHeads(nn.Module):
    """res5 on 14x14 RoI-pooled res4 cells (stride 1, dilation 2), then the box predictor."""

    def __init__(self) -> None:
        super().__init__()
        self.res5 = make_stage(3, 1024, 512, 2048, stride=1, dilation=2)
        self.box_predictor = BoxPredictor()


class BottomUpAttention(nn.Module):
    """The whole detector: backbone, RPN and RoI heads; forward logic is in `extract.detector`."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.backbone = ResNetC4(config.res4_blocks)
        self.proposal_generator = ProposalGenerator()
        self.roi_heads = RoIHeads()

    def fuse_norms(self) -> None:
        """Fold every frozen norm into its convolution (done once after loading, for speed)."""
        for m in self.modules():
            if isinstance(m, ConvNorm):
                m.fuse_norm()


def init_random_weights(model: nn.Module, seed: int = 0) -> None:
    """Fill every tensor from a fixed seed so that any process builds the same random detector.

    Scales keep activations O(1) (input pixels are O(100)), RPN deltas small and class scores spread, so a
    random detector still yields many distinct proposals and exercises every code path.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("cell_anchors.0"):
                continue
            if name.endswith("running_mean") or name.endswith("bias"):
                t.zero_()
            elif name.endswith("running_var"):
                t.fill_(1.0)
            elif name.endswith("norm.weight"):
                # A small last-norm scale keeps the residual sum bounded through 30+ blocks.
                t.fill_(0.2 if ".conv3." in name else 1.0)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else t.shape[-1]
                std = (2.0 / fan_in) ** 0.5  # He init
                if name.startswith("backbone.stem."):
                    std /= 128.0  # the input is 0-255 minus the mean
                elif "anchor_deltas" in name:
                    std = 0.1 / fan_in**0.5
                elif "objectness_logits" in name or "cls_score" in name or "attr_score" in name:
                    std = 1.0 / fan_in**0.5
                t.copy_(torch.randn(t.shape, generator=gen) * std)
