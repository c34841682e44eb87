"""The Visual Genome bottom-up-attention Faster R-CNN (ResNet C4), faithful to the original Caffe extractor.

Public API (docs/contracts.md, section 1)::

    from extract import Detector, DetectorConfig, Detections, load_image, ImageDecodeError
    det = Detector.from_checkpoint("bua-caffe-frcn-r101-k10-100.pth", device="auto", feature_layer="res5")
    dets = det.detect([load_image("photo.jpg")])

The names load on first use, so that `extract.config` (the defaults the CLI shows) and
`extract.devices` import without torchvision.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS = {
    "CheckpointError": "checkpoint",
    "DetectorConfig": "config",
    "Detections": "detector",
    "Detector": "detector",
    "spatial_features": "detector",
    "ImageDecodeError": "image",
    "load_image": "image",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines a public name when the name is first asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'extract' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    """The public names beside the module's own."""
    return sorted({*globals(), *_EXPORTS})
