"""Multi-task training (12-in-1, Lu et al. CVPR 2020): one model, a head per task, steps drawn task by task.

`vilbert-data train --task vqa,refcoco,retrieval --data vqa=DIR --data refcoco=DIR ...` trains one
`ViLBERTForTasks`; every optimiser step trains one task, chosen by `TaskSchedule` from the step number
alone (so every rank picks the same task and a resumed run continues the same sequence):

- round-robin: the tasks in the order given, a task with `--task-iter-gap N` only in every Nth round
  (the reference's train_iter_gap);
- proportional: drawn at random (seeded) in proportion to the tasks' training examples.

Each task keeps its own batch stream (epochs counted per task), global batch and peak lr (the shared
warmup/decay schedule times its lr over the base lr), its validation set and best score; metrics.jsonl
names the task of every line. With `--task-tokens` each task has a learned embedding added at [CLS].
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vilbert_core.tasks import Task, get_task

from .args import TrainArgs, TrainingError
from .data import (
    BatchStream,
    LoaderFactory,
    default_loader_factory,
    first_batch_feature_dim,
    load_tokenizer,
    read_task_source,
)
from .distributed import barrier
from .tasks import MaskingSpec, compute_losses
from .trainer import Trainer, _save_best, evaluate, training_warnings

SCHEDULES = ("round-robin", "proportional")


class TaskSchedule:
    """Which task each optimiser step trains: a function of the step number (and the seed) only."""

    def __init__(self, names: list[str], kind: str, gaps: dict[str, int], weights: dict[str, float], seed: int) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule {kind!r} must be one of {', '.join(SCHEDULES)}")
        self.names, self.kind, self.gaps, self.weights, self.seed = names, kind, gaps, weights, seed
        self._sequence: list[str] = []
        self._rng = random.Random(f"{seed}/task-schedule")
        self._round = 0

    def task_at(self, step: int) -> str:
        """The task of optimiser step `step` (0-based)."""
        while len(self._sequence) <= step:
            self._extend()
        return self._sequence[step]

    def _extend(self) -> None:
        """One more round (round-robin) or one more draw (proportional)."""
        if self.kind == "proportional":
            self._sequence.append(self._rng.choices(self.names, weights=[self.weights[n] for n in self.names])[0])
            return
        # round r trains the tasks whose gap divides r; round 0 trains them all, so no round is empty
        self._sequence.extend(n for n in self.names if self._round % self.gaps.get(n, 1) == 0)
        self._round += 1


class MultiTaskLoss(nn.Module):
    """The model and every task's loss in one forward (what DDP wraps): forward(batch, task)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any], task: str) -> dict[str, torch.Tensor]:
        """Losses of one batch of `task`, its task token set."""
        self.model.set_task(task)
        return compute_losses(self.model, batch, task)


@dataclass
class TaskRun:
    """One task of a multi-task run: its arguments, data stream and validation loaders."""

    name: str
    spec: Task
    args: TrainArgs  # the task's own single-task arguments (data, val, lr, batch)
    per_rank: int
    steps_per_epoch: int | None
    samples: int | None
    factory: LoaderFactory
    stream: BatchStream
    val_factory: LoaderFactory | None = None
    swap_factory: LoaderFactory | None = None


class MultiTaskTrainer(Trainer):
    """A `Trainer` whose steps go task by task (see the module docstring); the loop, logs and checkpoints are Trainer's."""

    # -------------------------------------------------------------- set-up
    def _read_data(self, loader_factory: LoaderFactory | None) -> None:
        """Every task's shards (checked), one vocabulary, the answer list of the answer task, steps per task."""
        args, ctx = self.args, self.ctx
        self.tokenizer = load_tokenizer(args.vocab, args.max_text_len)
        self.runs: dict[str, TaskRun] = {}
        self.answers, self.num_answers, self.feature_dim = None, None, None
        dims: dict[str, int] = {}
        for name in args.task_names:
            targs = args.for_task(name)
            source = read_task_source(targs, ctx, f"{name}=")
            spec = get_task(name)
            if spec.answer_head:
                self.answers, self.num_answers = source.answers, source.num_answers
            if source.feature_dim is not None:
                dims[name] = int(source.feature_dim)
            per_rank, samples, steps_per_epoch = source.per_rank, source.samples, source.steps_per_epoch
            factory = loader_factory or default_loader_factory(targs, ctx, steps_per_epoch=steps_per_epoch)
            run = TaskRun(name, spec, targs, per_rank, steps_per_epoch, samples, factory,
                          BatchStream(factory, targs.data, per_rank, ctx))  # fmt: skip
            if targs.val:
                run.val_factory = loader_factory or default_loader_factory(targs, ctx, train=False)
                if loader_factory is None and spec.data.swap:
                    run.swap_factory = default_loader_factory(targs, ctx, train=False, swap_images=True)
            self.runs[name] = run
        if len(set(dims.values())) > 1:
            raise TrainingError(f"the tasks' region features differ in size ({dims}): one model takes one size")
        self.feature_dim = next(iter(dims.values()), None)
        first = self.runs[args.task_names[0]]
        # what Trainer's set-up reads: the first task's stream and batch (feature statistics come from it)
        self.factory, self.stream, self.per_rank = first.factory, first.stream, first.per_rank
        if self.feature_dim is None:
            self.feature_dim = first_batch_feature_dim(first.factory, first.args.data, first.per_rank)
        # an "epoch" of the run: every task's epoch once, in steps
        epochs = [r.steps_per_epoch for r in self.runs.values()]
        self.steps_per_epoch = sum(epochs) if all(epochs) else None
        self.total_steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * self.steps_per_epoch))
        self.warmup_steps = int(args.warmup * self.total_steps) if args.warmup < 1 else int(args.warmup)
        self.schedule = TaskSchedule(
            args.task_names, args.schedule, args.task_iter_gap or {},
            {n: float(r.samples or 1) for n, r in self.runs.items()}, args.seed,
        )  # fmt: skip

    def model_args(self) -> TrainArgs:
        """The answer task's arguments (its answer list sizes the head), else the first task's."""
        answer = [n for n, r in self.runs.items() if r.spec.answer_head]
        return self.args.for_task(answer[0] if answer else self.args.task_names[0])

    def prepare_model(self) -> None:
        """A learned task embedding per task with --task-tokens (kept from a checkpoint that has them)."""
        if self.args.task_tokens:
            self.model.add_task_tokens(self.args.task_names)

    def loss_module(self, masking: MaskingSpec | None) -> nn.Module:
        """Every task's loss behind one forward(batch, task)."""
        return MultiTaskLoss(self.model)

    # -------------------------------------------------------------- the loop's hooks
    def current_task(self) -> str:
        """The schedule's task for the next step."""
        return self.schedule.task_at(self.step_count)

    def stream_for(self, task: str) -> BatchStream:
        """The task's own batch stream."""
        return self.runs[task].stream

    def forward(self, batch: dict[str, Any], task: str) -> dict[str, torch.Tensor]:
        """The task's loss (its task token set)."""
        return self.train_model(batch, task)

    def lr_scale(self, task: str) -> float:
        """The task's peak lr over the optimiser's base lr."""
        return self.runs[task].args.lr / self.args.lr

    def record_extra(self) -> dict[str, Any]:
        """The task of the step and its loss under its own name (one curve per task)."""
        return {"task": self.last_task, f"loss_{self.last_task}": self.last["loss"]}

    def restore_streams(self, state: dict[str, Any]) -> None:
        """Every task's stream at its saved position."""
        for name, (epoch, in_epoch) in state["streams"].items():
            self.runs[name].stream.seek(epoch, in_epoch)

    def extra_state(self) -> dict[str, Any]:
        """Every task's stream position."""
        return {"streams": {n: (r.stream.epoch, r.stream.in_epoch) for n, r in self.runs.items()}}

    def _start_logs(self, loader_factory: LoaderFactory | None) -> None:
        """Trainer's logs, and each task's last validation scores."""
        super()._start_logs(loader_factory)
        self.last_vals: dict[str, dict[str, float]] = {}

    def validates(self) -> bool:
        """Whether any task has a validation set."""
        return any(r.val_factory is not None for r in self.runs.values())

    def validate(self) -> None:
        """Score every task's validation set (and with shuffled images); best/ by the mean of the tasks' scores."""
        ctx, step = self.ctx, self.step_count
        metrics: dict[str, float] = {}
        for name, run in self.runs.items():
            if run.val_factory is None:
                continue
            metric = run.spec.defaults.metric
            self.model.set_task(name)
            scores = evaluate(self.model, run.val_factory(run.args.val, 0, run.per_rank), name, ctx, self.precision)
            if run.swap_factory is not None:
                swapped = evaluate(self.model, run.swap_factory(run.args.val, 0, run.per_rank), name, ctx, self.precision)
                scores[f"{metric}_images_shuffled"] = swapped[metric]
                scores["vision_gap"] = scores[metric] - swapped[metric]
            self.last_vals[name] = scores
            metrics[name] = scores[metric]
            if ctx.is_main:
                self.log_file.write({"step": step, "split": "val", "task": name, **scores})
        mean = sum(metrics.values()) / len(metrics)
        if ctx.is_main:
            self.log_file.write({"step": step, "split": "val", "task": "mean", "mean_score": mean})
        if self.best["metric"] is None or (math.isfinite(mean) and mean > self.best["metric"]):
            self.best = {"metric": mean, "step": step, "per_task": metrics}
            if ctx.is_main:
                _save_best(self.run_dir, self.model, step, {"mean_score": mean, **{f"{k}_score": v for k, v in metrics.items()}})
            barrier(ctx)

    def final_warnings(self) -> list[str]:
        """Each task's warning about not using the image, named by task."""
        return [f"{name}: {w}" for name, val in self.last_vals.items() for w in training_warnings(name, [], val)]
