"""NLVR2: is a sentence true of a pair of images? One example per (sentence, image pair).

The official layout (`{train,dev,test1}.json`, one JSON object a line): `{"identifier": "dev-850-0-0",
"sentence": "...", "label": "True", "left_url": ..., "right_url": ...}`. The identifier is
`<split>-<set>-<pair>-<sentence>`; the pair's images are `<split>-<set>-<pair>-img0.png` and `-img1.png`
(dropping the last `-N` of the identifier). A label of "True"/"False" (test files may have none).

`shard` files each example under its first image and stores the second image's regions beside them
(`right_*.npy`), so that an example never waits for another sample; task.json's image count counts the
first images. The dataset gives each example both images' regions (first image's first); the shuffled
image check gives a sentence another pair's two images.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.annotations.common import Annotation, ImageRef, bad, read_jsonl, require
from pipelines.datasets import Regions, build_regions
from pipelines.tasks import DataTask, lists

RIGHT = "right_"  # prefix of the second image's members in a task sample
LABELS = {"True": 1, "False": 0, True: 1, False: 0}


def pair_images(identifier: str) -> tuple[str, str]:
    """The two image file names of an NLVR2 identifier: 'dev-850-0-0' -> ('dev-850-0-img0.png', 'dev-850-0-img1.png')."""
    pair = identifier.rsplit("-", 1)[0]
    return f"{pair}-img0.png", f"{pair}-img1.png"


def read_nlvr2(paths: Sequence[Path]) -> list[Annotation]:
    """Examples of NLVR2 jsonl files, in file then line order, filed under their first image."""
    out: list[Annotation] = []
    for path in paths:
        for lineno, rec in read_jsonl(path):
            where = f"line {lineno}"
            require(path, where, rec, ["identifier", "sentence"])
            identifier = rec["identifier"]
            if not isinstance(identifier, str) or identifier.count("-") < 3:
                raise bad(path, where, f"identifier {identifier!r} is not <split>-<set>-<pair>-<sentence>")
            label = rec.get("label")
            if label is not None and label not in LABELS:
                raise bad(path, where, f"label {label!r} must be \"True\" or \"False\"")
            left, right = pair_images(identifier)
            record = {"identifier": identifier, "sentence": rec["sentence"],
                      "label": -1 if label is None else LABELS[label], "right_image": right}  # fmt: skip
            out.append(Annotation(ImageRef(path=left), record))
    return out


@dataclass
class PairRegions(Regions):
    """The first image's regions (what swapping, dimension checks and statistics read) and the second's."""

    right: Regions | None = None


class SecondImages:
    """The feature set's second images, read a tar at a time (a pair's images are usually in the same tar)."""

    def __init__(self, feature_set: Any, keep_tars: int = 2) -> None:
        from pipelines.matching import ImageMatcher

        self.fs = feature_set
        self.matcher = ImageMatcher(feature_set.ok_images())
        self.tar_of = {r["image_id"]: r["shard"] for r in feature_set.iter_index(["image_id", "status"])
                       if r["status"] == "ok"}  # fmt: skip
        self.keep_tars = keep_tars
        self.cache: OrderedDict[str, dict[str, dict]] = OrderedDict()

    def members(self, image: str, identifier: str) -> dict[str, bytes]:
        """The region members of a second image; ValueError naming the image and the example when it has none."""
        from pipelines.formats.tar import read_tar_samples
        from pipelines.shard_job import REGION_MEMBERS

        key = self.matcher.match(ImageRef(path=image)).image_id
        if key is None or key not in self.tar_of:
            raise ValueError(f"second image {image} of {identifier} has no features")
        tar = self.tar_of[key]
        if tar not in self.cache:
            self.cache[tar] = {k: {m: bytes(s[m]) for m in REGION_MEMBERS}
                               for k, s in read_tar_samples(self.fs.root / f"{tar}.tar")}  # fmt: skip
            while len(self.cache) > self.keep_tars:
                self.cache.popitem(last=False)
        self.cache.move_to_end(tar)
        return self.cache[tar][key]


class NLVR2Task(DataTask):
    """Two images, one sentence: true or false."""

    name = "nlvr2"
    swap = "regions"

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """Every example of the given NLVR2 files (the split name is only recorded)."""
        return read_nlvr2(paths)

    def shard_context(self, feature_set: Any, weights: str | None, device: str, detector_config: Any) -> Any:
        """Where the second images' regions are."""
        return SecondImages(feature_set)

    def sample_members(
        self, sample: dict[str, bytes], group: list[Annotation], records: list[dict], context: Any
    ) -> dict[str, bytes]:
        """right_*.npy: the regions of the pair's second image (one pair per first image)."""
        rights = sorted({r["right_image"] for r in records})
        if len(rights) != 1:
            raise ValueError(f"first image {group[0].ref} is paired with {len(rights)} second images: {rights}")
        members = context.members(rights[0], records[0]["identifier"])
        return {RIGHT + m: v for m, v in members.items()}

    def regions(self, sample: dict[str, bytes], max_regions: int) -> PairRegions:
        """Both images' regions, each cut to `max_regions`."""
        left = build_regions(sample, max_regions)
        right = build_regions({m[len(RIGHT):]: v for m, v in sample.items() if m.startswith(RIGHT)}, max_regions)
        return PairRegions(left.raw_feat, left.raw_loc, left.raw_target, left.raw_global, right=right)

    def examples(self, ds: Any, items: Iterator[tuple[str, list[dict], Any]], rng: random.Random) -> Iterator[dict]:
        """One example per sentence: its text and both images' regions, first image first."""
        for key, records, regions in items:
            for r in records:
                yield {"task": ds.task, "image_id": key, "regions": [regions, regions.right],
                       "texts": [ds.tokenizer.encode(r["sentence"])], "label": r["label"],
                       "identifier": r["identifier"], "sentence": r["sentence"]}  # fmt: skip

    def collate(self, examples: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        """label (B,) long (1 true, 0 false, -1 unknown), identifier and sentence lists."""
        batch["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        lists(examples, batch, ("identifier", "sentence"))


TASK = NLVR2Task()
