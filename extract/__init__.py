"""The Visual Genome bottom-up-attention Faster R-CNN (ResNet C4), faithful to the original Caffe extractor.

Public API (docs/contracts.md, section 1)::

    from extract import Detector, DetectorConfig, Detections, load_image, ImageDecodeError
    det = Detector.from_checkpoint("bua-caffe-frcn-r101-k10-100.pth", device="auto", feature_layer="res5")
    dets = det.detect([load_image("photo.jpg")])
"""

from .checkpoint import CheckpointError
from .config import DetectorConfig
from .detector import Detections, Detector, spatial_features
from .image import ImageDecodeError, load_image

__all__ = [
    "CheckpointError",
    "Detections",
    "Detector",
    "DetectorConfig",
    "ImageDecodeError",
    "load_image",
    "spatial_features",
]
