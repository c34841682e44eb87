"""What every task's evaluation builds on: batches of a TASKDIR, progress totals, the shuffled-image
drop, and the Markdown pieces of the report. The tasks' own parts are in `vilbert_core/tasks/`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vilbert_core.batches import batch_to_device

from .loading import LoadedModel

# A model whose score falls by less than this (points) when every image's regions are another image's
# does not use the image: the report says so.
VISION_DROP_MIN = 1.0


def task_batches(
    loaded: LoadedModel, data_dir: Path, shard_task: str, batch_size: int, seed: int, num_workers: int = 0,
    swap_images: bool = False, keep: dict[str, Any] | None = None,
) -> Iterator[dict]:  # fmt: skip
    """Padded batches of a TASKDIR (no shuffle buffer, no resampling; workers split the shards).

    Results are keyed by question / annotation / ref ids, so the order across workers does not matter;
    pretraining negatives depend on the worker count (seeded per worker), so keep it fixed to compare runs.
    swap_images: every image's records get another image's regions (pipelines.datasets.swap_regions).
    keep: only the examples whose fields have these values (pipelines.datasets.TaskDataset).
    """
    from torch.utils.data import DataLoader

    from pipelines.datasets import TaskDataset
    from pipelines.tasks import data_task

    answers = data_task(shard_task).answer_vocab and loaded.answers
    ds = TaskDataset(
        str(data_dir),
        shard_task,
        loaded.tokenizer,
        batch_size=batch_size,
        max_text_len=loaded.max_text_len,
        max_regions=loaded.max_regions,
        shuffle_buffer=1,
        seed=seed,
        num_answers=len(loaded.answers) if answers else None,
        feature_dim=loaded.feature_dim,
        swap_images=swap_images,
        keep=keep,
    )
    source = ds if num_workers == 0 else DataLoader(ds, batch_size=None, num_workers=num_workers)
    for batch in source:
        yield batch_to_device(batch, loaded.device)


def record_count(info: dict[str, Any]) -> int | None:
    """A progress total: the record count of task.json, when it has one."""
    records = (info.get("counts") or {}).get("records")
    return records if isinstance(records, int) else None


def shuffle_drop(metrics: dict, shuffled: dict | None, key: str, same: float) -> list[str]:
    """Record the shuffled-image scores and their drop on `key` under metrics; a warning when it is tiny."""
    if shuffled is None:
        return []
    drop = round(same - shuffled[key], 2)
    metrics["shuffled_images"] = {**shuffled, "drop": drop}
    metrics.setdefault("vision", {})["drop_when_images_shuffled"] = drop
    metrics["vision"]["uses_image"] = drop >= VISION_DROP_MIN
    if drop < VISION_DROP_MIN:
        return [f"giving every example another image's regions costs only {drop:.2f} points of {key} "
                f"({same:.2f} -> {shuffled[key]:.2f}): the model barely uses the image"]  # fmt: skip
    return []


def shuffle_drop_on_scored(
    metrics: dict,
    key: str,
    score: Callable[..., dict | None],
    own: tuple[dict, dict],
    scores: dict,
    shuffled: tuple[dict, dict],
) -> list[str]:
    """shuffle_drop for a task scored by `score(probs, labels, keep=None)` from per-example (probs, labels).

    own / shuffled: the (probs, labels) of the model's pass and of the shuffled-image pass; scores:
    score(*own). A lone image has no other image to take regions from, so the shuffled pass may score
    fewer examples: the model's own score is then taken over the examples it scored.
    """
    s_scores = score(*shuffled) or None  # nothing scored: no check
    same = scores
    if s_scores is not None and s_scores["num_scored"] != scores["num_scored"]:
        same = score(*own, set(shuffled[0]))
    return shuffle_drop(metrics, s_scores, key, same[key])


def fmt(v: Any) -> str:
    """A metric value for a Markdown cell."""
    return f"{v:.2f}" if isinstance(v, float) and math.isfinite(v) else str(v)


def comparison_lines(table: dict[str, dict[str, float]], first: str) -> list[str]:
    """A Markdown table with one column per entry of `table` and one row per key of its first entry."""
    titles = list(table)
    lines = [f"| {first} | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for row in table[titles[0]]:
        lines.append(f"| {row} | " + " | ".join(fmt(table[t].get(row, float("nan"))) for t in titles) + " |")
    return lines + [""]


def file_safe(split: str) -> str:
    """A split name as it appears in file names: anything but letters, digits, - and _ becomes _."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in split)
