"""Pure metric functions, computed exactly as the official evaluation tools compute them.

Nothing here touches a model or a file: each function takes predictions and ground truth (python
values, numpy arrays or torch tensors) and returns numbers, so every rule can be checked by hand.

- VQA: the official accuracy of the VQA v2 evaluation script (`vqaEval.py`), including its quirks.
- VCR: Q->A, QA->R and the joint Q->AR accuracy.
- RefCOCO: box IoU with the +0 (continuous) or +1 (inclusive pixel) convention, top-region accuracy.
- Retrieval: ranks, recall@K over a full images x captions score matrix, and the 100-candidate protocol.
- Pretraining: masked-token accuracy and perplexity, masked-region KL, alignment accuracy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "alignment_stats",
    "box_iou",
    "image_retrieval_ranks",
    "masked_region_kl_stats",
    "masked_token_stats",
    "pretrain_summary",
    "recall_at_k",
    "refcoco_correct",
    "retrieval_metrics",
    "retrieval_ranks",
    "sample_candidates_ranks",
    "text_retrieval_ranks",
    "vcr_accuracy",
    "vqa_accuracy",
    "vqa_question_accuracy",
]

RECALL_KS: tuple[int, ...] = (1, 5, 10)


def _as_tensor(x: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch view of a tensor, array or nested list (no copy when already a tensor)."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


# ----------------------------------------------------------------------------------------- VQA
def _clean_whitespace(answer: str) -> str:
    """The official script's first step on every answer: newlines and tabs to spaces, then strip."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def vqa_question_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one predicted answer against the human answers (a fraction in [0, 1]).

    Leave-one-annotator-out: for each of the (ten) human answers, drop it and score
    min(#matches among the others / 3, 1); the accuracy is the mean of those scores.
    As in the official `vqaEval.py`, the punctuation / digit / article normalisation is applied to the
    prediction and the human answers only when the humans disagree (more than one distinct answer after
    whitespace cleaning); when all humans agree the comparison is on the cleaned raw strings.
    """
    from pipelines.vqa_answers import normalize_answer

    if len(gt_answers) == 0:
        raise ValueError("vqa_question_accuracy: a question has no human answers")
    gts = [_clean_whitespace(a) for a in gt_answers]
    pred = _clean_whitespace(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    matches = [g == pred for g in gts]
    total = sum(matches)
    # leaving annotator i out removes one match exactly when annotator i agreed with the prediction
    scores = [min(1.0, (total - m) / 3.0) for m in matches]
    return sum(scores) / len(scores)


def vqa_accuracy(predictions: Mapping[int, str], questions: Iterable[Mapping]) -> dict:
    """Official VQA accuracy overall, per answer type and per question type, in percent (2 decimals).

    `questions`: records with "question_id", "answers" (the raw human answers), "answer_type" and
    optionally "question_type" (the task shard's vqa records). Every question must have a prediction.
    Averages are taken over unrounded per-question accuracies and rounded at the end, as the official
    script does.
    """
    per_question: dict[int, float] = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for q in questions:
        qid = int(q["question_id"])
        if qid not in predictions:
            raise KeyError(f"vqa_accuracy: no prediction for question_id {qid}")
        acc = vqa_question_accuracy(predictions[qid], q["answers"])
        per_question[qid] = acc
        by_answer_type[str(q.get("answer_type", "unknown"))].append(acc)
        if q.get("question_type") is not None:
            by_question_type[str(q["question_type"])].append(acc)
    if not per_question:
        raise ValueError("vqa_accuracy: no questions to score")

    def pct(values: Sequence[float]) -> float:
        return round(100.0 * sum(values) / len(values), 2)

    return {
        "overall": pct(list(per_question.values())),
        "per_answer_type": {k: pct(v) for k, v in sorted(by_answer_type.items())},
        "per_question_type": {k: pct(v) for k, v in sorted(by_question_type.items())},
        "num_questions": len(per_question),
        "per_question": per_question,
    }


# ----------------------------------------------------------------------------------------- VCR
def vcr_accuracy(
    answer_pred: Sequence[int] | torch.Tensor,
    answer_label: Sequence[int] | torch.Tensor,
    rationale_pred: Sequence[int] | torch.Tensor,
    rationale_label: Sequence[int] | torch.Tensor,
) -> dict[str, float]:
    """VCR accuracies in percent: Q->A, QA->R (rationale given the right answer) and joint Q->AR.

    The four sequences are aligned by question. Q->AR counts a question only when both the answer and
    the rationale are right.
    """
    a_ok = _as_tensor(answer_pred).long() == _as_tensor(answer_label).long()
    r_ok = _as_tensor(rationale_pred).long() == _as_tensor(rationale_label).long()
    if a_ok.shape != r_ok.shape or a_ok.ndim != 1:
        raise ValueError(
            f"vcr_accuracy: answer and rationale predictions must be aligned 1-d sequences, "
            f"got {tuple(a_ok.shape)} and {tuple(r_ok.shape)}"
        )
    if a_ok.numel() == 0:
        raise ValueError("vcr_accuracy: no questions to score")
    n = a_ok.numel()
    return {
        "q_a": 100.0 * a_ok.sum().item() / n,
        "qa_r": 100.0 * r_ok.sum().item() / n,
        "q_ar": 100.0 * (a_ok & r_ok).sum().item() / n,
        "num_questions": n,
    }


# ----------------------------------------------------------------------------------------- RefCOCO
def box_iou(boxes1: object, boxes2: object, offset: float = 0.0) -> torch.Tensor:
    """IoU of every box in `boxes1` (N,4) with every box in `boxes2` (M,4), x1,y1,x2,y2 -> (N,M).

    offset=0: continuous coordinates (torchvision's convention), width = x2 - x1; touching boxes have
    IoU 0 and a degenerate box has area 0. offset=1: inclusive pixel coordinates (the ViLBERT reference
    and the refer toolkit), width = x2 - x1 + 1, so boxes sharing an edge overlap by one pixel row and
    a single-point box covers one pixel. Pairs whose union is 0 (two empty boxes) get IoU 0.
    """
    b1 = _as_tensor(boxes1, torch.float64).reshape(-1, 4)
    b2 = _as_tensor(boxes2, torch.float64).reshape(-1, 4)
    area1 = (b1[:, 2] - b1[:, 0] + offset).clamp(min=0) * (b1[:, 3] - b1[:, 1] + offset).clamp(min=0)
    area2 = (b2[:, 2] - b2[:, 0] + offset).clamp(min=0) * (b2[:, 3] - b2[:, 1] + offset).clamp(min=0)
    lt = torch.maximum(b1[:, None, :2], b2[None, :, :2])  # (N,M,2)
    rb = torch.minimum(b1[:, None, 2:], b2[None, :, 2:])  # (N,M,2)
    wh = (rb - lt + offset).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # (N,M)
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def refcoco_correct(region_scores: object, region_iou: object, region_valid: object) -> torch.Tensor:
    """Per expression, whether the top-scoring valid region has IoU >= 0.5 with the ground truth -> (B,) bool.

    region_scores, region_iou, region_valid: (B,R). Invalid regions (the global [IMG] region 0, padding)
    never win; an expression with no valid region is wrong.
    """
    scores = _as_tensor(region_scores, torch.float32)
    iou = _as_tensor(region_iou, torch.float32)
    valid = _as_tensor(region_valid).bool()
    masked = scores.masked_fill(~valid, float("-inf"))
    top = masked.argmax(dim=1)  # (B,)
    top_iou = iou.gather(1, top[:, None]).squeeze(1)
    return (top_iou >= 0.5) & valid.any(dim=1)


# ----------------------------------------------------------------------------------------- retrieval
QUERY_CHUNK = 1024  # queries ranked per step: memory stays at QUERY_CHUNK x pool size


def _scores(scores: object) -> torch.Tensor:
    """Scores as float32 (float64 kept): comparisons only, so no precision is lost on model outputs."""
    s = _as_tensor(scores)
    return s if s.dtype in (torch.float32, torch.float64) else s.float()


def _ranks_in_rows(rows: torch.Tensor, pos_score: torch.Tensor, pos_idx: torch.Tensor,
                   candidates: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Per row, how many (candidate) items rank before the positive: higher score, or equal and lower index.

    rows: (Q,P) scores of each query's pool; pos_score, pos_idx: (Q,); candidates: (Q,P) bool or None (all).
    """
    cols = torch.arange(rows.shape[1])[None, :]
    ahead = (rows > pos_score[:, None]) | ((rows == pos_score[:, None]) & (cols < pos_idx[:, None]))
    if candidates is not None:
        ahead &= candidates
    return ahead.sum(dim=1)


def _best_own(rows: torch.Tensor, is_own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and index of each row's best own item; max returns the first maximal index (the tie rule)."""
    return rows.masked_fill(~is_own, float("-inf")).max(dim=1)


def image_retrieval_ranks(scores: object, caption_image: object) -> torch.Tensor:
    """0-based rank of each caption's own image among all images -> (N_cap,) long.

    scores: (N_img, N_cap), higher = better match; caption_image: (N_cap,) index of each caption's image.
    Ties are broken by the lower image index (a stable descending sort).
    """
    s = _scores(scores)
    own = _as_tensor(caption_image).long()
    n_cap = s.shape[1]
    out = []
    for c in range(0, n_cap, QUERY_CHUNK):
        cap = torch.arange(c, min(c + QUERY_CHUNK, n_cap))
        rows = s[:, cap].T  # (Q, N_img)
        out.append(_ranks_in_rows(rows, s[own[cap], cap], own[cap]))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def text_retrieval_ranks(scores: object, caption_image: object) -> torch.Tensor:
    """0-based rank of each image's best-ranked own caption among all captions -> (N_img,) long.

    A text-retrieval hit at K means any of the image's captions is in its top K, i.e. the best-ranked
    own caption is. Ties broken by the lower caption index, as in `image_retrieval_ranks`.
    Images with no caption get rank N_cap (never a hit).
    """
    s = _scores(scores)
    own = _as_tensor(caption_image).long()
    n_img, n_cap = s.shape
    out = []
    for c in range(0, n_img, QUERY_CHUNK):
        img = torch.arange(c, min(c + QUERY_CHUNK, n_img))
        is_own = own[None, :] == img[:, None]  # (Q, N_cap)
        best_score, best_idx = _best_own(s[img], is_own)
        ranks = _ranks_in_rows(s[img], best_score, best_idx)
        out.append(torch.where(is_own.any(dim=1), ranks, torch.full_like(ranks, n_cap)))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def recall_at_k(ranks: object, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@K in percent from 0-based ranks: the share of queries whose rank is < K."""
    r = _as_tensor(ranks).long()
    if r.numel() == 0:
        raise ValueError("recall_at_k: no queries")
    return {f"r{k}": 100.0 * (r < k).float().mean().item() for k in ks}


def sample_candidates_ranks(
    scores: object, caption_image: object, num_candidates: int = 100, seed: int = 0, text_scores: object | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks under the 100-candidate protocol -> (image ranks (N_cap,), text ranks (N_img,)).

    text_scores: what text retrieval ranks by, when it differs from `scores` (see retrieval_ranks).

    Image retrieval: each caption is ranked against its own image plus `num_candidates - 1` other images
    drawn uniformly without replacement. Text retrieval: each image is ranked against all its captions
    plus other captions drawn the same way up to `num_candidates`; a hit needs any own caption in the top K.
    Draws: a uniform key per (query, item) from a torch Generator seeded with `seed`, QUERY_CHUNK queries
    at a time, captions' queries before images' queries; the smallest keys are drawn. So the candidate
    sets are reproducible. When a pool is smaller than the candidate count every item is used.
    """
    s = _scores(scores)
    t = s if text_scores is None else _scores(text_scores)
    own = _as_tensor(caption_image).long()
    n_img, n_cap = s.shape
    gen = torch.Generator().manual_seed(seed)

    # image retrieval: captions are the queries, images the pool (own image never drawn as a negative)
    n_neg = min(num_candidates - 1, n_img - 1)
    image_ranks = []
    for c in range(0, n_cap, QUERY_CHUNK):
        cap = torch.arange(c, min(c + QUERY_CHUNK, n_cap))
        q = torch.arange(cap.numel())
        keys = torch.rand(cap.numel(), n_img, generator=gen)
        keys[q, own[cap]] = float("inf")
        chosen = torch.zeros(cap.numel(), n_img, dtype=torch.bool)
        chosen.scatter_(1, keys.topk(n_neg, dim=1, largest=False).indices, True)  # topk: no full sort
        image_ranks.append(_ranks_in_rows(s[:, cap].T, s[own[cap], cap], own[cap], chosen))

    # text retrieval: images are the queries; every own caption is a candidate, negatives fill up
    text_ranks = []
    for c in range(0, n_img, QUERY_CHUNK):
        img = torch.arange(c, min(c + QUERY_CHUNK, n_img))
        is_own = own[None, :] == img[:, None]  # (Q, N_cap)
        keys = torch.rand(img.numel(), n_cap, generator=gen).masked_fill(is_own, float("inf"))
        n_pos = is_own.sum(dim=1)
        n_negs = (num_candidates - n_pos).clamp(min=0).clamp(max=n_cap - n_pos)  # (Q,)
        k_max = int(n_negs.max())
        first = keys.topk(k_max, dim=1, largest=False, sorted=True).indices  # (Q, k_max) smallest keys first
        chosen = torch.zeros(img.numel(), n_cap, dtype=torch.bool)
        chosen.scatter_(1, first, torch.arange(k_max)[None, :] < n_negs[:, None])  # each query its own count
        best_score, best_idx = _best_own(t[img], is_own)
        ranks = _ranks_in_rows(t[img], best_score, best_idx, chosen)
        text_ranks.append(torch.where(n_pos > 0, ranks, torch.full_like(ranks, n_cap)))
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat(image_ranks) if image_ranks else empty, torch.cat(text_ranks) if text_ranks else empty)


def retrieval_ranks(
    scores: object,
    caption_image: object,
    num_candidates: int = 100,
    seed: int = 0,
    text_scores: object | None = None,
) -> dict[str, torch.Tensor]:
    """0-based ranks of the four retrieval protocols: image/text retrieval, full set and N candidates.

    text_scores: the (N_img, N_cap) scores text retrieval ranks by, when they differ from image
    retrieval's `scores` (a re-ranked second stage rescores each direction's own top k).
    """
    img_c, txt_c = sample_candidates_ranks(scores, caption_image, num_candidates, seed, text_scores)
    return {
        "image_retrieval": image_retrieval_ranks(scores, caption_image),
        "text_retrieval": text_retrieval_ranks(scores if text_scores is None else text_scores, caption_image),
        f"image_retrieval_{num_candidates}cand": img_c,
        f"text_retrieval_{num_candidates}cand": txt_c,
    }


def retrieval_metrics(
    scores: object, caption_image: object, num_candidates: int = 100, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Image and text retrieval R@1/5/10 (percent) over the full set and under the 100-candidate protocol."""
    ranks = retrieval_ranks(scores, caption_image, num_candidates, seed)
    return {name: recall_at_k(r) for name, r in ranks.items()}


# ----------------------------------------------------------------------------------------- pretraining
def masked_token_stats(mlm_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> dict:
    """Sums for masked-token accuracy and perplexity over the labelled positions of one batch.

    mlm_logits: (...,V); labels: (...) with `ignore_index` where no token was masked (e.g. (B,T,V) and
    (B,T), or only the predicted tokens' (N,V) and (N,)).
    Returns {"correct", "nll", "count"}: accuracy = correct / count, perplexity = exp(nll / count).
    """
    keep = labels != ignore_index
    if not keep.any():
        return {"correct": 0, "nll": 0.0, "count": 0}
    logits = mlm_logits[keep].float()  # (N,V)
    target = labels[keep]
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
    correct = int((logits.argmax(dim=-1) == target).sum().item())
    return {"correct": correct, "nll": nll, "count": int(keep.sum().item())}


def masked_region_kl_stats(mrm_logits: torch.Tensor, target_prob: torch.Tensor, masked: torch.Tensor) -> dict:
    """Sum of KL(detector distribution || softmax(MRM logits)) over masked regions, and their count.

    mrm_logits, target_prob: (...,C); masked: (...) 1 where the region was masked (e.g. (B,R,C) and (B,R),
    or only the predicted regions' (N,C) and (N,)).
    Terms with target probability 0 contribute 0 (the 0 log 0 = 0 convention).
    """
    m = masked.bool()
    if not m.any():
        return {"kl": 0.0, "count": 0}
    logq = torch.log_softmax(mrm_logits[m].float(), dim=-1)  # (N,C)
    p = target_prob[m].float()
    plogp = torch.where(p > 0, p * torch.log(p.clamp(min=1e-30)), torch.zeros_like(p))
    kl = (plogp - p * logq).sum().item()
    return {"kl": kl, "count": int(m.sum().item())}


def alignment_stats(align_logit: torch.Tensor, align_label: torch.Tensor) -> dict:
    """Correct alignment predictions (logit > 0 means "matches") and the pair count of one batch."""
    pred = align_logit.float() > 0
    correct = int((pred == (align_label.float() > 0.5)).sum().item())
    return {"correct": correct, "count": int(align_logit.numel())}


def pretrain_summary(tokens: dict, regions: dict, align: dict) -> dict[str, float]:
    """Final pretraining metrics from accumulated sums: accuracy in percent, perplexity, KL per region."""
    out: dict[str, float] = {}
    if tokens["count"]:
        out["masked_token_accuracy"] = 100.0 * tokens["correct"] / tokens["count"]
        out["perplexity"] = math.exp(tokens["nll"] / tokens["count"])
    out["masked_tokens"] = tokens["count"]
    if regions["count"]:
        out["masked_region_kl"] = regions["kl"] / regions["count"]
    out["masked_regions"] = regions["count"]
    if align["count"]:
        out["alignment_accuracy"] = 100.0 * align["correct"] / align["count"]
    out["pairs"] = align["count"]
    return out
