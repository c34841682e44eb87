"""The arguments of `vilbert-data train` (`TrainArgs`, checked and completed from the task's defaults) and its errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from extract.devices import check_precision
from vilbert_core.tasks import get_task, tasks


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
