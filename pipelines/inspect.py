"""`vilbert-data inspect`: look at a feature set (counts, boxes per image, failures) and at one image.

Works on a finished set (with `dataset.json`) and on a partial one (only the shards whose parquet
index exists are read: `pipelines.formats.features.FeatureSet`). Class and attribute names come from the Visual Genome vocabulary files passed with
`--vocab` (line i names id i+1); without them boxes are labelled with ids.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from extract.config import NUM_ATTRIBUTES, NUM_CLASSES
from pipelines.formats.features import FeatureSet
from pipelines.formats.npy import load_npy

_OBJECT_FILES = ("vg_objects_vocab.txt", "objects_vocab.txt")
_ATTRIBUTE_FILES = ("vg_attributes_vocab.txt", "attributes_vocab.txt")
_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#ffe119")


def summarize(out: str | Path) -> dict:
    """Counts, boxes-per-image histogram, failures by reason, and the detector/settings if known."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such feature set folder")
    fs = FeatureSet.open(out, unfinished=True)
    rows = list(fs.iter_index())
    dataset = fs.info
    if not rows and dataset is None:
        raise FileNotFoundError(f"{out}: no finished feature shards and no dataset.json")
    ok = [r for r in rows if r["status"] == "ok"]
    boxes = Counter(int(r["num_boxes"]) for r in ok)
    summary = {
        "out": str(out),
        "complete": dataset is not None,
        "shards": len(fs.shards),
        "images": len(rows),
        "ok": len(ok),
        "failed": len(rows) - len(ok),
        "failed_by_reason": dict(sorted(Counter(r["reason"] for r in rows if r["status"] != "ok").items())),
        "boxes_histogram": dict(sorted(boxes.items())),
        "boxes_mean": round(sum(k * n for k, n in boxes.items()) / len(ok), 3) if ok else 0.0,
        "failures": [
            {"image_id": r["image_id"], "source": r["source"], "reason": r["reason"], "error": r["error"]}
            for r in rows
            if r["status"] != "ok"
        ],
    }
    if dataset is not None:
        det = dataset.get("detector") or {}  # null for a converted set (no detector ran)
        summary.update(
            feature_layer=dataset.get("feature_layer"),
            feature_dim=dataset.get("feature_dim"),
            dtype=dataset.get("dtype"),
            checkpoint=det.get("checkpoint"),
            sha256=det.get("sha256"),
            random_weights=det.get("random_weights"),
            converted_from=(dataset.get("source") or {}).get("format"),
            lacks=dataset.get("lacks", []),
        )
    return summary


def format_summary(summary: dict, width: int = 40, max_failures: int = 10) -> str:
    """Human-readable report: header, histogram bars, failures by reason and the first failures."""
    lines = [
        f"feature set {summary['out']} ({'complete' if summary['complete'] else 'INCOMPLETE: no dataset.json'})"
    ]
    if summary.get("converted_from"):  # released features brought in by `vilbert-data convert`
        lines.append(
            f"features: {summary['feature_dim']}-d ({summary['dtype']}), converted from {summary['converted_from']}; "
            f"lacks: {', '.join(summary['lacks']) or 'nothing'}"
        )
    elif summary.get("feature_layer"):
        lines.append(
            f"features: {summary['feature_layer']} ({summary['feature_dim']}-d, {summary['dtype']}), "
            f"detector {summary.get('checkpoint') or 'random weights'}"
            + (" [RANDOM WEIGHTS]" if summary.get("random_weights") else "")
        )
    lines.append(
        f"images: {summary['images']}  ok: {summary['ok']}  failed: {summary['failed']}  shards: {summary['shards']}"
    )
    hist = summary["boxes_histogram"]
    if hist:
        lines.append(f"boxes per image (mean {summary['boxes_mean']}):")
        top = max(hist.values())
        for k, n in hist.items():
            lines.append(f"  {k:>4} | {'#' * max(1, round(width * n / top)):<{width}} {n}")
    if summary["failed_by_reason"]:
        lines.append(
            "failed by reason: " + ", ".join(f"{r}={n}" for r, n in summary["failed_by_reason"].items())
        )
        for f in summary["failures"][:max_failures]:
            lines.append(f"  {f['image_id']}: {f['reason']}: {f['error']} ({f['source']})")
        if len(summary["failures"]) > max_failures:
            lines.append(f"  ... {len(summary['failures']) - max_failures} more (see the parquet index)")
    return "\n".join(lines)


def load_sample(out: str | Path, image_id: str | None = None) -> dict:
    """Members of one image (decoded .npy arrays and the json dict); the first ok image when no id."""
    members = FeatureSet.open(out, unfinished=True).sample(image_id)
    return {k: json.loads(v) if k == "json" else load_npy(v) for k, v in members.items()}


def read_vocab(path: str | Path) -> list[str]:
    """Names of a Visual Genome vocabulary file; the first synonym of each line."""
    return [line.split(",")[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]


def load_vocabs(paths: list[str | Path]) -> tuple[list[str] | None, list[str] | None]:
    """(object names, attribute names) from `--vocab` paths: folders holding the VG files, or the files."""
    objects = attributes = None
    for path in map(Path, paths):
        if path.is_dir():
            for names, kind in ((_OBJECT_FILES, "objects"), (_ATTRIBUTE_FILES, "attributes")):
                found = next((path / n for n in names if (path / n).is_file()), None)
                if found is not None and kind == "objects":
                    objects = read_vocab(found)
                elif found is not None:
                    attributes = read_vocab(found)
            if objects is None and attributes is None:
                raise FileNotFoundError(
                    f"--vocab {path}: holds neither {_OBJECT_FILES[0]} nor {_ATTRIBUTE_FILES[0]}"
                )
        elif path.is_file():
            names = read_vocab(path)
            # 1600 object classes, 400 attributes in the VG vocabularies; the name decides otherwise.
            is_attr = len(names) == NUM_ATTRIBUTES or (len(names) != NUM_CLASSES and "attr" in path.name.lower())
            if is_attr:
                attributes = names
            else:
                objects = names
        else:
            raise FileNotFoundError(f"--vocab {path}: no such file or folder")
    return objects, attributes


def _name(names: list[str] | None, idx: int, prefix: str) -> str:
    """Name of 1-based id `idx`, or `prefix<idx>` without a vocabulary."""
    if names is not None and 1 <= idx <= len(names):
        return names[idx - 1]
    return f"{prefix}{idx}"


def box_labels(
    sample: dict, objects: list[str] | None = None, attributes: list[str] | None = None
) -> list[str]:
    """One label per box: "attribute class confidence" (ids when no vocabulary is given)."""
    labels = []
    for (obj, conf), (attr, _attr_conf) in zip(sample["objects.npy"], sample["attributes.npy"], strict=True):
        labels.append(
            f"{_name(attributes, int(attr), 'attr')} {_name(objects, int(obj), 'class')} {conf:.2f}"
        )
    return labels


def draw_boxes(image, boxes: np.ndarray, labels: list[str]):
    """A copy of the PIL image with each (x1,y1,x2,y2) box outlined and labelled."""
    from PIL import ImageDraw, ImageFont

    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    size = max(10, min(canvas.size) // 40)
    font = ImageFont.load_default(size=size)
    for i, (box, label) in enumerate(zip(boxes.tolist(), labels, strict=True)):
        colour = _COLOURS[i % len(_COLOURS)]
        draw.rectangle(box, outline=colour, width=max(1, size // 6))
        left, top, right, bottom = draw.textbbox((box[0], box[1]), label, font=font)
        draw.rectangle((left, top, right, bottom), fill=colour)
        draw.text((box[0], box[1]), label, fill="white", font=font)
    return canvas


def render_picture(
    out: str | Path, png_path: str | Path, image_id: str | None = None, vocab: list[str | Path] | None = None
) -> Path:
    """Draw one image of the set with its labelled boxes into `png_path` (grey canvas if unreadable)."""
    from PIL import Image

    sample = load_sample(out, image_id)
    meta = sample["json"]
    objects, attributes = load_vocabs(vocab or [])
    try:
        from extract import load_image
        from pipelines.worker import read_source

        image = load_image(read_source(meta["source"]))
    except Exception:  # the picture is still useful without the photo: boxes on a blank canvas
        image = Image.new("RGB", (meta["width"], meta["height"]), "#808080")
    picture = draw_boxes(image, sample["boxes.npy"], box_labels(sample, objects, attributes))
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(png_path)
    return png_path


def format_boxes(sample: dict, objects: list[str] | None = None, attributes: list[str] | None = None) -> str:
    """A table of one image's boxes: label and coordinates."""
    meta = sample["json"]
    lines = [
        f"{meta['image_id']} ({meta['width']}x{meta['height']}, {meta['num_boxes']} boxes) {meta['source']}"
    ]
    for label, box in zip(box_labels(sample, objects, attributes), sample["boxes.npy"].tolist(), strict=True):
        lines.append(f"  {label:<40} [{', '.join(f'{v:.1f}' for v in box)}]")
    return "\n".join(lines)
