"""`run_eval`: score a model on task shards with the task's official metric and write a report.

The task's spec (`vilbert_core/tasks/`) turns task shards (docs/contracts.md section 3, through
`pipelines.datasets`) into metrics and predictions; this module checks the inputs, runs it over every
`--data` folder and writes the report folder:

- `metrics.json`: {"task", "model", "model_kind", "device", "splits": {split: metrics}};
- `report.md`: the same numbers as Markdown tables;
- plots: `accuracy_by_answer_type_<split>.png` (VQA), `accuracy_<split>.png` (VCR),
  `accuracy_by_split.png` (RefCOCO, every split in one chart), `recall_at_k_<split>.png` (retrieval);
- predictions: `vqa_predictions_<split>.json` in the official submission format
  [{"question_id", "answer"}], `vcr_predictions_<split>.json`, `refcoco_predictions_<split>.json`.

Several `--data` folders (e.g. RefCOCO val, testA, testB) are scored one after the other and reported
per split (the `split` of each task.json).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extract.devices import autocast, check_precision
from pipelines.fileio import atomic_write_json, check_out_dir, make_out_dir
from pipelines.formats.tasks import read_task_json
from vilbert_core.tasks import EvalOptions, Task, get_task, tasks
from vilbert_core.tasks.vqa import vqa_comparison  # noqa: F401  (the demo's summary reads it from here)

from .common import fmt
from .loading import EvalError, LoadedModel, load_model

logger = logging.getLogger(__name__)

EVAL_PRECISIONS = ("fp32", "bf16")

# ---------------------------------------------------------------------------------------------- inputs
def read_task_info(data_dir: Path) -> dict[str, Any]:
    """task.json of a TASKDIR, with a clear error when it is missing (saying what is there instead) or damaged."""
    try:
        return read_task_json(data_dir, "--data")
    except ValueError as err:
        raise EvalError(str(err)) from None


def _split_name(info: dict[str, Any], data_dir: Path, taken: set[str]) -> str:
    """The split name for the report (task.json's split, made unique)."""
    name = str(info.get("split") or data_dir.name)
    base, i = name, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _check_feature_dim(loaded: LoadedModel, info: dict[str, Any], data_dir: Path) -> None:
    """Fail clearly when the task shards' features differ in size from what the model expects."""
    dim = (info.get("features") or {}).get("feature_dim")
    if dim is not None and int(dim) != loaded.feature_dim:
        hint = " (extract with --feature-layer res5)" if loaded.feature_dim == 2048 else ""
        raise EvalError(
            f"--data {data_dir}: {dim}-d region features but the model expects {loaded.feature_dim}-d{hint}"
        )


def _require_kind(loaded: LoadedModel, spec: Task) -> None:
    """Fail clearly when the model lacks the heads the task reads."""
    if loaded.kind not in spec.eval_kinds:
        kind = spec.eval_kinds[0]
        hint = f"; fine-tune it first with `vilbert-data train --task {spec.name}`" if kind == "tasks" else ""
        raise EvalError(
            f"--task {spec.name} needs a model with {spec.heads}, but {loaded.weights} is a {loaded.kind} model{hint}"
        )


def _check_rerank(k: int, spec: Task, precision: str) -> None:
    """--rerank-top-k needs a task that ranks pairs and a first pass cheaper than the exact one."""
    if not k:
        return
    if k < 0:
        raise EvalError(f"--rerank-top-k must be 0 (off) or a positive number, got {k}")
    if not spec.reranks:
        raise EvalError(f"--rerank-top-k: --task {spec.name} ranks no pairs; it applies to retrieval")
    if precision == "fp32":
        raise EvalError("--rerank-top-k rescores a bf16 first pass in fp32; with --precision fp32 every score "
                        "is already exact: add --precision bf16, or drop --rerank-top-k")  # fmt: skip


# ---------------------------------------------------------------------------------------------- report
def markdown_report(task: str, model: str, results: dict[str, dict]) -> str:
    """Every split's metrics as Markdown: warnings, scalars, the model beside its baselines, then groups."""
    spec = get_task(task)
    lines = [f"# Evaluation: {task}", "", f"Model: `{model}`", ""]
    for split, m in results.items():
        lines += [f"## {split}", ""]
        lines += [f"> **Warning**: {w}" for w in m.get("warnings", [])] + ([""] if m.get("warnings") else [])
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in m.items() if not isinstance(v, dict | list)] + [""]
        own, groups = spec.report(m)  # the task's own tables, and the groups it leaves to the generic ones
        lines += own
        for name, sub in groups.items():
            if name == "baselines":
                lines += ["| baseline | metric | value |", "|---|---|---|"]
                lines += [f"| {b} | {k} | {fmt(v)} |" for b, vals in sub.items() for k, v in vals.items()] + [""]
                continue
            lines += [f"| {name} | value |", "|---|---|"]
            lines += [f"| {k} | {fmt(v)} |" for k, v in sub.items()] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- entry point
def run_eval(
    task: str,
    model: str | Path | LoadedModel,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    batch_size: int = 64,
    device: str = "auto",
    *,
    vocab: str | Path | None = None,
    answers: str | Path | None = None,
    num_candidates: int = 100,
    seed: int = 0,
    precision: str = "fp32",
    num_workers: int = 0,
    max_images: int | None = None,
    progress: bool = True,
    train_data: str | Path | None = None,
    vision_check: bool = True,
    rerank_top_k: int = 0,
) -> dict[str, Any]:
    """Evaluate `model` on the TASKDIR(s) in `data` for `task`; write the report to `out`; return metrics.json.

    precision: "fp32" (default, exact) or "bf16" (autocast; faster on GPUs, scores may move slightly).
    num_workers: DataLoader worker processes reading the shards (0: in this process).
    max_images: retrieval only: score the first N images of the test set and their captions.
    train_data: VQA, GQA: the training TASKDIR the blind baselines (question-only prior, majority answer)
    are fitted on; default: the run's training data (train_args.json).
    vision_check: tasks with a shuffled-image check (VQA, VCR, RefCOCO, ...): score again with every
    image's regions taken from another image.
    rerank_top_k: retrieval with precision "bf16" only: rescore each query's top k pairs of the bf16
    pass in fp32 and rank them first (0: off).
    Every split's metrics get "baselines" (blind or chance scores) and "warnings" (e.g. the model
    does not use the image); warnings are also logged.
    """
    if task not in tasks():
        raise EvalError(f"--task {task!r} is not one of {', '.join(tasks())}")
    spec = get_task(task)
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    try:
        check_precision(precision, EVAL_PRECISIONS)
    except ValueError as err:
        raise EvalError(str(err)) from None
    _check_rerank(rerank_top_k, spec, precision)
    check_out_dir(out)  # before the model is loaded
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, vocab=vocab, answers=answers, device=device, task=task)
    )
    _require_kind(loaded, spec)
    try:
        loaded.model.set_task(task)  # a multi-task model with task tokens conditions on the task
    except ValueError as err:
        raise EvalError(f"--model {loaded.weights}: {err}") from None
    if loaded.kind != spec.eval_kinds[0]:
        logger.info("%s model: zero-shot %s", loaded.kind, task)
    data_dirs = [Path(data)] if isinstance(data, str | Path) else [Path(d) for d in data]
    out = make_out_dir(out)
    options = EvalOptions(batch_size=batch_size, progress=progress, num_workers=num_workers, seed=seed,
                          num_candidates=num_candidates, max_images=max_images, vision_check=vision_check,
                          train_data=train_data, rerank_top_k=rerank_top_k)  # fmt: skip
    setup = spec.eval_setup(loaded, options)  # e.g. a blind baseline fitted on the training split

    results: dict[str, dict] = {}
    files: list[str] = []
    for data_dir in data_dirs:
        info = read_task_info(data_dir)
        if info.get("task") not in (None, spec.shard_task):
            raise EvalError(
                f"--data {data_dir}: task shards of {info['task']!r}, but --task {task} reads {spec.shard_task!r} shards"
            )
        _check_feature_dim(loaded, info, data_dir)
        split = _split_name(info, data_dir, set(results))
        # bf16 autocast only wraps the forward passes; metrics are computed from fp32 copies
        with autocast(precision, loaded.device.type):
            metrics, extra = spec.evaluate(loaded, data_dir, info, options, setup)
        results[split] = metrics
        for warning in metrics.get("warnings", []):
            logger.warning("%s (%s): %s", task, split, warning)
        files += spec.write_predictions(split, extra, out)
        files += spec.plots(split, metrics, extra, out)

    files += spec.finish(results, out)  # e.g. RefCOCO's split "all" and its accuracy by split
    record = {
        "task": task,
        "model": str(loaded.weights),
        "model_kind": loaded.kind,
        "trained_task": loaded.train_task,
        "device": str(loaded.device),
        "precision": precision,
        "data": [str(d) for d in data_dirs],
        "splits": results,
        "files": sorted(files),
    }
    (out / "report.md").write_text(markdown_report(task, str(loaded.weights), results), encoding="utf-8")
    atomic_write_json(out / "metrics.json", record, sort_keys=False)
    return record
