"""What the tasks that pick one of a few fixed classes share (NLVR2, SNLI-VE, GuessWhat?! answers).

Training: cross-entropy over the classes; validation: the predicted class is the label. Evaluation:
accuracy overall and per gold class (percent), beside chance and the same model given other images'
regions; predictions [{<id field>, "prediction", "probs"}]. A subclass says which logits it reads, its
class names and the example id field. Not a registry module (its name starts with "_").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vilbert_core.evaluation.common import (
    comparison_lines,
    record_count,
    shuffle_drop_on_scored,
    task_batches,
)
from vilbert_core.evaluation.loading import EvalError
from vilbert_core.tasks import EvalOptions, Task, model_inputs


def class_accuracy(predicted: list[int], labels: list[int], classes: tuple[str, ...]) -> dict[str, Any]:
    """Accuracy (percent) overall and per gold class over labelled examples (label >= 0)."""
    scored = [(p, y) for p, y in zip(predicted, labels, strict=True) if y >= 0]
    if not scored:
        return {}
    per_class = {}
    for c, name in enumerate(classes):
        hits = [p == y for p, y in scored if y == c]
        if hits:
            per_class[name] = 100.0 * sum(hits) / len(hits)
    overall = 100.0 * sum(p == y for p, y in scored) / len(scored)
    return {"accuracy": overall, "per_class": per_class, "num_scored": len(scored)}


class LabelTask(Task):
    """One of `classes` per example, from the logits `logits` reads."""

    classes: tuple[str, ...] = ()
    id_field: str = ""  # the batch list that names each example in predictions
    title = "accuracy"  # the report table's title

    def logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(B, len(classes)) logits of a batch."""
        return model(**model_inputs(batch)).tri_logits

    # -------------------------------------------------------------- training
    def loss(self, model: nn.Module, batch: dict[str, Any], masking: Any = None) -> dict[str, torch.Tensor]:
        """Cross-entropy over the classes (examples without a label are left out)."""
        return {"loss": F.cross_entropy(self.logits(model, batch).float(), batch["label"], ignore_index=-1)}

    @torch.no_grad()
    def validation_score(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """1 where the highest logit is the label's."""
        return (self.logits(model, batch).argmax(-1) == batch["label"]).float()

    # -------------------------------------------------------------- evaluation
    def _pass(self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions,
              swap_images: bool = False) -> tuple[dict[Any, list[float]], dict[Any, int]]:  # fmt: skip
        """Class probabilities and labels per example id."""
        probs: dict[Any, list[float]] = {}  # by example id, as the records give it (GuessWhat?!'s are numbers)
        labels: dict[Any, int] = {}
        desc = f"{self.name}, images shuffled" if swap_images else self.name
        bar = tqdm(total=record_count(info), desc=desc, unit="ex", disable=not options.progress)
        for batch in task_batches(loaded, data_dir, self.shard_task, options.batch_size, 0, options.num_workers,
                                  swap_images):  # fmt: skip
            p = self.logits(loaded.model, batch).float().softmax(-1)
            for key, row, y in zip(batch[self.id_field], p.tolist(), batch["label"].tolist(), strict=True):
                probs[key], labels[key] = row, y
            bar.update(p.shape[0])
        bar.close()
        return probs, labels

    def _scores(self, probs: dict[Any, list[float]], labels: dict[Any, int], keep: Any = None) -> dict[str, Any]:
        """class_accuracy of the examples in `keep` (all by default), in id order."""
        ids = sorted(k for k in probs if keep is None or k in keep)
        predicted = [max(range(len(self.classes)), key=probs[k].__getitem__) for k in ids]
        return class_accuracy(predicted, [labels[k] for k in ids], self.classes)

    @torch.inference_mode()
    def evaluate(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, setup: Any
    ) -> tuple[dict, Any]:
        """Accuracy overall and per class beside chance and shuffled images; predictions per example."""
        probs, labels = self._pass(loaded, data_dir, info, options)
        if not probs:
            raise EvalError(f"--data {data_dir}: no {self.name} examples")
        predictions = [{self.id_field: k, "prediction": self.classes[max(range(len(v)), key=v.__getitem__)],
                        "probs": [round(x, 6) for x in v]} for k, v in sorted(probs.items())]  # fmt: skip
        metrics: dict[str, Any] = {"num_examples": len(probs)}
        scores = self._scores(probs, labels)
        if not scores:  # a test split without labels: predictions only
            return metrics, predictions
        metrics.update(scores)
        metrics["baselines"] = {"chance": {"accuracy": 100.0 / len(self.classes)}}
        warnings: list[str] = []
        if options.vision_check:
            shuffled = self._pass(loaded, data_dir, info, options, swap_images=True)
            warnings = shuffle_drop_on_scored(metrics, "accuracy", self._scores, (probs, labels), scores, shuffled)
        metrics["warnings"] = warnings
        return metrics, predictions

    def report(self, metrics: dict) -> tuple[list[str], dict[str, dict]]:
        """One table: the model, images shuffled and chance, overall and per class."""
        groups = {k: v for k, v in metrics.items() if isinstance(v, dict)}
        if "accuracy" not in metrics:
            return [], groups
        columns = {"model": metrics}
        if "shuffled_images" in metrics:
            columns["images shuffled"] = metrics["shuffled_images"]
        columns["chance"] = metrics["baselines"]["chance"]
        table = {title: {"overall": m["accuracy"], **{f"class: {c}": v for c, v in m.get("per_class", {}).items()}}
                 for title, m in columns.items()}  # fmt: skip
        return comparison_lines(table, self.title), {k: v for k, v in groups.items() if k == "vision"}
