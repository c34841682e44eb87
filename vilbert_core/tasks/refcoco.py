"""RefCOCO: score every detected region for a referring expression; right when the top one has IoU >= 0.5.

Training: BCE of every real region's logit against its IoU with the referred box (IoU < 0.5 -> 0).
Evaluation: accuracy per split (and "all" when several) beside a random region's, and with other
images' appearance features on each image's own boxes (the IoU targets stay).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vilbert_core.evaluation.baselines import refcoco_chance
from vilbert_core.evaluation.common import record_count, shuffle_drop, task_batches
from vilbert_core.evaluation.loading import EvalError
from vilbert_core.evaluation.metrics import refcoco_correct
from vilbert_core.tasks import EvalOptions, Task, TaskDefaults, model_inputs
from vilbert_core.training.losses import refer_loss


class RefcocoTask(Task):
    """Referring expressions: point at the referred region."""

    name = "refcoco"
    shard_task = "refcoco"
    heads = "a region head"
    defaults = TaskDefaults(batch_size=256, lr=4e-5, epochs=20, metric="accuracy")
    explain_head = "refer"

    def loss(self, model: nn.Module, batch: dict[str, Any], masking: Any = None) -> dict[str, torch.Tensor]:
        """BCE of the real regions' logits against their IoU targets."""
        out = model(**model_inputs(batch))
        return {"loss": refer_loss(out.region_logits, batch["region_target"], batch["image_mask"])}

    @torch.no_grad()
    def validation_score(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """1 where the top real region overlaps the referred box with IoU >= 0.5."""
        out = model(**model_inputs(batch))
        logits = out.region_logits.float().masked_fill(batch["image_mask"] == 0, float("-inf"))
        top = logits.argmax(-1, keepdim=True)
        return (batch["region_iou"].gather(1, top).squeeze(1) >= 0.5).float()

    def _pass(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, swap_images: bool = False
    ) -> tuple[list[bool], list[float], list[dict]]:
        """Per expression: correct or not, the chance of a random region, and the prediction record."""
        correct_all: list[bool] = []
        chance: list[float] = []
        predictions: list[dict] = []
        desc = "refcoco, features shuffled" if swap_images else "refcoco"
        bar = tqdm(total=record_count(info), desc=desc, unit="ref", disable=not options.progress)
        batches = task_batches(loaded, data_dir, "refcoco", options.batch_size, 0, options.num_workers, swap_images)
        for batch in batches:
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
    def evaluate(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, setup: Any
    ) -> tuple[dict, Any]:
        """Accuracy (top detected region has IoU >= 0.5 with the referred box), beside a random region's.

        The vision check gives every image's boxes another image's appearance features (the boxes, and so
        the IoU targets, stay): a model that points by position and wording alone loses nothing.
        """
        correct_all, chance, predictions = self._pass(loaded, data_dir, info, options)
        if not correct_all:
            raise EvalError(f"--data {data_dir}: no referring expressions")
        accuracy = 100.0 * sum(correct_all) / len(correct_all)
        metrics: dict[str, Any] = {"accuracy": accuracy, "num_refs": len(correct_all),
                                   "baselines": {"chance": {"accuracy": 100.0 * sum(chance) / len(chance)}}}  # fmt: skip
        warnings: list[str] = []
        if options.vision_check:
            s_correct, _, s_pred = self._pass(loaded, data_dir, info, options, swap_images=True)
            if s_correct:
                scored = {(p["ref_id"], p["sent_id"]) for p in s_pred}
                same = [p["correct"] for p in predictions if (p["ref_id"], p["sent_id"]) in scored]
                shuffled = {"accuracy": 100.0 * sum(s_correct) / len(s_correct), "num_refs": len(s_correct)}
                warnings = shuffle_drop(metrics, shuffled, "accuracy", 100.0 * sum(same) / len(same))
        metrics["warnings"] = warnings
        return metrics, predictions

    def finish(self, results: dict[str, dict], out: Path) -> list[str]:
        """Split "all" (every expression of every split) when there are several; accuracy per split."""
        from vilbert_core.evaluation.plots import plot_accuracy_bars

        if len(results) > 1:
            n = sum(m["num_refs"] for m in results.values())
            acc = sum(m["accuracy"] * m["num_refs"] for m in results.values()) / n
            results["all"] = {"accuracy": acc, "num_refs": n}
        values = {s: m["accuracy"] for s, m in results.items()}
        path = out / "accuracy_by_split.png"
        return [plot_accuracy_bars(values, path, "RefCOCO accuracy (top region IoU >= 0.5)").name]


TASK = RefcocoTask()
