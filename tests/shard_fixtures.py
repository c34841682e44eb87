"""Helpers for the shard and dataset tests: small feature sets in the exact on-disk format (contract s.2)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds


@dataclass
class FakeImage:
    """One image of a test feature set, with the arrays written for it."""

    image_id: str
    source: str
    width: int
    height: int
    boxes: np.ndarray  # (K,4) f32
    features: np.ndarray  # (K,D) as stored
    spatial: np.ndarray  # (K,5) f32
    cls_prob: np.ndarray  # (K,1601) as stored


def make_image(
    image_id: str, source: str, k: int, dim: int, seed: int, dtype=np.float16, w=100, h=80
) -> FakeImage:
    """Random but reproducible regions; spatial computed from the boxes as the detector does."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, w / 2, k)
    y1 = rng.uniform(0, h / 2, k)
    boxes = np.stack([x1, y1, x1 + rng.uniform(5, w / 2, k), y1 + rng.uniform(5, h / 2, k)], 1).astype(
        np.float32
    )
    spatial = np.concatenate(
        [
            boxes / [w, h, w, h],
            ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (w * h))[:, None],
        ],
        1,
    ).astype(np.float32)
    logits = rng.normal(size=(k, 1601))
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    feats = rng.uniform(0, 4, (k, dim)).astype(dtype)
    return FakeImage(image_id, source, w, h, boxes, feats, spatial, prob.astype(dtype))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_feature_set(
    root: Path,
    images: list[FakeImage],
    failed: tuple[str, ...] = (),
    per_shard: int = 2,
    layer: str = "res4",
    dim: int | None = None,
) -> Path:
    """Write `images` as a feature set (tars + parquet + stats + dataset.json); `failed` sources get failed rows."""
    root.mkdir(parents=True, exist_ok=True)
    dim = dim or (images[0].features.shape[1] if images else 8)
    shards = []
    chunks = [images[i : i + per_shard] for i in range(0, len(images), per_shard)] or [[]]
    for n, chunk in enumerate(chunks):
        name = f"features-{n:06d}"
        shards.append(f"{name}.tar")
        rows = []
        with wds.TarWriter(str(root / f"{name}.tar")) as sink:
            for im in chunk:
                k = im.boxes.shape[0]
                objects = np.stack([im.cls_prob[:, 1:].argmax(1) + 1, im.cls_prob.max(1)], 1).astype(
                    np.float32
                )
                sink.write(
                    {
                        "__key__": im.image_id,
                        "boxes.npy": _npy(im.boxes),
                        "features.npy": _npy(im.features),
                        "spatial.npy": _npy(im.spatial),
                        "cls_prob.npy": _npy(im.cls_prob),
                        "objects.npy": _npy(objects),
                        "attributes.npy": _npy(objects),
                        "json": json.dumps(
                            {
                                "image_id": im.image_id,
                                "source": im.source,
                                "width": im.width,
                                "height": im.height,
                                "num_boxes": k,
                                "feature_layer": layer,
                            }
                        ).encode(),
                    }  # fmt: skip
                )
                rows.append({"image_id": im.image_id, "source": im.source, "status": "ok", "error": None,
                             "reason": None, "num_boxes": k, "width": im.width, "height": im.height, "bytes": 1000})  # fmt: skip
        if n == 0:
            for src in failed:
                rows.append({"image_id": Path(src).stem, "source": src, "status": "failed", "error": "bad",
                             "reason": "corrupt", "num_boxes": 0, "width": 0, "height": 0, "bytes": 3})  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows), root / f"{name}.parquet")
        (root / f"{name}_stats.json").write_text(json.dumps({"count": len(rows)}))
    info = {
        "format": "vilbert-data/features",
        "version": 1,
        "feature_layer": layer,
        "feature_dim": dim,
        "dtype": "float16",
        "detector": {"random_weights": True, "feature_dim": dim, "feature_layer": layer},
        "settings": {},
        "counts": {
            "images": len(images) + len(failed),
            "ok": len(images),
            "failed": len(failed),
            "failed_by_reason": {"corrupt": len(failed)} if failed else {},
        },  # fmt: skip
        "summary": {},
        "shards": shards,
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def write_vocab(path: Path, words: list[str]) -> Path:
    """A BERT-style vocab.txt with the special tokens first and the given whole words."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path.write_text("\n".join(specials + words + [".", "?", ","]) + "\n")
    return path


def read_task_samples(taskdir: Path) -> dict[str, dict[str, bytes]]:
    """All samples of a TASKDIR's shards, keyed by image id."""
    from pipelines.formats.tar import iter_tar_samples

    out = {}
    for shard in json.loads((taskdir / "task.json").read_text())["shards"]:
        with open(taskdir / shard, "rb") as f:
            for key, sample in iter_tar_samples(f):
                out[key] = sample
    return out
