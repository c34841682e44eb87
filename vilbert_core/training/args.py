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
    clip_grad: float = 1.0  # global gradient-norm threshold; 0: no clipping
    # with no clipping, no accumulation, one process and no fp16 scaling: apply each parameter's update
    # as soon as backward has its gradient and free it (same results, less memory; docs/training.md)
    update_in_backward: bool = True
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
    # multi-task training (task = "vqa,refcoco,..."): per task its TASKDIR, validation TASKDIR, peak lr,
    # global batch and iteration gap (trained on every Nth round of the round-robin); docs/training.md
    task_data: dict[str, str] | None = None
    task_val: dict[str, str] | None = None
    task_lr: dict[str, float] | None = None
    task_batch_size: dict[str, int] | None = None
    task_iter_gap: dict[str, int] | None = None
    schedule: str = "round-robin"  # round-robin | proportional (to the tasks' training examples)
    task_tokens: bool = False  # a learned task embedding at [CLS] per task (12-in-1's task-specific tokens)

    @property
    def task_names(self) -> list[str]:
        """The tasks of the run, in the order given (one for a single-task run)."""
        return [name.strip() for name in self.task.split(",") if name.strip()]

    @property
    def multi_task(self) -> bool:
        """Whether the run trains several tasks at once."""
        return len(self.task_names) > 1

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
            ("--clip-grad", self.clip_grad, lambda v: v >= 0, "0 (no clipping) or more"),
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
        for name in self.task_names or [self.task]:
            if name not in tasks():
                raise TrainingError(f"--task {name!r} is not one of {', '.join(tasks())}")
        self.check_numbers()
        if self.multi_task:
            return self._resolved_multi_task()
        d = get_task(self.task).defaults
        out = dataclasses.replace(
            self,
            batch_size=self.batch_size or d.batch_size,
            lr=self.lr if self.lr is not None else d.lr,
            epochs=self.epochs if (self.epochs is not None or self.steps is not None) else d.epochs,
            max_text_len=self.max_text_len or d.max_text_len,
            max_regions=self.max_regions or d.max_regions,
        )
        return out.checked()

    def checked(self) -> TrainArgs:
        """This, once the options every run shares are known to be valid."""
        if self.feature_norm not in (None, "standardize", "none"):
            raise TrainingError(f"--feature-norm {self.feature_norm!r} must be standardize or none")
        try:
            check_precision(self.precision)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        if self.vocab is None:
            raise TrainingError("--vocab is required: a vocab.txt or a Hugging Face tokenizer folder")
        return self

    def _resolved_multi_task(self) -> TrainArgs:
        """A multi-task run: every task's data, lr, batch and gap known; the shared settings from the tasks' defaults."""
        names = self.task_names
        if len(set(names)) != len(names):
            raise TrainingError(f"--task {self.task}: a task is named twice")
        specs = [get_task(n) for n in names]
        if any(s.model_kind != "tasks" for s in specs):
            raise TrainingError("--task: pretraining trains another model (its own heads); it cannot be one of several tasks")
        answer_tasks = [s.name for s in specs if s.answer_head]
        if len(answer_tasks) > 1:
            raise TrainingError(
                f"--task: {' and '.join(answer_tasks)} both classify with the one answer head; train them in separate runs"
            )
        data = dict(self.task_data or {})
        missing = [n for n in names if n not in data]
        if missing:
            raise TrainingError(f"--data: no TASKDIR for {', '.join(missing)} (give --data TASK=DIR for every task)")
        for option, given in (("--data", data), ("--val", self.task_val), ("--task-lr", self.task_lr),
                              ("--task-batch-size", self.task_batch_size), ("--task-iter-gap", self.task_iter_gap)):  # fmt: skip
            extra = sorted(set(given or {}) - set(names))
            if extra:
                raise TrainingError(f"{option}: {', '.join(extra)} is not one of the tasks ({self.task})")
        if self.schedule not in ("round-robin", "proportional"):
            raise TrainingError(f"--schedule {self.schedule!r} must be round-robin or proportional")
        lr = {n: float((self.task_lr or {}).get(n, s.defaults.lr)) for n, s in zip(names, specs, strict=True)}
        batch = {n: int((self.task_batch_size or {}).get(n, s.defaults.batch_size)) for n, s in zip(names, specs, strict=True)}
        gap = {n: int((self.task_iter_gap or {}).get(n, 1)) for n in names}
        for option, values in (("--task-lr", lr), ("--task-batch-size", batch), ("--task-iter-gap", gap)):
            bad = {n: v for n, v in values.items() if not v > 0}
            if bad:
                raise TrainingError(f"{option}: {bad} must be above 0")
        if self.batch_size is not None:  # one --batch-size applies to every task without its own
            batch = {n: int((self.task_batch_size or {}).get(n, self.batch_size)) for n in names}
        out = dataclasses.replace(
            self,
            task=",".join(names),
            data=data[names[0]],
            val=None,
            task_data=data,
            task_val=dict(self.task_val or {}),
            task_lr=lr,
            task_batch_size=batch,
            task_iter_gap=gap,
            # the optimiser's base rate; each step scales it to its task's lr
            lr=self.lr if self.lr is not None else max(lr.values()),
            batch_size=batch[names[0]],
            epochs=self.epochs if (self.epochs is not None or self.steps is not None) else specs[0].defaults.epochs,
            max_text_len=self.max_text_len or max(s.defaults.max_text_len for s in specs),
            max_regions=self.max_regions or max(s.defaults.max_regions for s in specs),
        )
        if self.lr is not None and self.task_lr is None:  # one --lr for every task
            out.task_lr = {n: float(self.lr) for n in names}
        return out.checked()

    def for_task(self, name: str) -> TrainArgs:
        """The single-task arguments of one task of a multi-task run (its data, validation, lr and batch)."""
        return dataclasses.replace(
            self,
            task=name,
            data=(self.task_data or {})[name],
            val=(self.task_val or {}).get(name),
            lr=(self.task_lr or {})[name],
            batch_size=(self.task_batch_size or {})[name],
            task_data=None, task_val=None, task_lr=None, task_batch_size=None, task_iter_gap=None,
        )  # fmt: skip
