"""VCR: `{split}.jsonl` + per-image metadata (ground-truth boxes); Q->A and QA->R as 4-way choices.

`shard` adds the ground-truth boxes' features (`gt_*.npy`) from the detector's given-box mode; the
dataset puts those regions first and makes two examples per question: (question, answer_i) and
(question + right answer, rationale_i), the second only when the answer label is known.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.annotations.common import Annotation
from pipelines.annotations.vcr import read_vcr, read_vcr_metadata
from pipelines.formats.npy import load_npy, npy_bytes
from pipelines.tasks import DataTask, example_base, lists


class GivenBoxFeatures:
    """VCR ground-truth box features through the detector's given-box mode (loaded once per shard run)."""

    def __init__(self, weights: str | None, device: str, feature_set: Any, config: Any = None) -> None:
        from extract import Detector, load_image
        from pipelines.formats.tar import ShardError

        self.load_image = load_image
        layer = feature_set.info["feature_layer"]
        self.detector = Detector.from_checkpoint(weights, device=device, feature_layer=layer, config=config)
        dim = int(self.detector.info["feature_dim"])
        if dim != feature_set.feature_dim:
            raise ShardError(
                f"detector gives {dim}-d features but {feature_set.root}/dataset.json says {feature_set.feature_dim}-d"
            )

    def __call__(
        self, image_path: str, boxes: np.ndarray, feat_dtype: np.dtype, prob_dtype: np.dtype
    ) -> dict:
        """gt_*.npy members for the given boxes of one image."""
        det = self.detector.features_for_boxes(self.load_image(image_path), boxes)
        return {
            "gt_boxes.npy": npy_bytes(np.asarray(det.boxes, np.float32)),
            "gt_features.npy": npy_bytes(np.asarray(det.features).astype(feat_dtype)),
            "gt_spatial.npy": npy_bytes(np.asarray(det.spatial, np.float32)),
            "gt_cls_prob.npy": npy_bytes(np.asarray(det.cls_prob).astype(prob_dtype)),
        }


class VCRTask(DataTask):
    """Visual commonsense reasoning: multiple choice over 4 answers, then 4 rationales."""

    name = "vcr"
    with_gt_regions = True
    examples_per_record = 2
    swap = "regions"

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """Questions with object references rendered as words; the images folder holds the metadata."""
        return read_vcr(paths, images_dir)

    def shard_context(self, feature_set: Any, weights: str | None, device: str, detector_config: Any) -> Any:
        """The detector for the ground-truth boxes (None weights: random, tests only)."""
        return GivenBoxFeatures(weights, device, feature_set, detector_config)

    def sample_members(
        self, sample: dict[str, bytes], group: list[Annotation], records: list[dict], context: Any
    ) -> dict[str, bytes]:
        """gt_*.npy of the metadata file's boxes, in its order, stored with the detected regions' dtypes."""
        gt = read_vcr_metadata(Path(group[0].extra["metadata"]))
        feat_dtype = load_npy(sample["features.npy"]).dtype
        prob_dtype = load_npy(sample["cls_prob.npy"]).dtype
        gt_boxes = np.asarray(gt["boxes"], np.float32).reshape(-1, 4)
        return context(group[0].extra["image"], gt_boxes, feat_dtype, prob_dtype)

    def examples(self, ds: Any, items: Iterator[tuple[str, list[dict], Any]], rng: random.Random) -> Iterator[dict]:
        """Per question: the Q->A example and, when the answer is known, the QA->R example."""
        for key, records, regions in items:
            for r in records:
                common = {**example_base(ds, key, regions), "multi_choice": True, "annot_id": r["annot_id"]}
                q = r["question"]
                pairs = [(q, a) for a in r["answer_choices"]]
                yield {**common, "texts": ds.tokenizer.encode_batch(pairs), "label": r["answer_label"],
                       "vcr_stage": "q_a"}  # fmt: skip
                if r["answer_label"] >= 0:  # QA->R conditions on the right answer (unknown on test)
                    qa = f"{q} {r['answer_choices'][r['answer_label']]}"
                    pairs = [(qa, x) for x in r["rationale_choices"]]
                    yield {**common, "texts": ds.tokenizer.encode_batch(pairs), "label": r["rationale_label"],
                           "vcr_stage": "qa_r"}  # fmt: skip

    def collate(self, examples: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        """label (B,) long, vcr_stage and annot_id lists."""
        batch["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        lists(examples, batch, ("vcr_stage", "annot_id"))


TASK = VCRTask()
