"""Flickr30k Entities phrase grounding: one example per (sentence, phrase with boxes); score every detected region.

The official layout: `Sentences/<image>.txt` (five sentences a line each, phrases marked
`[/EN#18/people A man]`: entity id, one or more types, the words) and `Annotations/<image>.xml`
(PASCAL-VOC-like: `<size>`, then `<object>`s, each with one or more `<name>` entity ids and either a
`<bndbox>` or `<nobndbox>`/`<scene>` flags), and the split lists `train.txt` / `val.txt` / `test.txt`
(an image id a line) beside the two folders. `--annotations` takes a split list (its sibling
Sentences/ and Annotations/ are read) or the folder holding Sentences/ and Annotations/ (every image).

Boxes are taken as the official utilities read them (every XML coordinate minus 1: the XML counts
pixels from 1) and used as continuous corners, as RefCOCO's. Phrases whose entity has no box (scene,
non-visual, `EN#0`) make no example; `shard` counts them. The text of an example is the pair
(phrase, sentence): the phrase says what to point at, the sentence tells apart same-worded mentions.

Targets: `iou` per detected region = the largest IoU with any of the phrase's boxes (the any-box
protocol: pointing at one of several people of "two people" is right); `iou_merged` = the IoU with
the box enclosing all of them (the merged-boxes protocol of Plummer et al.). Training reads `iou`
zeroed below 0.5, as RefCOCO.
"""

from __future__ import annotations

import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.annotations.common import Annotation, AnnotationError, ImageRef, bad
from pipelines.formats.npy import load_npy
from pipelines.tasks import DataTask, example_base, lists
from pipelines.tasks.refcoco import box_iou

PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s/\]]+)+)\s+([^\[\]]+?)\]")


def parse_sentence(line: str) -> tuple[str, list[dict[str, Any]]]:
    """(plain sentence, its phrases: entity_id, types, phrase, first_word_index) of one Sentences line."""
    words: list[str] = []
    phrases: list[dict[str, Any]] = []
    pos = 0
    for m in PHRASE.finditer(line):
        words += line[pos : m.start()].split()
        phrase_words = m.group(3).split()
        phrases.append({"entity_id": m.group(1), "types": m.group(2).strip("/").split("/"),
                        "phrase": " ".join(phrase_words), "first_word_index": len(words)})  # fmt: skip
        words += phrase_words
        pos = m.end()
    words += line[pos:].split()
    sentence = " ".join(words)
    if "[/EN#" in sentence or "]" in sentence:  # a marker the pattern did not take: a malformed line
        raise ValueError("unbalanced or malformed phrase marker")
    return sentence, phrases


def parse_annotation(path: Path) -> dict[str, Any]:
    """{"width", "height", "boxes": {entity id: [[x1, y1, x2, y2], ...]}} of one Annotations xml."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: not valid XML: {err}") from None
    size = root.find("size")
    try:
        width, height = int(size.findtext("width")), int(size.findtext("height"))  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, ValueError):
        raise bad(path, "size", "missing or non-numeric width/height") from None
    boxes: dict[str, list[list[float]]] = {}
    for i, obj in enumerate(root.iter("object")):
        names = [n.text.strip() for n in obj.findall("name") if n.text]
        box = obj.find("bndbox")
        if not names:
            raise bad(path, f"object {i}", "no <name> (entity id)")
        if box is None:
            continue  # nobndbox / scene: the entity exists but has no box
        try:
            corners = [float(box.findtext(k)) - 1 for k in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise bad(path, f"object {i} ({names[0]})", "bndbox needs numeric xmin, ymin, xmax, ymax") from None
        for name in names:
            boxes.setdefault(name, []).append(corners)
    return {"width": width, "height": height, "boxes": boxes}


def flickr_images(path: Path) -> tuple[Path, list[str]]:
    """(the folder holding Sentences/ and Annotations/, the image ids) of a split list or that folder."""
    root = path if path.is_dir() else path.parent
    if not (root / "Sentences").is_dir() or not (root / "Annotations").is_dir():
        raise AnnotationError(f"{path}: expected a Flickr30k Entities split list or folder beside/with "
                              "Sentences/ and Annotations/")  # fmt: skip
    if path.is_dir():
        return root, sorted(p.stem for p in (root / "Sentences").glob("*.txt"))
    try:
        ids = path.read_text(encoding="utf-8").split()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: split list not found") from None
    return root, ids


def read_flickr_entities(paths: Sequence[Path]) -> list[Annotation]:
    """One annotation per (sentence, phrase with boxes) of the listed images, in list, sentence, phrase order."""
    out: list[Annotation] = []
    pending = 0  # phrases without boxes, counted on the next annotation (shard_report sums them)
    for path in paths:
        root, images = flickr_images(path)
        for image in images:
            ann = parse_annotation(root / "Annotations" / f"{image}.xml")
            sent_file = root / "Sentences" / f"{image}.txt"
            try:
                lines = sent_file.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                raise AnnotationError(f"{sent_file}: sentences file not found") from None
            ref = ImageRef(path=f"{image}.jpg", numeric_id=int(image) if image.isdigit() else None)
            for s, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    sentence, phrases = parse_sentence(line)
                except ValueError as err:
                    raise bad(sent_file, f"line {s + 1}", str(err)) from None
                for p in phrases:
                    gt = ann["boxes"].get(p["entity_id"])
                    if not gt:
                        pending += 1
                        continue
                    record = {"phrase_id": f"{image}_{s}_{p['first_word_index']}", "sent_id": f"{image}_{s}",
                              "entity_id": p["entity_id"], "phrase": p["phrase"], "phrase_type": p["types"][0],
                              "first_word_index": p["first_word_index"], "sentence": sentence, "gt_boxes": gt}  # fmt: skip
                    out.append(Annotation(ref, record, extra={"phrases_without_boxes": pending}))
                    pending = 0
    if out and pending:
        out[-1].extra["phrases_without_boxes"] += pending
    return out


def merged_box(boxes: Sequence[Sequence[float]]) -> list[float]:
    """The box enclosing every box of a phrase."""
    a = np.asarray(boxes, np.float64)
    return [float(a[:, 0].min()), float(a[:, 1].min()), float(a[:, 2].max()), float(a[:, 3].max())]


def phrase_ious(regions: np.ndarray, gt_boxes: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(any-box IoU, merged-box IoU) of each detected region with a phrase's ground-truth boxes."""
    any_box = np.max(np.stack([box_iou(regions, b) for b in gt_boxes]), axis=0)
    return any_box, box_iou(regions, merged_box(gt_boxes))


class Flickr30kEntitiesTask(DataTask):
    """Phrase grounding: score every detected region against the phrase's ground-truth boxes."""

    name = "flickr30k_entities"
    # the targets are the IoUs of the image's own boxes: a swap keeps them and takes another appearance
    swap = "features"

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """Phrases with boxes of the images of the given split lists (or folders)."""
        return read_flickr_entities(paths)

    def sample_members(
        self, sample: dict[str, bytes], group: list[Annotation], records: list[dict], context: Any
    ) -> dict[str, bytes]:
        """Add "iou" and "iou_merged" per detected region (boxes.npy order) to every record."""
        boxes = load_npy(sample["boxes.npy"])
        for r in records:
            any_box, merged = phrase_ious(boxes, r["gt_boxes"])
            r["iou"] = [round(float(v), 6) for v in any_box]
            r["iou_merged"] = [round(float(v), 6) for v in merged]
        return {}

    def shard_report(self, anns: Sequence[Annotation], report_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """How many phrases made no example (their entity has no box)."""
        return {"phrases_without_boxes": sum(a.extra.get("phrases_without_boxes", 0) for a in anns)}, []

    def examples(self, ds: Any, items: Iterator[tuple[str, list[dict], Any]], rng: random.Random) -> Iterator[dict]:
        """One example per phrase: the (phrase, sentence) pair and both IoUs of every region ([IMG] 0)."""
        for key, records, regions in items:
            for r in records:
                ious = np.zeros((2, regions.num_regions), np.float32)
                ious[0, 1:] = np.asarray(r["iou"], np.float32)[: regions.num_detected]
                ious[1, 1:] = np.asarray(r["iou_merged"], np.float32)[: regions.num_detected]
                yield {**example_base(ds, key, regions), "texts": ds.tokenizer.encode_batch([(r["phrase"], r["sentence"])]),
                       "region_iou": ious[0], "region_iou_merged": ious[1], "phrase_id": r["phrase_id"],
                       "sent_id": r["sent_id"], "phrase_type": r["phrase_type"]}  # fmt: skip

    def collate(self, examples: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        """region_iou, region_iou_merged and region_target (B,R) padded to the batch's regions; id lists."""
        r = batch["image_mask"].shape[-1]
        for key in ("region_iou", "region_iou_merged"):
            iou = np.zeros((len(examples), r), np.float32)
            for i, ex in enumerate(examples):
                iou[i, : len(ex[key])] = ex[key]
            batch[key] = torch.from_numpy(iou)
        iou = batch["region_iou"]
        batch["region_target"] = torch.where(iou >= 0.5, iou, torch.zeros_like(iou))
        lists(examples, batch, ("phrase_id", "sent_id", "phrase_type"))


TASK = Flickr30kEntitiesTask()
