"""Settings of the bottom-up-attention detector; the defaults are the original Caffe test settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# BGR pixel mean of the Caffe model (std 1: the network sees 0-255 floats minus this mean).
PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)

NUM_CLASSES = 1600  # Visual Genome object classes, plus background at index 0
NUM_ATTRIBUTES = 400  # Visual Genome attributes, plus "no attribute" at index 0
CLS_PROB_DIM = NUM_CLASSES + 1  # 1601 columns of a class distribution (cls_prob), background first
ATTR_PROB_DIM = NUM_ATTRIBUTES + 1  # 401 columns of an attribute distribution, "no attribute" first
MIN_BOXES = 10  # the original region-selection rule keeps 10 to 36 regions per image
MAX_BOXES = 36

FEATURE_DIMS = {"res4": 1024, "res5": 2048}
RES4_BLOCKS = {50: 6, 101: 23}  # ResNet depth -> bottleneck blocks in res4
AUTOCAST_DTYPES = (None, "bf16", "fp16")


@dataclass
class DetectorConfig:
    """Architecture and test-time settings; every field is recorded in `Detector.info`."""

    depth: int = 101  # ResNet depth: 50 or 101 (res4 has 6 or 23 blocks)
    min_size: int = 600  # short side of the network input
    max_size: int = 1000  # cap on the long side of the network input
    pre_nms_topk: int = 6000  # RPN proposals kept before NMS
    post_nms_topk: int = 300  # RPN proposals kept after NMS
    rpn_nms_thresh: float = 0.7
    rpn_min_size: int = 16  # minimum proposal side, in input pixels before scaling
    nms_thresh: float = 0.3  # per-class NMS of the region-selection rule
    conf_thresh: float = 0.2
    min_boxes: int = MIN_BOXES
    max_boxes: int = MAX_BOXES
    feature_layer: str = "res4"  # "res4" (1024-d RoI-pooled res4) or "res5" (2048-d, the original)
    autocast: str | None = None  # None (fp32), "bf16" (CPU or CUDA) or "fp16" (CUDA only)
    # Images per forward pass. Every pass has exactly this many slots (unused ones are zero images)
    # and holds images of one input size only, so an image's outputs never depend on its batch-mates.
    batch_size: int = 1
    pixel_mean: tuple[float, float, float] = field(default=PIXEL_MEAN_BGR)

    def __post_init__(self) -> None:
        """Check the settings so that a bad value fails at construction, not deep inside a forward pass."""
        if self.depth not in RES4_BLOCKS:
            raise ValueError(f"DetectorConfig.depth must be 50 or 101, got {self.depth!r}")
        if self.feature_layer not in FEATURE_DIMS:
            raise ValueError(
                f"DetectorConfig.feature_layer must be one of {sorted(FEATURE_DIMS)}, got {self.feature_layer!r}"
            )
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(
                f"DetectorConfig.autocast must be one of {AUTOCAST_DTYPES}, got {self.autocast!r}"
            )
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(
                f"need 0 < min_size <= max_size, got min_size={self.min_size}, max_size={self.max_size}"
            )
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ValueError(
                f"need 1 <= min_boxes <= max_boxes, got min_boxes={self.min_boxes}, max_boxes={self.max_boxes}"
            )
        if self.post_nms_topk < 1 or self.pre_nms_topk < 1:
            raise ValueError("pre_nms_topk and post_nms_topk must be positive")
        if self.batch_size < 1:
            raise ValueError(f"DetectorConfig.batch_size must be >= 1, got {self.batch_size!r}")
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)

    @property
    def feature_dim(self) -> int:
        """Length of one region feature vector for the chosen feature layer."""
        return FEATURE_DIMS[self.feature_layer]

    @property
    def res4_blocks(self) -> int:
        """Number of bottleneck blocks in res4 for this depth."""
        return RES4_BLOCKS[self.depth]

    def to_dict(self) -> dict:
        """JSON-serialisable copy of every setting."""
        d = asdict(self)
        d["pixel_mean"] = list(self.pixel_mean)
        return d
