"""Karpathy split json (Flickr30k / COCO retrieval): `images` with filename, split and sentences."""

from __future__ import annotations

from pathlib import Path

from pipelines.annotations.common import Annotation, ImageRef, bad, load_json, require


def split_names(split: str) -> set[str]:
    """Karpathy splits selected by `split`: 'train' also takes 'restval', as the usual COCO recipe does."""
    return {"train", "restval"} if split == "train" else {split}


def read_karpathy(path: Path, split: str) -> list[Annotation]:
    """One Annotation per sentence of the images in `split` ({"caption", "sent_id"} records)."""
    data = load_json(path)
    require(path, "top level", data, ["images"])
    wanted = split_names(split)
    seen: set[str] = set()
    out = []
    for i, img in enumerate(data["images"]):
        require(path, f"images[{i}]", img, ["filename", "split", "sentences"])
        seen.add(img["split"])
        if img["split"] not in wanted:
            continue
        rel = f"{img['filepath']}/{img['filename']}" if img.get("filepath") else img["filename"]
        numeric = img.get("cocoid")
        ref = ImageRef(path=rel, numeric_id=int(numeric) if numeric is not None else None)
        for j, sent in enumerate(img["sentences"]):
            require(path, f"images[{i}].sentences[{j}]", sent, ["raw"])
            sent_id = sent.get("sentid", j)
            out.append(Annotation(ref, {"caption": sent["raw"].strip(), "sent_id": int(sent_id)}))
    if not out:
        raise bad(
            path,
            "images",
            f"no image in split {split!r}; splits present: {', '.join(sorted(seen)) or 'none'}",
        )
    return out
