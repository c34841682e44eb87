"""The task registry, data half: what `shard` reads for a task and how its records become batches.

One module per shard task in this package (`captions.py`, `vqa.py`, `vcr.py`, ...), each defining
`TASK`, an instance of a `DataTask` subclass. A spec says which annotation reader(s) the task accepts
(`pipelines/annotations/`), what `shard` adds to its records (answer targets, IoUs, ground-truth
boxes), how `pipelines.datasets.TaskDataset` turns a task-shard record into examples and which fields
`collate` adds to the batch of docs/contracts.md section 4.

The model half (loss, validation score, metric, report, defaults) is `vilbert_core/tasks/`, keyed by
the training task name; each names the shard task it reads here (pretraining reads `captions`).
Modules are found by listing this package, so a new task is a new module: nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI lists task names from here for its help: keep importing this package cheap
    import numpy as np

    from pipelines.annotations.common import Annotation


class DataTask:
    """The data side of one shard task; subclass it in a module of this package and set `TASK`."""

    name: str = ""
    # shard: the split name selects records from the annotation files (else it is only recorded)
    split_selects_records: bool = False
    # shard: masked region modelling trains against the detector's class distributions
    needs_class_distributions: bool = False
    # shard: the records get answer labels/scores over an answer list (task.json answer_vocab)
    answer_vocab: bool = False
    # datasets: regions of ground-truth boxes (gt_*.npy) come before the detected ones
    with_gt_regions: bool = False
    # training examples per record (an epoch's length in steps): VCR makes two of each question
    examples_per_record: int = 1
    # datasets swap_images: None (not defined), "regions" (another image's regions), "features"
    # (another image's appearance on the image's own boxes, when the targets are those boxes)
    swap: str | None = None

    # -------------------------------------------------------------- shard
    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """The annotations of `paths` for `split`, with the task's reader(s)."""
        raise NotImplementedError

    def attach_targets(
        self, anns: Sequence[Annotation], answers: list[str] | None, min_count: int, split: str
    ) -> list[str]:
        """Answer tasks: the answer list (given, or built from `anns`), after adding labels/scores to every record."""
        raise NotImplementedError(f"task {self.name!r} has no answer vocabulary")

    def shard_context(self, feature_set: Any, weights: str | None, device: str, detector_config: Any) -> Any:
        """Whatever `sample_members` needs for every image of a shard run (VCR: the detector); None by default."""
        return None

    def sample_members(
        self, sample: dict[str, bytes], group: list[Annotation], records: list[dict], context: Any
    ) -> dict[str, bytes]:
        """Members to add to one task sample; may complete its `records` (which need the image's regions)."""
        return {}

    def shard_report(self, anns: Sequence[Annotation], report_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """Task-specific counts for task.json and warnings, after writing any report file; none by default."""
        return {}, []

    # -------------------------------------------------------------- datasets
    def regions(self, sample: dict[str, bytes], max_regions: int) -> Any:
        """The Regions of a task sample (NLVR2: with its second image's); see pipelines.datasets.build_regions."""
        from pipelines.datasets import build_regions

        return build_regions(sample, max_regions, with_gt=self.with_gt_regions)

    def examples(self, ds: Any, items: Iterator[tuple[str, list[dict], Any]], rng: random.Random) -> Iterator[dict]:
        """Examples of a stream of (image id, records, Regions) for `ds` (a TaskDataset: tokenizer, options)."""
        raise NotImplementedError

    def collate(self, examples: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        """Add the task's fields to a padded batch (text and region tensors are already in it)."""


def example_base(ds: Any, key: str, regions: Any) -> dict[str, Any]:
    """The fields every example starts with: its task, image id and regions."""
    return {"task": ds.task, "image_id": key, "regions": [regions]}


def lists(examples: Sequence[dict[str, Any]], batch: dict[str, Any], keys: Sequence[str]) -> None:
    """Copy per-example values into the batch as lists (strings, ids, raw annotations)."""
    for k in keys:
        batch[k] = [ex[k] for ex in examples]


def remember(pool: list, items: list, limit: int, rng: random.Random) -> None:
    """Add items to a bounded pool, replacing random old entries once it holds `limit`."""
    for item in items:
        if len(pool) < limit:
            pool.append(item)
        else:
            pool[rng.randrange(len(pool))] = item


def answer_target(record: dict[str, Any], num_answers: int) -> np.ndarray:
    """(A,) float32 soft scores of a record's answer labels (zeros when it has none: test splits)."""
    import numpy as np

    target = np.zeros(num_answers, np.float32)
    target[record["labels"]] = record["scores"]
    return target


# ---------------------------------------------------------------------------------------------- registry
def task_modules(folder: str | Path) -> list[str]:
    """Names of the task modules in a registry folder, read from the files (nothing is imported)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if not m.name.startswith("_"))


class Registry:
    """The task specs of one registry package, by name: each module's `TASK`, imported on first use."""

    def __init__(self, package: str, folder: str | Path) -> None:
        self.package, self.folder = package, Path(folder)
        self._tasks: dict[str, Any] = {}

    def all(self) -> dict[str, Any]:
        """Every task by name, in module-name order."""
        if not self._tasks:
            found = {}  # complete before it is kept: a module that fails to import leaves no half registry
            for module in task_modules(self.folder):
                spec = importlib.import_module(f"{self.package}.{module}").TASK
                found[spec.name] = spec
            self._tasks = found
        return self._tasks

    def get(self, name: str) -> Any:
        """The spec of a task; ValueError naming the tasks there are for any other name."""
        known = self.all()
        if name not in known:
            raise ValueError(f"unknown task {name!r}; expected one of {', '.join(known)}")
        return known[name]


_REGISTRY = Registry(__name__, Path(__file__).parent)


def data_tasks() -> dict[str, DataTask]:
    """Every shard task by name."""
    return _REGISTRY.all()


def data_task(name: str) -> DataTask:
    """The data spec of a shard task; ValueError naming the tasks there are for any other name."""
    return _REGISTRY.get(name)
