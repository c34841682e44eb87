"""`butd-tsv`: the bottom-up-attention release (trainval_resnet101_faster_rcnn_genome_36.tsv, 10-100).

One image a line, no header, tab-separated: image_id, image_w, image_h, num_boxes, boxes, features;
boxes and features are base64 of float32 (K x 4, K x D). Forks add a 7th field cls_prob (base64
float32 K x 1601, background first) and an 8th attrs (base64 float32 K x 401, "no attribute"
first). Without cls_prob the source has no class distributions, object or attribute ids.

`ButdTsvWriter` writes the same layout (with cls_prob when the feature set has it), for `export`.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np

from extract.config import ATTR_PROB_DIM, CLS_PROB_DIM
from pipelines.feature_formats.common import (
    Entry,
    Record,
    b64_array,
    best_of,
    rows,
    to_int,
)
from pipelines.feature_formats.tsv import TsvReader
from pipelines.formats.writers import FeatureWriter


class ButdTsvReader(TsvReader):
    """Reader of the bottom-up-attention TSV (6 fields, 7 with cls_prob, 8 with attrs)."""

    name = "butd-tsv"

    def decode(self, entry: Entry) -> Record:
        """Decode one line."""
        fields = self.split(entry, (6, 7, 8))
        k = to_int(fields[3], "num_boxes")
        record = Record(
            raw_id=fields[0].decode("utf-8", "replace"),
            width=to_int(fields[1], "image_w"),
            height=to_int(fields[2], "image_h"),
            boxes=rows(b64_array(fields[4], "boxes"), k, 4, "boxes"),
            features=rows(b64_array(fields[5], "features"), k, None, "features"),
        )
        if len(fields) > 6 and fields[6]:
            record.cls_prob = rows(b64_array(fields[6], "cls_prob"), k, CLS_PROB_DIM, "cls_prob")
        if len(fields) > 7 and fields[7]:
            record.attributes = best_of(rows(b64_array(fields[7], "attrs"), k, ATTR_PROB_DIM, "attrs"))
        return record


def b64(array: np.ndarray) -> bytes:
    """Base64 of an array's float32 bytes (C order)."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes())


class ButdTsvWriter(FeatureWriter):
    """Writes records as butd-tsv lines into an open binary file."""

    def __init__(self, path: Path, with_cls_prob: bool) -> None:
        super().__init__(path, with_cls_prob)
        self.f = open(path, "wb")  # closed by close()

    def write(
        self, image_id: str, width: int, height: int, boxes: np.ndarray, features: np.ndarray,
        cls_prob: np.ndarray | None,
    ) -> int:  # fmt: skip
        """Append one image's line; returns its size in bytes."""
        fields = [
            image_id.encode(),
            b"%d" % width,
            b"%d" % height,
            b"%d" % boxes.shape[0],
            b64(boxes),
            b64(features),
        ]
        if self.with_cls_prob:
            fields.append(b64(cls_prob))
        line = b"\t".join(fields) + b"\n"
        self.f.write(line)
        return len(line)

    def close(self) -> None:
        """Flush to disk and close the file."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
