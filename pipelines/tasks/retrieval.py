"""Image-text retrieval (Karpathy `dataset_*.json`): 4 candidates per caption for training.

Candidates: 0 = (image, its caption), 1 = (image, another image's caption), 2 = (another image, the
caption), 3 = (image, a hard negative caption if the record has "hard_negatives", else another
image's caption); label 0. Negatives come from pools of recent images and captions.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.annotations.common import Annotation
from pipelines.annotations.karpathy import read_karpathy
from pipelines.tasks import DataTask, remember


class RetrievalTask(DataTask):
    """Caption-image matching: the positive pair among hard and random negatives."""

    name = "retrieval"
    split_selects_records = True

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """The split's captions of every file."""
        return [ann for p in paths for ann in read_karpathy(p, split)]

    def examples(self, ds: Any, items: Iterator[tuple[str, list[dict], Any]], rng: random.Random) -> Iterator[dict]:
        """Four candidates per caption; an image waits until the pools hold another image and its captions."""
        captions: list[tuple[str, str]] = []  # (image id, caption) of recent images
        images: list[tuple[str, Any]] = []  # (image id, Regions) of recent images
        deferred: list[tuple[str, Any, list[dict]]] = []
        for key, records, regions in items:
            remember(captions, [(key, r["caption"]) for r in records], ds.negative_buffer, rng)
            remember(images, [(key, regions)], ds.negative_buffer, rng)
            # Negatives need another image in the pools: hold an image back until there is one.
            deferred.append((key, regions, records))
            waiting = []
            for item in deferred:
                if any(k != item[0] for k, _ in images) and any(k != item[0] for k, _ in captions):
                    yield from self._candidates(ds, *item, captions, images, rng)
                else:
                    waiting.append(item)
            deferred = waiting

    @staticmethod
    def _candidates(ds, key, regions, records, captions, images, rng) -> Iterator[dict]:  # noqa: ANN001
        """Four candidates per caption: positive, other caption, other image, hard negative (or other caption)."""
        other_caps = [c for k, c in captions if k != key]
        other_imgs = [r for k, r in images if k != key]
        for r in records:
            hard = r.get("hard_negatives") or other_caps
            texts = [r["caption"], rng.choice(other_caps), r["caption"], rng.choice(hard)]
            yield {
                "task": ds.task,
                "image_id": key,
                "multi_choice": True,
                "texts": ds.tokenizer.encode_batch(texts),
                "regions": [regions, regions, rng.choice(other_imgs), regions],
                "label": 0,
            }

    def collate(self, examples: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        """label (B,) long: the positive is candidate 0."""
        batch["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)


TASK = RetrievalTask()
