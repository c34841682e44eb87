"""Flickr30k Entities phrase grounding: score every detected region for a phrase; right when the top one has IoU >= 0.5.

Training and validation are RefCOCO's (the region head; BCE of every real region's logit against its
any-box IoU, zeroed below 0.5). Evaluation: accuracy at IoU 0.5 under the any-box protocol (the
reported metric) and the merged-boxes protocol, per phrase type (people, clothing, bodyparts,
animals, vehicles, instruments, scene, other), beside a random region's, and with other images'
appearance features on each image's own boxes (the IoU targets stay). Predictions:
[{"phrase_id", "sent_id", "region", "iou", "correct"}] (region: index into the image's detected boxes).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vilbert_core.evaluation.baselines import refcoco_chance
from vilbert_core.evaluation.common import record_count, shuffle_drop, task_batches
from vilbert_core.evaluation.loading import EvalError
from vilbert_core.tasks import EvalOptions, TaskDefaults, model_inputs
from vilbert_core.tasks.refcoco import RefcocoTask


def grounding_accuracy(predictions: list[dict]) -> dict[str, Any]:
    """Accuracy (percent) overall, under merged boxes, and per phrase type, of per-phrase prediction records."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        by_type[p["phrase_type"]].append(p["correct"])
    n = len(predictions)
    return {"accuracy": 100.0 * sum(p["correct"] for p in predictions) / n,
            "accuracy_merged_boxes": 100.0 * sum(p["correct_merged"] for p in predictions) / n,
            "per_phrase_type": {t: 100.0 * sum(v) / len(v) for t, v in sorted(by_type.items())},
            "num_phrases": n}  # fmt: skip


class Flickr30kEntitiesTask(RefcocoTask):
    """Phrase grounding: point at a region of the phrase's entity."""

    name = "flickr30k_entities"
    shard_task = "flickr30k_entities"
    # RefCOCO's recipe (the multi-task reference trains grounding tasks alike)
    defaults = TaskDefaults(batch_size=256, lr=4e-5, epochs=20, metric="accuracy", max_text_len=48)

    def _pass(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, swap_images: bool = False
    ) -> tuple[list[dict], list[float]]:
        """Per phrase: the prediction record (correct under both protocols), and a random region's chance."""
        predictions: list[dict] = []
        chance: list[float] = []
        desc = f"{self.name}, features shuffled" if swap_images else self.name
        bar = tqdm(total=record_count(info), desc=desc, unit="phrase", disable=not options.progress)
        batches = task_batches(loaded, data_dir, self.shard_task, options.batch_size, 0, options.num_workers,
                               swap_images)  # fmt: skip
        for batch in batches:
            logits = loaded.model(**model_inputs(batch)).region_logits.float()  # (B,R)
            valid = batch["image_mask"].bool().clone()
            valid[:, 0] = False  # the global [IMG] region is not a box to point at
            top = logits.masked_fill(~valid, float("-inf")).argmax(-1)
            iou = batch["region_iou"].gather(1, top[:, None]).squeeze(1).tolist()
            merged = batch["region_iou_merged"].gather(1, top[:, None]).squeeze(1).tolist()
            has_region = valid.any(-1).tolist()
            for i, (pid, sid, ptype) in enumerate(zip(batch["phrase_id"], batch["sent_id"], batch["phrase_type"],
                                                      strict=True)):  # fmt: skip
                # region index counts the global region: detected box r - 1 of the image
                predictions.append({"phrase_id": pid, "sent_id": sid, "phrase_type": ptype,
                                    "region": int(top[i]) - 1, "iou": iou[i],
                                    "correct": has_region[i] and iou[i] >= 0.5,
                                    "correct_merged": has_region[i] and merged[i] >= 0.5})  # fmt: skip
            chance.extend(refcoco_chance(batch["region_iou"], valid).tolist())
            bar.update(len(batch["image_id"]))
        bar.close()
        return predictions, chance

    @torch.inference_mode()
    def evaluate(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, setup: Any
    ) -> tuple[dict, Any]:
        """Accuracy at IoU 0.5 (any-box, merged boxes, per phrase type) beside a random region's; the shuffle check."""
        predictions, chance = self._pass(loaded, data_dir, info, options)
        if not predictions:
            raise EvalError(f"--data {data_dir}: no phrases")
        metrics: dict[str, Any] = {**grounding_accuracy(predictions),
                                   "baselines": {"chance": {"accuracy": 100.0 * sum(chance) / len(chance)}}}  # fmt: skip
        warnings: list[str] = []
        if options.vision_check:
            shuffled, _ = self._pass(loaded, data_dir, info, options, swap_images=True)
            if shuffled:
                scored = {p["phrase_id"] for p in shuffled}
                same = [p["correct"] for p in predictions if p["phrase_id"] in scored]
                s_acc = grounding_accuracy(shuffled)
                warnings = shuffle_drop(metrics, {"accuracy": s_acc["accuracy"], "num_phrases": len(shuffled)},
                                        "accuracy", 100.0 * sum(same) / len(same))  # fmt: skip
        metrics["warnings"] = warnings
        return metrics, [{k: v for k, v in p.items() if k != "phrase_type"} for p in predictions]

    def finish(self, results: dict[str, dict], out: Path) -> list[str]:
        """Accuracy per split (any-box protocol)."""
        from vilbert_core.evaluation.plots import plot_accuracy_bars

        values = {s: m["accuracy"] for s, m in results.items() if "accuracy" in m}
        if not values:
            return []
        path = out / "accuracy_by_split.png"
        return [plot_accuracy_bars(values, path, "Flickr30k Entities accuracy (top region IoU >= 0.5)").name]


TASK = Flickr30kEntitiesTask()
