"""Blind baselines: what a model that never looks at the image scores, to judge a trained model against.

Beating the majority answer proves nothing about vision: a model that reads only the question beats it
too. The strongest simple blind baseline for VQA is the question-only prior: for each question, the
most common training answer among training questions with the same normalised wording, backing off to
the most common answer of its question type ("what color is the", "how many", ...), then to the
overall majority answer. The other tasks get their chance level, computed exactly for the split.

Pure functions over records and tensors: nothing here touches a model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pipelines.vqa_answers import normalize_answer

_NON_WORD = re.compile(r"[^\w\s]")


def normalize_question(question: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: 'What color is it?' -> 'what color is it'."""
    return " ".join(_NON_WORD.sub(" ", question.lower()).split())


def question_answer(answers: Sequence[str]) -> str | None:
    """A training question's answer: its most frequent normalised human answer (ties: alphabetical)."""
    counts = Counter(a for a in (normalize_answer(x) for x in answers) if a)
    if not counts:
        return None
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def _most_common(counter: Counter) -> str:
    """The most common key; ties broken alphabetically so the baseline is the same on every run."""
    return min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]


@dataclass
class QuestionPrior:
    """Most common training answer per normalised question, per question type, and overall."""

    majority: str
    by_question: dict[str, str] = field(default_factory=dict)
    by_type: dict[str, str] = field(default_factory=dict)
    num_train_questions: int = 0

    @classmethod
    def fit(
        cls, records: Iterable[Mapping], answer_of: Callable[[Sequence[str]], str | None] = question_answer
    ) -> QuestionPrior:
        """Count training records ({"question", "answers", "question_type"?}); one vote per question.

        answer_of: a question's answer from its answers (None: not counted); by default VQA's rule, the most
        frequent normalised human answer.
        """
        overall: Counter = Counter()
        per_q: dict[str, Counter] = {}
        per_t: dict[str, Counter] = {}
        n = 0
        for r in records:
            answer = answer_of(r.get("answers") or [])
            if answer is None:  # test-split records carry no answers
                continue
            n += 1
            overall[answer] += 1
            per_q.setdefault(normalize_question(r["question"]), Counter())[answer] += 1
            qtype = r.get("question_type")
            if qtype:
                per_t.setdefault(qtype, Counter())[answer] += 1
        if not n:
            raise ValueError("no training questions with answers to fit the question-only prior on")
        return cls(
            majority=_most_common(overall),
            by_question={q: _most_common(c) for q, c in per_q.items()},
            by_type={t: _most_common(c) for t, c in per_t.items()},
            num_train_questions=n,
        )

    def predict(self, question: str, question_type: str | None = None) -> str:
        """The prior's answer: by question wording, else by question type, else the majority answer."""
        answer = self.by_question.get(normalize_question(question))
        if answer is None and question_type:
            answer = self.by_type.get(question_type)
        return answer if answer is not None else self.majority


def refcoco_chance(region_iou: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per expression, the accuracy of pointing at a uniformly random region: share of regions with IoU >= 0.5.

    region_iou, valid: (B,R); valid marks the detected regions (not [IMG], not padding).
    """
    hits = ((region_iou >= 0.5) & valid).sum(-1).float()
    return hits / valid.sum(-1).clamp(min=1).float()


def vcr_chance(num_choices: int = 4) -> dict[str, float]:
    """VCR accuracy of random choices, in percent: 1/4 per stage, 1/16 for Q->AR."""
    p = 100.0 / num_choices
    return {"q_a": p, "qa_r": p, "q_ar": p / num_choices}


def _hit_probability(pool: int, positives: int, k: int) -> float:
    """P(at least one of `positives` items in the top k of a random order of `pool` items)."""
    if positives <= 0:
        return 0.0
    miss = 1.0
    for i in range(min(k, pool)):
        miss *= max(pool - positives - i, 0) / (pool - i)
    return 1.0 - miss


def retrieval_chance(
    caption_image: Sequence[int] | torch.Tensor, num_images: int, num_candidates: int = 100,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Expected R@K (percent) of random scores under the four protocols of `retrieval_ranks`."""
    own = torch.as_tensor(caption_image).long()
    n_cap = int(own.numel())
    per_image = torch.bincount(own, minlength=num_images).tolist()
    out: dict[str, dict[str, float]] = {}
    for name, img_pool in (("image_retrieval", num_images), (f"image_retrieval_{num_candidates}cand",
                                                           min(num_candidates, num_images))):  # fmt: skip
        out[name] = {f"r{k}": 100.0 * min(k, img_pool) / img_pool for k in ks}
    for name, cap_pool in (("text_retrieval", None), (f"text_retrieval_{num_candidates}cand", num_candidates)):
        out[name] = {}
        for k in ks:
            probs = []
            for c in per_image:
                pool = n_cap if cap_pool is None else max(min(cap_pool, n_cap), c)
                probs.append(_hit_probability(pool, c, k))
            out[name][f"r{k}"] = 100.0 * sum(probs) / max(len(probs), 1)
    return out
