"""RefCOCO (refer toolkit `refs(unc).p` + `instances.json`): one example per referring expression.

`shard` stores, per expression, the IoU of every detected region with the referred box; the dataset
turns it into `region_target` (IoU, zeroed below 0.5) over the regions after [IMG].
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.annotations.common import Annotation
from pipelines.annotations.refer import read_refer
from pipelines.formats.npy import load_npy
from pipelines.tasks import DataTask, example_base, lists


def box_iou(boxes: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """IoU of each (K,4) xyxy box with one xyxy box (continuous coordinates, no +1)."""
    boxes = boxes.astype(np.float64)
    x1 = np.maximum(boxes[:, 0], box[0])
    y1 = np.maximum(boxes[:, 1], box[1])
    x2 = np.minimum(boxes[:, 2], box[2])
    y2 = np.minimum(boxes[:, 3], box[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)  # (K,)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


class RefcocoTask(DataTask):
    """Referring expressions: score every detected region against the referred box."""

    name = "refcoco"
    split_selects_records = True
    # the targets are the IoUs of the image's own boxes: a swap keeps them and takes another appearance
    swap = "features"

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """The split's referring expressions with their boxes."""
        return read_refer(paths, split)

    def sample_members(
        self, sample: dict[str, bytes], group: list[Annotation], records: list[dict], context: Any
    ) -> dict[str, bytes]:
        """Add "iou": each detected region's IoU with the referred box (boxes.npy order) to every record."""
        boxes = load_npy(sample["boxes.npy"])
        for r in records:
            r["iou"] = [round(float(v), 6) for v in box_iou(boxes, r["gt_box"])]
        return {}

    def examples(self, ds: Any, items: Iterator[tuple[str, list[dict], Any]], rng: random.Random) -> Iterator[dict]:
        """One example per sentence, with the IoU of every region ([IMG] 0)."""
        for key, records, regions in items:
            for r in records:
                iou = np.zeros(regions.num_regions, np.float32)
                iou[1:] = np.asarray(r["iou"], np.float32)[: regions.num_detected]
                yield {**example_base(ds, key, regions), "texts": [ds.tokenizer.encode(r["sentence"])],
                       "region_iou": iou, "gt_box": r["gt_box"], "ref_id": r["ref_id"],
                       "sent_id": r.get("sent_id")}  # fmt: skip

    def collate(self, examples: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        """region_iou and region_target (B,R) padded to the batch's regions, gt_box (B,4), ref and sentence ids."""
        iou = np.zeros((len(examples), batch["image_mask"].shape[-1]), np.float32)
        for i, ex in enumerate(examples):
            iou[i, : len(ex["region_iou"])] = ex["region_iou"]
        batch["region_iou"] = torch.from_numpy(iou)
        batch["region_target"] = torch.from_numpy(np.where(iou >= 0.5, iou, 0.0).astype(np.float32))
        batch["gt_box"] = torch.tensor([ex["gt_box"] for ex in examples], dtype=torch.float32)
        lists(examples, batch, ("ref_id", "sent_id"))


TASK = RefcocoTask()
