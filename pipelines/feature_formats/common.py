"""Shared types of the feature-format readers: the reader interface, records, checks, safe decoding.

A reader cuts its sources into `Part`s (the unit of a shard and of resume), lists the `Entry`s of a
part one at a time (a TSV line, an LMDB value, a file: memory stays flat), and decodes an entry into
a `Record` in our conventions (float32 arrays, 1-based class / attribute ids, background in column 0
of `cls_prob`). `check_record` applies the checks every format shares. A bad entry raises
`RecordError(reason, message)` and becomes a failed row; a source that cannot be read at all raises
`FormatError` naming it.

Pickles (LMDB values, `.npy` dicts) go only through `extract.checkpoint.safe_pickle_loads`, which
builds numpy arrays, numbers, strings and plain containers and refuses every other global.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.config import CLS_PROB_DIM

MAX_LINE_BYTES = 256 * 1024**2  # a longer TSV "line" is a file that is not a TSV, not a record


class FormatError(ValueError):
    """A source that cannot be read as the given format (missing, unknown layout, refused header)."""


class RecordError(Exception):
    """One bad record: `reason` (a short tag for the parquet index) and a message naming the record."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Part:
    """A unit of work of one source: bytes [start, end) of a TSV, keys [start, end) of an LMDB, or files.

    `fingerprint` identifies the source's content cheaply (size, a hash of its head or key list), so
    that a resumed job notices a changed source; `files` lists (relative path, image id) for npz-dir.
    """

    path: str
    start: int
    end: int
    fingerprint: str
    files: tuple[tuple[str, str], ...] = ()


@dataclass
class Entry:
    """One raw record of a part, not decoded yet."""

    locator: str  # where it is: "file.tsv@offset", "db.lmdb[key]", "dir/a.npz"
    id_hint: str  # the record's id as far as it can be read without decoding ("" if unknown)
    payload: Any  # a TSV line (bytes), an LMDB value (bytes or None), a file path
    nbytes: int  # size of the raw record in the source


@dataclass
class Record:
    """A decoded record in our conventions; None marks what the source does not have."""

    raw_id: str
    width: int
    height: int
    boxes: np.ndarray  # (K,4) float32, x1 y1 x2 y2 in pixels
    features: np.ndarray  # (K,D)
    cls_prob: np.ndarray | None = None  # (K,1601)
    objects: np.ndarray | None = None  # (K,2) float32: [1-based class id, confidence]
    attributes: np.ndarray | None = None  # (K,2) float32: [1-based attribute id, confidence]

    @property
    def num_boxes(self) -> int:
        """K."""
        return int(self.boxes.shape[0])


class FeatureReader(ABC):
    """The interface of one released layout: plan parts, list a part's entries, decode one entry."""

    name: str = ""

    @abstractmethod
    def plan(self, sources: list[str], shard_size: int) -> list[Part]:
        """Cut the sources into parts of about `shard_size` records, in a stable order."""

    @abstractmethod
    def entries(self, part: Part) -> Iterator[Entry]:
        """The raw records of a part, one at a time, in source order."""

    @abstractmethod
    def decode(self, entry: Entry) -> Record:
        """Decode one entry; raises RecordError for a bad one."""

    def close(self) -> None:  # noqa: B027 (an optional hook: only some readers hold handles)
        """Release open handles (LMDB environments); the reader stays usable."""


# ----------------------------------------------------------------------------- decoding helpers


def b64_array(value: Any, name: str, dtype: type = np.float32) -> np.ndarray:
    """A flat array from base64 text/bytes of `dtype` values, or from an array given as is."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiub":
            raise RecordError("bad_field", f"{name}: an array of {value.dtype}, not numbers")
        return value.reshape(-1)
    if isinstance(value, str):
        value = value.encode("latin-1")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise RecordError(
            "bad_field", f"{name}: expected base64 text or an array, got {type(value).__name__}"
        )
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RecordError("bad_base64", f"{name}: not valid base64 ({err})") from None
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise RecordError(
            "bad_base64", f"{name}: {len(raw)} bytes is not a whole number of {np.dtype(dtype).name} values"
        )
    return np.frombuffer(raw, dtype=dtype)


def rows(flat: np.ndarray, k: int, width: int | None, name: str) -> np.ndarray:
    """`flat` as (k, width) (width inferred when None); raises bad_num_boxes when the sizes disagree."""
    if width is None:
        if k == 0:
            if flat.size:
                raise RecordError("bad_num_boxes", f"num_boxes is 0 but {name} holds {flat.size} values")
            return flat.reshape(0, 0)
        width = flat.size // k
    if flat.size != k * width or width == 0:
        raise RecordError(
            "bad_num_boxes",
            f"num_boxes is {k} but {name} holds {flat.size} values"
            + (f" (expected {k} x {width})" if width else ""),
        )
    return flat.reshape(k, width)


def to_int(value: Any, name: str) -> int:
    """An integer field (text, bytes, numpy or Python number); bad_field otherwise."""
    try:
        if isinstance(value, bytes | bytearray):
            value = value.decode("ascii")
        if isinstance(value, np.ndarray):
            value = value.item()
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError("not a whole number")
        return number
    except (TypeError, ValueError, UnicodeDecodeError):
        raise RecordError("bad_field", f"{name}: expected an integer, got {value!r:.40}") from None


def ids_and_conf(ids: np.ndarray, conf: np.ndarray, k: int, name: str) -> np.ndarray:
    """(K,2) float32 [id + 1, confidence] from 0-based ids over the classes without background."""
    ids, conf = rows(ids.reshape(-1), k, 1, f"{name}_id"), rows(conf.reshape(-1), k, 1, f"{name}_conf")
    if k and ids.min() < 0:
        raise RecordError("bad_field", f"{name}_id: negative id {int(ids.min())}")
    return np.concatenate([ids.astype(np.float32) + 1, conf.astype(np.float32)], axis=1)


def best_of(prob: np.ndarray) -> np.ndarray:
    """(K,2) [1-based argmax over columns 1:, its probability]: how the detector names a region."""
    if prob.shape[0] == 0:
        return np.zeros((0, 2), np.float32)
    rest = prob[:, 1:]
    return np.stack([rest.argmax(axis=1).astype(np.float32) + 1, rest.max(axis=1).astype(np.float32)], axis=1)


def safe_unpickle(data: bytes, what: str) -> Any:
    """Unpickle with the project's restricted unpickler; a refused or broken pickle names `what`."""
    from extract.checkpoint import CheckpointError, safe_pickle_loads

    try:
        return safe_pickle_loads(data)
    except CheckpointError as err:
        # safe_pickle_loads wraps parse errors (so they carry a cause); a refused global has none.
        reason = "bad_pickle" if err.__cause__ is not None else "unsafe_pickle"
        raise RecordError(reason, f"{what}: {err}") from None


def load_npy_safe(data: bytes, what: str) -> Any:
    """A .npy payload: plain arrays with numpy, object arrays (pickles) with the restricted unpickler."""
    from numpy.lib import format as npy_format

    stream = io.BytesIO(data)
    try:
        version = npy_format.read_magic(stream)
        header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        _shape, _fortran, dtype = header(stream)
    except Exception as err:  # numpy parses the header with ast: a damaged one raises all kinds of errors
        raise RecordError("bad_record", f"{what}: not a .npy file ({type(err).__name__}: {err})") from None
    if dtype.hasobject:  # np.save pickles object arrays after the header
        obj = safe_unpickle(data[stream.tell() :], what)
        return obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise RecordError("bad_record", f"{what}: unreadable .npy ({err})") from None


def _pick(mapping: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    """The value of the first of `names` present in `mapping`, else None."""
    for n in names:
        if n in mapping:
            return mapping[n]
    return None


def record_from_mapping(obj: Any, default_id: str, what: str) -> Record:
    """A Record from a dict-shaped source (LMDB value, .npy dict, .npz members), by the releases' names.

    Accepted names: image_id; image_w/img_w/image_width; image_h/img_h/image_height; num_boxes/num_bbox;
    boxes/bbox; features/x; cls_prob; objects_id + objects_conf and attrs_id + attrs_conf (0-based,
    top level or inside an `info` dict). Class ids are derived from cls_prob when it is there.
    """
    if not isinstance(obj, Mapping):
        raise RecordError("bad_record", f"{what}: expected a dict of fields, got {type(obj).__name__}")
    m = {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
    info = m.get("info")
    if isinstance(info, Mapping):
        m = {**{str(k): v for k, v in info.items()}, **m}
    missing = [
        names[0]
        for names in (("image_w", "img_w", "image_width"), ("image_h", "img_h", "image_height"),
                      ("boxes", "bbox"), ("features", "x"))
        if _pick(m, names) is None
    ]  # fmt: skip
    if missing:
        raise RecordError("bad_record", f"{what}: lacks the field(s) {', '.join(missing)}")
    raw_id = _pick(m, ("image_id", "img_id"))
    raw_id = default_id if raw_id is None else raw_id
    if isinstance(raw_id, bytes):
        raw_id = raw_id.decode("latin-1")
    boxes = b64_array(_pick(m, ("boxes", "bbox")), "boxes").astype(np.float32, copy=False)
    num = _pick(m, ("num_boxes", "num_bbox"))
    k = to_int(num, "num_boxes") if num is not None else boxes.size // 4
    record = Record(
        raw_id=str(raw_id.item() if isinstance(raw_id, np.generic | np.ndarray) else raw_id),
        width=to_int(_pick(m, ("image_w", "img_w", "image_width")), "image_w"),
        height=to_int(_pick(m, ("image_h", "img_h", "image_height")), "image_h"),
        boxes=rows(boxes, k, 4, "boxes"),
        features=rows(b64_array(_pick(m, ("features", "x")), "features"), k, None, "features"),
    )
    if m.get("cls_prob") is not None:
        record.cls_prob = rows(b64_array(m["cls_prob"], "cls_prob"), k, CLS_PROB_DIM, "cls_prob")
    for name, attr in (("objects", "objects"), ("attrs", "attributes")):
        ids, conf = m.get(f"{name}_id"), m.get(f"{name}_conf")
        if ids is not None and conf is not None:
            setattr(record, attr, ids_and_conf(b64_array(ids, f"{name}_id", np.int64),
                                               b64_array(conf, f"{name}_conf"), k, name))  # fmt: skip
    return record


# ----------------------------------------------------------------------------- checks


def check_record(record: Record, feature_dim: int) -> Record:
    """The checks every format shares: image size, finite values, boxes inside the image, feature size."""
    w, h, k = record.width, record.height, record.num_boxes
    if w < 1 or h < 1:
        raise RecordError("bad_size", f"image size {w}x{h} is not positive")
    if k == 0:
        record.features = record.features.reshape(0, feature_dim)
    if record.features.shape[1] != feature_dim:
        raise RecordError(
            "bad_feature_dim",
            f"{record.features.shape[1]}-d features, but this source's first record has {feature_dim}-d",
        )
    for name in ("boxes", "features", "cls_prob", "objects", "attributes"):
        array = getattr(record, name)
        if array is not None and array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.nonzero(~np.isfinite(array).all(axis=1))[0][0])
            raise RecordError("not_finite", f"{name} of box {bad} holds NaN or infinity")
    b = record.boxes
    outside = (
        (b[:, 0] < 0)
        | (b[:, 1] < 0)
        | (b[:, 2] > w)
        | (b[:, 3] > h)
        | (b[:, 2] < b[:, 0])
        | (b[:, 3] < b[:, 1])
    )
    if outside.any():
        i = int(np.nonzero(outside)[0][0])
        raise RecordError(
            "box_outside_image",
            f"box {i} {[round(float(v), 2) for v in b[i]]} is not inside the {w}x{h} image (x1 y1 x2 y2)",
        )
    return record


def source_fingerprint(path: Path, head_bytes: int = 1 << 20) -> str:
    """Size plus sha256 of the first MiB: cheap, and it changes when a file is replaced."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(head_bytes))
    return f"{path.stat().st_size}:{h.hexdigest()[:16]}"
