"""Per-dimension statistics of region features: computed by `shard`, read by `train` to standardise inputs.

Detector features (post-ReLU, mean-pooled) share a large component: in the demo's feature set every
dimension's mean is about 5 times its spread, and an image's mean feature differs from the feature
set's mean by about 10% of its length. Fed raw into ViLBERT's region embedding (Linear + LayerNorm),
the image-specific part is a small perturbation of one vector that every region and image has, and
small models learn to ignore it (docs/training.md, "Vision must reach the answer"). Subtracting each
dimension's mean and dividing by its standard deviation, over the training split's regions, removes
that shared vector and puts every dimension on one scale.

The statistics are accumulated in float64 over every region written (one pass, mergeable) and saved
as `feature_stats.json` beside task shards: {"format", "version", "feature_dim", "images", "regions",
"mean": [D floats], "std": [D floats]}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STATS_FORMAT = "vilbert-data/feature-stats"
STATS_FILE = "feature_stats.json"
# A dimension that (almost) never varies in the training regions, e.g. a dead ReLU unit, would be
# blown up by a tiny std at test time; its std is floored at this fraction of the mean std.
STD_FLOOR = 1e-2


@dataclass
class FeatureStats:
    """Mean and standard deviation of every feature dimension over a set of regions."""

    mean: np.ndarray  # (D,) float32
    std: np.ndarray  # (D,) float32, floored (never 0)
    images: int
    regions: int

    @property
    def feature_dim(self) -> int:
        """Feature size D."""
        return int(self.mean.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable form written to feature_stats.json."""
        return {
            "format": STATS_FORMAT,
            "version": 1,
            "feature_dim": self.feature_dim,
            "images": self.images,
            "regions": self.regions,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "feature statistics") -> FeatureStats:
        """Parse and check the dict of to_dict(); ValueError naming `where` when it is malformed."""
        if not isinstance(values, dict) or values.get("format") != STATS_FORMAT:
            raise ValueError(f"{where}: not a vilbert-data feature statistics file (format {STATS_FORMAT!r})")
        try:
            mean = np.asarray(values["mean"], np.float32)
            std = np.asarray(values["std"], np.float32)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: mean/std missing or not lists of numbers ({err})") from None
        if mean.ndim != 1 or mean.shape != std.shape or not mean.size:
            raise ValueError(f"{where}: mean {mean.shape} and std {std.shape} must be two equal-length lists")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"{where}: mean and std must be finite and std positive")
        return cls(mean, std, int(values.get("images", 0)), int(values.get("regions", 0)))

    def save(self, path: str | Path) -> None:
        """Write feature_stats.json atomically."""
        from pipelines.fileio import atomic_write_json

        atomic_write_json(path, self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read a feature_stats.json file (ValueError naming the file when it is malformed)."""
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(values, str(path))


class RunningFeatureStats:
    """Streaming per-dimension sums (float64) of region features; `result()` gives a FeatureStats."""

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.sumsq: np.ndarray | None = None
        self.regions = 0
        self.images = 0

    def add(self, features: np.ndarray) -> None:
        """Add one image's (K,D) region features (any float dtype)."""
        if features.ndim != 2:
            raise ValueError(f"region features must be (regions, dim), got shape {features.shape}")
        f = features.astype(np.float64)
        if self.sum is None:
            self.sum, self.sumsq = np.zeros(f.shape[1]), np.zeros(f.shape[1])
        elif f.shape[1] != self.sum.shape[0]:
            raise ValueError(f"{f.shape[1]}-d region features after {self.sum.shape[0]}-d ones")
        self.sum += f.sum(0)
        self.sumsq += np.square(f).sum(0)
        self.regions += f.shape[0]
        self.images += 1

    def result(self) -> FeatureStats | None:
        """Mean and floored std of everything added; None before any region."""
        if self.sum is None or self.regions == 0:
            return None
        mean = self.sum / self.regions
        var = np.maximum(self.sumsq / self.regions - np.square(mean), 0.0)
        std = np.sqrt(var)
        floor = max(STD_FLOOR * float(std.mean()), 1e-6)
        return FeatureStats(
            mean.astype(np.float32), np.maximum(std, floor).astype(np.float32), self.images, self.regions
        )


def stats_of(features: Iterable[np.ndarray]) -> FeatureStats | None:
    """FeatureStats of a stream of (K,D) per-image region features."""
    running = RunningFeatureStats()
    for f in features:
        running.add(f)
    return running.result()
