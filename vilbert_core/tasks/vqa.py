"""VQA v2: an answer classifier over the training answers, scored with the official accuracy.

Training: BCE-with-logits on the soft scores x number of answers (the reference); validation: the soft
score of the top answer. Evaluation: the official VQA accuracy overall, per answer type and per
question type, beside the same model given other images' regions and the blind baselines (the
question-only prior and the majority answer, fitted on the training split); the submission file
[{"question_id", "answer"}].

`VQATask` is written so that other answer-classification tasks (GQA) subclass it: they change the
metric (`accuracy`), the per-question fields, the prior's answer rule and the submission format.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipelines.formats.tasks import answers_path, iter_task_records
from vilbert_core.evaluation.baselines import QuestionPrior
from vilbert_core.evaluation.common import comparison_lines, file_safe, record_count, task_batches
from vilbert_core.evaluation.loading import EvalError
from vilbert_core.evaluation.metrics import vqa_accuracy
from vilbert_core.tasks import EvalOptions, Task, TaskDefaults, model_inputs
from vilbert_core.training.losses import vqa_loss

logger = logging.getLogger(__name__)


def fit_question_prior(train_data: str | Path | None, **fit: Any) -> QuestionPrior | None:
    """The question-only prior of a training TASKDIR; None (with a log line) when there is none."""
    if train_data is None:
        logger.warning("no training data known (pass --train-data): blind baselines are not reported")
        return None
    path = Path(train_data)
    if not path.is_dir():
        logger.warning("training data %s is not a TASKDIR here: blind baselines are not reported", path)
        return None
    try:
        return QuestionPrior.fit(iter_task_records(path), **fit)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise EvalError(f"--train-data {path}: cannot fit the question-only prior: {err}") from None


def vision_report(metrics: dict) -> tuple[dict, list[str]]:
    """Whether the model uses the image (shuffled-image run) and beats a blind model (question-only prior)."""
    from vilbert_core.evaluation.common import VISION_DROP_MIN

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


VQA_ROWS = (("per_answer_type", ""), ("per_question_type", "q: "))


def comparison(metrics: dict, rows: Iterable[tuple[str, str]] = VQA_ROWS) -> dict[str, dict[str, float]]:
    """Accuracy of the model and its references by row (overall, then each group's keys with its prefix).

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
    rows = list(rows)
    table: dict[str, dict[str, float]] = {}
    for title, m in columns.items():
        table[title] = {"overall": m["overall"]}
        for group, prefix in rows:
            table[title].update({f"{prefix}{k}": v for k, v in m.get(group, {}).items()})
    return table


def vqa_comparison(metrics: dict) -> dict[str, dict[str, float]]:
    """VQA accuracy of the model and its references by row (overall, answer types, `q: ` question types)."""
    return comparison(metrics, VQA_ROWS)


class VQATask(Task):
    """Open-ended questions answered by a classifier over the training answers."""

    name = "vqa"
    shard_task = "vqa"
    heads = "a VQA head"
    defaults = TaskDefaults(batch_size=256, lr=4e-5, epochs=20, metric="vqa_score")
    answer_head = True
    explain_head = "vqa"
    title = "VQA accuracy"  # the report's table
    # the metric's groups, as (metrics key, row prefix in the report); the first is plotted
    groups: tuple[tuple[str, str], ...] = VQA_ROWS
    plot_name = "accuracy_by_answer_type"
    # per-question lists of a batch that evaluation keeps (besides question_id), see `question`
    question_fields: tuple[str, ...] = ("answers", "answer_type", "question_type", "question")

    # -------------------------------------------------------------- training
    def loss(self, model: nn.Module, batch: dict[str, Any], masking: Any = None) -> dict[str, torch.Tensor]:
        """BCE-with-logits on the soft scores, times the answer count."""
        out = model(**model_inputs(batch))
        return {"loss": vqa_loss(out.vqa_logits, batch["vqa_target"])}

    @torch.no_grad()
    def validation_score(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The soft score of the predicted answer."""
        out = model(**model_inputs(batch))
        pred = out.vqa_logits.argmax(-1, keepdim=True)
        return batch["vqa_target"].gather(1, pred).squeeze(1).float()

    # -------------------------------------------------------------- what subclasses change
    def accuracy(self, predictions: Mapping[Any, str], questions: list[dict]) -> dict:
        """The reported accuracy tables ("overall" and `groups`) and "num_questions"."""
        acc = vqa_accuracy(predictions, questions)
        return {"overall": acc["overall"], **{k: acc[k] for k, _ in self.groups}, "num_questions": acc["num_questions"]}

    def question(self, batch: dict[str, Any], i: int) -> dict[str, Any]:
        """What the metric and the prior read of question i of a batch (a missing question type is None)."""
        q = {k: batch[k][i] for k in self.question_fields}
        return {**q, "question_type": q["question_type"] or None}

    def answered(self, question: dict) -> bool:
        """Whether a question has ground truth to score (test splits have none)."""
        return bool(question["answers"])

    def fit_prior(self, train_data: str | Path | None) -> QuestionPrior | None:
        """The question-only prior of the training split."""
        return fit_question_prior(train_data)

    def prior_answer(self, prior: QuestionPrior, question: dict) -> str:
        """The question-only prior's answer to one question."""
        return prior.predict(question["question"], question["question_type"])

    def submission(self, predictions: Mapping[Any, str]) -> Any:
        """The official submission file: [{"question_id", "answer"}] sorted by id."""
        return [{"question_id": q, "answer": predictions[q]} for q in sorted(predictions)]

    # -------------------------------------------------------------- evaluation
    def eval_setup(self, loaded: Any, options: EvalOptions) -> QuestionPrior | None:
        """The question-only prior, fitted on --train-data or the run's training data."""
        return self.fit_prior(options.train_data or loaded.train_data)

    def check_answer_list(self, loaded: Any, data_dir: Path, info: dict) -> None:
        """Make sure the model's answer list is known (else the shards', which are the training split's) and fits."""
        shard_answers = answers_path(data_dir, info)
        if loaded.answers is None and shard_answers is not None:
            from pipelines.vqa_answers import load_answer_vocab

            loaded.answers = load_answer_vocab(shard_answers)
            logger.warning("no answer list with the model; using %s", shard_answers)
        if loaded.answers is None:
            raise EvalError(f"{self.name} needs the answer list: a run directory with answers.json, or --answers FILE")
        if len(loaded.answers) != loaded.model.config.num_answers:
            raise EvalError(
                f"{len(loaded.answers)} answers in the answer list but the model's VQA head has "
                f"{loaded.model.config.num_answers}"
            )

    def answer_pass(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, swap_images: bool = False
    ) -> tuple[dict[Any, str], list[dict]]:
        """Predicted answer per question id, and the questions (question_id and `question_fields`) in reading order."""
        predictions: dict[Any, str] = {}
        questions: list[dict] = []
        desc = f"{self.name}, images shuffled" if swap_images else self.name
        bar = tqdm(total=record_count(info), desc=desc, unit="q", disable=not options.progress)
        batches = task_batches(loaded, data_dir, self.shard_task, options.batch_size, 0, options.num_workers,
                               swap_images)  # fmt: skip
        for batch in batches:
            logits = loaded.model(**model_inputs(batch)).vqa_logits  # (B,A)
            ids = batch["question_id"]
            ids = ids.tolist() if torch.is_tensor(ids) else ids
            for i, (qid, a) in enumerate(zip(ids, logits.argmax(-1).tolist(), strict=True)):
                predictions[qid] = loaded.answers[a]
                questions.append({"question_id": qid, **self.question(batch, i)})
            bar.update(len(batch["image_id"]))
        bar.close()
        return predictions, questions

    @torch.inference_mode()
    def evaluate(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, prior: QuestionPrior | None
    ) -> tuple[dict, Any]:
        """Accuracy tables beside the shuffled-image run and the blind baselines; the submission file.

        prior: the question-only prior fitted on the training split; its accuracy and the majority
        answer's are reported beside the model's.
        """
        self.check_answer_list(loaded, data_dir, info)
        predictions, questions = self.answer_pass(loaded, data_dir, info, options)
        if not questions:
            raise EvalError(f"--data {data_dir}: no questions")
        submission = self.submission(predictions)
        with_answers = [q for q in questions if self.answered(q)]
        metrics: dict[str, Any] = {"num_questions": len(questions)}
        if not with_answers:  # test splits ship no answers: predictions only
            return metrics, submission
        acc = self.accuracy(predictions, with_answers)
        metrics.update(acc)
        if options.vision_check:
            shuffled, _ = self.answer_pass(loaded, data_dir, info, options, swap_images=True)
            scored = [q for q in with_answers if q["question_id"] in shuffled]  # a lone image has no other
            if scored:
                s_acc = self.accuracy(shuffled, scored)
                same = self.accuracy(predictions, scored)["overall"] if len(scored) < len(with_answers) else acc["overall"]
                metrics["shuffled_images"] = {**s_acc, "num_questions": len(scored),
                                              "drop": round(same - s_acc["overall"], 2)}  # fmt: skip
        if prior is not None:
            blind = {
                "question_prior": {q["question_id"]: self.prior_answer(prior, q) for q in with_answers},
                "majority_answer": {q["question_id"]: prior.majority for q in with_answers},
            }
            metrics["baselines"] = {}
            for name, p in blind.items():
                tables = self.accuracy(p, with_answers)
                tables.pop("num_questions")
                metrics["baselines"][name] = tables
            metrics["baselines"]["majority_answer"]["answer"] = prior.majority
            metrics["baselines"]["train_questions"] = prior.num_train_questions
        metrics["vision"], metrics["warnings"] = vision_report(metrics)
        return metrics, submission

    def report(self, metrics: dict) -> tuple[list[str], dict[str, dict]]:
        """One table: the model, images shuffled and the blind baselines, overall and per group."""
        groups = {k: v for k, v in metrics.items() if isinstance(v, dict)}
        if "overall" not in metrics:
            return [], groups
        return comparison_lines(comparison(metrics, self.groups), self.title), {
            k: v for k, v in groups.items() if k == "vision"
        }

    def plots(self, split: str, metrics: dict, extra: Any, out: Path) -> list[str]:
        """The model beside its blind baselines and shuffled images, overall and by the first group."""
        from vilbert_core.evaluation.plots import plot_accuracy_comparison

        if self.groups[0][0] not in metrics:
            return []
        first = comparison(metrics, self.groups[:1])
        path = out / f"{self.plot_name}_{file_safe(split)}.png"
        return [plot_accuracy_comparison(first, path, f"{self.title} ({split})").name]


TASK = VQATask()
