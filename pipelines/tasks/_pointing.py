"""Shared data half of the pointing tasks (Visual7W pointing, GuessWhat?! guesser): pick one of a record's boxes.

A reader gives each record `candidate_ids` (box ids, sorted), `candidate_boxes` (xyxy, same order),
`label` (the index of the right box among them) and the text. `shard` runs the detector's given-box
mode on the union of the image's candidate boxes (sorted by box id; stored as `gt_*.npy`, as VCR's
ground-truth boxes) and adds `candidates` to every record: each candidate's index in that union. The
dataset puts those regions first (`with_gt_regions`), so candidate i is region 1 + candidates[i]
after [IMG]; the detected regions follow and give the model the rest of the scene.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.annotations.common import Annotation, AnnotationError
from pipelines.formats.npy import load_npy
from pipelines.tasks import DataTask, example_base, lists
from pipelines.tasks.vcr import GivenBoxFeatures


def image_path(images_dir: str | Path | None, name: str, task: str, cache: dict[str, str]) -> str:
    """The file of image `name` under --images: the folder itself, else its first (sorted) subfolder holding it."""
    if images_dir is None:
        raise AnnotationError(f"task {task!r} needs --images (the images, for the candidate boxes' features)")
    if name not in cache:
        root = Path(images_dir)
        found = root / name
        if not found.is_file():  # COCO keeps train2014/ and val2014/ side by side under one root
            inside = sorted(p / name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            found = next((p for p in inside if p.is_file()), found)  # missing: a per-image shard failure
        cache[name] = str(found)
    return cache[name]


def image_boxes(records: Sequence[dict[str, Any]], image: str) -> tuple[list[Any], np.ndarray]:
    """(box ids sorted, (N,4) float32 xyxy boxes) of the union of an image's records' candidates."""
    boxes: dict[Any, list[float]] = {}
    for r in records:
        for bid, box in zip(r["candidate_ids"], r["candidate_boxes"], strict=True):
            if boxes.setdefault(bid, box) != box:
                raise ValueError(f"image {image}: box {bid} has two different coordinates {boxes[bid]} and {box}")
    ids = sorted(boxes)
    return ids, np.asarray([boxes[b] for b in ids], np.float32).reshape(-1, 4)


class PointingDataTask(DataTask):
    """Pick one of a record's candidate boxes (given boxes through the detector, stored before the detected ones)."""

    with_gt_regions = True
    # the targets are the image's own candidate boxes: a swap keeps them and takes another image's appearance
    swap = "features"
    id_key = ""  # the record field that names a record in predictions (qa_id, game_id)

    def shard_context(self, feature_set: Any, weights: str | None, device: str, detector_config: Any) -> Any:
        """The detector for the candidate boxes (None weights: random, tests only)."""
        return GivenBoxFeatures(weights, device, feature_set, detector_config)

    def sample_members(
        self, sample: dict[str, bytes], group: list[Annotation], records: list[dict], context: Any
    ) -> dict[str, bytes]:
        """gt_*.npy of the image's candidate boxes (sorted by box id); `candidates` (indices into them) per record."""
        ids, boxes = image_boxes(records, group[0].extra["image"])
        index = {b: i for i, b in enumerate(ids)}
        for r in records:
            r["candidates"] = [index[b] for b in r["candidate_ids"]]
        feat_dtype = load_npy(sample["features.npy"]).dtype
        prob_dtype = load_npy(sample["cls_prob.npy"]).dtype
        return context(group[0].extra["image"], boxes, feat_dtype, prob_dtype)

    def shard_report(self, anns: Sequence[Annotation], report_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """The most candidate boxes of one image (they must fit in --max-regions) and the candidates per record."""
        per_image: dict[str, set] = {}
        for a in anns:
            per_image.setdefault(str(a.ref), set()).update(a.record["candidate_ids"])
        most = max((len(v) for v in per_image.values()), default=0)
        counts = {"max_candidate_boxes_per_image": most,
                  "candidates_per_record": sorted({len(a.record["candidate_ids"]) for a in anns})}  # fmt: skip
        warnings = []
        if most > 36:
            warnings.append(f"an image has {most} candidate boxes: train and eval with --max-regions {most} or more "
                            "(the default 36 leaves some out and stops the run)")  # fmt: skip
        return counts, warnings

    def text(self, record: dict[str, Any]) -> str:
        """The text an example reads."""
        raise NotImplementedError

    def examples(self, ds: Any, items: Iterator[tuple[str, list[dict], Any]], rng: random.Random) -> Iterator[dict]:
        """One example per record: its text, its candidates' region indices ([IMG] is 0) and the right one."""
        for key, records, regions in items:
            for r in records:
                positions = [1 + i for i in r["candidates"]]
                if max(positions) > regions.num_detected:
                    raise ValueError(
                        f"image {key}, {self.id_key} {r[self.id_key]}: candidate box {max(r['candidates']) + 1} of the "
                        f"image is not among the {regions.num_detected} regions kept; raise --max-regions to at least "
                        f"{max(r['candidates']) + 1}"
                    )  # fmt: skip
                yield {**example_base(ds, key, regions), "texts": [ds.tokenizer.encode(self.text(r))],
                       "candidate_regions": positions, "label": r["label"], "record_id": r[self.id_key],
                       "candidate_ids": r["candidate_ids"]}  # fmt: skip

    def collate(self, examples: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        """candidate_regions and candidate_mask (B,C) padded to the most candidates, label (B,), id lists."""
        c = max(len(ex["candidate_regions"]) for ex in examples)
        regions = torch.zeros(len(examples), c, dtype=torch.long)
        mask = torch.zeros(len(examples), c, dtype=torch.bool)
        for i, ex in enumerate(examples):
            regions[i, : len(ex["candidate_regions"])] = torch.tensor(ex["candidate_regions"])
            mask[i, : len(ex["candidate_regions"])] = True
        batch["candidate_regions"], batch["candidate_mask"] = regions, mask
        batch["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        lists(examples, batch, ("record_id", "candidate_ids"))
