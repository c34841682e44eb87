"""The public detector: images in, per-image region boxes, features, class and attribute distributions out."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_pool

from .boxes import box_sizes, clip_boxes, decode_boxes, grid_anchors, nms_plus1, output_boxes
from .checkpoint import load_checkpoint
from .config import ATTR_PROB_DIM, CLS_PROB_DIM, FEATURE_DIMS, DetectorConfig
from .devices import autocast, resolve_device
from .modeling import POOLER_RESOLUTION, BottomUpAttention, feature_size, init_random_weights
from .selection import select_regions

logger = logging.getLogger(__name__)

RANDOM_SEED = 0
HEAD_CHUNK = 300  # RoIs per res5 pass: bounds the (R, 2048, 14, 14) activation to ~0.5 GB in fp32
MIN_INPUT_SIDE = 32  # the stem's ceil-mode max-pool needs a few pixels; 1-pixel strips are padded up


@dataclass
class Detections:
    """Regions of one image; arrays are float32 unless noted, boxes in original pixels (see contracts.md)."""

    boxes: np.ndarray  # (K, 4) x1, y1, x2, y2
    features: np.ndarray  # (K, D)
    spatial: np.ndarray  # (K, 5)
    cls_prob: np.ndarray  # (K, 1601) background in column 0
    object_ids: np.ndarray  # (K,) int64, 1..1600
    object_conf: np.ndarray  # (K,)
    attr_ids: np.ndarray  # (K,) int64, 1..400
    attr_conf: np.ndarray  # (K,)
    image_w: int
    image_h: int

    @property
    def num_boxes(self) -> int:
        """K, the number of regions."""
        return int(self.boxes.shape[0])


@dataclass
class ImageBatch:
    """Preprocessed images padded to one tensor, with what is needed to map boxes back."""

    tensor: torch.Tensor  # (B, 3, Hmax, Wmax) BGR minus mean, zero padding bottom/right
    input_sizes: list[tuple[int, int]]  # (h, w) of each resized image before padding
    scales: list[float]  # input pixels per original pixel
    original_sizes: list[tuple[int, int]]  # (h, w) of each original image


@dataclass
class HeadOutput:
    """Per-RoI outputs of the box head, float32."""

    res4: torch.Tensor  # (R, 1024) RoI-pooled res4, mean over the 14x14 cells
    res5: torch.Tensor  # (R, 2048) res5 output, spatial mean
    cls_prob: torch.Tensor  # (R, 1601)
    attr_prob: torch.Tensor  # (R, 401)


def spatial_features(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """[x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W H)] for boxes (K, 4) in pixels; (K, 5) float32."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w, h = float(width), float(height)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
    return np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h, area], axis=1).astype(np.float32)


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Caffe's test scale: short side to min_size unless the long side would pass max_size."""
    short, long = min(height, width), max(height, width)
    scale = min_size / short
    if round(scale * long) > max_size:
        scale = max_size / long
    return scale


def _check_images(images: Sequence[Image.Image]) -> None:
    """Raise TypeError / ValueError naming the first input that is not a non-empty PIL image."""
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise TypeError(
                f"image {i}: expected a PIL.Image (use extract.load_image), got {type(img).__name__}"
            )
        if img.width < 1 or img.height < 1:
            raise ValueError(f"image {i}: empty image of size {img.width}x{img.height}")


class Detector:
    """The Visual Genome bottom-up-attention Faster R-CNN (ResNet C4) with the original region-selection rule."""

    def __init__(
        self,
        model: BottomUpAttention,
        config: DetectorConfig,
        device: torch.device,
        checkpoint: str | None = None,
        sha256: str | None = None,
        checkpoint_format: str = "random",
    ) -> None:
        if config.autocast == "fp16" and device.type != "cuda":
            raise ValueError("DetectorConfig.autocast='fp16' needs CUDA; use 'bf16' or None on the CPU")
        self.config = config
        self.device = device
        self.checkpoint = checkpoint
        self.sha256 = sha256
        self.format = checkpoint_format
        model.fuse_norms()
        # channels_last: the oneDNN (CPU) and cuDNN convolutions are faster in NHWC (~20% on res5 here)
        self.model = model.to(device=device, memory_format=torch.channels_last).eval()
        self.model.requires_grad_(False)
        mean = torch.tensor(config.pixel_mean, dtype=torch.float32, device=device)
        self._pixel_mean = mean.view(3, 1, 1)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None,
        device: str | torch.device = "auto",
        feature_layer: str | None = None,
        config: DetectorConfig | None = None,
    ) -> Detector:
        """Build a detector from a checkpoint in any of the three public formats, or random weights for None."""
        dev = resolve_device(device)
        explicit_config = config is not None
        config = config or DetectorConfig()
        if feature_layer is not None:
            config = replace(config, feature_layer=feature_layer)
        if path is None:
            model = BottomUpAttention(config)
            init_random_weights(model, seed=RANDOM_SEED)
            msg = (
                "Detector has RANDOM WEIGHTS (no checkpoint given): boxes, features and labels are meaningless. "
                "Pass a bottom-up-attention checkpoint (.pkl, .bin or .pth) for real features."
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
            logger.warning("!" * 20 + " " + msg + " " + "!" * 20)
            return cls(model, config, dev)

        loaded = load_checkpoint(path)
        if not explicit_config and loaded.depth is not None and loaded.depth != config.depth:
            config = replace(config, depth=loaded.depth)
        model = BottomUpAttention(config)
        loaded.load_into(model)
        return cls(
            model, config, dev, checkpoint=str(path), sha256=loaded.sha256, checkpoint_format=loaded.format
        )

    @property
    def info(self) -> dict:
        """JSON-serialisable description of the weights and every setting (written into dataset.json)."""
        return {
            "checkpoint": self.checkpoint,
            "sha256": self.sha256,
            "format": self.format,
            "random_weights": self.checkpoint is None,
            "feature_dim": self.config.feature_dim,
            **self.config.to_dict(),
        }

    @property
    def feature_dim(self) -> int:
        """Length of a region feature vector."""
        return self.config.feature_dim

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """Mixed precision if the config asks for it."""
        return autocast(self.config.autocast, self.device.type)

    # ------------------------------------------------------------------ stages (public for benchmarks)

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """(h, w) of the network input for `image`; only images of equal input size share a forward pass."""
        w, h = image.size
        scale = resize_scale(h, w, self.config.min_size, self.config.max_size)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def forward_groups(self, images: Sequence[Image.Image]) -> list[list[int]]:
        """Indices of `images` per forward pass: one input size per pass, at most `config.batch_size`, in order."""
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            buckets.setdefault(self.input_size(img), []).append(i)
        size = self.config.batch_size
        return [idx[k : k + size] for idx in buckets.values() for k in range(0, len(idx), size)]

    def preprocess(self, images: Sequence[Image.Image], slots: int | None = None) -> ImageBatch:
        """PIL images -> BGR, minus the mean, resized (bilinear), zero-padded into one batch of max(len, slots) rows.

        `detect` passes images of one input size and `slots=config.batch_size`, so nothing is padded
        relative to another image; mixed sizes (padded bottom/right) remain possible for benchmarks.
        """
        _check_images(images)
        tensors, sizes, scales, originals = [], [], [], []
        for img in images:
            if img.mode != "RGB":
                img = img.convert("RGB")
            w, h = img.size
            scale = resize_scale(h, w, self.config.min_size, self.config.max_size)
            nh, nw = self.input_size(img)
            rgb = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).to(self.device)  # (h, w, 3)
            x = rgb.permute(2, 0, 1).flip(0).float() - self._pixel_mean  # (3, h, w) BGR
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
            tensors.append(x)
            sizes.append((nh, nw))
            scales.append(scale)
            originals.append((h, w))
        hmax = max(MIN_INPUT_SIDE, max(s[0] for s in sizes))
        wmax = max(MIN_INPUT_SIDE, max(s[1] for s in sizes))
        rows = max(len(tensors), slots or 0)
        batch = torch.zeros((rows, 3, hmax, wmax), dtype=torch.float32, device=self.device)
        for i, x in enumerate(tensors):
            batch[i, :, : x.shape[1], : x.shape[2]] = x
        return ImageBatch(batch, sizes, scales, originals)

    def backbone_features(self, batch: ImageBatch) -> torch.Tensor:
        """(B, 3, H, W) -> res4 (B, 1024, H/16, W/16)."""
        return self.model.backbone(batch.tensor.contiguous(memory_format=torch.channels_last))

    def proposals(self, features: torch.Tensor, batch: ImageBatch) -> list[torch.Tensor]:
        """RPN proposals per image, (P_i, 4) float32, +1-style boxes in input pixels, best first."""
        cfg = self.config
        logits, deltas = self.model.proposal_generator.rpn_head(features)
        cell = self.model.proposal_generator.anchor_generator.anchors
        num_anchors = cell.shape[0]
        out = []
        for i, (h, w) in enumerate(batch.input_sizes):
            # Only the cells the unpadded image has: padding must not add proposals.
            hf, wf = feature_size(h), feature_size(w)
            scores = logits[i, :, :hf, :wf].permute(1, 2, 0).reshape(-1).float()  # (hf*wf*A,)
            d = (
                deltas[i, :, :hf, :wf]
                .reshape(num_anchors, 4, hf, wf)
                .permute(2, 3, 0, 1)
                .reshape(-1, 4)
                .float()
            )
            boxes = clip_boxes(decode_boxes(d, grid_anchors(cell, hf, wf)), h, w)
            ws, hs = box_sizes(boxes)
            min_size = cfg.rpn_min_size * batch.scales[i]
            big = (ws >= min_size) & (hs >= min_size)
            if bool(big.any()):  # a 1-pixel strip has no box of that size: keep all rather than none
                boxes, scores = boxes[big], scores[big]
            order = torch.sort(scores, descending=True, stable=True).indices[: cfg.pre_nms_topk]
            boxes, scores = boxes[order], scores[order]
            keep = nms_plus1(boxes, scores, cfg.rpn_nms_thresh)[: cfg.post_nms_topk]
            out.append(boxes[keep])
        return out

    def box_head(self, features: torch.Tensor, boxes: list[torch.Tensor]) -> HeadOutput:
        """RoIPool 14x14 on res4, res5, class and attribute heads for boxes (input pixels) of each image."""
        # Each chunk holds RoIs of one image only, so the res5 batch an image's RoIs run in does not
        # depend on the other images of the pass.
        chunks = [
            torch.cat([torch.full_like(part[:, :1], i, dtype=torch.float32), part.float()], dim=1)
            for i, b in enumerate(boxes)
            for part in b.split(HEAD_CHUNK)
        ]  # (r, 5) float32 each: batch index, x1, y1, x2, y2
        # float32 pooling: the CPU kernel has no bf16 version, and box coordinates must not be rounded.
        # Cast once here, not per chunk (under autocast each cast copies the whole res4 map).
        features = features.float()
        parts: list[tuple[torch.Tensor, ...]] = []
        predictor = self.model.roi_heads.box_predictor
        for chunk in chunks:
            pooled = roi_pool(features, chunk, (POOLER_RESOLUTION, POOLER_RESOLUTION), 1 / 16)
            res5 = self.model.roi_heads.res5(pooled.contiguous(memory_format=torch.channels_last))
            res5 = res5.mean(dim=(2, 3))  # (r, 2048)
            cls_logits, attr_logits = predictor(res5)
            parts.append((pooled.mean(dim=(2, 3)), res5.float(), cls_logits.float(), attr_logits.float()))
        if not parts:
            dev = features.device
            dims = (FEATURE_DIMS["res4"], FEATURE_DIMS["res5"], CLS_PROB_DIM, ATTR_PROB_DIM)
            z = [torch.zeros((0, n), device=dev) for n in dims]
            return HeadOutput(z[0], z[1], z[2], z[3])
        res4, res5, cls_logits, attr_logits = (torch.cat(p, dim=0) for p in zip(*parts, strict=True))
        return HeadOutput(res4, res5, F.softmax(cls_logits, dim=1), F.softmax(attr_logits, dim=1))

    def select(self, proposals: list[torch.Tensor], head: HeadOutput, batch: ImageBatch) -> list[Detections]:
        """The region-selection rule on each image's proposals, then its kept regions as Detections."""
        cfg = self.config
        results, start = [], 0
        for i, props in enumerate(proposals):
            n = props.shape[0]
            cls_prob = head.cls_prob[start : start + n]
            # In original pixels, like the Caffe extractor (rois / im_scale): the +1 IoU of its
            # per-class NMS is not scale-invariant, so selecting on input pixels keeps other boxes.
            boxes = props / batch.scales[i]
            keep, _ = select_regions(
                boxes, cls_prob, cfg.nms_thresh, cfg.conf_thresh, cfg.min_boxes, cfg.max_boxes
            )
            size = batch.original_sizes[i]
            kept = output_boxes(props[keep], batch.scales[i], *size)
            results.append(self._package(kept, head, keep + start, size))
            start += n
        return results

    def run_pass(self, batch: ImageBatch) -> list[Detections]:
        """One forward pass over a preprocessed batch: backbone, RPN, box head, then selection per image."""
        with self.autocast_context():
            features = self.backbone_features(batch)
            proposals = self.proposals(features, batch)
            head = self.box_head(features, proposals)
        return self.select(proposals, head, batch)

    # ------------------------------------------------------------------ public API

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image] | Image.Image) -> list[Detections]:
        """Detect regions in several images; one Detections per image, independent of the other images.

        Images are grouped by input size (`forward_groups`) and each group runs as one forward pass of
        exactly `config.batch_size` slots, so on a given device an image gives the same bytes alone or
        in any batch.
        """
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        _check_images(images)
        results: list[Detections | None] = [None] * len(images)
        for group in self.forward_groups(images):
            batch = self.preprocess([images[i] for i in group], slots=self.config.batch_size)
            for i, det in zip(group, self.run_pass(batch), strict=True):
                results[i] = det
        return results  # type: ignore[return-value]  # every index belongs to one group

    @torch.inference_mode()
    def features_for_boxes(
        self, image: Image.Image, boxes: np.ndarray | Sequence[Sequence[float]]
    ) -> Detections:
        """Given-box mode: features and class/attribute distributions for boxes (K, 4) in original pixels."""
        arr = np.asarray(boxes, dtype=np.float32)
        if arr.size == 0:
            arr = arr.reshape(0, 4)
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise ValueError(f"boxes must have shape (K, 4) as x1, y1, x2, y2; got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("boxes contain NaN or infinite coordinates")
        bad = np.nonzero((arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1]))[0]
        if bad.size:
            raise ValueError(f"boxes {bad[:10].tolist()} have x2 < x1 or y2 < y1 (expected x1, y1, x2, y2)")
        batch = self.preprocess([image])
        given = torch.from_numpy(arr).to(self.device)
        with self.autocast_context():
            features = self.backbone_features(batch)
            head = self.box_head(features, [given * batch.scales[0]])
        rows = torch.arange(arr.shape[0], device=self.device)
        return self._package(given, head, rows, batch.original_sizes[0])

    def _package(
        self, boxes: torch.Tensor, head: HeadOutput, rows: torch.Tensor, size: tuple[int, int]
    ) -> Detections:
        """Gather the kept rows into numpy arrays."""
        h, w = size
        feats = (head.res4 if self.config.feature_layer == "res4" else head.res5)[rows]
        cls_prob = head.cls_prob[rows]
        attr_prob = head.attr_prob[rows]
        object_conf, object_ids = cls_prob[:, 1:].max(dim=1)
        attr_conf, attr_ids = attr_prob[:, 1:].max(dim=1)
        boxes_np = boxes.float().cpu().numpy().astype(np.float32)
        return Detections(
            boxes=boxes_np,
            features=feats.cpu().numpy().astype(np.float32),
            spatial=spatial_features(boxes_np, w, h),
            cls_prob=cls_prob.cpu().numpy().astype(np.float32),
            object_ids=(object_ids + 1).cpu().numpy().astype(np.int64),
            object_conf=object_conf.cpu().numpy().astype(np.float32),
            attr_ids=(attr_ids + 1).cpu().numpy().astype(np.int64),
            attr_conf=attr_conf.cpu().numpy().astype(np.float32),
            image_w=int(w),
            image_h=int(h),
        )
