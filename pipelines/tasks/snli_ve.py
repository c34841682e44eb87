"""SNLI-VE: does the image entail, contradict or leave open a hypothesis? One example per hypothesis.

The official layout (`snli_ve_{train,dev,test}.jsonl`, one JSON object a line) is SNLI's with the premise's
Flickr30k image: `{"pairID": "4564320256.jpg#0r1e", "Flikr30kID": "4564320256.jpg", "sentence1": "...",
"sentence2": "...", "gold_label": "entailment"}`; some releases spell the image field `Flickr30K_ID` and
give the bare number. The model reads the hypothesis (sentence2) with the image, not the premise.

`LabelDataTask` is what the few-class tasks with one image and one text share (GuessWhat?! answers
subclasses it): the reader gives each record `label` (-1 when unknown) and the fields named below.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.annotations.common import Annotation, ImageRef, bad, read_jsonl, require
from pipelines.tasks import DataTask, example_base, lists

SNLI_VE_CLASSES = ("entailment", "neutral", "contradiction")
IMAGE_FIELDS = ("Flikr30kID", "Flickr30K_ID")  # the release's spelling first


def read_snli_ve(paths: Sequence[Path]) -> list[Annotation]:
    """Hypotheses of SNLI-VE jsonl files, in file then line order."""
    out: list[Annotation] = []
    for path in paths:
        for lineno, rec in read_jsonl(path):
            where = f"line {lineno}"
            require(path, where, rec, ["sentence2"])
            field = next((f for f in IMAGE_FIELDS if f in rec), None)
            if field is None:
                raise bad(path, where, f"missing field {' or '.join(IMAGE_FIELDS)}")
            label = rec.get("gold_label")
            if label is not None and label not in SNLI_VE_CLASSES:
                raise bad(path, where, f"gold_label {label!r} must be one of {', '.join(SNLI_VE_CLASSES)}")
            image = str(rec[field])
            image = image if "." in image else f"{image}.jpg"
            stem = image.rsplit(".", 1)[0]
            record = {"pair_id": str(rec.get("pairID", f"{path.name}:{lineno}")), "hypothesis": rec["sentence2"],
                      "premise": rec.get("sentence1", ""),
                      "label": -1 if label is None else SNLI_VE_CLASSES.index(label)}  # fmt: skip
            out.append(Annotation(ImageRef(path=image, numeric_id=int(stem) if stem.isdigit() else None), record))
    return out


class LabelDataTask(DataTask):
    """One image, one text, one of a few classes: one example per record."""

    swap = "regions"
    text_field = ""  # the record's text the model reads
    id_field = ""  # the record's id, kept in batches for predictions
    list_fields: tuple[str, ...] = ()  # more per-example fields batches carry as lists

    def examples(self, ds: Any, items: Iterator[tuple[str, list[dict], Any]], rng: random.Random) -> Iterator[dict]:
        """One example per record: its text, label and id."""
        for key, records, regions in items:
            for r in records:
                yield {**example_base(ds, key, regions), "texts": [ds.tokenizer.encode(r[self.text_field])],
                       "label": r["label"], **{k: r[k] for k in (self.id_field, *self.list_fields)}}  # fmt: skip

    def collate(self, examples: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        """label (B,) long (-1: unknown), the id and the other per-example lists."""
        batch["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        lists(examples, batch, (self.id_field, *self.list_fields))


class SNLIVETask(LabelDataTask):
    """Visual entailment of a hypothesis by a Flickr30k image."""

    name = "snli_ve"
    text_field = "hypothesis"
    id_field = "pair_id"
    list_fields = ("hypothesis",)

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """Every hypothesis of the given SNLI-VE files (the split name is only recorded)."""
        return read_snli_ve(paths)


TASK = SNLIVETask()
