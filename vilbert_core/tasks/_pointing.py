"""Shared model half of the pointing tasks: score a record's candidate boxes with the region head, pick the top one.

Training: cross-entropy over the candidates' region logits (softmax over the C candidates only). It is
RefCOCO's head with another loss: there the target is a soft IoU over every detected region, so each
region is its own binary question (BCE); here exactly one of a known, small set of boxes is right
and the metric is the argmax over that set, which is what a softmax over the set trains. Validation
and evaluation: accuracy, the top-scoring candidate being the right box; the chance baseline picks a
candidate at random (1 / C per record); the vision check gives every image's candidate boxes another
image's appearance features (the boxes stay). Predictions: {record id: {"box_id", "answer_box_id",
"correct", "probs" (over the candidates, in `candidate_ids` order)}}.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vilbert_core.evaluation.common import file_safe, record_count, shuffle_drop, task_batches
from vilbert_core.evaluation.loading import EvalError
from vilbert_core.tasks import EvalOptions, Task, model_inputs
from vilbert_core.training.losses import multiple_choice_loss


def candidate_region_logits(region_logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """(B, C) float32 region logits of each record's candidates; -inf where a record has fewer than C."""
    logits = region_logits.float().gather(1, batch["candidate_regions"])
    return logits.masked_fill(~batch["candidate_mask"], float("-inf"))


def pointing_accuracy(scores: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """Percent of records whose highest-scoring candidate (the first of ties) is the right one."""
    if not scores:
        raise ValueError("no records to score")
    right = sum(max(range(len(s)), key=s.__getitem__) == y for s, y in zip(scores, labels, strict=True))
    return 100.0 * right / len(scores)


class PointingTask(Task):
    """Pick one of a record's candidate boxes with the region head."""

    heads = "a region head"
    explain_head = "refer"
    unit = "record"  # progress bar unit

    def loss(self, model: nn.Module, batch: dict[str, Any], masking: Any = None) -> dict[str, torch.Tensor]:
        """Cross-entropy over the candidates' region logits."""
        out = model(**model_inputs(batch))
        return {"loss": multiple_choice_loss(candidate_region_logits(out.region_logits, batch), batch["label"])}

    @torch.no_grad()
    def validation_score(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """1 where the right candidate has the highest region logit."""
        out = model(**model_inputs(batch))
        return (candidate_region_logits(out.region_logits, batch).argmax(-1) == batch["label"]).float()

    def _pass(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, swap_images: bool = False
    ) -> tuple[dict[Any, dict], list[list[float]], list[int]]:
        """(predictions by record id, candidate probabilities, labels) of one TASKDIR."""
        predictions: dict[Any, dict] = {}
        scores: list[list[float]] = []
        labels: list[int] = []
        desc = f"{self.name}, features shuffled" if swap_images else self.name
        bar = tqdm(total=record_count(info), desc=desc, unit=self.unit, disable=not options.progress)
        batches = task_batches(loaded, data_dir, self.shard_task, options.batch_size, 0, options.num_workers,
                               swap_images)  # fmt: skip
        for batch in batches:
            probs = candidate_region_logits(loaded.model(**model_inputs(batch)).region_logits, batch).softmax(-1)
            for rid, ids, row, y in zip(batch["record_id"], batch["candidate_ids"], probs.tolist(),
                                        batch["label"].tolist(), strict=True):  # fmt: skip
                row = row[: len(ids)]
                top = max(range(len(row)), key=row.__getitem__)
                predictions[rid] = {"box_id": ids[top], "answer_box_id": ids[y], "correct": top == y,
                                    "probs": [round(p, 6) for p in row]}  # fmt: skip
                scores.append(row)
                labels.append(y)
            bar.update(len(batch["image_id"]))
        bar.close()
        return predictions, scores, labels

    @torch.inference_mode()
    def evaluate(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, setup: Any
    ) -> tuple[dict, Any]:
        """Accuracy (top candidate = the right box) beside a random candidate's, and with shuffled appearance."""
        predictions, scores, labels = self._pass(loaded, data_dir, info, options)
        if not predictions:
            raise EvalError(f"--data {data_dir}: no {self.name} records")
        chance = 100.0 * sum(1 / len(s) for s in scores) / len(scores)
        metrics: dict[str, Any] = {"accuracy": pointing_accuracy(scores, labels), "num_records": len(scores),
                                   "baselines": {"chance": {"accuracy": chance}}}  # fmt: skip
        warnings: list[str] = []
        if options.vision_check:
            shuffled, s_scores, s_labels = self._pass(loaded, data_dir, info, options, swap_images=True)
            if shuffled:  # a lone image has no other image to take features from
                same = [predictions[r]["correct"] for r in shuffled]
                s_metrics = {"accuracy": pointing_accuracy(s_scores, s_labels), "num_records": len(s_scores)}
                warnings = shuffle_drop(metrics, s_metrics, "accuracy", 100.0 * sum(same) / len(same))
        metrics["warnings"] = warnings
        return metrics, {str(k): v for k, v in sorted(predictions.items())}

    def finish(self, results: dict[str, dict], out: Path) -> list[str]:
        """Accuracy per split."""
        from vilbert_core.evaluation.plots import plot_accuracy_bars

        values = {s: m["accuracy"] for s, m in results.items() if "accuracy" in m}
        if not values:
            return []
        path = out / f"accuracy_by_split_{file_safe(self.name)}.png"
        return [plot_accuracy_bars(values, path, f"{self.name} accuracy (top candidate is the right box)").name]
