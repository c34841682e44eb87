"""`run_export`: a feature set (extract's or convert's) -> the butd-tsv or vilbert-lmdb layout.

The samples are streamed shard by shard (one decoded at a time) into the layout's writer under a
hidden temporary name next to OUT, which is renamed into place at the end: OUT never holds half an
export. Features and cls_prob are written as float32 (a float16 set is widened exactly), so
convert -> export -> convert gives back the same float32 bits. cls_prob is written only when the
set has class distributions; object / attribute ids have no place in these two layouts. An image id
met twice (possible in a converted set whose source repeats an id) is written once, the first time.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from pipelines.fileio import temp_path
from pipelines.formats.features import FeatureSet
from pipelines.formats.npy import load_npy
from pipelines.formats.writers import FeatureWriter, writer_class


def run_export(
    features: str | Path,
    fmt: str,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    any_feature_dim: bool = False,
) -> dict:
    """Write the feature set `features` to `out` in layout `fmt`; returns a summary dict.

    A layout whose usual reader assumes a feature size (vilbert-lmdb: 2048) refuses a set of another
    size, which that reader could not load, unless `any_feature_dim`.
    """
    from pipelines.progress import progress_bar

    writer_cls = writer_class(fmt)
    fs = FeatureSet.open(features)
    info = fs.info
    out = Path(out)
    _check_out(out, fmt, writer_cls, overwrite)
    dim, wanted = info.get("feature_dim"), writer_cls.reader_feature_dim
    if None not in (dim, wanted) and dim != wanted and not any_feature_dim:
        raise ValueError(
            f"{features}: its features are {dim}-d, but {writer_cls.reader} reads every {fmt} record as "
            f"{wanted}-d and would fail on these; extract with --feature-layer res5 for that trainer, or pass "
            "--any-feature-dim for a reader that takes the size from the data"
        )
    with_cls = bool(info.get("class_distributions", True))
    tmp = temp_path(out)
    t0 = time.perf_counter()
    seen: set[str] = set()
    nbytes = duplicates = 0
    bar = progress_bar(int(info["counts"]["ok"]), f"export {fmt}", "img", progress)
    try:
        writer = writer_cls(tmp, with_cls)
        for key, sample in fs.samples():
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            meta = json.loads(sample["json"])
            nbytes += writer.write(
                key,
                int(meta["width"]),
                int(meta["height"]),
                load_npy(sample["boxes.npy"]).astype(np.float32),
                load_npy(sample["features.npy"]).astype(np.float32),
                load_npy(sample["cls_prob.npy"]).astype(np.float32) if with_cls else None,
            )
            bar.update(1)
        writer.close()
        _replace(tmp, out)
    finally:
        bar.close()
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
    return {
        "format": fmt,
        "out": str(out),
        "images": len(seen),
        "bytes": nbytes,
        "with_cls_prob": with_cls,
        "duplicates_skipped": duplicates,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _check_out(out: Path, fmt: str, writer_cls: type[FeatureWriter], overwrite: bool) -> None:
    """Refuse an existing OUT unless --overwrite, and never replace a folder that this layout did not write."""
    if not out.exists():
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
        return
    if not overwrite:
        raise ValueError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.is_dir() and writer_cls.folder and not writer_cls.is_own_output(out):
        raise ValueError(f"--out {out} is a folder that is not {writer_cls.kind}; refusing to replace it")
    if out.is_dir() != writer_cls.folder:
        raise ValueError(
            f"--out {out}: a {'folder' if out.is_dir() else 'file'} cannot be replaced by a {fmt} export"
        )


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export into place (an existing one, checked by _check_out, goes first)."""
    if out.is_dir():
        shutil.rmtree(out)
    tmp.replace(out)
