"""Captions (pretraining): COCO captions json, Conceptual Captions style TSV or JSONL; one example per caption.

Half the captions (seeded) are replaced by a caption of another recent image, with `align_label` 0,
for the alignment head; masking for MLM/MRM is the trainer's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.annotations.captions import read_captions
from pipelines.annotations.common import Annotation
from pipelines.tasks import DataTask, example_base, remember


class CaptionsTask(DataTask):
    """Caption-image pairs, half of them misaligned, for pretraining."""

    name = "captions"
    needs_class_distributions = True

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """Every caption of every file (the split name is only recorded)."""
        return [ann for p in paths for ann in read_captions(p)]

    def examples(self, ds: Any, items: Iterator[tuple[str, list[dict], Any]], rng: random.Random) -> Iterator[dict]:
        """One example per caption; with probability 0.5 another image's caption (from a pool of recent ones)."""
        pool: list[tuple[str, str]] = []  # (image id, caption) of recent images, for negatives
        for key, records, regions in items:
            for r in records:
                caption, aligned = r["caption"], True
                if rng.random() < 0.5:
                    others = [c for k, c in pool if k != key]
                    if others:  # the very first image has no other captions to borrow yet
                        caption, aligned = rng.choice(others), False
                yield {**example_base(ds, key, regions), "texts": [ds.tokenizer.encode(caption)],
                       "align_label": float(aligned)}  # fmt: skip
            remember(pool, [(key, r["caption"]) for r in records], ds.negative_buffer, rng)

    def collate(self, examples: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        """align_label (B,) float: 1 = the caption belongs to the image."""
        batch["align_label"] = torch.tensor([ex["align_label"] for ex in examples], dtype=torch.float32)


TASK = CaptionsTask()
