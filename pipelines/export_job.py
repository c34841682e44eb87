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
from typing import Any

import numpy as np

from pipelines.convert_job import read_dataset
from pipelines.feature_formats import EXPORT_FORMATS
from pipelines.writers import load_npy, temp_path


def run_export(
    features: str | Path, fmt: str, out: str | Path, overwrite: bool = False, progress: bool = True
) -> dict:
    """Write the feature set `features` to `out` in layout `fmt`; returns a summary dict."""
    from pipelines.progress import progress_bar
    from pipelines.shard_job import iter_tar_samples

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    root = Path(features)
    info = read_dataset(root)
    out = Path(out)
    _check_out(out, fmt, overwrite)
    with_cls = bool(info.get("class_distributions", True))
    tmp = temp_path(out)
    t0 = time.perf_counter()
    seen: set[str] = set()
    nbytes = duplicates = 0
    bar = progress_bar(int(info["counts"]["ok"]), f"export {fmt}", "img", progress)
    try:
        writer = _writer(fmt, tmp, with_cls)
        for shard in info["shards"]:
            with open(root / shard, "rb") as f:
                for key, sample in iter_tar_samples(f, str(root / shard)):
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


def _writer(fmt: str, path: Path, with_cls: bool) -> Any:
    """The layout's writer at `path`."""
    if fmt == "butd-tsv":
        from pipelines.feature_formats.butd_tsv import ButdTsvWriter

        return ButdTsvWriter(path, with_cls)
    from pipelines.feature_formats.vilbert_lmdb import VilbertLmdbWriter

    return VilbertLmdbWriter(path, with_cls)


def _check_out(out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse an existing OUT unless --overwrite, and never replace a folder that is not an LMDB export."""
    if not out.exists():
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
        return
    if not overwrite:
        raise ValueError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.is_dir() and not (out / "data.mdb").is_file():
        raise ValueError(f"--out {out} is a folder that is not an LMDB environment; refusing to replace it")
    if out.is_dir() != (fmt == "vilbert-lmdb"):
        raise ValueError(
            f"--out {out}: a {'folder' if out.is_dir() else 'file'} cannot be replaced by a {fmt} export"
        )


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export into place (an existing one, checked by _check_out, goes first)."""
    if out.is_dir():
        shutil.rmtree(out)
    tmp.replace(out)
