"""Output layouts of `vilbert-data export`: one writer class per layout, found by name in one table.

As in img2dataset's writer.py, every layout implements one small interface (`FeatureWriter`: write
one image, close) and the job never names a layout. Adding one is a class and a line in `WRITERS`
(docs/architecture.md, "Add an output format"); `--format`'s choices and help follow the table.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

# --format name -> "module:Class"; the module is imported only when that layout is written
WRITERS: dict[str, str] = {
    "butd-tsv": "pipelines.feature_formats.butd_tsv:ButdTsvWriter",
    "vilbert-lmdb": "pipelines.feature_formats.vilbert_lmdb:VilbertLmdbWriter",
}


def load_class(target: str) -> Any:
    """The class a "module:Class" string names (imported now)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class FeatureWriter(ABC):
    """Writes a feature set's images, one at a time, into one output: a file, or a folder when `folder`.

    Arrays come as float32: boxes (K,4) in pixels, features (K,D), cls_prob (K,1601) or None when the
    set has no class distributions.
    """

    folder: ClassVar[bool] = False  # the output is a folder (else one file)
    kind: ClassVar[str] = "a file"  # what an output of this layout is, for messages
    # the feature size the layout's usual reader assumes (None: it takes the size from the data), and that reader
    reader_feature_dim: ClassVar[int | None] = None
    reader: ClassVar[str] = ""

    def __init__(self, path: Path, with_cls_prob: bool) -> None:
        self.path, self.with_cls_prob = path, with_cls_prob

    @classmethod
    def is_own_output(cls, path: Path) -> bool:
        """Whether an existing `path` is an output of this layout, which --overwrite may replace."""
        return path.is_file() if not cls.folder else False

    @abstractmethod
    def write(
        self, image_id: str, width: int, height: int, boxes: np.ndarray, features: np.ndarray,
        cls_prob: np.ndarray | None,
    ) -> int:  # fmt: skip
        """Add one image; returns the bytes it took."""

    @abstractmethod
    def close(self) -> None:
        """Finish the output and flush it to disk."""


def writer_class(name: str) -> type[FeatureWriter]:
    """The writer of layout `name`; a ValueError naming the choices for an unknown one."""
    if name not in WRITERS:
        raise ValueError(f"--format must be one of {', '.join(WRITERS)}, got {name!r}")
    return load_class(WRITERS[name])
