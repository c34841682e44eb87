"""Plan an extraction job as numbered shards of the sorted input list (same input -> same shards).

A shard is done when its `_stats.json` exists next to its tar and parquet: the writer renames the
stats file into place last, so a shard with stats is complete and a rerun skips it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.formats.features import SHARD_PREFIX, STATS_SUFFIX
from pipelines.sources import SourceItem


@dataclass(frozen=True)
class ShardPlan:
    """One unit of work: shard number, file stem (`features-000007`) and its inputs in order."""

    index: int
    name: str
    items: tuple[SourceItem, ...]

    @property
    def tar_name(self) -> str:
        """File name of the WebDataset tar."""
        return f"{self.name}.tar"

    @property
    def parquet_name(self) -> str:
        """File name of the per-input index."""
        return f"{self.name}.parquet"

    @property
    def stats_name(self) -> str:
        """File name of the stats file written last."""
        return f"{self.name}{STATS_SUFFIX}"


def shard_name(index: int) -> str:
    """File stem of shard `index`."""
    return f"{SHARD_PREFIX}{index:06d}"


def plan_shards(items: list[SourceItem], shard_size: int) -> list[ShardPlan]:
    """Cut the (already sorted) inputs into consecutive shards of `shard_size` images."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    return [
        ShardPlan(k, shard_name(k), tuple(items[start : start + shard_size]))
        for k, start in enumerate(range(0, len(items), shard_size))
    ]


def inputs_fingerprint(items: list[SourceItem]) -> str:
    """sha256 over the (image id, source) list: a resumed job must see the same inputs."""
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.image_id}\t{item.source}\n".encode())
    return h.hexdigest()


def shard_is_done(out_dir: str | Path, plan: ShardPlan) -> bool:
    """True when the shard's stats, tar and parquet all exist (the stats are renamed in last)."""
    out = Path(out_dir)
    return all((out / n).is_file() for n in (plan.stats_name, plan.tar_name, plan.parquet_name))


def read_shard_stats(out_dir: str | Path, plan: ShardPlan) -> dict:
    """The `_stats.json` of a finished shard."""
    return json.loads((Path(out_dir) / plan.stats_name).read_text())


def split_done(out_dir: str | Path, plans: list[ShardPlan]) -> tuple[list[ShardPlan], list[ShardPlan]]:
    """(finished, pending) shards of a plan, judged by the files in `out_dir`."""
    done: list[ShardPlan] = []
    pending: list[ShardPlan] = []
    for p in plans:
        (done if shard_is_done(out_dir, p) else pending).append(p)
    return done, pending
