"""`run_eval`: score a model on task shards with the tasks' official metrics and write a report.

One function per task turns task shards (docs/contracts.md section 3, through `pipelines.datasets`)
into predictions, and `metrics.py` turns predictions into numbers. The report folder gets:

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

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipelines.writers import atomic_write_json
from vilbert_core.training.trainer import SHARD_TASK  # the shard task each task reads

from .loading import EvalError, LoadedModel, load_model
from .metrics import (
    RECALL_KS,
    alignment_stats,
    masked_region_kl_stats,
    masked_token_stats,
    pretrain_summary,
    recall_at_k,
    refcoco_correct,
    retrieval_ranks,
    vcr_accuracy,
    vqa_accuracy,
)

logger = logging.getLogger(__name__)

EVAL_TASKS = ("pretrain", "vqa", "vcr", "refcoco", "retrieval")
MODEL_KEYS = ("input_ids", "token_type_ids", "attention_mask", "image_feat", "image_loc", "image_mask")


# ---------------------------------------------------------------------------------------------- helpers
def read_task_info(data_dir: Path) -> dict[str, Any]:
    """task.json of a TASKDIR, with a clear error when it is missing."""
    info_path = data_dir / "task.json"
    if not info_path.is_file():
        raise EvalError(
            f"--data {data_dir}: no task.json; is this a TASKDIR written by `vilbert-data shard`?"
        )
    return json.loads(info_path.read_text(encoding="utf-8"))


def _split_name(info: dict[str, Any], data_dir: Path, taken: set[str]) -> str:
    """The split name for the report (task.json's split, made unique)."""
    name = str(info.get("split") or data_dir.name)
    base, i = name, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _record_count(info: dict[str, Any]) -> int | None:
    """A progress total: the record count of task.json, when it has one."""
    records = (info.get("counts") or {}).get("records")
    return records if isinstance(records, int) else None


def _batches(
    loaded: LoadedModel, data_dir: Path, shard_task: str, batch_size: int, seed: int, num_workers: int = 0
) -> Iterator[dict]:
    """Padded batches of a TASKDIR (no shuffle buffer, no resampling; workers split the shards).

    Results are keyed by question / annotation / ref ids, so the order across workers does not matter;
    pretraining negatives depend on the worker count (seeded per worker), so keep it fixed to compare runs.
    """
    from torch.utils.data import DataLoader

    from pipelines.datasets import TaskDataset

    ds = TaskDataset(
        str(data_dir),
        shard_task,
        loaded.tokenizer,
        batch_size=batch_size,
        max_text_len=loaded.max_text_len,
        max_regions=loaded.max_regions,
        shuffle_buffer=1,
        seed=seed,
        num_answers=len(loaded.answers) if (shard_task == "vqa" and loaded.answers) else None,
        feature_dim=loaded.feature_dim,
    )
    source = ds if num_workers == 0 else DataLoader(ds, batch_size=None, num_workers=num_workers)
    for batch in source:
        yield {k: v.to(loaded.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model inputs of a flat batch."""
    return {k: batch[k] for k in MODEL_KEYS}


def _check_feature_dim(loaded: LoadedModel, info: dict[str, Any], data_dir: Path) -> None:
    """Fail clearly when the task shards' features differ in size from what the model expects."""
    dim = (info.get("features") or {}).get("feature_dim")
    if dim is not None and int(dim) != loaded.feature_dim:
        hint = " (extract with --feature-layer res5)" if loaded.feature_dim == 2048 else ""
        raise EvalError(
            f"--data {data_dir}: {dim}-d region features but the model expects {loaded.feature_dim}-d{hint}"
        )


# the model kind and heads each task reads (retrieval scores with either kind)
_NEEDS = {"vqa": ("tasks", "a VQA head"), "vcr": ("tasks", "a pair head"), "refcoco": ("tasks", "a region head"),
          "pretrain": ("pretraining", "the MLM, MRM and alignment heads")}  # fmt: skip


def _require_kind(loaded: LoadedModel, task: str) -> None:
    """Fail clearly when the model lacks the heads `task` reads."""
    kind, heads = _NEEDS.get(task, (loaded.kind, ""))
    if loaded.kind != kind:
        hint = f"; fine-tune it first with `vilbert-data train --task {task}`" if kind == "tasks" else ""
        raise EvalError(
            f"--task {task} needs a model with {heads}, but {loaded.weights} is a {loaded.kind} model{hint}"
        )


# ---------------------------------------------------------------------------------------------- VQA
@torch.inference_mode()
def eval_vqa(
    loaded: LoadedModel, data_dir: Path, info: dict, batch_size: int, progress: bool, num_workers: int = 0
) -> tuple[dict, Any]:
    """Official VQA accuracy (overall, per answer type) and the predictions in submission format."""
    _require_kind(loaded, "vqa")
    if loaded.answers is None and info.get("answer_vocab"):
        from pipelines.vqa_answers import load_answer_vocab

        # the shards' answer list is the training split's (docs/contracts.md section 3)
        loaded.answers = load_answer_vocab(data_dir / info["answer_vocab"])
        logger.warning("no answer list with the model; using %s", data_dir / info["answer_vocab"])
    if loaded.answers is None:
        raise EvalError("vqa needs the answer list: a run directory with answers.json, or --answers FILE")
    if len(loaded.answers) != loaded.model.config.num_answers:
        raise EvalError(
            f"{len(loaded.answers)} answers in the answer list but the model's VQA head has "
            f"{loaded.model.config.num_answers}"
        )
    predictions: dict[int, str] = {}
    questions: list[dict] = []
    bar = tqdm(total=_record_count(info), desc="vqa", unit="q", disable=not progress)
    for batch in _batches(loaded, data_dir, "vqa", batch_size, 0, num_workers):
        logits = loaded.model(**_inputs(batch)).vqa_logits  # (B,A)
        for qid, a, gts, atype in zip(
            batch["question_id"].tolist(),
            logits.argmax(-1).tolist(),
            batch["answers"],
            batch["answer_type"],
            strict=True,
        ):
            predictions[qid] = loaded.answers[a]
            questions.append({"question_id": qid, "answers": gts, "answer_type": atype})
        bar.update(len(batch["image_id"]))
    bar.close()
    if not questions:
        raise EvalError(f"--data {data_dir}: no questions")
    submission = [{"question_id": q, "answer": predictions[q]} for q in sorted(predictions)]
    with_answers = [q for q in questions if q["answers"]]
    metrics: dict[str, Any] = {"num_questions": len(questions)}
    if with_answers:  # test splits ship no answers: predictions only
        acc = vqa_accuracy(predictions, with_answers)
        metrics.update({k: acc[k] for k in ("overall", "per_answer_type", "num_questions")})
    return metrics, submission


# ---------------------------------------------------------------------------------------------- VCR
@torch.inference_mode()
def eval_vcr(
    loaded: LoadedModel, data_dir: Path, info: dict, batch_size: int, progress: bool, num_workers: int = 0
) -> tuple[dict, Any]:
    """VCR Q->A, QA->R and Q->AR accuracy; predictions are the 4 choice probabilities per stage."""
    _require_kind(loaded, "vcr")
    probs: dict[str, dict[str, list[float]]] = {}
    labels: dict[str, dict[str, int]] = {}
    bar = tqdm(desc="vcr", unit="q", disable=not progress)
    for batch in _batches(loaded, data_dir, "vcr", batch_size, 0, num_workers):
        b, c, t = batch["input_ids"].shape  # (B,4,T); image tensors (B,R,...) shared by the 4 choices
        inputs = {k: batch[k].reshape(b * c, t) for k in MODEL_KEYS[:3]}
        for k in MODEL_KEYS[3:]:
            inputs[k] = batch[k].repeat_interleave(c, dim=0)
        p = loaded.model(**inputs).pair_logit.float().view(b, c).softmax(-1)  # (B,4)
        for aid, stage, row, lab in zip(batch["annot_id"], batch["vcr_stage"], p.tolist(), batch["label"].tolist(),
                                        strict=True):  # fmt: skip
            probs.setdefault(aid, {})[stage] = row
            labels.setdefault(aid, {})[stage] = lab
        bar.update(b)
    bar.close()
    if not probs:
        raise EvalError(f"--data {data_dir}: no VCR questions")
    predictions = {aid: {f"{s}_probs": v for s, v in st.items()} for aid, st in sorted(probs.items())}
    both = [a for a in sorted(probs) if {"q_a", "qa_r"} <= probs[a].keys() and labels[a]["q_a"] >= 0]
    metrics: dict[str, Any] = {"num_questions": len(probs)}
    if both:

        def argmax(v: list[float]) -> int:
            return max(range(len(v)), key=v.__getitem__)

        metrics.update(
            vcr_accuracy(
                [argmax(probs[a]["q_a"]) for a in both],
                [labels[a]["q_a"] for a in both],
                [argmax(probs[a]["qa_r"]) for a in both],
                [labels[a]["qa_r"] for a in both],
            )
        )
    return metrics, predictions


# ---------------------------------------------------------------------------------------------- RefCOCO
@torch.inference_mode()
def eval_refcoco(
    loaded: LoadedModel, data_dir: Path, info: dict, batch_size: int, progress: bool, num_workers: int = 0
) -> tuple[dict, Any]:
    """Accuracy: the top-scoring detected region has IoU >= 0.5 with the referred box."""
    _require_kind(loaded, "refcoco")
    correct_all: list[bool] = []
    predictions: list[dict] = []
    bar = tqdm(total=_record_count(info), desc="refcoco", unit="ref", disable=not progress)
    for batch in _batches(loaded, data_dir, "refcoco", batch_size, 0, num_workers):
        logits = loaded.model(**_inputs(batch)).region_logits  # (B,R)
        valid = batch["image_mask"].bool().clone()
        valid[:, 0] = False  # the global [IMG] region is not a box to point at
        correct = refcoco_correct(logits, batch["region_iou"], valid)
        top = logits.float().masked_fill(~valid, float("-inf")).argmax(-1)
        for ref, ok, r, iou in zip(batch["ref_id"], correct.tolist(), top.tolist(), batch["region_iou"].tolist(),
                                   strict=True):  # fmt: skip
            # region index r counts the global region: detected box r - 1 of the image
            predictions.append({"ref_id": ref, "region": r - 1, "iou": iou[r], "correct": ok})
        correct_all.extend(correct.tolist())
        bar.update(len(batch["image_id"]))
    bar.close()
    if not correct_all:
        raise EvalError(f"--data {data_dir}: no referring expressions")
    return {
        "accuracy": 100.0 * sum(correct_all) / len(correct_all),
        "num_refs": len(correct_all),
    }, predictions


# ---------------------------------------------------------------------------------------------- pretraining
@torch.inference_mode()
def eval_pretrain(
    loaded: LoadedModel,
    data_dir: Path,
    info: dict,
    batch_size: int,
    progress: bool,
    seed: int = 0,
    num_workers: int = 0,
) -> tuple[dict, None]:
    """Masked-token accuracy and perplexity, masked-region KL and alignment accuracy on held-out captions.

    Masking follows training (15% of tokens 80/10/10, 15% of regions 90% zeroed) from a generator
    seeded with `seed`; as in training, misaligned pairs are not scored for MLM and MRM.
    """
    from vilbert_core.training.masking import IGNORE_INDEX, mask_regions, mask_tokens

    _require_kind(loaded, "pretrain")
    tok = loaded.tokenizer
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    sums_tok = {"correct": 0, "nll": 0.0, "count": 0}
    sums_reg = {"kl": 0.0, "count": 0}
    sums_al = {"correct": 0, "count": 0}
    bar = tqdm(total=_record_count(info), desc="pretrain", unit="pair", disable=not progress)
    for batch in _batches(loaded, data_dir, "captions", batch_size, seed, num_workers):
        aligned = batch["align_label"] > 0.5  # (B,)
        ids, mlm_labels = mask_tokens(
            batch["input_ids"], batch["attention_mask"], mask_token_id=tok.mask_id, vocab_size=tok.vocab_size,
            special_token_ids=(tok.pad_id, tok.cls_id, tok.sep_id), generator=gen,
        )  # fmt: skip
        feat, region_labels = mask_regions(batch["image_feat"], batch["image_mask"], generator=gen)
        mlm_labels = mlm_labels.masked_fill(~aligned[:, None], IGNORE_INDEX)
        masked_regions = (region_labels == 1) & aligned[:, None]
        inputs = {**_inputs(batch), "input_ids": ids, "image_feat": feat}
        out = loaded.model(**inputs)
        if out.mrm_logits.shape[-1] != batch["image_target"].shape[-1]:
            raise EvalError(
                f"the model predicts {out.mrm_logits.shape[-1]} region classes but the shards' detector "
                f"distributions have {batch['image_target'].shape[-1]}"
            )
        for total, part in (
            (sums_tok, masked_token_stats(out.mlm_logits, mlm_labels, IGNORE_INDEX)),
            (sums_reg, masked_region_kl_stats(out.mrm_logits, batch["image_target"], masked_regions)),
            (sums_al, alignment_stats(out.align_logit, batch["align_label"])),
        ):
            for k, v in part.items():
                total[k] += v
        bar.update(len(batch["image_id"]))
    bar.close()
    if sums_al["count"] == 0:
        raise EvalError(f"--data {data_dir}: no captions")
    return pretrain_summary(sums_tok, sums_reg, sums_al), None


# ---------------------------------------------------------------------------------------------- retrieval
def read_retrieval_set(
    loaded: LoadedModel, data_dir: Path, max_images: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """All images (padded regions) and all captions (padded tokens) of retrieval task shards.

    max_images: keep only the first N images in shard order (and their captions), for quick checks.

    Returns (image tensors {image_feat (N,R,D), image_loc (N,R,5), image_mask (N,R)},
    text tensors {input_ids, token_type_ids, attention_mask (M,T)}, caption -> image index (M,), image ids).
    """
    import webdataset as wds

    from pipelines.datasets import build_regions, collate, expand_urls
    from pipelines.shard_job import iter_tar_samples

    urls, _ = expand_urls(str(data_dir))
    examples: list[dict] = []
    texts: list[str] = []
    caption_image: list[int] = []
    for url in urls:
        if max_images is not None and len(examples) >= max_images:
            break
        with wds.gopen(url, "rb") as stream:
            for key, sample in iter_tar_samples(stream, url):
                if max_images is not None and len(examples) >= max_images:
                    break
                records = json.loads(sample["ann.json"])
                regions = build_regions(sample, loaded.max_regions)
                if regions.feat.shape[1] != loaded.feature_dim:
                    raise EvalError(
                        f"{url}: sample {key} has {regions.feat.shape[1]}-d features, the model expects "
                        f"{loaded.feature_dim}-d"
                    )
                for r in records:
                    texts.append(r["caption"])
                    caption_image.append(len(examples))
                examples.append(
                    {
                        "task": "retrieval",
                        "image_id": key,
                        "texts": [([0], [0])],
                        "regions": [regions],
                        "label": 0,
                    }
                )
    if not examples or not texts:
        raise EvalError(f"--data {data_dir}: no images or no captions")
    # collate pads the regions; the dummy text of each image is dropped
    img_batch = collate(examples)
    images = {k: img_batch[k] for k in ("image_feat", "image_loc", "image_mask")}
    encoded = loaded.tokenizer.encode_batch(texts)
    t = max(len(ids) for ids, _ in encoded)
    text = {k: torch.zeros(len(encoded), t, dtype=torch.long) for k in MODEL_KEYS[:3]}
    text["input_ids"].fill_(loaded.tokenizer.pad_id)
    for i, (ids, seg) in enumerate(encoded):
        text["input_ids"][i, : len(ids)] = torch.tensor(ids)
        text["token_type_ids"][i, : len(seg)] = torch.tensor(seg)
        text["attention_mask"][i, : len(ids)] = 1
    return images, text, torch.tensor(caption_image), [e["image_id"] for e in examples]


@torch.inference_mode()
def score_all_pairs(
    loaded: LoadedModel,
    images: dict[str, torch.Tensor],
    text: dict[str, torch.Tensor],
    batch_size: int,
    progress: bool = True,
) -> torch.Tensor:
    """Score every (image, caption) pair -> (N_img, N_cap) on the CPU, in batches of pairs.

    Fine-tuned models score with the pair head; pretraining models (zero-shot) with the alignment head.
    The cost grows as images x captions, so the progress bar counts pairs and shows the ETA.
    """
    n_img, n_cap = images["image_feat"].shape[0], text["input_ids"].shape[0]
    scores = torch.empty(n_img * n_cap, dtype=torch.float32)
    dev = loaded.device
    images = {k: v.to(dev) for k, v in images.items()}
    text = {k: v.to(dev) for k, v in text.items()}
    head = "align_logit" if loaded.kind == "pretraining" else "pair_logit"
    with tqdm(
        total=n_img * n_cap, desc=f"retrieval {n_img}x{n_cap}", unit="pair", disable=not progress
    ) as bar:
        for start in range(0, n_img * n_cap, batch_size):
            pair = torch.arange(start, min(start + batch_size, n_img * n_cap), device=dev)
            img, cap = pair // n_cap, pair % n_cap  # image-major order: flat index = img * n_cap + cap
            inputs = {k: v[cap] for k, v in text.items()} | {k: v[img] for k, v in images.items()}
            # trim padding shared by the whole batch: fewer tokens and regions, same scores
            t = int(inputs["attention_mask"].sum(1).max())
            r = int(inputs["image_mask"].sum(1).max())
            inputs = {k: (v[:, :t] if k in MODEL_KEYS[:3] else v[:, :r]) for k, v in inputs.items()}
            for k in ("attention_mask", "image_mask"):
                if bool(inputs[k].all()):
                    inputs[k] = None  # no padding left: the model may use its fastest unmasked attention
            out = loaded.model(**inputs)
            scores[start : start + pair.numel()] = getattr(out, head).float().cpu()
            bar.update(pair.numel())
    return scores.view(n_img, n_cap)


def eval_retrieval(
    loaded: LoadedModel, data_dir: Path, info: dict, batch_size: int, progress: bool,
    num_candidates: int = 100, seed: int = 0, max_images: int | None = None,
) -> tuple[dict, Any]:  # fmt: skip
    """Image and text retrieval R@1/5/10 over the full set and under the 100-candidate protocol."""
    images, text, caption_image, image_ids = read_retrieval_set(loaded, data_dir, max_images)
    t0 = time.perf_counter()
    scores = score_all_pairs(loaded, images, text, batch_size, progress)
    seconds = time.perf_counter() - t0
    ranks = retrieval_ranks(scores, caption_image, num_candidates, seed)
    metrics: dict[str, Any] = {name: recall_at_k(r) for name, r in ranks.items()}
    metrics.update(
        {
            "num_images": len(image_ids),
            "num_captions": int(caption_image.numel()),
            "zero_shot": loaded.kind == "pretraining",
            "scoring_seconds": round(seconds, 3),
            "pairs_per_second": round(scores.numel() / max(seconds, 1e-9), 1),
            "candidate_seed": seed,
            "max_images": max_images,
        }
    )
    return metrics, {"ranks": ranks, "image_ids": image_ids}


# ---------------------------------------------------------------------------------------------- report
def _fmt(v: Any) -> str:
    """A metric value for a Markdown cell."""
    return f"{v:.2f}" if isinstance(v, float) and math.isfinite(v) else str(v)


def markdown_report(task: str, model: str, results: dict[str, dict]) -> str:
    """The metrics of every split as Markdown tables: scalar metrics first, then grouped ones."""
    lines = [f"# Evaluation: {task}", "", f"Model: `{model}`", ""]
    for split, m in results.items():
        lines += [f"## {split}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in m.items() if not isinstance(v, dict)] + [""]
        groups = {k: v for k, v in m.items() if isinstance(v, dict)}
        if task == "retrieval" and groups:
            lines += ["| protocol | " + " | ".join(f"R@{k}" for k in RECALL_KS) + " |", "|---|---|---|---|"]
            for name, rec in groups.items():
                lines.append(f"| {name} | " + " | ".join(_fmt(rec[f"r{k}"]) for k in RECALL_KS) + " |")
            lines.append("")
        else:
            for name, sub in groups.items():
                lines += [f"| {name} | value |", "|---|---|"]
                lines += [f"| {k} | {_fmt(v)} |" for k, v in sub.items()] + [""]
    return "\n".join(lines)


def _file_safe(split: str) -> str:
    """A split name as it appears in file names: anything but letters, digits, - and _ becomes _."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in split)


def _plots(task: str, split: str, metrics: dict, extra: Any, out: Path) -> list[str]:
    """Write the task's plots for one split; returns their file names."""
    from .plots import plot_accuracy_bars, plot_recall_curves

    safe = _file_safe(split)
    if task == "vqa" and "per_answer_type" in metrics:
        values = {"overall": metrics["overall"], **metrics["per_answer_type"]}
        return [
            plot_accuracy_bars(
                values, out / f"accuracy_by_answer_type_{safe}.png", f"VQA accuracy ({split})"
            ).name
        ]
    if task == "vcr" and "q_a" in metrics:
        values = {"Q->A": metrics["q_a"], "QA->R": metrics["qa_r"], "Q->AR": metrics["q_ar"]}
        return [plot_accuracy_bars(values, out / f"accuracy_{safe}.png", f"VCR ({split})").name]
    if task == "retrieval":
        return [
            plot_recall_curves(extra["ranks"], out / f"recall_at_k_{safe}.png", f"Retrieval ({split})").name
        ]
    return []


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
) -> dict[str, Any]:
    """Evaluate `model` on the TASKDIR(s) in `data` for `task`; write the report to `out`; return metrics.json.

    precision: "fp32" (default, exact) or "bf16" (autocast; faster on GPUs, scores may move slightly).
    num_workers: DataLoader worker processes reading the shards (0: in this process).
    max_images: retrieval only: score the first N images of the test set and their captions.
    """
    if task not in EVAL_TASKS:
        raise EvalError(f"--task {task!r} is not one of {', '.join(EVAL_TASKS)}")
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    if precision not in ("fp32", "bf16"):
        raise EvalError(f"--precision must be fp32 or bf16, got {precision!r}")
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, vocab=vocab, answers=answers, device=device)
    )
    _require_kind(loaded, task)
    if task == "retrieval" and loaded.kind == "pretraining":
        logger.info("pretraining model: zero-shot retrieval through the alignment head")
    data_dirs = [Path(data)] if isinstance(data, str | Path) else [Path(d) for d in data]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict] = {}
    files: list[str] = []
    for data_dir in data_dirs:
        info = read_task_info(data_dir)
        if info.get("task") not in (None, SHARD_TASK[task]):
            raise EvalError(
                f"--data {data_dir}: task shards of {info['task']!r}, but --task {task} reads {SHARD_TASK[task]!r} shards"
            )
        _check_feature_dim(loaded, info, data_dir)
        split = _split_name(info, data_dir, set(results))
        # bf16 autocast only wraps the forward passes; metrics are computed from fp32 copies
        with torch.autocast(loaded.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if task == "vqa":
                metrics, extra = eval_vqa(loaded, data_dir, info, batch_size, progress, num_workers)
            elif task == "vcr":
                metrics, extra = eval_vcr(loaded, data_dir, info, batch_size, progress, num_workers)
            elif task == "refcoco":
                metrics, extra = eval_refcoco(loaded, data_dir, info, batch_size, progress, num_workers)
            elif task == "pretrain":
                metrics, extra = eval_pretrain(
                    loaded, data_dir, info, batch_size, progress, seed, num_workers
                )
            else:
                metrics, extra = eval_retrieval(
                    loaded, data_dir, info, batch_size, progress, num_candidates, seed, max_images
                )
        results[split] = metrics
        safe = _file_safe(split)
        if task in ("vqa", "vcr", "refcoco"):
            name = f"{task}_predictions_{safe}.json"
            atomic_write_json(out / name, extra, sort_keys=False)
            files.append(name)
        files += _plots(task, split, metrics, extra, out)

    if task == "refcoco":
        if len(results) > 1:
            n = sum(m["num_refs"] for m in results.values())
            acc = sum(m["accuracy"] * m["num_refs"] for m in results.values()) / n
            results["all"] = {"accuracy": acc, "num_refs": n}
        files.append(_plot_refcoco(results, out))
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


def _plot_refcoco(results: dict[str, dict], out: Path) -> str:
    """Bar chart of RefCOCO accuracy per split."""
    from .plots import plot_accuracy_bars

    values = {s: m["accuracy"] for s, m in results.items()}
    return plot_accuracy_bars(
        values, out / "accuracy_by_split.png", "RefCOCO accuracy (top region IoU >= 0.5)"
    ).name
