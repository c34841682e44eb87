"""Task folders (docs/contracts.md section 3): the task shard writer and the one reader of a TASKDIR.

A TASKDIR holds `task-NNNNNN.tar` shards (one sample per image: its regions once, all its records in
`ann.json`), a parquet index per shard, `feature_stats.json`, `answers.json` (VQA) and `task.json`,
written last. Every command reads a TASKDIR through this module, so a missing or damaged file is said
the same way whichever command meets it.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.fileio import atomic_write_table
from pipelines.formats.tar import NotFoundError, ShardError, TarWriter, iter_tar_members

TASK_FORMAT = "vilbert-data/task"
TASK_FILE = "task.json"
SHARD_PREFIX = "task-"
EXPECTED = "expected a TASKDIR written by `vilbert-data shard` (task.json + task-*.tar)"


# ----------------------------------------------------------------------------- writing


class TaskShardWriter:
    """Numbered task shards with at most `shard_size` samples; each tar is renamed into place when full."""

    def __init__(self, out: Path, shard_size: int) -> None:
        self.out, self.shard_size = out, shard_size
        self.shards: list[str] = []
        self._tar: TarWriter | None = None
        self._rows: list[dict[str, Any]] = []

    def write(self, key: str, members: dict[str, bytes], row: dict[str, Any]) -> None:
        """Add one sample (members named `key.suffix`) and its parquet index row."""
        if self._tar is None:
            name = f"{SHARD_PREFIX}{len(self.shards):06d}.tar"
            self.shards.append(name)
            self._tar = TarWriter(self.out / name, tarfile.USTAR_FORMAT)
        self._tar.write(key, members)
        self._rows.append({"image_id": key, "shard": self.shards[-1], **row})
        if len(self._rows) >= self.shard_size:
            self.close()

    def close(self) -> None:
        """Finish the open shard: rename the tar into place, then write its parquet index."""
        if self._tar is None:
            return
        import pyarrow as pa

        self._tar.close()
        index = self.out / self.shards[-1].replace(".tar", ".parquet")
        atomic_write_table(index, pa.Table.from_pylist(self._rows))
        self._tar, self._rows = None, []


# ----------------------------------------------------------------------------- reading


def is_url(source: str) -> bool:
    """Whether a data source is a URL or a pipe (read as a stream) rather than a local path."""
    return "://" in source or source.startswith("pipe:")


def check_task_source(source: str, flag: str) -> None:
    """Say what --data / --val is when it is not task shards: missing, empty, a feature set, unfinished, a stray file."""
    if is_url(source) or "{" in source:
        return  # URLs and brace patterns are checked when they are read
    path = Path(source)
    if not path.exists():
        raise NotFoundError(f"{flag} {source}: no such file or folder; {EXPECTED}")
    if path.is_file():
        if path.suffix != ".tar":
            raise ShardError(f"{flag} {source}: a file, not task shards; {EXPECTED} or task-*.tar files")
        return
    if (path / TASK_FILE).is_file():
        return
    if (path / "dataset.json").is_file():
        raise ShardError(
            f"{flag} {source}: a feature set (dataset.json), not task shards; make them with "
            f"`vilbert-data shard --features {source} --task ... --out TASKDIR`"
        )
    if any(path.glob(f"{SHARD_PREFIX}*.tar")):
        raise ShardError(
            f"{flag} {source}: task shards without task.json (written last): an unfinished `vilbert-data shard` "
            "run; run it again"
        )
    what = "an empty folder" if not any(path.iterdir()) else "a folder without task.json"
    raise NotFoundError(f"{flag} {source}: {what}; {EXPECTED}")


def task_json_path(data: str | Path) -> Path:
    """Where the task.json of a data source is: in the TASKDIR, or beside the shards a brace pattern names."""
    path = Path(str(data))
    return path / TASK_FILE if path.is_dir() else Path(str(data).split("{")[0]).parent / TASK_FILE


def read_task_json(data: str | Path, flag: str | None = None, required: bool = True) -> dict[str, Any] | None:
    """The task.json of a TASKDIR (or of the folder a shard pattern names); None when absent and not required.

    A missing file is described (with `flag`: what the folder is instead); a damaged one is named.
    """
    path = task_json_path(data)
    if not path.is_file():
        if not required:
            return None
        if flag is not None:
            check_task_source(str(data), flag)
        where = f"{flag} {data}" if flag is not None else str(data)
        raise NotFoundError(f"{where}: no task.json; is this a TASKDIR written by `vilbert-data shard`?")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: not valid JSON ({err}); rerun `vilbert-data shard` for this folder") from None
    if not isinstance(info, dict):
        raise ShardError(f"{path}: not a task.json written by `vilbert-data shard` (not a JSON object)")
    return info


def task_shards(taskdir: str | Path, info: dict[str, Any]) -> list[Path]:
    """The shards of a TASKDIR in order: those task.json lists (a hand-made task.json may list none)."""
    root = Path(taskdir)
    names = info.get("shards") or sorted(p.name for p in root.glob(f"{SHARD_PREFIX}*.tar"))
    return [root / name for name in names]


def answers_path(taskdir: str | Path, info: dict[str, Any] | None) -> Path | None:
    """The answers.json task.json names (VQA: index = class id), or None."""
    if not info or not info.get("answer_vocab"):
        return None
    return Path(taskdir) / info["answer_vocab"]


def read_answers(taskdir: str | Path, info: dict[str, Any] | None) -> list[str] | None:
    """The answer list task.json names (a ValueError naming a missing or damaged file), or None."""
    from pipelines.vqa_answers import load_answer_vocab

    path = answers_path(taskdir, info)
    return load_answer_vocab(path) if path is not None else None


def num_answers(taskdir: str | Path, info: dict[str, Any]) -> int | None:
    """The answer vocabulary size of a VQA TASKDIR (task.json's count, else its answers.json), or None."""
    if info.get("num_answers"):
        return int(info["num_answers"])
    answers = read_answers(taskdir, info)
    return len(answers) if answers is not None else None


def load_task_feature_stats(data: str | Path) -> Any:
    """The feature_stats.json of a TASKDIR written by `shard` (a FeatureStats); None for older TASKDIRs and shard URLs."""
    from pipelines.feature_stats import STATS_FILE, FeatureStats

    path = Path(str(data))
    if path.is_dir() and (path / STATS_FILE).is_file():
        return FeatureStats.load(path / STATS_FILE)
    return None


def read_shard_index(url: str) -> list[tuple[str, int]]:
    """(image id, records) of each sample of a local task shard, in file order, from its parquet index."""
    import pyarrow.parquet as pq

    index = Path(url[: -len(".tar")] + ".parquet") if url.endswith(".tar") else None
    if index is None or is_url(url) or not index.is_file():
        raise ShardError(
            f"{url}: several processes split an epoch by the records of each shard, which its parquet index "
            "(written by `vilbert-data shard`) counts; train on the TASKDIR, or draw shards with --resampled"
        )
    rows = pq.read_table(index, columns=["image_id", "num_records"]).to_pylist()
    return [(r["image_id"], int(r["num_records"])) for r in rows]


def iter_task_records(taskdir: str | Path) -> Iterator[dict]:
    """Every record (ann.json) of a TASKDIR's shards, reading no region features."""
    info = read_task_json(taskdir)
    for shard in task_shards(taskdir, info):
        with open(shard, "rb") as f:
            for _name, data in iter_tar_members(f, str(shard), lambda m: m.endswith(".ann.json")):
                if data is not None:
                    yield from json.loads(data)
