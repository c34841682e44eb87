"""`run_train`: pretraining and fine-tuning of ViLBERT on task shards, on one CPU or many GPUs and nodes.

A run is put together from `args.py` (TrainArgs, per-task defaults from the task registry,
`vilbert_core.tasks`), `data.py` (task.json checks, one loader per epoch, skipping to the saved
position on resume) and `model_setup.py` (fresh, from a checkpoint, text stream from BERT); this
module is `Trainer`: set-up, and the loop of `step` (gradient accumulation, clipping, warmup + linear
decay, NaN stop), `log`, `validate` (with a best checkpoint) and `checkpoint` (atomic), and the run
folder of docs/contracts.md section 6.

`--batch-size` is the global batch: samples per optimiser step over all ranks and accumulation steps.
Each rank feeds batch_size / (world_size * grad_accum) samples per forward pass, so the same command
trains the same model whatever the number of processes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from extract.devices import autocast
from extract.devices import resolve_precision as _resolve_precision
from pipelines.fileio import atomic_write_json, check_out_dir, disk_full_error, is_disk_full, make_out_dir
from vilbert_core.batches import batch_size_of, batch_to_device
from vilbert_core.tasks import get_task

# the pieces a run is made of, re-exported: scripts and tests import them from here
from .args import TrainArgs, TrainingDiverged, TrainingError  # noqa: F401
from .checkpointing import (
    capture_rng_state,
    latest_checkpoint,
    load_trainer_state,
    remove_dead_writers_temps,
    replace_folder,
    restore_rng_state,
    save_checkpoint,
    unwrap,
)
from .data import (  # noqa: F401
    BatchStream,
    LoaderFactory,
    answers_file,
    check_task_json,
    count_samples,
    default_loader_factory,
    first_batch_feature_dim,
    load_tokenizer,
    masking_spec,
    read_task_json,
    read_task_source,
)
from .distributed import (
    DistContext,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    configure_threads,
    gather_objects,
    setup_distributed,
    teardown_distributed,
)
from .memory import return_freed_memory_to_os
from .metrics_log import MetricsLog, plot_curves
from .model_setup import (  # noqa: F401
    build_model,
    check_model_matches,
    load_bert_text_stream,
    resolve_config,
    training_feature_stats,
)
from .optim import build_optimizer, step_in_backward, warmup_linear_schedule
from .tasks import MaskingSpec, TaskLossModule, validation_scores


# ---------------------------------------------------------------------------------------------- loop
def resolve_precision(args: TrainArgs, device: torch.device) -> str:
    """The autocast precision: fp32 on the CPU and bf16 on CUDA unless --precision says otherwise."""
    try:
        return _resolve_precision(args.precision, device)
    except ValueError as err:
        raise TrainingError(str(err)) from None


def _seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)




def evaluate(
    model: nn.Module, loader: Iterable[dict[str, Any]], task: str, ctx: DistContext, precision: str
) -> dict[str, float]:
    """Mean validation score over a loader (all ranks' samples together)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(precision, ctx.device.type):
        for batch in loader:
            scores = validation_scores(unwrap(model), batch_to_device(batch, ctx.device), task)
            total += float(scores.sum())
            count += int(scores.numel())
    model.train(was_training)
    summed = all_reduce_sum(ctx, torch.tensor([total, float(count)], dtype=torch.float64))
    total, count = float(summed[0]), int(round(float(summed[1])))
    return {get_task(task).defaults.metric: total / count if count else float("nan"), "samples": count}


# The alignment loss of a model that cannot tell matching pairs from others is ln 2 = 0.693.
ALIGN_CHANCE_LOSS = 0.68
# A validation score (in [0, 1]) that moves less than this when images are shuffled: the model ignores them.
VISION_GAP_MIN = 0.01


def training_warnings(task: str, align_losses: list[float], val_record: dict[str, float] | None) -> list[str]:
    """Warnings about a finished run: alignment at chance, a model that does not use the image."""
    warnings = []
    # align_losses: only pretraining has an alignment loss
    if align_losses and sum(align_losses) / len(align_losses) >= ALIGN_CHANCE_LOSS:
        mean = sum(align_losses) / len(align_losses)
        warnings.append(
            f"the alignment loss stayed at chance ({mean:.3f} over the last {len(align_losses)} steps; "
            "ln 2 = 0.693): the model does not relate captions to images. Train longer, check that the "
            "captions describe their images, or that the features differ between images (docs/training.md)"
        )
    if val_record and "vision_gap" in val_record and val_record["vision_gap"] < VISION_GAP_MIN:
        metric = get_task(task).defaults.metric
        warnings.append(
            f"the last validation {metric} moved by {val_record['vision_gap']:.4f} when every example got "
            "another image's regions: the model answers without looking at the image (docs/training.md)"
        )
    return warnings


def run_train(
    args: TrainArgs | None = None, *, loader_factory: LoaderFactory | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Train (or resume) one run; returns a summary (steps, last losses, best metric, paths, warnings)."""
    args = (args or TrainArgs(**kwargs)).resolved()
    ctx = setup_distributed(args.device)
    try:
        if args.multi_task:
            from .multitask import MultiTaskTrainer

            return MultiTaskTrainer(args, ctx, loader_factory).run()
        return Trainer(args, ctx, loader_factory).run()
    except (OSError, SafetensorError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        ckpt = latest_checkpoint(Path(args.out) / "checkpoints")
        advice = "free space and continue with --resume" + (f" (from {ckpt})" if ckpt else "")
        raise disk_full_error(args.out, "the run folder", advice) from None
    finally:
        teardown_distributed(ctx)


class Trainer:
    """One run of `run_train`: set up from the arguments, then `run()` to the last step.

    Setting up reads the data (task.json checks, vocabulary, answers, steps), finds the resume point,
    builds the model, optimiser and schedule, restores a checkpoint's state and writes the run files.
    `run()` repeats `step()` (one optimiser step over the gradient-accumulation micro-batches of every
    rank), `log()`, `validate()` (with --val: the score, the same with shuffled images, best/) and
    `checkpoint()` (checkpoints/step-N, everything --resume needs).
    """

    def __init__(self, args: TrainArgs, ctx: DistContext, loader_factory: LoaderFactory | None) -> None:
        # a multi-task run (MultiTaskTrainer) takes the model kind and its defaults from its first task
        self.args, self.ctx, self.spec = args, ctx, get_task(args.task_names[0])
        self.run_dir = Path(args.out)
        self.ckpt_root = self.run_dir / "checkpoints"
        try:
            if ctx.is_main:
                make_out_dir(self.run_dir)
            else:
                check_out_dir(self.run_dir)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        self.threads = configure_threads(args.num_workers, args.threads)
        self._read_data(loader_factory)
        self._find_resume_point()
        self._build()
        self._restore_or_clean()
        self._start_logs(loader_factory)

    # -------------------------------------------------------------- set-up
    def _read_data(self, loader_factory: LoaderFactory | None) -> None:
        """What the sources are, task check, vocabulary, answers, feature size, batch per rank, total steps."""
        args, ctx = self.args, self.ctx
        source = read_task_source(args, ctx)
        self.tokenizer = load_tokenizer(args.vocab, args.max_text_len)
        self.answers, self.num_answers, self.feature_dim = source.answers, source.num_answers, source.feature_dim
        self.per_rank, self.steps_per_epoch = source.per_rank, source.steps_per_epoch
        # total steps: --steps, or epochs x samples per epoch
        self.total_steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * self.steps_per_epoch))
        self.factory = loader_factory or default_loader_factory(args, ctx, steps_per_epoch=self.steps_per_epoch)
        self.stream = BatchStream(self.factory, args.data, self.per_rank, ctx)
        if self.feature_dim is None:  # shard URLs without a task.json: read the size off the first batch
            self.feature_dim = first_batch_feature_dim(self.factory, args.data, self.per_rank)
        self.warmup_steps = int(args.warmup * self.total_steps) if args.warmup < 1 else int(args.warmup)

    def _find_resume_point(self) -> None:
        """The newest checkpoint and its trainer state with --resume (None otherwise, or when there is none)."""
        args, ctx = self.args, self.ctx
        if args.resume and ctx.is_main:
            # checkpoint and best/ folders that killed runs were writing: nobody will finish them
            for folder in (self.ckpt_root, self.run_dir):
                remove_dead_writers_temps(folder)
        self.resume_dir = latest_checkpoint(self.ckpt_root) if args.resume else None
        if args.resume and self.resume_dir is None and ctx.is_main:
            print(f"--resume: no checkpoint under {self.ckpt_root}; starting from scratch")
        try:
            self.resumed = load_trainer_state(self.resume_dir) if self.resume_dir else None
        except ValueError as err:  # a refused (malicious) or damaged trainer_state.pt, named in the message
            raise TrainingError(f"--resume: {err}") from None

    def _build(self) -> None:
        """Model (on its device, in train mode), optimiser, schedule, precision, grad scaler, masking."""
        args, ctx = self.args, self.ctx
        # a new model standardises its region features with the training split's statistics (docs/training.md)
        stats, self.stats_source = None, None
        if self.resume_dir is None and args.init_from is None and args.feature_norm in (None, "standardize"):
            stats, self.stats_source = training_feature_stats(args, self.factory, self.per_rank, ctx)

        _seed_everything(args.seed + ctx.rank)
        self.model, bert_names = build_model(
            self.model_args(), self.tokenizer.vocab_size, self.feature_dim, self.num_answers, self.resume_dir, stats
        )
        self.prepare_model()
        if self.resumed is not None:
            bert_names = set(self.resumed.get("bert_param_names", []))
        self.bert_names = bert_names
        self.model.to(ctx.device)
        self.model.train()
        self.model.gradient_checkpointing_enable(args.activation_checkpointing)
        return_freed_memory_to_os()  # freed activations and gradients go back to the OS (BENCHMARKS.md)
        self.optimizer = build_optimizer(
            self.model,
            lr=args.lr,
            weight_decay=args.weight_decay,
            bert_param_names=bert_names,
            bert_lr_mult=args.bert_lr_mult,
        )
        self.scheduler = warmup_linear_schedule(self.optimizer, self.warmup_steps, self.total_steps)
        self.precision = resolve_precision(args, ctx.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        # nothing happens to the gradients between backward and the update: apply each one as backward
        # produces it, so that all of them never exist at once (BENCHMARKS.md: the memory of a step)
        self.in_backward = (args.update_in_backward and args.clip_grad == 0 and args.grad_accum == 1
                            and not ctx.distributed and not self.scaler.is_enabled())  # fmt: skip
        self._grad_sq: list[torch.Tensor] = []
        if self.in_backward:
            step_in_backward(self.optimizer, lambda g: self._grad_sq.append(g.detach().float().pow(2).sum()))
        self.mask_gen = torch.Generator().manual_seed(args.seed * 1000 + ctx.rank)
        pretraining = self.spec.model_kind == "pretraining"
        masking = masking_spec(self.tokenizer, self.mask_gen) if pretraining else None
        # DDP wraps model + loss: heads another task uses (computed but not in the loss) then count as unused
        self.train_model: nn.Module = self.loss_module(masking)
        self.step_count, self.samples_seen = 0, 0
        self.best: dict[str, Any] = {"metric": None, "step": None}

    def _restore_or_clean(self) -> None:
        """Continue a resumed run's optimiser, schedule, data position and RNGs; or clear an old run's files."""
        state, ctx = self.resumed, self.ctx
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.step_count, self.samples_seen = state["step"], state["samples_seen"]
            self.best = state.get("best", self.best)
            self.restore_streams(state)
            rng = state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0]
            # after the loader is rebuilt: building it may draw from the global RNG
            restore_rng_state(rng, {"masking": self.mask_gen})
        elif ctx.is_main:
            # a fresh run in an old folder must not resume from, or report, the old run's files
            for stale in (self.ckpt_root, self.run_dir / "best"):
                if stale.exists():
                    shutil.rmtree(stale)
        if ctx.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.train_model,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=self.spec.model_kind != "pretraining",
            )

    def _start_logs(self, loader_factory: LoaderFactory | None) -> None:
        """Run files, metrics.jsonl, validation loaders, the progress bar."""
        args, ctx = self.args, self.ctx
        if ctx.is_main:
            _write_run_files(
                args, self.run_dir, self.model, self.answers, self.num_answers, self.feature_dim, self.total_steps,
                self.warmup_steps, self.precision, ctx, self.stats_source,
                config_used(args, self.resume_dir, self.run_dir), self.threads,
            )  # fmt: skip
        resume_step = self.step_count if self.resumed else None
        self.log_file = MetricsLog(self.run_dir, resume_step=resume_step, tensorboard=args.tensorboard) if ctx.is_main else None
        self.val_factory = self.swap_factory = None
        if args.val:
            self.val_factory = loader_factory or default_loader_factory(args, ctx, train=False)
            if loader_factory is None and self.spec.data.swap:
                self.swap_factory = default_loader_factory(args, ctx, train=False, swap_images=True)
        self.bar = None
        if ctx.is_main and args.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.step_count, desc=f"train {args.task}", unit="step",
                            dynamic_ncols=True)  # fmt: skip
        self.last: dict[str, float] = {}
        self.last_task = self.args.task_names[0]  # the task of the last step (the log names its epoch)
        # the last steps' alignment losses, to warn when pretraining alignment stays at chance
        self.align_window: collections.deque[float] = collections.deque(maxlen=max(10, min(50, self.total_steps // 10)))
        self.last_val: dict[str, float] | None = None
        self.t_last, self.samples_since = time.perf_counter(), 0

    # -------------------------------------------------------------- what a multi-task run changes (multitask.py)
    def model_args(self) -> TrainArgs:
        """The arguments the model is built from (a multi-task run: its answer task's, or its first task's)."""
        return self.args

    def prepare_model(self) -> None:
        """Changes to the built model before the optimiser sees its parameters (multi-task: task tokens)."""

    def loss_module(self, masking: MaskingSpec | None) -> nn.Module:
        """The module DDP wraps: the model and its task loss in one forward."""
        return TaskLossModule(self.model, self.args.task, masking)

    def current_task(self) -> str:
        """The task the next optimiser step trains."""
        return self.args.task

    def stream_for(self, task: str) -> BatchStream:
        """The training batches of a task."""
        return self.stream

    def forward(self, batch: dict[str, Any], task: str) -> dict[str, torch.Tensor]:
        """The losses of one micro-batch of `task`."""
        return self.train_model(batch)

    def lr_scale(self, task: str) -> float:
        """The factor on the schedule's rate for a step of `task` (its lr over the base lr)."""
        return 1.0

    def record_extra(self) -> dict[str, Any]:
        """More fields of a training metrics.jsonl line."""
        return {}

    def restore_streams(self, state: dict[str, Any]) -> None:
        """Put the batch streams where a checkpoint left them."""
        self.stream.seek(state["epoch"], state["in_epoch"])

    def extra_state(self) -> dict[str, Any]:
        """More of the trainer state a checkpoint keeps."""
        return {}

    def validates(self) -> bool:
        """Whether the run has validation data (--val)."""
        return self.val_factory is not None

    def final_warnings(self) -> list[str]:
        """Warnings about the finished run."""
        return training_warnings(self.args.task, list(self.align_window), self.last_val)

    # -------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """Train to the last step; the run's summary (steps, last losses, best metric, warnings)."""
        args, ctx = self.args, self.ctx
        try:
            while self.step_count < self.total_steps:
                epoch_before = self.stream.epoch
                lr, grad_norm = self.step()
                self.log(lr, grad_norm)
                step = self.step_count
                # epochs of the task.json size; without a count, the step that crossed into a new epoch
                epoch_ended = (
                    step % self.steps_per_epoch == 0 if self.steps_per_epoch else self.stream.epoch != epoch_before
                )
                if self.validates() and (
                    (args.eval_every and step % args.eval_every == 0)
                    or (not args.eval_every and epoch_ended)
                    or step == self.total_steps
                ):
                    self.validate()
                if step % args.checkpoint_every == 0 or step == self.total_steps:
                    self.checkpoint()
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.log_file is not None:
                self.log_file.close()

        warnings = self.final_warnings()
        if ctx.is_main:
            self.model.save_pretrained(self.run_dir)
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        barrier(ctx)
        return {
            "warnings": warnings,
            "run_dir": str(self.run_dir),
            "steps": self.step_count,
            "samples": self.samples_seen,
            "last": self.last,
            "best": self.best,
            "precision": self.precision,
            "update_in_backward": self.in_backward,
            "world_size": ctx.world_size,
            "rank": ctx.rank,
        }

    def step(self) -> tuple[float, torch.Tensor]:
        """One optimiser step: accumulate the micro-batches' gradients, stop on a NaN, clip, update.

        Returns the base learning rate it used and the gradient norm before clipping; the losses (mean
        over ranks) are in `self.last`.
        """
        args, ctx = self.args, self.ctx
        task = self.last_task = self.current_task()
        stream = self.stream_for(task)
        if self.in_backward:
            return self._step_in_backward(task, stream)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(args.grad_accum):
            sync = micro == args.grad_accum - 1 or not ctx.distributed
            with contextlib.nullcontext() if sync else self.train_model.no_sync():
                losses = self._micro_batch(task, stream)
                self.scaler.scale(losses["loss"] / args.grad_accum).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / args.grad_accum

        self._record_losses(sums)
        self.scaler.unscale_(self.optimizer)
        # --clip-grad 0: the norm is still logged; an infinite threshold scales every gradient by exactly 1
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad or math.inf)
        scale = self.lr_scale(task)  # a multi-task step runs at its task's lr; the schedule stays shared
        self._scale_lr(scale)
        self.scaler.step(self.optimizer)
        self._scale_lr(scale, undo=True)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return self._finish_step(scale), grad_norm

    def _step_in_backward(self, task: str, stream: BatchStream) -> tuple[float, torch.Tensor]:
        """step() when backward applies the updates (one process, one micro-batch, no clipping or scaling)."""
        losses = self._micro_batch(task, stream)
        # checked before backward, which updates the weights: a NaN loss leaves them as they were
        self._record_losses({k: v.detach().float() for k, v in losses.items()})
        scale = self.lr_scale(task)
        self._scale_lr(scale)
        self._grad_sq.clear()
        losses["loss"].backward()
        self._scale_lr(scale, undo=True)
        grad_norm = torch.stack(self._grad_sq).sum().sqrt() if self._grad_sq else torch.zeros(())
        return self._finish_step(scale), grad_norm

    def _micro_batch(self, task: str, stream: BatchStream) -> dict[str, torch.Tensor]:
        """The next batch of `stream`, its forward pass under the run's precision, the sample counts; its losses."""
        batch = batch_to_device(stream.next(), self.ctx.device)
        with autocast(self.precision, self.ctx.device.type):
            losses = self.forward(batch, task)
        self.samples_since += batch_size_of(batch) * self.ctx.world_size
        self.samples_seen += batch_size_of(batch) * self.ctx.world_size
        return losses

    def _record_losses(self, sums: dict[str, torch.Tensor]) -> None:
        """The step's losses (mean over ranks) into self.last; stop on a non-finite loss."""
        keys = sorted(sums)
        mean = all_reduce_mean(self.ctx, torch.stack([sums[k] for k in keys]))
        self.last = {k: float(v) for k, v in zip(keys, mean.tolist(), strict=True)}
        if "align" in self.last:
            self.align_window.append(self.last["align"])
        if not math.isfinite(self.last["loss"]):
            raise TrainingDiverged(
                f"the loss became {self.last['loss']} at step {self.step_count + 1}; training stopped. The last good "
                f"checkpoint is {self.last_good()} (continue from it with --resume, e.g. with a lower --lr)"
            )

    def _scale_lr(self, scale: float, undo: bool = False) -> None:
        """Multiply every group's learning rate by a multi-task step's task scale (undo: divide it back)."""
        if scale != 1:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] / scale if undo else group["lr"] * scale

    def _finish_step(self, scale: float) -> float:
        """Advance the schedule and the step count; the base learning rate of --lr the step used."""
        # the base rate of --lr: BERT-initialised groups run at bert_lr_mult times it, above or below
        lr = self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0]["lr_mult"] * scale
        self.scheduler.step()
        self.step_count += 1
        return lr

    def log(self, lr: float, grad_norm: torch.Tensor) -> None:
        """A metrics.jsonl line every --log-every steps (and at the last), and the progress bar (main process)."""
        args, step = self.args, self.step_count
        now = time.perf_counter()
        if self.ctx.is_main:
            rate = self.samples_since / max(now - self.t_last, 1e-9)
            if step % args.log_every == 0 or step == self.total_steps:
                record = {
                    "step": step,
                    "epoch": self.stream_for(self.last_task).epoch,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "samples": self.samples_seen,
                    "samples_per_s": rate,
                }
                record.update({("loss" if k == "loss" else f"loss_{k}"): v for k, v in self.last.items()})
                record.update(self.record_extra())
                self.log_file.write(record)
            if self.bar is not None:
                self.bar.set_postfix(
                    loss=f"{self.last['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}",
                    ep=self.stream_for(self.last_task).epoch
                )
                self.bar.update(1)
        self.t_last, self.samples_since = now, 0

    def validate(self) -> None:
        """Score --val (and, where the task defines it, with other images' regions); keep best/ on a new best."""
        args, ctx, step = self.args, self.ctx, self.step_count
        name = self.spec.defaults.metric
        scores = evaluate(self.model, self.val_factory(args.val, 0, self.per_rank), args.task, ctx, self.precision)
        metric = scores[name]
        if self.swap_factory is not None:
            # the same examples with other images' regions: how much the score owes to the image
            swap_loader = self.swap_factory(args.val, 0, self.per_rank)
            swapped = evaluate(self.model, swap_loader, args.task, ctx, self.precision)
            scores[f"{name}_images_shuffled"] = swapped[name]
            scores["vision_gap"] = metric - swapped[name]
        self.last_val = scores
        if ctx.is_main:
            self.log_file.write({"step": step, "split": "val", **scores})
        if self.best["metric"] is None or (math.isfinite(metric) and metric > self.best["metric"]):
            self.best = {"metric": metric, "step": step}
            if ctx.is_main:
                _save_best(self.run_dir, self.model, step, scores)
            barrier(ctx)

    def state(self) -> dict[str, Any]:
        """Everything but the model needed to continue exactly where the run is (all ranks gather RNGs)."""
        rngs = gather_objects(self.ctx, capture_rng_state({"masking": self.mask_gen}))
        return {
            "step": self.step_count,
            "samples_seen": self.samples_seen,
            "epoch": self.stream.epoch,
            "in_epoch": self.stream.in_epoch,
            **self.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rngs,
            "best": self.best,
            "bert_param_names": sorted(self.bert_names),
            "world_size": self.ctx.world_size,
        }

    def checkpoint(self) -> Path | None:
        """Save checkpoints/step-N (all ranks take part in gathering RNG states); the best one is kept."""
        st = self.state()
        path = None
        if self.ctx.is_main:
            protect = self.ckpt_root / f"step-{self.best['step']}" if self.best["step"] is not None else None
            path = save_checkpoint(
                self.ckpt_root, self.step_count, self.model, st, keep=self.args.keep_checkpoints, protect=protect
            )
        barrier(self.ctx)
        return path

    def last_good(self) -> str:
        """Where the newest complete checkpoint is, for error messages."""
        ck = latest_checkpoint(self.ckpt_root)
        return str(ck) if ck else "none was written yet"


def _save_best(run_dir: Path, model: nn.Module, step: int, scores: dict[str, float]) -> None:
    """Replace RUNDIR/best/ atomically with the current model and its validation scores."""

    def fill(folder: Path) -> None:
        """The model and the scores that made it the best."""
        unwrap(model).save_pretrained(folder)
        atomic_write_json(folder / "val_metrics.json", {"step": step, **scores}, default=str)

    replace_folder(run_dir / "best", fill)


def _write_run_files(
    args: TrainArgs,
    run_dir: Path,
    model: nn.Module,
    answers: Path | None,
    num_answers: int | None,
    feature_dim: int | None,
    total_steps: int,
    warmup_steps: int,
    precision: str,
    ctx: DistContext,
    stats_source: str | None = None,
    config: str | None = None,
    threads: int | None = None,
) -> None:
    """config.json and train_args.json, which `vilbert-data eval` reads (docs/contracts.md section 6).

    config: where the model's configuration came from (default: --config).
    """
    unwrap(model).config.to_json_file(run_dir / "config.json")
    answers_copy = None
    if answers is not None:
        answers_copy = run_dir / "answers.json"
        shutil.copyfile(answers, answers_copy)
    record = {
        **dataclasses.asdict(args),
        "vocab": str(Path(args.vocab).resolve()),
        # resolved, so that `eval` finds the training split (for its blind baselines) from any directory
        "data": str(Path(args.data).resolve()) if Path(args.data).is_dir() else args.data,
        "num_answers": num_answers,
        "answers_file": str(answers_copy.resolve()) if answers_copy else None,
        "answers_source": str(answers.resolve()) if answers else None,
        "config": config or args.config,
        "config_name": config or args.config,
        "feature_dim": feature_dim,
        "feature_norm_used": unwrap(model).config.v_feature_norm,
        # a run started from a checkpoint keeps the statistics stored in its weights
        "feature_stats_source": stats_source
        or ("the checkpoint" if unwrap(model).config.v_feature_norm == "standardize" else None),
        "total_steps": total_steps,
        "warmup_steps": warmup_steps,
        "precision_used": precision,
        "world_size": ctx.world_size,
        "threads": threads,
    }
    atomic_write_json(run_dir / "train_args.json", record, default=str)


def config_used(args: TrainArgs, resume_dir: Path | None, run_dir: Path) -> str:
    """What the model's configuration came from: --config for a new model, else the checkpoint it was loaded from.

    A resumed run keeps what its first start recorded; --init-from a folder or file uses the config.json
    beside the weights (a reference pytorch_model.bin without one gets the paper preset).
    """
    if resume_dir is not None:
        try:
            return json.loads((run_dir / "train_args.json").read_text(encoding="utf-8"))["config"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{resume_dir}/config.json"
    if args.init_from is None:
        return args.config
    source = Path(args.init_from).resolve()
    config_file = (source if source.is_dir() else source.parent) / "config.json"
    return str(config_file) if config_file.is_file() else f"vilbert-base (the preset: no config.json beside {source})"

