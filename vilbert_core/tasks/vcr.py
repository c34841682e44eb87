"""VCR: Q->A and QA->R as 4-way choices scored by the pair head; Q->AR = both right.

Training: cross-entropy over the 4 pair logits; validation: the right choice ranked first.
Evaluation: Q->A, QA->R and Q->AR accuracy beside chance (25 / 25 / 6.25) and with other images'
regions; predictions are the softmax over the choices per annotation and stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vilbert_core.evaluation.baselines import vcr_chance
from vilbert_core.evaluation.common import file_safe, shuffle_drop_on_scored, task_batches
from vilbert_core.evaluation.loading import EvalError
from vilbert_core.evaluation.metrics import vcr_accuracy
from vilbert_core.tasks import IMAGE_KEYS, TEXT_KEYS, EvalOptions, Task, TaskDefaults, candidate_logits
from vilbert_core.training.losses import multiple_choice_loss


def vcr_pair_logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(B, C) pair logits of a VCR batch: C texts (B, C, T) against each question's one image.

    The image's embedding and visual layers before co-attention run once per question, not once per
    choice (`embed_image`); the same logits as the model's forward on the image repeated C times.
    """
    b, c, t = batch["input_ids"].shape
    text = {k: batch[k].reshape(b * c, t) for k in TEXT_KEYS}
    image = model.vilbert.embed_image(*(batch[k] for k in IMAGE_KEYS)).repeat_interleave(c, dim=0)
    text_states = model.vilbert.embed_text(text["input_ids"], text["token_type_ids"], text["attention_mask"])
    image_mask = batch["image_mask"].repeat_interleave(c, dim=0)
    return model.score_pairs(text_states, image, text["attention_mask"], image_mask).view(b, c)


def _argmax(v: list[float]) -> int:
    """Index of the largest value (the first of ties)."""
    return max(range(len(v)), key=v.__getitem__)


def vcr_scores(probs: dict, labels: dict, keep: set[str] | None = None) -> dict[str, float] | None:
    """VCR accuracies over the questions with both stages and a known answer (optionally only `keep`)."""
    both = [a for a in sorted(probs) if {"q_a", "qa_r"} <= probs[a].keys() and labels[a]["q_a"] >= 0
            and (keep is None or a in keep)]  # fmt: skip
    if not both:
        return None
    return vcr_accuracy(
        [_argmax(probs[a]["q_a"]) for a in both],
        [labels[a]["q_a"] for a in both],
        [_argmax(probs[a]["qa_r"]) for a in both],
        [labels[a]["qa_r"] for a in both],
    ) | {"num_scored": len(both)}


class VCRTask(Task):
    """Multiple-choice answers and rationales."""

    name = "vcr"
    shard_task = "vcr"
    heads = "a pair head"
    defaults = TaskDefaults(batch_size=64, lr=2e-5, epochs=20, metric="accuracy")

    def loss(self, model: nn.Module, batch: dict[str, Any], masking: Any = None) -> dict[str, torch.Tensor]:
        """Cross-entropy over the 4 choices' pair logits (the image repeated for each choice)."""
        return {"loss": multiple_choice_loss(candidate_logits(model, batch, shared_image=True), batch["label"])}

    @torch.no_grad()
    def validation_score(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """1 where the right choice has the highest pair logit."""
        return (vcr_pair_logits(model, batch).argmax(-1) == batch["label"]).float()

    def _pass(
        self, loaded: Any, data_dir: Path, options: EvalOptions, swap_images: bool = False
    ) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, int]]]:
        """Choice probabilities and labels per annotation id and stage ("q_a", "qa_r"; a stage task: its own)."""
        probs: dict[str, dict[str, list[float]]] = {}
        labels: dict[str, dict[str, int]] = {}
        desc = f"{self.name}, images shuffled" if swap_images else self.name
        bar = tqdm(desc=desc, unit="q", disable=not options.progress)
        batches = task_batches(loaded, data_dir, "vcr", options.batch_size, 0, options.num_workers, swap_images,
                               keep=self.keep_examples)  # fmt: skip
        for batch in batches:
            p = vcr_pair_logits(loaded.model, batch).float().softmax(-1)  # (B,4)
            for aid, stage, row, lab in zip(batch["annot_id"], batch["vcr_stage"], p.tolist(),
                                            batch["label"].tolist(), strict=True):  # fmt: skip
                probs.setdefault(aid, {})[stage] = row
                labels.setdefault(aid, {})[stage] = lab
            bar.update(p.shape[0])
        bar.close()
        return probs, labels

    @torch.inference_mode()
    def evaluate(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, setup: Any
    ) -> tuple[dict, Any]:
        """VCR Q->A, QA->R and Q->AR accuracy beside chance and with shuffled images; predictions per stage."""
        probs, labels = self._pass(loaded, data_dir, options)
        if not probs:
            raise EvalError(f"--data {data_dir}: no VCR questions")
        predictions = {aid: {f"{s}_probs": v for s, v in st.items()} for aid, st in sorted(probs.items())}
        metrics: dict[str, Any] = {"num_questions": len(probs)}
        scores = vcr_scores(probs, labels)
        if scores is None:
            return metrics, predictions
        metrics.update({k: v for k, v in scores.items() if k != "num_scored"})
        metrics["baselines"] = {"chance": vcr_chance()}
        warnings: list[str] = []
        if options.vision_check:
            shuffled = self._pass(loaded, data_dir, options, swap_images=True)
            warnings = shuffle_drop_on_scored(metrics, "q_a", vcr_scores, (probs, labels), scores, shuffled)
        metrics["warnings"] = warnings
        return metrics, predictions

    def plots(self, split: str, metrics: dict, extra: Any, out: Path) -> list[str]:
        """Q->A, QA->R and Q->AR bars."""
        from vilbert_core.evaluation.plots import plot_accuracy_bars

        if "q_a" not in metrics:
            return []
        values = {"Q->A": metrics["q_a"], "QA->R": metrics["qa_r"], "Q->AR": metrics["q_ar"]}
        return [plot_accuracy_bars(values, out / f"accuracy_{file_safe(split)}.png", f"VCR ({split})").name]


class VCRStageTask(VCRTask):
    """One VCR stage as a task of its own (the multi-task reference's VCR_Q-A and VCR_QA-R): the same
    shards and pair head, only that stage's examples."""

    stage = "q_a"
    stage_title = "Q->A"

    def __init__(self) -> None:
        self.keep_examples = {"vcr_stage": self.stage}
        self.examples_per_record = 1

    @torch.inference_mode()
    def evaluate(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, setup: Any
    ) -> tuple[dict, Any]:
        """The stage's accuracy beside chance (25) and with shuffled images; choice probabilities per annotation."""

        def scored(swap: bool) -> tuple[dict[str, list[float]], dict[str, int]]:
            probs, labels = self._pass(loaded, data_dir, options, swap)  # only this stage's examples
            return {a: p[self.stage] for a, p in probs.items()}, {a: y[self.stage] for a, y in labels.items()}

        def accuracy(probs: dict, labels: dict, keep: set[str] | None = None) -> dict[str, float] | None:
            ids = [a for a in sorted(probs) if labels[a] >= 0 and (keep is None or a in keep)]
            if not ids:
                return None
            return {"accuracy": 100.0 * sum(_argmax(probs[a]) == labels[a] for a in ids) / len(ids), "num_scored": len(ids)}

        probs, labels = scored(False)
        if not probs:
            raise EvalError(f"--data {data_dir}: no VCR {self.stage_title} examples")
        metrics: dict[str, Any] = {"num_questions": len(probs)}
        scores = accuracy(probs, labels)
        predictions = {aid: {f"{self.stage}_probs": row} for aid, row in sorted(probs.items())}
        if scores is None:  # a test split: no labels
            return metrics, predictions
        metrics.update({"accuracy": scores["accuracy"], "num_scored": scores["num_scored"],
                        "baselines": {"chance": {"accuracy": vcr_chance()[self.stage]}}})  # fmt: skip
        warnings: list[str] = []
        if options.vision_check:
            warnings = shuffle_drop_on_scored(metrics, "accuracy", accuracy, (probs, labels), scores, scored(True))
        metrics["warnings"] = warnings
        return metrics, predictions

    def plots(self, split: str, metrics: dict, extra: Any, out: Path) -> list[str]:
        """No plot: one number."""
        return []


TASK = VCRTask()
