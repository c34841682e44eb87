"""`npz-dir`: one file per image, from bottom-up-attention.pytorch and the detectron2 extractors.

- `.npz` (bottom-up-attention.pytorch `extract_features.py`): x (K x D), bbox (K x 4), num_bbox,
  image_h, image_w, and `info`, a pickled dict with objects_id, objects_conf, attrs_id, attrs_conf
  (0-based ids; some versions add cls_prob).
- `.npy` holding a pickled dict (vilbert-multi-task's `extract_features.py` and similar): features,
  bbox, num_boxes, image_h/image_height, image_w/image_width, often cls_prob.

Object arrays are pickles: they go through the project's restricted unpickler, nothing else.
A folder is searched recursively (hidden files skipped) and sorted by relative path; the image id
is that path without its extension, made by `pipelines.sources.assign_image_ids` as for `extract`,
so the features of `val2014/COCO_val2014_000000000042.npz` get the id extract would give the image.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

from pipelines.feature_formats.common import (
    Entry,
    FeatureReader,
    FormatError,
    Part,
    Record,
    RecordError,
    load_npy_safe,
    record_from_mapping,
)

SUFFIXES = (".npz", ".npy")


def npz_files(sources: list[str]) -> list[tuple[str, Path]]:
    """(relative path, file) of every .npz/.npy of the sources, each source's files sorted by relative path."""
    found: list[tuple[str, Path]] = []
    for source in sources:
        root = Path(source)
        if root.is_file():
            found.append((root.name, root.resolve()))
            continue
        if not root.is_dir():
            raise FormatError(f"{source}: no such file or folder")
        mine = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if not name.startswith(".") and name.endswith(SUFFIXES):
                    full = Path(dirpath) / name
                    mine.append((full.relative_to(root).as_posix(), full.resolve()))
        if not mine:
            raise FormatError(f"{source}: no .npz or .npy files in this folder")
        found.extend(sorted(mine))
    return found


class NpzDirReader(FeatureReader):
    """Reader of per-image .npz / .npy feature files."""

    name = "npz-dir"

    def plan(self, sources: list[str], shard_size: int) -> list[Part]:
        """Consecutive runs of `shard_size` files; each part lists its files and their image ids."""
        from pipelines.sources import SourceError, assign_image_ids

        files = npz_files(sources)
        try:
            ids = assign_image_ids([rel for rel, _ in files])
        except SourceError as err:
            raise FormatError(str(err)) from None
        parts = []
        for start in range(0, len(files), shard_size):
            chunk = [
                (str(path), ids[start + i])
                for i, (_rel, path) in enumerate(files[start : start + shard_size])
            ]
            listing = "\n".join(f"{p}:{os.path.getsize(p)}" for p, _ in chunk)
            fp = hashlib.sha256(listing.encode()).hexdigest()[:16]
            parts.append(Part(str(Path(sources[0]).resolve()), start, start + len(chunk), fp, tuple(chunk)))
        return parts

    def entries(self, part: Part) -> Iterator[Entry]:
        """One entry per file of the part."""
        for path, image_id in part.files:
            try:
                size = os.path.getsize(path)
            except OSError:
                size = 0
            yield Entry(path, image_id, path, size)

    def decode(self, entry: Entry) -> Record:
        """Read one .npz (members) or .npy (a pickled dict)."""
        path = entry.payload
        try:
            if path.endswith(".npz"):
                with zipfile.ZipFile(path) as z:
                    fields = {
                        name[: -len(".npy")]: load_npy_safe(z.read(name), f"{path}:{name}")
                        for name in z.namelist()
                        if name.endswith(".npy")
                    }
            else:
                fields = load_npy_safe(Path(path).read_bytes(), path)
        except (OSError, zipfile.BadZipFile) as err:
            raise RecordError("read_error", f"{path}: {type(err).__name__}: {err}") from None
        return record_from_mapping(fields, entry.id_hint, path)
