"""`vilbert-lmdb`: the vilbert-multi-task / vilbert_beta releases (COCO_trainval_resnext152_faster_rcnn_genome.lmdb).

An LMDB environment (a folder with data.mdb). The key `keys` holds a pickled list of the image ids
(bytes); each id is the key of a pickled dict: image_id, image_h, image_w, num_boxes, boxes, features
(base64 of float32 in the releases, numpy arrays in files written by their convert script), sometimes
cls_prob (K x 1601). Every pickle, the key list included, goes through the project's restricted
unpickler: a value that names any other global is refused (a failed row naming the key); a refused
key list refuses the whole source. Without cls_prob the source has no class distributions, object or
attribute ids (an `objects` field without confidences is not enough for our (id, confidence) pairs).

`VilbertLmdbWriter` writes the same layout (base64 strings, as the releases), for `export`.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.feature_formats.butd_tsv import b64
from pipelines.feature_formats.common import (
    Entry,
    FeatureReader,
    FormatError,
    Part,
    Record,
    RecordError,
    record_from_mapping,
    safe_unpickle,
)
from pipelines.formats.writers import FeatureWriter

KEYS = b"keys"
MAP_SIZE = 1 << 40  # address space only: LMDB files grow as written (sparse), as the releases' scripts do


def lmdb_location(source: str) -> tuple[Path, bool]:
    """(path to open, subdir) for an LMDB folder, its data.mdb, or a single-file environment."""
    path = Path(source)
    if path.is_dir():
        if not (path / "data.mdb").is_file():
            raise FormatError(f"{source}: a folder without data.mdb, not an LMDB environment")
        return path, True
    if path.is_file():
        return (path.parent, True) if path.name == "data.mdb" else (path, False)
    raise FormatError(f"{source}: no such file or folder")


class VilbertLmdbReader(FeatureReader):
    """Reader of vilbert's LMDB feature files; environments and key lists are opened once per process."""

    name = "vilbert-lmdb"

    def __init__(self) -> None:
        self._envs: dict[str, Any] = {}
        self._keys: dict[str, list[bytes]] = {}

    def _env(self, source: str) -> Any:
        """The read-only environment of a source (no lock file: the files may sit on a read-only disk)."""
        if source not in self._envs:
            import lmdb

            path, subdir = lmdb_location(source)
            try:
                self._envs[source] = lmdb.open(
                    str(path), subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False
                )
            except lmdb.Error as err:
                raise FormatError(f"{source}: not a readable LMDB environment ({err})") from None
        return self._envs[source]

    def key_list(self, source: str) -> list[bytes]:
        """The image keys: the pickled `keys` list, or every key of the database when there is none."""
        if source not in self._keys:
            with self._env(source).begin(buffers=False) as txn:
                raw = txn.get(KEYS)
                if raw is None:
                    keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
                else:
                    try:
                        listed = safe_unpickle(raw, f"{source}[{KEYS!r}]")
                    except RecordError as err:
                        raise FormatError(str(err)) from None
                    if not isinstance(listed, list | tuple):
                        raise FormatError(
                            f"{source}[{KEYS!r}]: expected a list of ids, got {type(listed).__name__}"
                        )
                    keys = [_key_bytes(k) for k in listed]
            self._keys[source] = keys
        return self._keys[source]

    def plan(self, sources: list[str], shard_size: int) -> list[Part]:
        """Slices of `shard_size` keys, in the order of each source's key list."""
        parts: list[Part] = []
        for source in sources:
            keys = self.key_list(source)
            path, subdir = lmdb_location(source)
            data = path / "data.mdb" if subdir else path
            digest = hashlib.sha256(b"\n".join(keys)).hexdigest()[:16]
            fp = f"{data.stat().st_size}:{len(keys)}:{digest}"
            parts.extend(
                Part(str(Path(source).resolve()), i, min(i + shard_size, len(keys)), fp)
                for i in range(0, len(keys), shard_size)
            )
        if not parts:
            raise FormatError(f"{', '.join(sources)}: no image keys in the LMDB")
        return parts

    def entries(self, part: Part) -> Iterator[Entry]:
        """The values of the part's keys (copied out of the map one at a time)."""
        keys = self.key_list(part.path)[part.start : part.end]
        with self._env(part.path).begin(buffers=False) as txn:
            for key in keys:
                value = txn.get(key)
                yield Entry(f"{part.path}[{key!r}]", key.decode("latin-1"), value, len(value or b""))

    def decode(self, entry: Entry) -> Record:
        """Unpickle (restricted) and read the dict's fields."""
        if entry.payload is None:
            raise RecordError("bad_record", f"{entry.locator}: listed in 'keys' but has no value")
        return record_from_mapping(safe_unpickle(entry.payload, entry.locator), entry.id_hint, entry.locator)

    def close(self) -> None:
        """Close the environments."""
        for env in self._envs.values():
            env.close()
        self._envs.clear()


def _key_bytes(key: Any) -> bytes:
    """A key of the `keys` list as bytes (Python 2 pickles give str, some scripts ints)."""
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("latin-1")
    if isinstance(key, int | np.integer):
        return str(int(key)).encode()
    raise FormatError(f"an entry of the 'keys' list is a {type(key).__name__}, not an id")


def id_value(image_id: str) -> int | str:
    """The image_id as the releases store it: an int when it is one (no leading zeros), else text."""
    return int(image_id) if image_id.isdigit() and str(int(image_id)) == image_id else image_id


class VilbertLmdbWriter(FeatureWriter):
    """Writes records into a new LMDB environment at `path` (a folder), then the `keys` list."""

    folder = True
    kind = "an LMDB environment"
    # vilbert-multi-task's ImageFeaturesH5Reader reshapes every record's features to (num_boxes, 2048)
    reader_feature_dim = 2048
    reader = "vilbert-multi-task's ImageFeaturesH5Reader"

    def __init__(self, path: Path, with_cls_prob: bool, commit_every: int = 256) -> None:
        import lmdb

        super().__init__(path, with_cls_prob)
        self.env = lmdb.open(str(path), map_size=MAP_SIZE, subdir=True, meminit=False)
        self.commit_every = commit_every
        self.keys: list[bytes] = []
        self.txn = self.env.begin(write=True)

    def write(
        self, image_id: str, width: int, height: int, boxes: np.ndarray, features: np.ndarray,
        cls_prob: np.ndarray | None,
    ) -> int:  # fmt: skip
        """Put one image's pickled dict; returns its size in bytes."""
        item: dict[str, Any] = {
            "image_id": id_value(image_id),
            "image_h": int(height),
            "image_w": int(width),
            "num_boxes": int(boxes.shape[0]),
            "boxes": b64(boxes).decode("ascii"),
            "features": b64(features).decode("ascii"),
        }
        if self.with_cls_prob:
            item["cls_prob"] = b64(cls_prob).decode("ascii")
        key = image_id.encode()
        if key == KEYS:
            raise ValueError(f"image id {image_id!r} is the name of the key list in this layout")
        value = pickle.dumps(item, protocol=4)
        self.txn.put(key, value)
        self.keys.append(key)
        if len(self.keys) % self.commit_every == 0:
            self.txn.commit()
            self.txn = self.env.begin(write=True)
        return len(value)

    @classmethod
    def is_own_output(cls, path: Path) -> bool:
        """An LMDB environment folder (data.mdb inside)."""
        return path.is_dir() and (path / "data.mdb").is_file()

    def close(self) -> None:
        """Write the key list, commit, flush to disk and close."""
        self.txn.put(KEYS, pickle.dumps(self.keys, protocol=4))
        self.txn.commit()
        self.env.sync(True)
        self.env.close()
