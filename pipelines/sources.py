"""List the input images of an extraction job, sorted, each with a stable WebDataset-safe image id.

A source is one of:
- a local folder, searched recursively for every file type Pillow can open;
- an fsspec URL of a folder (`s3://bucket/photos`, `gs://...`, `file:///data/photos`);
- a list file: `.txt` (one path or URL per line, optionally `<TAB>image_id`; `#` starts a comment)
  or `.parquet` (a `path`, `source` or `url` column and an optional `image_id` column).

Image ids come from the path relative to the source root (for a list: the longest common folder of
its entries) through `image_id_for`, the one function that makes them (docs/contracts.md section 2).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_VALID_ID = re.compile(r"^[A-Za-z0-9_-]+$")
_LIST_SUFFIXES = (".txt", ".parquet")
_PATH_COLUMNS = ("path", "source", "url")


class SourceError(ValueError):
    """The image source cannot be listed (missing, empty, or a malformed list file)."""


@dataclass(frozen=True, order=True)
class SourceItem:
    """One input image: its id, where to read it (local path or URL), and its path relative to the root."""

    relpath: str
    source: str
    image_id: str


def image_id_for(relpath: str, disambiguate: bool = False) -> str:
    """Image id of a relative path: extension dropped, every char outside [A-Za-z0-9_-] -> `_`.

    With `disambiguate=True` a short hash of the full relative path is appended; `assign_image_ids`
    does that only for paths whose plain ids collide.
    """
    posix = PurePosixPath(str(relpath).replace("\\", "/").lstrip("/")).as_posix()
    stem, _ext = os.path.splitext(posix)
    image_id = _UNSAFE.sub("_", stem or posix)
    if not image_id:
        raise ValueError(f"cannot make an image id from the empty path {relpath!r}")
    if disambiguate:
        image_id += "_" + hashlib.sha1(posix.encode("utf-8")).hexdigest()[:8]
    return image_id


def assign_image_ids(relpaths: list[str]) -> list[str]:
    """Ids for a list of relative paths: plain ids, hash-suffixed for every member of a collision."""
    plain = [image_id_for(p) for p in relpaths]
    counts = Counter(plain)
    ids = [
        image_id_for(p, disambiguate=True) if counts[i] > 1 else i
        for p, i in zip(relpaths, plain, strict=True)
    ]
    duplicates = [i for i, n in Counter(ids).items() if n > 1]
    if duplicates:
        raise SourceError(f"the same image path is listed more than once: {sorted(duplicates)[:5]}")
    return ids


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with dot) of every image format Pillow can open."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_url(source: str) -> bool:
    """True for fsspec URLs such as s3://, gs://, file://."""
    return "://" in source


def list_sources(source: str | os.PathLike, limit: int | None = None) -> list[SourceItem]:
    """Every input image of `source`, sorted by relative path (then the first `limit`)."""
    source = os.fspath(source)
    if limit is not None and limit < 0:
        raise SourceError(f"--limit must be >= 0, got {limit}")
    if is_url(source):
        items = _list_url(source)
    else:
        path = Path(source)
        if not path.exists():
            raise SourceError(f"--images {source}: no such file or folder")
        if path.is_dir():
            items = _list_folder(path)
        elif path.suffix.lower() in _LIST_SUFFIXES:
            items = _list_file(path)
        else:
            raise SourceError(
                f"--images {source}: expected a folder, an fsspec URL or a .txt/.parquet list, got a {path.suffix or 'plain'} file"
            )
    if not items:
        raise SourceError(
            f"--images {source}: no images found (looked for {', '.join(sorted(_COMMON_EXTS))}, ...)"
        )
    items.sort()
    return items[:limit] if limit is not None else items


_COMMON_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


def _items_from_relpaths(pairs: list[tuple[str, str]]) -> list[SourceItem]:
    """(relpath, source) pairs -> items with ids assigned over the whole list."""
    ids = assign_image_ids([rel for rel, _ in pairs])
    return [SourceItem(rel, src, i) for (rel, src), i in zip(pairs, ids, strict=True)]


def _list_folder(root: Path) -> list[SourceItem]:
    """Recursive listing of a local folder (hidden files and folders skipped), each real folder once.

    The real folders are walked first; folder symlinks are followed afterwards, unless they lead to
    a folder already listed (a loop such as `sub/up -> ..`, or a second way into the same folder):
    those are skipped with a warning naming them. File symlinks are inputs like files, listed under
    their own path; a dangling or looping one becomes a failed row when it is read.
    """
    exts = image_extensions()
    pairs: list[tuple[str, str]] = []
    listed: dict[str, str] = {}  # real path of every folder walked -> the relative path it is listed under
    links: deque[Path] = deque()  # folder symlinks met, followed once the real tree is listed

    def walk(top: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(top):  # does not descend into links
            here = Path(dirpath)
            listed.setdefault(os.path.realpath(here), _relative(here, root))
            kept = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue
                if (here / d).is_symlink():
                    links.append(here / d)
                else:
                    kept.append(d)
            dirnames[:] = kept
            for name in filenames:
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                    continue
                full = here / name
                # the path as listed, not its target: a dangling link's row must name the input
                pairs.append((_relative(full, root), os.path.abspath(full)))

    walk(root)
    while links:
        link = links.popleft()
        target = os.path.realpath(link)
        if target not in listed:
            walk(link)
            continue
        rel, where = _relative(link, root), listed[target] or "."
        if os.path.commonpath([os.path.realpath(link.parent), target]) == target:  # an ancestor: a loop
            logger.warning(
                "warning: symlink loop: %s -> %s leads back to %s, which is listed already; not followed",
                rel,
                os.readlink(link),
                where,
            )
        else:
            logger.warning(
                "warning: %s -> %s is the folder already listed as %s; its images are listed once",
                rel,
                os.readlink(link),
                where,
            )
    return _items_from_relpaths(pairs)


def _relative(path: Path, root: Path) -> str:
    """`path` relative to `root` as a posix string ('' for the root itself), without resolving links."""
    rel = os.path.relpath(path, root)
    return "" if rel == "." else Path(rel).as_posix()


def _list_url(url: str) -> list[SourceItem]:
    """Recursive listing of an fsspec folder URL."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        if not fs.exists(root):
            raise SourceError(f"--images {url}: no such folder or object")
        files = sorted(fs.find(root)) if fs.isdir(root) else [root]
    except SourceError:
        raise
    except Exception as err:  # credentials, network, unknown protocol: say which input failed
        raise SourceError(f"--images {url}: cannot list ({type(err).__name__}: {err})") from err
    exts = image_extensions()
    root = root.rstrip("/")
    pairs = []
    for f in files:
        if os.path.splitext(f)[1].lower() not in exts:
            continue
        rel = f[len(root) :].lstrip("/") if f != root else PurePosixPath(f).name
        pairs.append((rel, fs.unstrip_protocol(f)))
    return _items_from_relpaths(pairs)


def _list_file(path: Path) -> list[SourceItem]:
    """Entries of a .txt or .parquet list; relative paths resolve against the list's folder."""
    if path.suffix.lower() == ".parquet":
        entries = _read_parquet_list(path)
    else:
        entries = _read_txt_list(path)
    base = path.resolve().parent
    # absolute but not resolved: a symlink entry stays the path the list names
    resolved = [(s if is_url(s) else os.path.abspath(base / s), i) for s, i in entries]
    root = _common_root([s for s, _ in resolved])
    rels = [s[len(root) :].lstrip("/") for s, _ in resolved]
    given = [i for _, i in resolved]
    if all(i is None for i in given):
        return _items_from_relpaths(list(zip(rels, [s for s, _ in resolved], strict=True)))
    if any(i is None for i in given):
        raise SourceError(f"--images {path}: image_id is given for some entries but not all")
    bad = [i for i in given if not _VALID_ID.match(i)]
    if bad:
        raise SourceError(
            f"--images {path}: image ids may hold only [A-Za-z0-9_-] (WebDataset keys), got {bad[:3]}"
        )
    dup = [i for i, n in Counter(given).items() if n > 1]
    if dup:
        raise SourceError(f"--images {path}: duplicate image ids {sorted(dup)[:5]}")
    return [SourceItem(rel, s, i) for rel, (s, i) in zip(rels, resolved, strict=True)]


def _read_txt_list(path: Path) -> list[tuple[str, str | None]]:
    """Lines `path` or `path<TAB>image_id`; blank lines and `#` comments skipped."""
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) > 2:
            raise SourceError(
                f"--images {path}:{lineno}: expected 'path' or 'path<TAB>image_id', got {line!r}"
            )
        entries.append((parts[0].strip(), parts[1].strip() if len(parts) == 2 else None))
    return entries


def _read_parquet_list(path: Path) -> list[tuple[str, str | None]]:
    """Rows of a parquet list: a path/source/url column and an optional image_id column."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:
        raise SourceError(f"--images {path}: not a readable parquet file ({err})") from err
    column = next((c for c in _PATH_COLUMNS if c in table.column_names), None)
    if column is None:
        raise SourceError(
            f"--images {path}: needs one of the columns {_PATH_COLUMNS}, has {table.column_names}"
        )
    sources = [str(s) for s in table.column(column).to_pylist()]
    ids = table.column("image_id").to_pylist() if "image_id" in table.column_names else [None] * len(sources)
    return [(s, None if i is None else str(i)) for s, i in zip(sources, ids, strict=True)]


def _common_root(locations: list[str]) -> str:
    """Longest common folder prefix (ending at a '/') of paths or URLs."""
    if not locations:
        return ""
    prefix = os.path.commonprefix(locations)
    return prefix[: prefix.rfind("/") + 1]
