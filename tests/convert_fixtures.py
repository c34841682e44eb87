"""Writers of the four released feature layouts for the convert tests, written the way the releases'
own scripts write them (base64 + numpy, pickle, np.savez), independently of `pipelines.feature_formats`.
"""

from __future__ import annotations

import base64
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Img:
    """One image's released features (ids of objects / attributes 0-based, as LXMERT and bua store them)."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (K,4) float32
    features: np.ndarray  # (K,D) float32
    cls_prob: np.ndarray  # (K,1601) float32
    attr_prob: np.ndarray  # (K,401) float32
    objects_id: np.ndarray  # (K,) int64, 0-based
    objects_conf: np.ndarray  # (K,) float32
    attrs_id: np.ndarray  # (K,) int64, 0-based
    attrs_conf: np.ndarray  # (K,) float32


def make_images(n: int, dim: int = 2048, seed: int = 0, first_id: int = 1) -> list[Img]:
    """`n` images with 3-7 random boxes inside the image and random features / distributions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(3, 8))
        w, h = int(rng.integers(200, 640)), int(rng.integers(150, 480))
        x1 = rng.uniform(0, w / 2, k)
        y1 = rng.uniform(0, h / 2, k)
        boxes = np.stack([x1, y1, rng.uniform(x1, w), rng.uniform(y1, h)], axis=1).astype(np.float32)
        cls = rng.random((k, 1601), dtype=np.float32)
        cls /= cls.sum(axis=1, keepdims=True)
        attr = rng.random((k, 401), dtype=np.float32)
        attr /= attr.sum(axis=1, keepdims=True)
        out.append(
            Img(
                image_id=str(first_id + i),
                width=w,
                height=h,
                boxes=boxes,
                features=(rng.standard_normal((k, dim)) * 3).astype(np.float32),
                cls_prob=cls,
                attr_prob=attr,
                objects_id=rng.integers(0, 1600, k).astype(np.int64),
                objects_conf=rng.random(k, dtype=np.float32),
                attrs_id=rng.integers(0, 400, k).astype(np.int64),
                attrs_conf=rng.random(k, dtype=np.float32),
            )
        )
    return out


def b64(a: np.ndarray) -> bytes:
    """Base64 of the array's bytes, as the releases' scripts encode."""
    return base64.b64encode(a.tobytes())


def butd_line(img: Img, cls_prob: bool = False, attrs: bool = False, **override: bytes) -> bytes:
    """One bottom-up-attention TSV line (fields overridable, to make bad records)."""
    fields = {
        "image_id": img.image_id.encode(),
        "image_w": str(img.width).encode(),
        "image_h": str(img.height).encode(),
        "num_boxes": str(len(img.boxes)).encode(),
        "boxes": b64(img.boxes),
        "features": b64(img.features),
    }
    if cls_prob:
        fields["cls_prob"] = b64(img.cls_prob)
    if attrs:
        fields["attrs"] = b64(img.attr_prob)
    fields.update(override)
    return b"\t".join(fields.values()) + b"\n"


def lxmert_line(img: Img, **override: bytes) -> bytes:
    """One LXMERT TSV line."""
    fields = {
        "img_id": img.image_id.encode(),
        "img_h": str(img.height).encode(),
        "img_w": str(img.width).encode(),
        "objects_id": b64(img.objects_id),
        "objects_conf": b64(img.objects_conf),
        "attrs_id": b64(img.attrs_id),
        "attrs_conf": b64(img.attrs_conf),
        "num_boxes": str(len(img.boxes)).encode(),
        "boxes": b64(img.boxes),
        "features": b64(img.features),
    }
    fields.update(override)
    return b"\t".join(fields.values()) + b"\n"


def vilbert_value(img: Img, arrays: bool = False, cls_prob: bool = True) -> dict:
    """The dict vilbert's LMDB holds for an image: base64 strings (releases) or arrays (convert script)."""
    enc = (lambda a: a) if arrays else (lambda a: b64(a).decode())
    item = {
        "image_id": int(img.image_id),
        "image_h": img.height,
        "image_w": img.width,
        "num_boxes": len(img.boxes),
        "boxes": enc(img.boxes),
        "features": enc(img.features),
    }
    if cls_prob:
        item["cls_prob"] = enc(img.cls_prob)
    return item


def write_lmdb(path: Path, values: dict[bytes, bytes], keys: bytes | None) -> None:
    """An LMDB folder with raw `values` and a raw `keys` entry (None: no key list)."""
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for k, v in values.items():
            txn.put(k, v)
        if keys is not None:
            txn.put(b"keys", keys)
    env.close()


def npz_bytes(img: Img) -> bytes:
    """A bottom-up-attention.pytorch .npz: x, bbox, num_bbox, image_h, image_w, info (a pickled dict)."""
    info = {
        "objects_id": img.objects_id,
        "objects_conf": img.objects_conf,
        "attrs_id": img.attrs_id,
        "attrs_conf": img.attrs_conf,
    }
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        x=img.features,
        bbox=img.boxes,
        num_bbox=len(img.boxes),
        image_h=img.height,
        image_w=img.width,
        info=info,
    )
    return buf.getvalue()


def npy_dict_bytes(img: Img) -> bytes:
    """vilbert-multi-task's extract_features .npy: a pickled dict with features, bbox, cls_prob ..."""
    info = {
        "image_id": img.image_id,
        "image_height": img.height,
        "image_width": img.width,
        "num_boxes": len(img.boxes),
        "bbox": img.boxes,
        "features": img.features,
        "cls_prob": img.cls_prob,
        "objects": img.cls_prob[:, 1:].argmax(axis=1),
    }
    buf = io.BytesIO()
    np.save(buf, info, allow_pickle=True)
    return buf.getvalue()


def pickled(obj: object) -> bytes:
    """pickle.dumps, protocol 2 as Python 2 era releases."""
    return pickle.dumps(obj, protocol=2)
