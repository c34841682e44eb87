"""The task registry, model half: what training and evaluation do for each task.

One module per training task in this package (`pretrain.py`, `vqa.py`, `vcr.py`, ...), each defining
`TASK`, an instance of a `Task` subclass: the shard task it reads (its data half in `pipelines.tasks`:
reader, records -> examples, batch fields), the model it trains, its loss and validation score, its
paper defaults, how `eval` scores it (metric, blind baselines, shuffled-image check, report, plots,
predictions) and what `explain` shows for it. The trainer, the evaluator, model loading and explain
ask the registry instead of branching on the task name; modules are found by listing this package,
so a new task is a new module here (plus its data half, plus a reader when no existing one fits).

Task modules are imported on the first lookup, so that they may import the evaluation and training
helpers they build on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.tasks import DataTask, Registry, data_task
from vilbert_core.batches import IMAGE_KEYS, MODEL_KEYS, TEXT_KEYS, flatten_candidates, model_inputs

__all__ = ["IMAGE_KEYS", "MODEL_KEYS", "TEXT_KEYS", "EvalOptions", "Task", "TaskDefaults", "candidate_logits",
           "flatten_candidates", "get_task", "kind_for", "model_inputs", "tasks"]


@dataclass(frozen=True)
class TaskDefaults:
    """Paper / reference settings of one task: global batch, peak learning rate, epochs, lengths."""

    batch_size: int
    lr: float
    epochs: float
    metric: str  # validation score name (higher is better)
    max_text_len: int = 36  # tokens per text, [CLS]/[SEP] included
    max_regions: int = 36  # detected regions per image (+1 global [IMG] region)


@dataclass
class EvalOptions:
    """`vilbert-data eval` settings that a task's evaluation may read."""

    batch_size: int = 64
    progress: bool = True
    num_workers: int = 0
    seed: int = 0
    num_candidates: int = 100  # retrieval: candidates per query of the paper's protocol
    max_images: int | None = None  # retrieval: score only the first N images
    rerank_top_k: int = 0  # retrieval: rescore each query's top k of the (bf16) first pass in fp32
    vision_check: bool = True  # score again with every image's regions taken from another image
    train_data: str | Path | None = None  # the training TASKDIR, for blind baselines


class Task:
    """The model side of one task; subclass it in a module of this package and set `TASK`."""

    name: str = ""
    shard_task: str = ""  # the shard task it reads (`vilbert-data shard --task`)
    model_kind: str = "tasks"  # the model training builds: "tasks" (ViLBERTForTasks) or "pretraining"
    eval_kinds: tuple[str, ...] = ("tasks",)  # model kinds `eval` can score it with; the first is the usual one
    heads: str = ""  # what a model needs for it, in messages ("a VQA head")
    defaults: TaskDefaults
    answer_head: bool = False  # classifies over the shards' answers.json with the answer (VQA) head
    # the multi-task reference checkpoint's answer head this task reads (convert.py maps it to vqa_head)
    reference_answer_head: str = "vil_prediction"
    explain_head: str = "pair"  # what `explain --head auto` reports: align, vqa, refer or pair
    writes_predictions: bool = True  # eval writes <task>_predictions_<split>.json
    reranks: bool = False  # eval --rerank-top-k: the task ranks pairs and can rescore its top k exactly
    # a task that trains on part of its shard task's examples: the field values they must have
    # (VCR's stages as two tasks, as the multi-task reference); the examples per record then
    keep_examples: dict[str, Any] | None = None
    examples_per_record: int | None = None

    @property
    def data(self) -> DataTask:
        """The data half of the shard task it reads."""
        return data_task(self.shard_task)

    # -------------------------------------------------------------- training
    def loss(self, model: nn.Module, batch: dict[str, Any], masking: Any = None) -> dict[str, torch.Tensor]:
        """Forward one batch: {"loss": total, plus any components}."""
        raise NotImplementedError

    def validation_score(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Per-sample validation score in [0, 1] (higher is better), under no_grad."""
        raise NotImplementedError

    # -------------------------------------------------------------- evaluation
    def eval_setup(self, loaded: Any, options: EvalOptions) -> Any:
        """What every split's evaluation shares (e.g. a blind baseline fitted on the training split)."""
        return None

    def evaluate(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, setup: Any
    ) -> tuple[dict, Any]:
        """(metrics, predictions or other extra output) of one TASKDIR."""
        raise NotImplementedError

    def report(self, metrics: dict) -> tuple[list[str], dict[str, dict]]:
        """Task-specific Markdown lines of one split, and the groups left for the generic tables."""
        return [], {k: v for k, v in metrics.items() if isinstance(v, dict)}

    def write_predictions(self, split: str, extra: Any, out: Path) -> list[str]:
        """One split's prediction files in `out` (<task>_predictions_<split>.json, when the task writes one); their names."""
        if not self.writes_predictions:
            return []
        from pipelines.fileio import atomic_write_json
        from vilbert_core.evaluation.common import file_safe

        name = f"{self.name}_predictions_{file_safe(split)}.json"
        atomic_write_json(out / name, extra, sort_keys=False)
        return [name]

    def plots(self, split: str, metrics: dict, extra: Any, out: Path) -> list[str]:
        """Plots of one split written into `out`; their file names."""
        return []

    def finish(self, results: dict[str, dict], out: Path) -> list[str]:
        """After every split: add summary splits to `results`, write summary plots; their file names."""
        return []


def candidate_logits(model: nn.Module, batch: dict[str, Any], shared_image: bool) -> torch.Tensor:
    """(B, C) pair logits of a batch of C candidates per sample (see flatten_candidates)."""
    inputs, c = flatten_candidates(batch, shared_image)
    return model(**inputs).pair_logit.view(-1, c)


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY = Registry(__name__, Path(__file__).parent)


def tasks() -> dict[str, Task]:
    """Every training task by name."""
    return _REGISTRY.all()


def get_task(name: str) -> Task:
    """The spec of a training task; ValueError naming the tasks there are for any other name."""
    return _REGISTRY.get(name)


def kind_for(task: str | None) -> str | None:
    """The model kind a run of `task` trained (its shard task's name is accepted too); None when unknown."""
    for spec in tasks().values():
        if task in (spec.name, spec.shard_task):
            return spec.model_kind
    return None
