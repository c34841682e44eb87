"""Load a model for evaluation: a run directory, a save_pretrained folder or a reference checkpoint.

A run directory (docs/contracts.md section 6) carries everything: `config.json` + `model.safetensors`
and `train_args.json` (task, vocabulary, answer list, text and region limits). A bare checkpoint
needs `vocab=` (and `answers=` for VQA). `RUNDIR/best` and `RUNDIR/checkpoints/step-N` find the
`train_args.json` of their run.

Which model class: the `model_class` recorded in `model.safetensors` by `save_pretrained`, else the
run's training task (pretrain -> ViLBERTForPretraining), else, for a reference `pytorch_model.bin`,
the heads its keys hold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from extract.config import MAX_BOXES
from extract.devices import resolve_device
from pipelines.tokenization import MAX_TEXT_LEN

logger = logging.getLogger(__name__)

KINDS = ("pretraining", "tasks")
_CLASS_KIND = {"ViLBERTForPretraining": "pretraining", "ViLBERTForTasks": "tasks"}


class EvalError(RuntimeError):
    """A problem with the evaluation inputs, with a message meant for the user."""


@dataclass
class LoadedModel:
    """A model in eval mode plus what is needed to feed it and read its outputs."""

    model: torch.nn.Module
    kind: str  # "pretraining" (MLM, MRM, alignment heads) or "tasks" (VQA, pair, region heads)
    tokenizer: Any  # pipelines.tokenization.TextTokenizer
    answers: list[str] | None  # VQA answer list (index = class id) when known
    max_text_len: int
    max_regions: int
    train_task: str | None  # the task the run was trained on, when known
    weights: Path
    device: torch.device
    train_data: str | None = None  # the run's training data (train_args.json), for blind baselines

    @property
    def feature_dim(self) -> int:
        """Region feature size the model expects."""
        return int(self.model.config.v_feature_size)


def find_train_args(path: Path) -> Path | None:
    """train_args.json of the run a model path belongs to (the path, its parent or grandparent)."""
    start = path if path.is_dir() else path.parent
    for d in (start, start.parent, start.parent.parent):
        if (d / "train_args.json").is_file():
            return d / "train_args.json"
    return None


def _weights_dir(path: Path) -> Path:
    """Folder or file to load weights from: a run without final weights falls back to best/."""
    if path.is_dir() and not any((path / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        if (path / "best" / "model.safetensors").is_file():
            logger.warning("%s has no final model.safetensors; using %s", path, path / "best")
            return path / "best"
        raise EvalError(
            f"--model {path}: no model.safetensors or pytorch_model.bin here (nor in best/); "
            "is this a run directory of `vilbert-data train` or a save_pretrained folder?"
        )
    if not path.exists():
        raise EvalError(f"--model {path}: no such file or folder")
    return path


def detect_kind(weights: Path, train_task: str | None) -> str:
    """'pretraining' or 'tasks' for a weights path (folder or file)."""
    file = weights
    if weights.is_dir():
        file = weights / "model.safetensors"
        if not file.is_file():
            file = weights / "pytorch_model.bin"
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            cls = (f.metadata() or {}).get("model_class")
        if cls in _CLASS_KIND:
            return _CLASS_KIND[cls]
    if train_task is not None:
        from vilbert_core.tasks import kind_for

        # an unknown task name (a newer or older run) trained task heads: only pretraining differs
        return kind_for(train_task) or "tasks"
    from vilbert_core.convert import reference_to_project
    from vilbert_core.torch_files import load_torch_file

    # a reference checkpoint: mmap keeps the peek at its key names cheap
    state = load_torch_file(file, mmap=True)
    heads = {(reference_to_project(k)[0] or "").split(".", 1)[0] for k in state}
    return "tasks" if heads & {"vqa_head", "pair_head", "region_head"} else "pretraining"


def load_model(
    path: str | Path,
    *,
    vocab: str | Path | None = None,
    answers: str | Path | None = None,
    device: str | torch.device = "auto",
    kind: str | None = None,
    max_text_len: int | None = None,
    max_regions: int | None = None,
    task: str | None = None,
) -> LoadedModel:
    """Load a run directory or checkpoint, its tokenizer and answer list, in eval mode on `device`.

    task: what the model is loaded for (default: its training task); a multi-task reference checkpoint
    gives that task's answer head.
    """
    from pipelines.tokenization import TextTokenizer
    from vilbert_core import ViLBERTForPretraining, ViLBERTForTasks

    path = Path(path)
    weights = _weights_dir(path)
    args_file = find_train_args(path)
    targs: dict[str, Any] = json.loads(args_file.read_text(encoding="utf-8")) if args_file else {}
    train_task = targs.get("task")
    vocab = vocab or targs.get("vocab")
    if vocab is None:
        raise EvalError(f"--model {path}: no train_args.json with a vocabulary; pass --vocab (a vocab.txt)")
    answers = answers or targs.get("answers_file")
    max_text_len = max_text_len or int(targs.get("max_text_len", MAX_TEXT_LEN))
    max_regions = max_regions or int(targs.get("max_regions", MAX_BOXES))
    try:
        kind = kind or detect_kind(weights, train_task)
    except SafetensorError as err:  # a truncated or foreign file: a message, not a traceback
        raise EvalError(f"--model {path}: cannot read the weights: {err}") from None
    except ValueError as err:  # a refused (malicious) or unreadable pickle; the message names the file
        raise EvalError(f"--model {path}: {err}") from None
    if kind not in KINDS:
        raise EvalError(f"model kind must be one of {KINDS}, got {kind!r}")

    answer_list = None
    if answers is not None:
        from pipelines.vqa_answers import load_answer_vocab

        answer_list = load_answer_vocab(answers)
    try:
        tokenizer = TextTokenizer.from_pretrained(vocab, max_len=max_text_len)
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(f"vocabulary {vocab}: {err}") from None

    cls = ViLBERTForPretraining if kind == "pretraining" else ViLBERTForTasks
    # a reference checkpoint carries no project config: its VQA head size comes from the answer list
    reference = weights.suffix == ".bin" or (
        weights.is_dir() and not (weights / "model.safetensors").is_file()
    )
    extra: dict[str, Any] = {"num_answers": len(answer_list)} if (kind == "tasks" and answer_list and reference) else {}
    if kind == "tasks" and reference:
        from vilbert_core.tasks import tasks

        spec = tasks().get(task or train_task or "")
        if spec is not None:
            extra["reference_answer_head"] = spec.reference_answer_head
    try:
        model = cls.from_pretrained(weights, **extra)
    except SafetensorError as err:
        raise EvalError(f"--model {path}: cannot read the weights: {err}") from None
    if model.config.vocab_size != tokenizer.vocab_size:
        raise EvalError(
            f"vocabulary {vocab} has {tokenizer.vocab_size} tokens but the model {weights} was built for "
            f"{model.config.vocab_size}; pass the --vocab the model was trained with"
        )
    if kind == "tasks" and answer_list is not None and len(answer_list) != model.config.num_answers:
        raise EvalError(
            f"answer list {answers} has {len(answer_list)} answers but the model's VQA head has "
            f"{model.config.num_answers}"
        )
    try:
        dev = resolve_device(device)
    except RuntimeError as err:  # CUDA asked for on a machine without it
        raise EvalError(str(err)) from None
    model.to(dev).eval()
    return LoadedModel(
        model=model,
        kind=kind,
        tokenizer=tokenizer,
        answers=answer_list,
        max_text_len=max_text_len,
        max_regions=max_regions,
        train_task=train_task,
        weights=weights,
        device=dev,
        # a multi-task run trained each task on its own TASKDIR
        train_data=(targs.get("task_data") or {}).get(task or "") or targs.get("data"),
    )
