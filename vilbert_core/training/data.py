"""Training data: task.json checks, the answer list, one loader per epoch split by rank and worker, and a
stream of batches that resumes at a saved position."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.formats.tasks import answers_path, check_task_source, read_answers
from pipelines.formats.tasks import read_task_json as _read_task_json
from vilbert_core.tasks import get_task

from .args import TrainArgs, TrainingError
from .distributed import (
    DistContext,
    all_reduce_min,
)
from .tasks import MaskingSpec


# ---------------------------------------------------------------------------------------------- data
def read_task_json(data: str) -> dict[str, Any] | None:
    """TASKDIR/task.json beside the shards (None for URL lists without one)."""
    try:
        return _read_task_json(data, required=False)
    except ValueError as err:
        raise TrainingError(str(err)) from None


def check_task_json(info: dict[str, Any] | None, task: str, data: str) -> None:
    """Fail clearly when the shards were written for another task."""
    if info is None:
        return
    spec = get_task(task)
    expected = spec.shard_task
    if info.get("task") != expected:
        raise TrainingError(
            f"{data}: these are task shards of task {info.get('task')!r} but --task {task} needs "
            f"{expected!r} shards (vilbert-data shard --task {expected} ...)"
        )
    if spec.data.needs_class_distributions and not (info.get("features") or {}).get(
        "class_distributions", True
    ):
        # features converted from a release without cls_prob: MRM would learn against zeros
        raise TrainingError(
            f"{data}: the region features have no class distributions (converted from a release that lacks "
            "cls_prob), which masked region modelling is trained against; add them with `vilbert-data convert "
            "--recompute-classes` (docs/convert.md)"
        )


def answers_file(data: str, info: dict[str, Any] | None) -> Path | None:
    """The VQA answer list beside the shards, if any."""
    path = answers_path(data, info) if Path(data).is_dir() else None
    return path if path is not None and path.is_file() else None


LoaderFactory = Callable[[str, int, int], Iterable[dict[str, Any]]]  # (source, epoch, per-rank batch)


def default_loader_factory(
    args: TrainArgs, ctx: DistContext, *, train: bool = True, steps_per_epoch: int | None = None,
    swap_images: bool = False,
) -> LoaderFactory:  # fmt: skip
    """Loaders over task shards (pipelines.datasets), split by rank and worker, reshuffled per epoch.

    Training under DDP splits each epoch by records (every record once, equal counts per rank, the last
    steps padded by repetition); with `resampled`, each rank draws shards with replacement and yields
    exactly steps_per_epoch x grad_accum batches per epoch. Validation splits by shards (each record
    scored once, no padding). swap_images (validation): every image's examples get another image's
    regions, to measure how much the model uses the image.
    """
    from pipelines.datasets import make_loader

    resampled = train and args.resampled and steps_per_epoch is not None
    even_split = train and ctx.distributed and not resampled

    def factory(source: str, epoch: int, batch_size: int) -> Iterable[dict[str, Any]]:
        """A DataLoader over `source` for one epoch, `batch_size` samples per batch on this rank."""
        try:
            loader = make_loader(
                source,
                get_task(args.task).shard_task,
                args.vocab,
                batch_size=batch_size,
                max_text_len=args.max_text_len,
                max_regions=args.max_regions,
                shuffle_buffer=args.shuffle_buffer if train else 0,
                seed=args.seed,
                resampled=resampled,
                steps=steps_per_epoch * args.grad_accum if resampled else None,
                num_workers=args.num_workers,
                swap_images=swap_images,
                even_split=even_split,
                keep=get_task(args.task).keep_examples,
            )
        except (FileNotFoundError, ValueError) as err:
            raise TrainingError(f"{source}: {err}") from None
        loader.dataset.set_epoch(epoch)
        return loader

    return factory


class BatchStream:
    """Batches across epochs with a resumable position (epoch, batches taken in that epoch)."""

    def __init__(self, factory: LoaderFactory, source: str, batch_size: int, ctx: DistContext) -> None:
        self.factory, self.source, self.batch_size, self.ctx = factory, source, batch_size, ctx
        self.epoch = 0
        self.in_epoch = 0
        self._it: Iterator[dict[str, Any]] | None = None

    def seek(self, epoch: int, in_epoch: int) -> None:
        """Start reading at a saved position: the epoch's loader is rebuilt and `in_epoch` batches skipped."""
        self.epoch, self.in_epoch = epoch, 0
        self._it = iter(self.factory(self.source, epoch, self.batch_size))
        for _ in range(in_epoch):
            if next(self._it, None) is None:
                break
            self.in_epoch += 1

    def next(self) -> dict[str, Any]:
        """The next batch; when any rank's epoch ends, every rank starts the next epoch together."""
        for _attempt in range(2):
            if self._it is None:
                self._it = iter(self.factory(self.source, self.epoch, self.batch_size))
            try:
                batch = next(self._it, None)
            except FileNotFoundError as err:  # a shard URL that does not exist
                raise TrainingError(f"{self.source}: {err}") from None
            if all_reduce_min(self.ctx, 0.0 if batch is None else 1.0) > 0:
                self.in_epoch += 1
                return batch
            if self.in_epoch == 0:
                break
            self.epoch, self.in_epoch, self._it = self.epoch + 1, 0, None
        raise TrainingError(f"{self.source}: the data source yields no training samples (epoch {self.epoch})")


# --------------------------------------------------------------------------------------------- model
def load_tokenizer(vocab: str, max_text_len: int) -> Any:
    """The WordPiece tokenizer of --vocab (a vocab.txt or a tokenizer folder), with a clear error."""
    from pipelines.tokenization import TextTokenizer

    try:
        return TextTokenizer.from_pretrained(vocab, max_len=max_text_len)
    except (FileNotFoundError, ValueError) as err:
        raise TrainingError(f"--vocab {vocab}: {err}") from None


def masking_spec(tokenizer: Any, generator: torch.Generator) -> MaskingSpec:
    """MLM masking settings from the tokenizer: [MASK] id, vocabulary size, never-masked ids."""
    return MaskingSpec.for_tokenizer(tokenizer, generator)


def count_samples(info: dict[str, Any] | None, task: str) -> int | None:
    """Training examples per epoch from task.json counts (VCR: two stages per question)."""
    if not info:
        return None
    counts = info.get("counts", {})
    for key in ("samples", "records"):
        if isinstance(counts.get(key), int):
            spec = get_task(task)
            per_record = spec.examples_per_record or spec.data.examples_per_record
            return counts[key] * per_record
    return None


@dataclass
class TaskSource:
    """One task's training data as the trainer sizes it: task.json, answer list, features, batch, epoch."""

    info: dict[str, Any] | None
    answers: Path | None  # the answers.json beside the shards
    num_answers: int | None
    feature_dim: int | None  # None: shard URLs without task.json (read off the first batch)
    per_rank: int  # samples per forward pass on each rank
    samples: int | None  # training examples per epoch (task.json counts)
    steps_per_epoch: int | None


def read_task_source(args: TrainArgs, ctx: DistContext, flag: str = "") -> TaskSource:
    """Check one task's --data and --val (shards of that task, answers where it needs them) and size its epoch.

    flag: how the task's options are named in messages ("" for a single task, "vqa=" in a multi-task run).
    """
    try:
        check_task_source(args.data, f"--data {flag}".rstrip())
        if args.val:
            check_task_source(args.val, f"--val {flag}".rstrip())
    except ValueError as err:
        raise TrainingError(str(err)) from None
    info = read_task_json(args.data)
    check_task_json(info, args.task, args.data)
    if args.val:
        check_task_json(read_task_json(args.val), args.task, args.val)
    answers = answers_file(args.data, info)
    num_answers = len(read_answers(args.data, info)) if answers else None
    if get_task(args.task).answer_head and num_answers is None and args.init_from is None:
        raise TrainingError(f"{args.data}: {args.task} shards need their answers.json (answer_vocab in task.json)")
    per_rank = args.batch_size // (ctx.world_size * args.grad_accum)
    if per_rank * ctx.world_size * args.grad_accum != args.batch_size:
        option = f"--task-batch-size {flag}" if flag else "--batch-size "
        raise TrainingError(
            f"{option}{args.batch_size} must be a multiple of world size x grad accum = "
            f"{ctx.world_size} x {args.grad_accum}"
        )
    samples = count_samples(info, args.task)
    if samples == 0:
        raise TrainingError(f"{args.data}: the task shards hold no training samples (task.json counts)")
    steps_per_epoch = math.ceil(samples / args.batch_size) if samples else None
    if args.steps is None and steps_per_epoch is None:
        raise TrainingError(f"{args.data}: the sample count is unknown (no task.json counts); pass --steps")
    if args.resampled and steps_per_epoch is None:
        raise TrainingError("--resampled needs the sample count of task.json to size an epoch")
    feature_dim = (info or {}).get("features", {}).get("feature_dim")
    return TaskSource(info, answers, num_answers, feature_dim, per_rank, samples, steps_per_epoch)


def first_batch_feature_dim(factory: LoaderFactory, source: str, per_rank: int) -> int:
    """The region feature size of the first training batch (shard URLs without a task.json say none)."""
    try:
        first = next(iter(factory(source, 0, per_rank)), None)
    except FileNotFoundError as err:
        raise TrainingError(f"{source}: {err}") from None
    if first is None:
        raise TrainingError(f"{source}: the data source yields no training samples")
    return int(first["image_feat"].shape[-1])
