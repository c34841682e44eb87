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

import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from extract.devices import autocast, check_precision
from pipelines.fileio import atomic_write_json, check_out_dir, make_out_dir
from pipelines.formats.tasks import answers_path, iter_task_records, read_task_json
from vilbert_core.batches import (
    IMAGE_KEYS,
    SHARD_TASK,
    TEXT_KEYS,
    batch_to_device,
    model_inputs,
    vcr_pair_logits,
)

from .baselines import QuestionPrior, refcoco_chance, retrieval_chance, vcr_chance
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
EVAL_PRECISIONS = ("fp32", "bf16")
# A model whose score falls by less than this (points) when every image's regions are another image's
# does not use the image: the report says so.
VISION_DROP_MIN = 1.0
# A pretraining model whose alignment accuracy stays below the label majority plus this has not learnt
# to tell matching captions from others.
ALIGNMENT_MARGIN = 5.0


# ---------------------------------------------------------------------------------------------- helpers
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


def _record_count(info: dict[str, Any]) -> int | None:
    """A progress total: the record count of task.json, when it has one."""
    records = (info.get("counts") or {}).get("records")
    return records if isinstance(records, int) else None


def _batches(
    loaded: LoadedModel, data_dir: Path, shard_task: str, batch_size: int, seed: int, num_workers: int = 0,
    swap_images: bool = False,
) -> Iterator[dict]:  # fmt: skip
    """Padded batches of a TASKDIR (no shuffle buffer, no resampling; workers split the shards).

    Results are keyed by question / annotation / ref ids, so the order across workers does not matter;
    pretraining negatives depend on the worker count (seeded per worker), so keep it fixed to compare runs.
    swap_images: every image's records get another image's regions (pipelines.datasets.swap_regions).
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
        swap_images=swap_images,
    )
    source = ds if num_workers == 0 else DataLoader(ds, batch_size=None, num_workers=num_workers)
    for batch in source:
        yield batch_to_device(batch, loaded.device)


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
def _vqa_pass(
    loaded: LoadedModel, data_dir: Path, info: dict, batch_size: int, progress: bool, num_workers: int,
    swap_images: bool = False,
) -> tuple[dict[int, str], list[dict]]:  # fmt: skip
    """Predicted answer per question id, and the questions (answers, types, text) in reading order."""
    predictions: dict[int, str] = {}
    questions: list[dict] = []
    desc = "vqa, images shuffled" if swap_images else "vqa"
    bar = tqdm(total=_record_count(info), desc=desc, unit="q", disable=not progress)
    for batch in _batches(loaded, data_dir, "vqa", batch_size, 0, num_workers, swap_images):
        logits = loaded.model(**model_inputs(batch)).vqa_logits  # (B,A)
        for qid, a, gts, atype, qtype, text in zip(
            batch["question_id"].tolist(),
            logits.argmax(-1).tolist(),
            batch["answers"],
            batch["answer_type"],
            batch["question_type"],
            batch["question"],
            strict=True,
        ):
            predictions[qid] = loaded.answers[a]
            questions.append({"question_id": qid, "answers": gts, "answer_type": atype,
                              "question_type": qtype or None, "question": text})  # fmt: skip
        bar.update(len(batch["image_id"]))
    bar.close()
    return predictions, questions


def _accuracy_tables(acc: dict) -> dict:
    """The reported part of vqa_accuracy(): overall, per answer type, per question type."""
    return {k: acc[k] for k in ("overall", "per_answer_type", "per_question_type")}


def vqa_vision_report(metrics: dict) -> tuple[dict, list[str]]:
    """Whether the model uses the image (shuffled-image run) and beats a blind model (question-only prior)."""
    vision: dict[str, Any] = {}
    warnings: list[str] = []
    shuffled = metrics.get("shuffled_images")
    if shuffled is not None:
        vision["drop_when_images_shuffled"] = shuffled["drop"]
        vision["uses_image"] = shuffled["drop"] >= VISION_DROP_MIN
        if not vision["uses_image"]:
            warnings.append(
                f"giving every question another image's regions costs only {shuffled['drop']:.2f} points "
                f"({metrics['overall']:.2f} -> {shuffled['overall']:.2f}): the model barely uses the image"
            )
    prior = (metrics.get("baselines") or {}).get("question_prior")
    if prior is not None:
        gain = round(metrics["overall"] - prior["overall"], 2)
        vision["gain_over_question_prior"] = gain
        vision["beats_question_prior"] = gain > 0
        if gain <= 0:
            warnings.append(
                f"the model ({metrics['overall']:.2f}) does not beat the question-only prior "
                f"({prior['overall']:.2f}): it does no better than answering from the question alone"
            )
    return vision, warnings


@torch.inference_mode()
def eval_vqa(
    loaded: LoadedModel, data_dir: Path, info: dict, batch_size: int, progress: bool, num_workers: int = 0,
    prior: QuestionPrior | None = None, vision_check: bool = True,
) -> tuple[dict, Any]:  # fmt: skip
    """Official VQA accuracy (overall, per answer and question type), blind baselines, vision-use check.

    prior: the question-only prior fitted on the training split (baselines.QuestionPrior); its
    accuracy and the majority answer's are reported beside the model's. vision_check: score again with
    every image's regions replaced by another image's; the drop shows how much the model uses the image.
    """
    _require_kind(loaded, "vqa")
    shard_answers = answers_path(data_dir, info)
    if loaded.answers is None and shard_answers is not None:
        from pipelines.vqa_answers import load_answer_vocab

        # the shards' answer list is the training split's (docs/contracts.md section 3)
        loaded.answers = load_answer_vocab(shard_answers)
        logger.warning("no answer list with the model; using %s", shard_answers)
    if loaded.answers is None:
        raise EvalError("vqa needs the answer list: a run directory with answers.json, or --answers FILE")
    if len(loaded.answers) != loaded.model.config.num_answers:
        raise EvalError(
            f"{len(loaded.answers)} answers in the answer list but the model's VQA head has "
            f"{loaded.model.config.num_answers}"
        )
    predictions, questions = _vqa_pass(loaded, data_dir, info, batch_size, progress, num_workers)
    if not questions:
        raise EvalError(f"--data {data_dir}: no questions")
    submission = [{"question_id": q, "answer": predictions[q]} for q in sorted(predictions)]
    with_answers = [q for q in questions if q["answers"]]
    metrics: dict[str, Any] = {"num_questions": len(questions)}
    if not with_answers:  # test splits ship no answers: predictions only
        return metrics, submission
    acc = vqa_accuracy(predictions, with_answers)
    metrics.update({**_accuracy_tables(acc), "num_questions": acc["num_questions"]})
    if vision_check:
        shuffled, _ = _vqa_pass(loaded, data_dir, info, batch_size, progress, num_workers, swap_images=True)
        scored = [q for q in with_answers if q["question_id"] in shuffled]  # a lone image has no other
        if scored:
            s_acc = vqa_accuracy(shuffled, scored)
            same = vqa_accuracy(predictions, scored)["overall"] if len(scored) < len(with_answers) else acc["overall"]
            metrics["shuffled_images"] = {**_accuracy_tables(s_acc), "num_questions": len(scored),
                                          "drop": round(same - s_acc["overall"], 2)}  # fmt: skip
    if prior is not None:
        blind = {
            "question_prior": {q["question_id"]: prior.predict(q["question"], q["question_type"]) for q in with_answers},
            "majority_answer": {q["question_id"]: prior.majority for q in with_answers},
        }
        metrics["baselines"] = {name: _accuracy_tables(vqa_accuracy(p, with_answers)) for name, p in blind.items()}
        metrics["baselines"]["majority_answer"]["answer"] = prior.majority
        metrics["baselines"]["train_questions"] = prior.num_train_questions
    metrics["vision"], metrics["warnings"] = vqa_vision_report(metrics)
    return metrics, submission


# ---------------------------------------------------------------------------------------------- VCR
def _vcr_pass(
    loaded: LoadedModel, data_dir: Path, batch_size: int, progress: bool, num_workers: int, swap_images: bool = False
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, int]]]:  # fmt: skip
    """Choice probabilities and labels per annotation id and stage ("q_a", "qa_r")."""
    probs: dict[str, dict[str, list[float]]] = {}
    labels: dict[str, dict[str, int]] = {}
    bar = tqdm(desc="vcr, images shuffled" if swap_images else "vcr", unit="q", disable=not progress)
    for batch in _batches(loaded, data_dir, "vcr", batch_size, 0, num_workers, swap_images):
        p = vcr_pair_logits(loaded.model, batch).float().softmax(-1)  # (B,4)
        for aid, stage, row, lab in zip(batch["annot_id"], batch["vcr_stage"], p.tolist(), batch["label"].tolist(),
                                        strict=True):  # fmt: skip
            probs.setdefault(aid, {})[stage] = row
            labels.setdefault(aid, {})[stage] = lab
        bar.update(p.shape[0])
    bar.close()
    return probs, labels


def _vcr_scores(probs: dict, labels: dict, keep: set[str] | None = None) -> dict[str, float] | None:
    """VCR accuracies over the questions with both stages and a known answer (optionally only `keep`)."""
    both = [a for a in sorted(probs) if {"q_a", "qa_r"} <= probs[a].keys() and labels[a]["q_a"] >= 0
            and (keep is None or a in keep)]  # fmt: skip
    if not both:
        return None

    def argmax(v: list[float]) -> int:
        return max(range(len(v)), key=v.__getitem__)

    return vcr_accuracy(
        [argmax(probs[a]["q_a"]) for a in both],
        [labels[a]["q_a"] for a in both],
        [argmax(probs[a]["qa_r"]) for a in both],
        [labels[a]["qa_r"] for a in both],
    ) | {"num_scored": len(both)}


def _shuffle_drop(metrics: dict, shuffled: dict | None, key: str, same: float) -> list[str]:
    """Record the shuffled-image scores and their drop on `key` under metrics; a warning when it is tiny."""
    if shuffled is None:
        return []
    drop = round(same - shuffled[key], 2)
    metrics["shuffled_images"] = {**shuffled, "drop": drop}
    metrics.setdefault("vision", {})["drop_when_images_shuffled"] = drop
    metrics["vision"]["uses_image"] = drop >= VISION_DROP_MIN
    if drop < VISION_DROP_MIN:
        return [f"giving every example another image's regions costs only {drop:.2f} points of {key} "
                f"({same:.2f} -> {shuffled[key]:.2f}): the model barely uses the image"]  # fmt: skip
    return []


@torch.inference_mode()
def eval_vcr(
    loaded: LoadedModel, data_dir: Path, info: dict, batch_size: int, progress: bool, num_workers: int = 0,
    vision_check: bool = True,
) -> tuple[dict, Any]:  # fmt: skip
    """VCR Q->A, QA->R and Q->AR accuracy beside chance and with shuffled images; predictions per stage."""
    _require_kind(loaded, "vcr")
    probs, labels = _vcr_pass(loaded, data_dir, batch_size, progress, num_workers)
    if not probs:
        raise EvalError(f"--data {data_dir}: no VCR questions")
    predictions = {aid: {f"{s}_probs": v for s, v in st.items()} for aid, st in sorted(probs.items())}
    metrics: dict[str, Any] = {"num_questions": len(probs)}
    scores = _vcr_scores(probs, labels)
    if scores is None:
        return metrics, predictions
    metrics.update({k: v for k, v in scores.items() if k != "num_scored"})
    metrics["baselines"] = {"chance": vcr_chance()}
    warnings: list[str] = []
    if vision_check:
        s_probs, s_labels = _vcr_pass(loaded, data_dir, batch_size, progress, num_workers, swap_images=True)
        shuffled = _vcr_scores(s_probs, s_labels)
        same = scores if shuffled is None or shuffled["num_scored"] == scores["num_scored"] else _vcr_scores(
            probs, labels, set(s_probs))  # fmt: skip
        warnings = _shuffle_drop(metrics, shuffled, "q_a", same["q_a"])
    metrics["warnings"] = warnings
    return metrics, predictions


# ---------------------------------------------------------------------------------------------- RefCOCO
def _refcoco_pass(
    loaded: LoadedModel, data_dir: Path, info: dict, batch_size: int, progress: bool, num_workers: int,
    swap_images: bool = False,
) -> tuple[list[bool], list[float], list[dict]]:  # fmt: skip
    """Per expression: correct or not, the chance of a random region, and the prediction record."""
    correct_all: list[bool] = []
    chance: list[float] = []
    predictions: list[dict] = []
    desc = "refcoco, features shuffled" if swap_images else "refcoco"
    bar = tqdm(total=_record_count(info), desc=desc, unit="ref", disable=not progress)
    for batch in _batches(loaded, data_dir, "refcoco", batch_size, 0, num_workers, swap_images):
        logits = loaded.model(**model_inputs(batch)).region_logits  # (B,R)
        valid = batch["image_mask"].bool().clone()
        valid[:, 0] = False  # the global [IMG] region is not a box to point at
        correct = refcoco_correct(logits, batch["region_iou"], valid)
        top = logits.float().masked_fill(~valid, float("-inf")).argmax(-1)
        for ref, sent, ok, r, iou in zip(batch["ref_id"], batch["sent_id"], correct.tolist(), top.tolist(),
                                         batch["region_iou"].tolist(), strict=True):  # fmt: skip
            # region index r counts the global region: detected box r - 1 of the image
            predictions.append({"ref_id": ref, "sent_id": sent, "region": r - 1, "iou": iou[r], "correct": ok})
        correct_all.extend(correct.tolist())
        chance.extend(refcoco_chance(batch["region_iou"], valid).tolist())
        bar.update(len(batch["image_id"]))
    bar.close()
    return correct_all, chance, predictions


@torch.inference_mode()
def eval_refcoco(
    loaded: LoadedModel, data_dir: Path, info: dict, batch_size: int, progress: bool, num_workers: int = 0,
    vision_check: bool = True,
) -> tuple[dict, Any]:  # fmt: skip
    """Accuracy (top detected region has IoU >= 0.5 with the referred box), beside a random region's.

    The vision check gives every image's boxes another image's appearance features (the boxes, and so
    the IoU targets, stay): a model that points by position and wording alone loses nothing.
    """
    _require_kind(loaded, "refcoco")
    correct_all, chance, predictions = _refcoco_pass(loaded, data_dir, info, batch_size, progress, num_workers)
    if not correct_all:
        raise EvalError(f"--data {data_dir}: no referring expressions")
    accuracy = 100.0 * sum(correct_all) / len(correct_all)
    metrics: dict[str, Any] = {"accuracy": accuracy, "num_refs": len(correct_all),
                               "baselines": {"chance": {"accuracy": 100.0 * sum(chance) / len(chance)}}}  # fmt: skip
    warnings: list[str] = []
    if vision_check:
        s_correct, _, s_pred = _refcoco_pass(loaded, data_dir, info, batch_size, progress, num_workers, True)
        if s_correct:
            scored = {(p["ref_id"], p["sent_id"]) for p in s_pred}
            same = [p["correct"] for p in predictions if (p["ref_id"], p["sent_id"]) in scored]
            shuffled = {"accuracy": 100.0 * sum(s_correct) / len(s_correct), "num_refs": len(s_correct)}
            warnings = _shuffle_drop(metrics, shuffled, "accuracy", 100.0 * sum(same) / len(same))
    metrics["warnings"] = warnings
    return metrics, predictions


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
    from vilbert_core.training.losses import pretraining_positions
    from vilbert_core.training.masking import IGNORE_INDEX, mask_regions, mask_tokens

    _require_kind(loaded, "pretrain")
    tok = loaded.tokenizer
    # A CPU generator on every device, as in training: the masks, so the metrics, do not depend on the
    # device (a CUDA generator draws other numbers from the same seed).
    gen = torch.Generator().manual_seed(seed)
    sums_tok = {"correct": 0, "nll": 0.0, "count": 0}
    sums_reg = {"kl": 0.0, "count": 0}
    sums_al = {"correct": 0, "count": 0}
    positives = 0
    bar = tqdm(total=_record_count(info), desc="pretrain", unit="pair", disable=not progress)
    for batch in _batches(loaded, data_dir, "captions", batch_size, seed, num_workers):
        aligned = batch["align_label"] > 0.5  # (B,)
        ids, mlm_labels = mask_tokens(
            batch["input_ids"], batch["attention_mask"], mask_token_id=tok.mask_id, vocab_size=tok.vocab_size,
            special_token_ids=(tok.pad_id, tok.cls_id, tok.sep_id), generator=gen,
        )  # fmt: skip
        feat, region_labels = mask_regions(batch["image_feat"], batch["image_mask"], generator=gen)
        classes = loaded.model.config.v_target_size
        if classes != batch["image_target"].shape[-1]:
            raise EvalError(
                f"the model predicts {classes} region classes but the shards' detector "
                f"distributions have {batch['image_target'].shape[-1]}"
            )
        # the MLM / MRM heads run only on the scored positions: masked tokens and regions of aligned pairs
        tokens, regions = pretraining_positions(mlm_labels, region_labels, aligned)
        inputs = {**model_inputs(batch), "input_ids": ids, "image_feat": feat}
        out = loaded.model(**inputs, mlm_positions=tokens, mrm_positions=regions)
        for total, part in (
            (sums_tok, masked_token_stats(out.mlm_logits, mlm_labels[tokens], IGNORE_INDEX)),
            (sums_reg, masked_region_kl_stats(out.mrm_logits, batch["image_target"][regions], regions[regions])),
            (sums_al, alignment_stats(out.align_logit, batch["align_label"])),
        ):
            for k, v in part.items():
                total[k] += v
        positives += int(aligned.sum())
        bar.update(len(batch["image_id"]))
    bar.close()
    if sums_al["count"] == 0:
        raise EvalError(f"--data {data_dir}: no captions")
    metrics: dict[str, Any] = pretrain_summary(sums_tok, sums_reg, sums_al)
    # a blind model's best alignment accuracy: always the more frequent label
    chance = 100.0 * max(positives, sums_al["count"] - positives) / sums_al["count"]
    metrics["baselines"] = {"chance": {"alignment_accuracy": chance}}
    metrics["warnings"] = []
    if metrics["alignment_accuracy"] < chance + ALIGNMENT_MARGIN:
        metrics["warnings"].append(
            f"alignment accuracy {metrics['alignment_accuracy']:.2f} is within {ALIGNMENT_MARGIN:.0f} points of "
            f"chance ({chance:.2f}): the model does not tell a matching caption from another image's"
        )
    return metrics, None


# ---------------------------------------------------------------------------------------------- retrieval
def read_retrieval_set(
    loaded: LoadedModel, data_dir: Path, max_images: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """All images (padded regions) and all captions (padded tokens) of retrieval task shards.

    max_images: keep only the first N images in shard order (and their captions), for quick checks.

    Returns (image tensors {image_feat (N,R,D), image_loc (N,R,5), image_mask (N,R)},
    text tensors {input_ids, token_type_ids, attention_mask (M,T)}, caption -> image index (M,), image ids).
    """
    from pipelines.datasets import TaskDataset, collate_regions, collate_texts

    ds = TaskDataset(
        str(data_dir), "retrieval", loaded.tokenizer, batch_size=None, max_text_len=loaded.max_text_len,
        max_regions=loaded.max_regions, shuffle_buffer=1, feature_dim=loaded.feature_dim,
    )  # fmt: skip
    regions, image_ids, texts, caption_image = [], [], [], []
    try:
        for key, records, image_regions in ds.images():
            if max_images is not None and len(image_ids) >= max_images:
                break
            texts.extend(r["caption"] for r in records)
            caption_image.extend([len(image_ids)] * len(records))
            regions.append(image_regions)
            image_ids.append(key)
    except ValueError as err:  # a sample of another feature size than the model's
        raise EvalError(f"--data {data_dir}: {err}") from None
    if not image_ids or not texts:
        raise EvalError(f"--data {data_dir}: no images or no captions")
    images = collate_regions(regions, (len(regions),))
    del images["image_target"]  # scoring reads no class distributions
    text = collate_texts(ds.tokenizer.encode_batch(texts), (len(texts),), ds.tokenizer.pad_id)
    return images, text, torch.tensor(caption_image), image_ids


@torch.inference_mode()
def score_all_pairs(
    loaded: LoadedModel,
    images: dict[str, torch.Tensor],
    text: dict[str, torch.Tensor],
    batch_size: int,
    progress: bool = True,
    caption_chunk: int = 1024,
) -> torch.Tensor:
    """Score every (image, caption) pair -> (N_img, N_cap) on the CPU, in batches of pairs.

    Fine-tuned models score with the pair head; pretraining models (zero-shot) with the alignment head.
    What depends on one side only is computed once: each image's region embedding and visual layers
    before co-attention (`embed_image`), each caption's text layers before co-attention (`embed_text`,
    `caption_chunk` captions at a time to bound memory); each pair then runs only the co-attention part
    (`score_pairs`). The scores equal the full forward pass's to float rounding (tested).
    The cost grows as images x captions, so the progress bar counts pairs and shows the ETA.
    """
    n_img, n_cap = images["image_feat"].shape[0], text["input_ids"].shape[0]
    scores = torch.empty(n_img, n_cap, dtype=torch.float32)
    dev, model = loaded.device, loaded.model
    image_mask = images["image_mask"].to(dev)
    region_counts = image_mask.sum(1)
    # (N_img, R, v_hidden): once per image
    image_states = torch.cat(
        [
            model.vilbert.embed_image(*(images[k][i : i + batch_size].to(dev) for k in IMAGE_KEYS))
            for i in range(0, n_img, batch_size)
        ]
    )
    with tqdm(total=n_img * n_cap, desc=f"retrieval {n_img}x{n_cap}", unit="pair", disable=not progress) as bar:
        for c0 in range(0, n_cap, caption_chunk):
            chunk = {k: v[c0 : c0 + caption_chunk].to(dev) for k, v in text.items()}
            n = chunk["input_ids"].shape[0]
            # (n, T, hidden): once per caption
            text_states = torch.cat(
                [
                    model.vilbert.embed_text(*(chunk[k][i : i + batch_size] for k in TEXT_KEYS))
                    for i in range(0, n, batch_size)
                ]
            )
            token_counts = chunk["attention_mask"].sum(1)
            for start in range(0, n_img * n, batch_size):
                pair = torch.arange(start, min(start + batch_size, n_img * n), device=dev)
                img, cap = pair // n, pair % n  # image-major within the chunk
                # trim padding shared by the whole batch: fewer tokens and regions, same scores
                t, r = int(token_counts[cap].max()), int(region_counts[img].max())
                masks = [chunk["attention_mask"][cap, :t], image_mask[img, :r]]
                # no padding left: the model may use its fastest unmasked attention
                masks = [None if bool(m.all()) else m for m in masks]
                logits = model.score_pairs(text_states[cap, :t], image_states[img, :r], *masks)
                scores[img.cpu(), (c0 + cap).cpu()] = logits.float().cpu()
                bar.update(pair.numel())
    return scores


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
            "baselines": {"chance": retrieval_chance(caption_image, len(image_ids), num_candidates)},
        }
    )
    return metrics, {"ranks": ranks, "image_ids": image_ids}


# ---------------------------------------------------------------------------------------------- baselines
def fit_question_prior(train_data: str | Path | None) -> QuestionPrior | None:
    """The question-only prior of a VQA training TASKDIR; None (with a log line) when there is none."""
    if train_data is None:
        logger.warning("no training data known (pass --train-data): VQA blind baselines are not reported")
        return None
    path = Path(train_data)
    if not path.is_dir():
        logger.warning("training data %s is not a TASKDIR here: VQA blind baselines are not reported", path)
        return None
    try:
        return QuestionPrior.fit(iter_task_records(path))
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise EvalError(f"--train-data {path}: cannot fit the question-only prior: {err}") from None


# ---------------------------------------------------------------------------------------------- report
def _fmt(v: Any) -> str:
    """A metric value for a Markdown cell."""
    return f"{v:.2f}" if isinstance(v, float) and math.isfinite(v) else str(v)


def vqa_comparison(metrics: dict) -> dict[str, dict[str, float]]:
    """VQA accuracy of the model and its references by row (overall, answer types, question types).

    Returns {column title: {row: accuracy}} for the model, the shuffled-image run and the blind
    baselines that were computed.
    """
    columns: dict[str, dict] = {"model": metrics}
    if "shuffled_images" in metrics:
        columns["images shuffled"] = metrics["shuffled_images"]
    blind = metrics.get("baselines") or {}
    if "question_prior" in blind:
        columns["question-only prior"] = blind["question_prior"]
    if "majority_answer" in blind:
        columns[f"majority answer ({blind['majority_answer']['answer']!r})"] = blind["majority_answer"]
    table: dict[str, dict[str, float]] = {}
    for title, m in columns.items():
        rows = {"overall": m["overall"], **m.get("per_answer_type", {})}
        rows.update({f"q: {k}": v for k, v in m.get("per_question_type", {}).items()})
        table[title] = rows
    return table


def _comparison_lines(table: dict[str, dict[str, float]], first: str) -> list[str]:
    """A Markdown table with one column per entry of `table` and one row per key of its first entry."""
    titles = list(table)
    lines = [f"| {first} | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for row in table[titles[0]]:
        lines.append(f"| {row} | " + " | ".join(_fmt(table[t].get(row, float("nan"))) for t in titles) + " |")
    return lines + [""]


def markdown_report(task: str, model: str, results: dict[str, dict]) -> str:
    """Every split's metrics as Markdown: warnings, scalars, the model beside its baselines, then groups."""
    lines = [f"# Evaluation: {task}", "", f"Model: `{model}`", ""]
    for split, m in results.items():
        lines += [f"## {split}", ""]
        lines += [f"> **Warning**: {w}" for w in m.get("warnings", [])] + ([""] if m.get("warnings") else [])
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in m.items() if not isinstance(v, dict | list)] + [""]
        groups = {k: v for k, v in m.items() if isinstance(v, dict)}
        if task == "vqa" and "overall" in m:
            lines += _comparison_lines(vqa_comparison(m), "VQA accuracy")
            groups = {k: v for k, v in groups.items() if k == "vision"}
        if task == "retrieval":
            recalls = {k: v for k, v in groups.items() if k != "baselines"}
            chance = (groups.get("baselines") or {}).get("chance", {})
            if recalls:
                head = "| protocol | " + " | ".join(f"R@{k}" for k in RECALL_KS)
                lines += [head + (" | chance R@1 |" if chance else " |"), "|---" * (len(RECALL_KS) + 1 + bool(chance)) + "|"]
                for name, rec in recalls.items():
                    cells = [_fmt(rec[f"r{k}"]) for k in RECALL_KS] + ([_fmt(chance[name]["r1"])] if name in chance else [])
                    lines.append(f"| {name} | " + " | ".join(cells) + " |")
                lines.append("")
            continue
        for name, sub in groups.items():
            if name == "baselines":
                lines += ["| baseline | metric | value |", "|---|---|---|"]
                lines += [f"| {b} | {k} | {_fmt(v)} |" for b, vals in sub.items() for k, v in vals.items()] + [""]
                continue
            lines += [f"| {name} | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in sub.items()] + [""]
    return "\n".join(lines)


def _file_safe(split: str) -> str:
    """A split name as it appears in file names: anything but letters, digits, - and _ becomes _."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in split)


def _plots(task: str, split: str, metrics: dict, extra: Any, out: Path) -> list[str]:
    """Write the task's plots for one split; returns their file names."""
    from .plots import plot_accuracy_bars, plot_accuracy_comparison, plot_recall_curves

    safe = _file_safe(split)
    if task == "vqa" and "per_answer_type" in metrics:
        # the model beside its blind baselines and shuffled images, by answer type (question types: report.md)
        table = {name: {k: v for k, v in rows.items() if not k.startswith("q: ")}
                 for name, rows in vqa_comparison(metrics).items()}  # fmt: skip
        return [
            plot_accuracy_comparison(
                table, out / f"accuracy_by_answer_type_{safe}.png", f"VQA accuracy ({split})"
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
    train_data: str | Path | None = None,
    vision_check: bool = True,
) -> dict[str, Any]:
    """Evaluate `model` on the TASKDIR(s) in `data` for `task`; write the report to `out`; return metrics.json.

    precision: "fp32" (default, exact) or "bf16" (autocast; faster on GPUs, scores may move slightly).
    num_workers: DataLoader worker processes reading the shards (0: in this process).
    max_images: retrieval only: score the first N images of the test set and their captions.
    train_data: VQA: the training TASKDIR the blind baselines (question-only prior, majority answer) are
    fitted on; default: the run's training data (train_args.json).
    vision_check: VQA, VCR, RefCOCO: score again with every image's regions taken from another image.
    Every split's metrics get "baselines" (blind or chance scores) and "warnings" (e.g. the model
    does not use the image); warnings are also logged.
    """
    if task not in EVAL_TASKS:
        raise EvalError(f"--task {task!r} is not one of {', '.join(EVAL_TASKS)}")
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    try:
        check_precision(precision, EVAL_PRECISIONS)
    except ValueError as err:
        raise EvalError(str(err)) from None
    check_out_dir(out)  # before the model is loaded
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, vocab=vocab, answers=answers, device=device)
    )
    _require_kind(loaded, task)
    if task == "retrieval" and loaded.kind == "pretraining":
        logger.info("pretraining model: zero-shot retrieval through the alignment head")
    data_dirs = [Path(data)] if isinstance(data, str | Path) else [Path(d) for d in data]
    out = make_out_dir(out)
    prior = fit_question_prior(train_data or loaded.train_data) if task == "vqa" else None

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
        with autocast(precision, loaded.device.type):
            if task == "vqa":
                metrics, extra = eval_vqa(
                    loaded, data_dir, info, batch_size, progress, num_workers, prior, vision_check
                )
            elif task == "vcr":
                metrics, extra = eval_vcr(loaded, data_dir, info, batch_size, progress, num_workers, vision_check)
            elif task == "refcoco":
                metrics, extra = eval_refcoco(
                    loaded, data_dir, info, batch_size, progress, num_workers, vision_check
                )
            elif task == "pretrain":
                metrics, extra = eval_pretrain(
                    loaded, data_dir, info, batch_size, progress, seed, num_workers
                )
            else:
                metrics, extra = eval_retrieval(
                    loaded, data_dir, info, batch_size, progress, num_candidates, seed, max_images
                )
        results[split] = metrics
        for warning in metrics.get("warnings", []):
            logger.warning("%s (%s): %s", task, split, warning)
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
