"""`run_train`: pretraining and fine-tuning of ViLBERT on task shards, on one CPU or many GPUs and nodes.

Read top to bottom: the arguments (TrainArgs, per-task defaults from the task registry,
`vilbert_core.tasks`), the data (task.json checks, one loader per epoch, skipping to the saved position
on resume), the model (fresh, from a checkpoint, text stream from BERT), then `Trainer`: set-up, and
the loop of `step` (gradient accumulation, clipping, warmup + linear decay, NaN stop), `log`,
`validate` (with a best checkpoint) and `checkpoint` (atomic), and the run folder of
docs/contracts.md section 6.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from extract.config import CLS_PROB_DIM
from extract.devices import autocast, check_precision
from extract.devices import resolve_precision as _resolve_precision
from pipelines.fileio import atomic_write_json, check_out_dir, disk_full_error, is_disk_full, make_out_dir
from pipelines.formats.tasks import answers_path, check_task_source, load_task_feature_stats, read_answers
from pipelines.formats.tasks import read_task_json as _read_task_json
from vilbert_core.batches import batch_size_of, batch_to_device
from vilbert_core.tasks import get_task, tasks

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
from .distributed import (
    DistContext,
    all_reduce_mean,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    configure_threads,
    gather_objects,
    setup_distributed,
    teardown_distributed,
)
from .memory import return_freed_memory_to_os
from .metrics_log import MetricsLog, plot_curves
from .optim import build_optimizer, warmup_linear_schedule
from .tasks import MaskingSpec, TaskLossModule, validation_scores


class TrainingError(RuntimeError):
    """A problem with the training inputs or run, with a message meant for the user."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


@dataclass
class TrainArgs:
    """Every option of `vilbert-data train` (None = the task's paper default or automatic)."""

    task: str
    data: str
    out: str
    vocab: str | None = None
    val: str | None = None
    config: str = "vilbert-base"
    init_from: str | None = None
    init_text_from: str | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    lr: float | None = None
    bert_lr_mult: float = 0.1
    weight_decay: float = 0.01
    warmup: float = 0.1  # < 1: fraction of the total steps; >= 1: a number of steps
    epochs: float | None = None
    steps: int | None = None
    max_text_len: int | None = None  # None: the task's default
    max_regions: int | None = None
    # standardize | none; None: standardize a fresh model, keep a checkpoint's own (docs/training.md)
    feature_norm: str | None = None
    clip_grad: float = 1.0
    activation_checkpointing: bool = False  # recompute layer activations in backward: memory for compute
    precision: str | None = None  # fp32 | bf16 | fp16; None: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    resume: bool = False
    seed: int = 0
    num_workers: int = 2
    resampled: bool = False  # draw shards with replacement, a fixed number of batches per rank and epoch
    shuffle_buffer: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    eval_every: int | None = None  # steps; None: at the end of every epoch
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True
    threads: int | None = None  # torch intra-op threads; None: OMP_NUM_THREADS, else what the cores allow

    def check_numbers(self) -> None:
        """Refuse numeric options that would train nonsense (a zero batch, negative steps) instead of using them."""
        rules = [  # (option, value, allowed, what it must be); None means "the default"
            ("--batch-size", self.batch_size, lambda v: v >= 1, "at least 1"),
            ("--grad-accum", self.grad_accum, lambda v: v >= 1, "at least 1"),
            ("--steps", self.steps, lambda v: v >= 1, "at least 1"),
            ("--epochs", self.epochs, lambda v: v > 0, "above 0"),
            ("--lr", self.lr, lambda v: v > 0, "above 0"),
            ("--bert-lr-mult", self.bert_lr_mult, lambda v: v >= 0, "0 or more"),
            ("--weight-decay", self.weight_decay, lambda v: v >= 0, "0 or more"),
            ("--warmup", self.warmup, lambda v: v >= 0, "0 or more"),
            ("--max-text-len", self.max_text_len, lambda v: v >= 3, "at least 3 ([CLS], a token, [SEP])"),
            ("--max-regions", self.max_regions, lambda v: v >= 1, "at least 1"),
            ("--clip-grad", self.clip_grad, lambda v: v > 0, "above 0"),
            ("--num-workers", self.num_workers, lambda v: v >= 0, "0 or more"),
            ("--shuffle-buffer", self.shuffle_buffer, lambda v: v >= 0, "0 or more"),
            ("--checkpoint-every", self.checkpoint_every, lambda v: v >= 1, "at least 1"),
            ("--keep-checkpoints", self.keep_checkpoints, lambda v: v >= 0, "0 (keep all) or more"),
            ("--eval-every", self.eval_every, lambda v: v >= 1, "at least 1"),
            ("--log-every", self.log_every, lambda v: v >= 1, "at least 1"),
            ("--threads", self.threads, lambda v: v >= 1, "at least 1"),
        ]
        for option, value, allowed, must in rules:
            # NaN fails every comparison, so it is refused too
            if value is not None and not allowed(value):
                raise TrainingError(f"{option} must be {must}, got {value}")

    def resolved(self) -> TrainArgs:
        """A copy with the task defaults filled in, checked for consistency."""
        if self.task not in tasks():
            raise TrainingError(f"--task {self.task!r} is not one of {', '.join(tasks())}")
        self.check_numbers()
        d = get_task(self.task).defaults
        out = dataclasses.replace(
            self,
            batch_size=self.batch_size or d.batch_size,
            lr=self.lr if self.lr is not None else d.lr,
            epochs=self.epochs if (self.epochs is not None or self.steps is not None) else d.epochs,
            max_text_len=self.max_text_len or d.max_text_len,
            max_regions=self.max_regions or d.max_regions,
        )
        if out.feature_norm not in (None, "standardize", "none"):
            raise TrainingError(f"--feature-norm {out.feature_norm!r} must be standardize or none")
        try:
            check_precision(out.precision)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        if out.vocab is None:
            raise TrainingError("--vocab is required: a vocab.txt or a Hugging Face tokenizer folder")
        return out


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
    if spec.data.needs_class_distributions and not (info.get("features") or {}).get("class_distributions", True):
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


def resolve_config(args: TrainArgs, vocab_size: int, feature_dim: int | None) -> Any:
    """The config of a freshly built model: a preset adapts to the data, a config file must match it."""
    from vilbert_core import ViLBERTConfig

    if args.config in ("vilbert-base", "tiny"):
        cfg = ViLBERTConfig.preset(args.config)
        # a preset built from scratch takes the vocabulary and feature size of the data
        cfg.vocab_size = vocab_size
        if feature_dim is not None:
            cfg.v_feature_size = feature_dim
        cfg.v_target_size = CLS_PROB_DIM
        return cfg
    if not Path(args.config).is_file():
        raise TrainingError(f"--config {args.config!r} is neither a preset (vilbert-base, tiny) nor a file")
    try:
        given = json.loads(Path(args.config).read_text(encoding="utf-8"))
        cfg = ViLBERTConfig.from_json_file(args.config)
    except (ValueError, TypeError) as err:
        raise TrainingError(f"--config {args.config}: not a ViLBERT config.json ({err})") from None
    cfg.vocab_size = vocab_size
    # a file that leaves the region feature size out (demo/vilbert_demo_config.json) takes the data's, as presets do
    if feature_dim is not None and "v_feature_size" not in given:
        cfg.v_feature_size = feature_dim
    return cfg


def check_model_matches(cfg: Any, vocab_size: int, feature_dim: int | None, where: str, vocab: str) -> None:
    """Clear errors for a vocabulary or feature size that the model was not built for."""
    if cfg.vocab_size != vocab_size:
        raise TrainingError(
            f"{where} was trained with a vocabulary of {cfg.vocab_size} tokens but --vocab {vocab} has "
            f"{vocab_size}: pass the vocabulary the checkpoint was trained with"
        )
    if feature_dim is not None and cfg.v_feature_size != feature_dim:
        if where.startswith("--config"):  # a fresh model: the file's number is what to change, not the features
            hint = (
                f" Set \"v_feature_size\": {feature_dim} in that file, or leave it out to follow the data."
            )
        elif cfg.v_feature_size == 2048:
            hint = " Released ViLBERT checkpoints expect 2048-d res5 features: extract with --feature-layer res5."
        else:
            hint = ""
        raise TrainingError(
            f"the region features are {feature_dim}-d but {where} expects v_feature_size="
            f"{cfg.v_feature_size}.{hint}"
        )


def build_model(
    args: TrainArgs,
    vocab_size: int,
    feature_dim: int | None,
    num_answers: int | None,
    resume_dir: Path | None,
    feature_stats: Any = None,
) -> tuple[nn.Module, set[str]]:
    """The model to train and the names of its BERT-initialised parameters (for the lr multiplier).

    feature_stats (pipelines.feature_stats.FeatureStats): what a new model standardises its region
    features with (needed when it is built with v_feature_norm="standardize", the default).
    """
    from vilbert_core import ViLBERTForPretraining, ViLBERTForTasks

    spec = get_task(args.task)
    tasks_model = spec.model_kind == "tasks"
    cls = ViLBERTForTasks if tasks_model else ViLBERTForPretraining
    # A checkpoint keeps its own VQA answer count unless the shards' answers.json gives one: forcing a
    # count onto a checkpoint whose VQA head has another size would make loading fail on the shape.
    kwargs: dict[str, Any] = {"num_answers": num_answers} if tasks_model and num_answers is not None else {}
    if tasks_model:  # a multi-task reference checkpoint holds one answer head per task: take this task's
        kwargs["reference_answer_head"] = spec.reference_answer_head
    bert_names: set[str] = set()
    source = resume_dir or (Path(args.init_from) if args.init_from else None)
    if source is not None:
        try:
            model = cls.from_pretrained(str(source), **kwargs)
        except (ValueError, FileNotFoundError) as err:  # a refused pickle, missing or mis-shaped tensors
            raise TrainingError(f"{'--resume' if resume_dir else '--init-from'} {source}: {err}") from None
        check_model_matches(model.config, vocab_size, feature_dim, f"the checkpoint {source}", args.vocab)
        if spec.data.needs_class_distributions and model.config.v_target_size != CLS_PROB_DIM:
            # masked region modelling predicts the detector's class distribution over its 1601 classes
            raise TrainingError(
                f"the checkpoint {source} predicts {model.config.v_target_size} region classes but the "
                f"features' class distributions have {CLS_PROB_DIM} (v_target_size)"
            )
        norm = model.config.v_feature_norm
        if args.feature_norm is not None and args.feature_norm != norm:
            raise TrainingError(
                f"--feature-norm {args.feature_norm}: the checkpoint {source} was trained with "
                f"v_feature_norm={norm!r}, and its weights only fit that input; drop --feature-norm"
            )
    else:
        cfg = resolve_config(args, vocab_size, feature_dim)
        check_model_matches(cfg, vocab_size, feature_dim, f"--config {args.config}", args.vocab)
        if tasks_model:
            cfg.num_answers = num_answers or 1
        cfg.v_feature_norm = args.feature_norm or "standardize"
        model = cls(cfg)
        if cfg.v_feature_norm == "standardize":
            if feature_stats is None:
                raise TrainingError("a model that standardises its region features needs their statistics")
            if feature_stats.feature_dim != cfg.v_feature_size:
                raise TrainingError(
                    f"feature statistics of {feature_stats.feature_dim}-d features, the model takes "
                    f"{cfg.v_feature_size}-d"
                )
            model.set_feature_stats(feature_stats.mean, feature_stats.std)
    if args.init_text_from and resume_dir is None:
        bert_names = set(load_bert_text_stream(model, args.init_text_from))
    return model, bert_names


def training_feature_stats(
    args: TrainArgs, factory: LoaderFactory, per_rank: int, ctx: DistContext, max_images: int = 2000
) -> tuple[Any, str]:
    """Per-dimension statistics of the training features, and where they came from.

    A TASKDIR written by `shard` carries them (feature_stats.json, over every region of the split).
    Otherwise (older TASKDIRs, shard URL lists) they are computed from the real regions of the first
    training batches, about `max_images` examples over all ranks, summed across ranks so every rank
    gets the same numbers.
    """
    from pipelines.feature_stats import RunningFeatureStats

    try:
        stats = load_task_feature_stats(args.data)
    except ValueError as err:
        raise TrainingError(f"--data {args.data}: {err}") from None
    if stats is not None:
        return stats, f"{args.data}/feature_stats.json"
    running = RunningFeatureStats()
    for batch in factory(args.data, 0, per_rank):
        feat, mask = batch["image_feat"], batch["image_mask"]
        feat = feat.reshape(-1, *feat.shape[-2:])[:, 1:]  # (N,R-1,D): candidates folded, [IMG] dropped
        keep = mask.reshape(-1, mask.shape[-1])[:, 1:] != 0
        for f, k in zip(feat, keep, strict=True):  # one example's real regions at a time
            running.add(f[k].double().numpy())
        if running.images * ctx.world_size >= max_images:
            break
    if running.sum is None:
        raise TrainingError(f"--data {args.data}: no regions to compute the feature statistics from")
    totals = all_reduce_sum(
        ctx, torch.from_numpy(np.concatenate([running.sum, running.sumsq, [running.regions, running.images]]))
    ).numpy()
    d = running.sum.shape[0]
    running.sum, running.sumsq = totals[:d], totals[d : 2 * d]
    running.regions, running.images = int(round(totals[2 * d])), int(round(totals[2 * d + 1]))
    return running.result(), f"the regions of the first {running.images} training examples (no feature_stats.json)"


def load_bert_text_stream(model: nn.Module, bert_dir: str) -> list[str]:
    """Load a Hugging Face BERT folder into the text stream; returns the loaded parameter names."""
    from vilbert_core import init_text_from_bert

    try:
        report = init_text_from_bert(model, bert_dir)
    except (FileNotFoundError, ValueError) as err:
        raise TrainingError(f"--init-text-from {bert_dir}: {err}") from None
    names = set(dict(model.named_parameters()))
    return sorted(n for n in report.loaded if n in names)


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


def _count_samples(info: dict[str, Any] | None, task: str) -> int | None:
    """Training examples per epoch from task.json counts (VCR: two stages per question)."""
    if not info:
        return None
    counts = info.get("counts", {})
    for key in ("samples", "records"):
        if isinstance(counts.get(key), int):
            return counts[key] * get_task(task).data.examples_per_record
    return None


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
        return Trainer(args, ctx, loader_factory).run()
    except (OSError, SafetensorError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        ckpt = latest_checkpoint(Path(args.out) / "checkpoints")
        raise TrainingError(
            f"{disk_full_error(args.out, 'the run folder')}; free space and continue with --resume"
            + (f" (from {ckpt})" if ckpt else "")
        ) from None
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
        self.args, self.ctx, self.spec = args, ctx, get_task(args.task)
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
        try:
            check_task_source(args.data, "--data")
            if args.val:
                check_task_source(args.val, "--val")
        except ValueError as err:
            raise TrainingError(str(err)) from None
        info = read_task_json(args.data)
        check_task_json(info, args.task, args.data)
        if args.val:
            check_task_json(read_task_json(args.val), args.task, args.val)
        self.tokenizer = load_tokenizer(args.vocab, args.max_text_len)
        self.answers = answers_file(args.data, info)
        self.num_answers = len(read_answers(args.data, info)) if self.answers else None
        if self.spec.answer_head and self.num_answers is None and args.init_from is None:
            raise TrainingError(f"{args.data}: {args.task} shards need their answers.json (answer_vocab in task.json)")
        self.feature_dim = (info or {}).get("features", {}).get("feature_dim")

        self.per_rank = args.batch_size // (ctx.world_size * args.grad_accum)
        if self.per_rank * ctx.world_size * args.grad_accum != args.batch_size:
            raise TrainingError(
                f"--batch-size {args.batch_size} must be a multiple of world size x grad accum = "
                f"{ctx.world_size} x {args.grad_accum}"
            )
        # total steps: --steps, or epochs x samples per epoch
        n_samples = _count_samples(info, args.task)
        if n_samples == 0:
            raise TrainingError(f"{args.data}: the task shards hold no training samples (task.json counts)")
        self.steps_per_epoch = math.ceil(n_samples / args.batch_size) if n_samples else None
        if args.steps is not None:
            self.total_steps = args.steps
        elif self.steps_per_epoch is None:
            raise TrainingError(f"{args.data}: the sample count is unknown (no task.json counts); pass --steps")
        else:
            self.total_steps = max(1, math.ceil(args.epochs * self.steps_per_epoch))
        if args.resampled and self.steps_per_epoch is None:
            raise TrainingError("--resampled needs the sample count of task.json to size an epoch")
        self.factory = loader_factory or default_loader_factory(args, ctx, steps_per_epoch=self.steps_per_epoch)
        self.stream = BatchStream(self.factory, args.data, self.per_rank, ctx)
        if self.feature_dim is None:  # shard URLs without a task.json: read the size off the first batch
            try:
                first = next(iter(self.factory(args.data, 0, self.per_rank)), None)
            except FileNotFoundError as err:
                raise TrainingError(f"{args.data}: {err}") from None
            if first is None:
                raise TrainingError(f"{args.data}: the data source yields no training samples")
            self.feature_dim = int(first["image_feat"].shape[-1])
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
            args, self.tokenizer.vocab_size, self.feature_dim, self.num_answers, self.resume_dir, stats
        )
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
        self.mask_gen = torch.Generator().manual_seed(args.seed * 1000 + ctx.rank)
        pretraining = self.spec.model_kind == "pretraining"
        masking = masking_spec(self.tokenizer, self.mask_gen) if pretraining else None
        # DDP wraps model + loss: heads another task uses (computed but not in the loss) then count as unused
        self.train_model: nn.Module = TaskLossModule(self.model, args.task, masking)
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
            self.stream.seek(state["epoch"], state["in_epoch"])
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
        # the last steps' alignment losses, to warn when pretraining alignment stays at chance
        self.align_window: collections.deque[float] = collections.deque(maxlen=max(10, min(50, self.total_steps // 10)))
        self.last_val: dict[str, float] | None = None
        self.t_last, self.samples_since = time.perf_counter(), 0

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
                if self.val_factory is not None and (
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

        warnings = training_warnings(args.task, list(self.align_window), self.last_val)
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
            "world_size": ctx.world_size,
            "rank": ctx.rank,
        }

    def step(self) -> tuple[float, torch.Tensor]:
        """One optimiser step: accumulate the micro-batches' gradients, stop on a NaN, clip, update.

        Returns the base learning rate it used and the gradient norm before clipping; the losses (mean
        over ranks) are in `self.last`.
        """
        args, ctx = self.args, self.ctx
        sums: dict[str, torch.Tensor] = {}
        for micro in range(args.grad_accum):
            batch = batch_to_device(self.stream.next(), ctx.device)
            sync = micro == args.grad_accum - 1 or not ctx.distributed
            with (
                contextlib.nullcontext() if sync else self.train_model.no_sync(),
                autocast(self.precision, ctx.device.type),
            ):
                losses = self.train_model(batch)
            self.scaler.scale(losses["loss"] / args.grad_accum).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / args.grad_accum
            self.samples_since += batch_size_of(batch) * ctx.world_size
            self.samples_seen += batch_size_of(batch) * ctx.world_size

        keys = sorted(sums)
        mean = all_reduce_mean(ctx, torch.stack([sums[k] for k in keys]))
        self.last = {k: float(v) for k, v in zip(keys, mean.tolist(), strict=True)}
        if "align" in self.last:
            self.align_window.append(self.last["align"])
        if not math.isfinite(self.last["loss"]):
            raise TrainingDiverged(
                f"the loss became {self.last['loss']} at step {self.step_count + 1}; training stopped. The last good "
                f"checkpoint is {self.last_good()} (continue from it with --resume, e.g. with a lower --lr)"
            )
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # the base rate of --lr: BERT-initialised groups run at bert_lr_mult times it, above or below
        lr = self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0]["lr_mult"]
        self.scheduler.step()
        self.step_count += 1
        return lr, grad_norm

    def log(self, lr: float, grad_norm: torch.Tensor) -> None:
        """A metrics.jsonl line every --log-every steps (and at the last), and the progress bar (main process)."""
        args, step = self.args, self.step_count
        now = time.perf_counter()
        if self.ctx.is_main:
            rate = self.samples_since / max(now - self.t_last, 1e-9)
            if step % args.log_every == 0 or step == self.total_steps:
                record = {
                    "step": step,
                    "epoch": self.stream.epoch,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "samples": self.samples_seen,
                    "samples_per_s": rate,
                }
                record.update({("loss" if k == "loss" else f"loss_{k}"): v for k, v in self.last.items()})
                self.log_file.write(record)
            if self.bar is not None:
                self.bar.set_postfix(
                    loss=f"{self.last['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}", ep=self.stream.epoch
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

