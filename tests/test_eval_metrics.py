"""The evaluation metrics against hand-computed cases and plain-loop versions of the vectorised rules."""

from __future__ import annotations

import math

import pytest
import torch

from vilbert_core.evaluation.metrics import (
    alignment_stats,
    box_iou,
    image_retrieval_ranks,
    masked_region_kl_stats,
    masked_token_stats,
    pretrain_summary,
    recall_at_k,
    refcoco_correct,
    retrieval_metrics,
    sample_candidates_ranks,
    text_retrieval_ranks,
    vcr_accuracy,
    vqa_accuracy,
    vqa_question_accuracy,
)

# ----------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("prediction", "gts", "expected"),
    [
        # all ten agree: every leave-one-out subset has 9 matches -> min(9/3, 1) = 1
        ("yes", ["yes"] * 10, 1.0),
        # 3 say "two" (normalised to "2"), 7 say "3": dropping one of the 3 leaves 2 matches (2/3),
        # dropping any of the 7 leaves 3 matches (1): (3 * 2/3 + 7 * 1) / 10 = 0.9, not the naive 1.0
        ("2", ["two"] * 3 + ["3"] * 7, 0.9),
        # one match: 0 when that annotator is left out, 1/3 otherwise -> 9/30
        ("red", ["red"] + ["blue"] * 9, 0.3),
        # four matches are always at least three of the other nine
        ("red", ["red"] * 4 + ["blue"] * 6, 1.0),
        # articles, case and punctuation: "a dog" and "Dog." both become "dog"; 2 matches ->
        # (2 * 1/3 + 8 * 2/3) / 10 = 0.6
        ("Dog.", ["a dog", "dog"] + ["cat"] * 8, 0.6),
        # contractions: "dont" -> "don't"
        ("dont", ["don't"] * 2 + ["no"] * 8, 0.6),
        # official quirk: when all humans agree, nothing is normalised, so "2" does not match "two"
        ("2", ["two"] * 10, 0.0),
        ("two", ["two"] * 10, 1.0),
        # whitespace cleaning happens always
        ("yes\n", ["yes"] * 10, 1.0),
        ("nothing", ["yes"] * 5 + ["no"] * 5, 0.0),
    ],
)
def test_vqa_question_accuracy_hand_computed(prediction: str, gts: list[str], expected: float) -> None:
    assert vqa_question_accuracy(prediction, gts) == pytest.approx(expected)


def test_vqa_question_accuracy_equals_leave_one_out_loop() -> None:
    # the closed form (total - own match) equals literally removing each annotator in turn
    gts = ["yes", "Yes", "no", "yes ", "yes", "nope", "no", "yes", "y", "no"]
    from pipelines.vqa_answers import normalize_answer

    norm = [normalize_answer(a) for a in gts]
    for pred in ["yes", "no", "y", "maybe"]:
        p = normalize_answer(pred)
        subsets = [norm[:i] + norm[i + 1 :] for i in range(10)]
        expected = sum(min(1.0, sum(g == p for g in s) / 3) for s in subsets) / 10
        assert vqa_question_accuracy(pred, gts) == pytest.approx(expected)


def test_vqa_accuracy_aggregates_per_answer_type_and_rounds_like_official() -> None:
    questions = [
        {"question_id": 1, "answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        {
            "question_id": 2,
            "answers": ["two"] * 3 + ["3"] * 7,
            "answer_type": "number",
            "question_type": "how many",
        },
        {
            "question_id": 3,
            "answers": ["red"] + ["blue"] * 9,
            "answer_type": "other",
            "question_type": "what color",
        },
    ]
    preds = {1: "yes", 2: "2", 3: "red"}
    res = vqa_accuracy(preds, questions)
    # (1 + 0.9 + 0.3) / 3 = 0.7333.. -> 73.33
    assert res["overall"] == 73.33
    assert res["per_answer_type"] == {"number": 90.0, "other": 30.0, "yes/no": 100.0}
    assert res["per_question_type"]["how many"] == 90.0
    assert res["per_question"][2] == pytest.approx(0.9)
    assert res["num_questions"] == 3
    with pytest.raises(KeyError, match="question_id 3"):
        vqa_accuracy({1: "yes", 2: "2"}, questions)


# ----------------------------------------------------------------------------------------- VCR


def test_vcr_joint_accuracy() -> None:
    res = vcr_accuracy([0, 1, 2, 3], [0, 1, 0, 3], [1, 1, 2, 0], [1, 0, 2, 0])
    # answers right: T T F T; rationales right: T F T T; both: T F F T
    assert res["q_a"] == 75.0
    assert res["qa_r"] == 75.0
    assert res["q_ar"] == 50.0
    assert res["num_questions"] == 4
    with pytest.raises(ValueError, match="aligned"):
        vcr_accuracy([0, 1], [0, 1], [0], [0])


# ----------------------------------------------------------------------------------------- RefCOCO


@pytest.mark.parametrize(
    ("a", "b", "offset", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 0, 1.0),
        # touching along x = 10: no overlap in continuous coordinates; one shared pixel column with +1
        ([0, 0, 10, 10], [10, 0, 20, 10], 0, 0.0),
        ([0, 0, 10, 10], [10, 0, 20, 10], 1, 11 / (121 + 121 - 11)),
        # containment: area ratio
        ([0, 0, 10, 10], [0, 0, 20, 20], 0, 100 / 400),
        ([0, 0, 10, 10], [0, 0, 20, 20], 1, 121 / 441),
        # a degenerate (point) box: area 0 in continuous coordinates, one pixel with +1
        ([5, 5, 5, 5], [0, 0, 10, 10], 0, 0.0),
        ([5, 5, 5, 5], [0, 0, 10, 10], 1, 1 / 121),
        # two empty boxes: union 0 -> defined as 0, not NaN
        ([5, 5, 5, 5], [5, 5, 5, 5], 0, 0.0),
        ([0, 0, 2, 2], [1, 1, 3, 3], 0, 1 / 7),
        ([0, 0, 2, 2], [5, 5, 7, 7], 1, 0.0),
    ],
)
def test_box_iou_edge_cases(a: list[int], b: list[int], offset: int, expected: float) -> None:
    iou = box_iou([a], [b], offset=offset)
    assert iou.shape == (1, 1)
    assert iou.item() == pytest.approx(expected)
    assert box_iou([b], [a], offset=offset).item() == pytest.approx(expected)


def test_box_iou_matches_plain_loop() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(7, 2, generator=g) * 50
    wh = torch.rand(7, 2, generator=g) * 30
    boxes = torch.cat([xy, xy + wh], dim=1)
    gt = torch.tensor([[10.0, 10.0, 40.0, 35.0], [0.0, 0.0, 5.0, 5.0]])
    for offset in (0.0, 1.0):
        got = box_iou(boxes, gt, offset=offset)
        for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            for j, (u1, v1, u2, v2) in enumerate(gt.tolist()):
                iw = max(0.0, min(x2, u2) - max(x1, u1) + offset)
                ih = max(0.0, min(y2, v2) - max(y1, v1) + offset)
                inter = iw * ih
                union = (
                    (x2 - x1 + offset) * (y2 - y1 + offset) + (u2 - u1 + offset) * (v2 - v1 + offset) - inter
                )
                assert got[i, j].item() == pytest.approx(inter / union, rel=1e-9)


def test_refcoco_correct_top_valid_region() -> None:
    scores = torch.tensor([[9.0, 1.0, 3.0, 2.0], [9.0, 5.0, 1.0, 0.0], [0.0, 1.0, 2.0, 8.0]])
    iou = torch.tensor([[1.0, 0.1, 0.5, 0.9], [1.0, 0.49, 0.8, 0.0], [0.0, 0.9, 0.9, 0.9]])
    valid = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 0]])
    # row 0: region 0 (global) excluded, top valid = 2 with IoU exactly 0.5 -> correct
    # row 1: top valid = 1 with IoU 0.49 -> wrong; row 2: region 3 is padding, top = 2 -> correct
    assert refcoco_correct(scores, iou, valid).tolist() == [True, False, True]
    assert refcoco_correct(scores[:1], iou[:1], torch.zeros(1, 4)).tolist() == [False]


# ----------------------------------------------------------------------------------------- retrieval

# 3 images x 5 captions, captions 0,1 -> image 0, caption 2 -> image 1, captions 3,4 -> image 2
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.3, 0.2],
        [0.5, 0.6, 0.7, 0.4, 0.9],
        [0.2, 0.3, 0.1, 0.8, 0.5],
    ]
)
CAPTION_IMAGE = torch.tensor([0, 0, 1, 2, 2])


def test_recall_on_hand_worked_matrix() -> None:
    # image retrieval, column by column: cap0 img0 first; cap1 img0 (0.1) last; cap2 img1 (0.7) behind 0.8;
    # cap3 img2 first; cap4 img2 (0.5) behind 0.9
    assert image_retrieval_ranks(SCORES, CAPTION_IMAGE).tolist() == [0, 2, 1, 0, 1]
    # text retrieval, row by row: img0's best own caption (0.9) first; img1's only caption (0.7) behind 0.9;
    # img2's best own caption (0.8) first
    assert text_retrieval_ranks(SCORES, CAPTION_IMAGE).tolist() == [0, 1, 0]
    img = recall_at_k(image_retrieval_ranks(SCORES, CAPTION_IMAGE), ks=(1, 2, 3))
    assert img == pytest.approx({"r1": 40.0, "r2": 80.0, "r3": 100.0})
    txt = recall_at_k(text_retrieval_ranks(SCORES, CAPTION_IMAGE), ks=(1, 2))
    assert txt == pytest.approx({"r1": 200 / 3, "r2": 100.0})


def test_recall_ties_break_by_lower_index() -> None:
    s = torch.full((2, 2), 0.5)
    own = torch.tensor([0, 1])
    assert image_retrieval_ranks(s, own).tolist() == [0, 1]
    assert text_retrieval_ranks(s, own).tolist() == [0, 1]


def _plain_ranks(s: torch.Tensor, own: torch.Tensor) -> tuple[list[int], list[int]]:
    """Ranks by sorting each query's candidate list, a stable descending sort in plain Python."""
    n_img, n_cap = s.shape
    img_ranks = []
    for j in range(n_cap):
        order = sorted(range(n_img), key=lambda i: -s[i, j].item())  # sorted() is stable
        img_ranks.append(order.index(int(own[j])))
    txt_ranks = []
    for i in range(n_img):
        order = sorted(range(n_cap), key=lambda j: -s[i, j].item())
        mine = [order.index(j) for j in range(n_cap) if int(own[j]) == i]
        txt_ranks.append(min(mine) if mine else n_cap)
    return img_ranks, txt_ranks


@pytest.mark.parametrize("chunk", [1024, 3])
def test_retrieval_ranks_match_sorting_loop(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import vilbert_core.evaluation.metrics as metrics

    monkeypatch.setattr(metrics, "QUERY_CHUNK", chunk)  # queries are ranked in chunks of this many
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 6, (8, 20), generator=g).float()  # small integers: many ties
    own = torch.arange(20) % 7  # image 7 has no caption
    img, txt = _plain_ranks(s, own)
    assert image_retrieval_ranks(s, own).tolist() == img
    assert text_retrieval_ranks(s, own).tolist() == txt
    # every positive below every negative: the candidate ranks are exact whatever the draws
    s2 = torch.ones(8, 20)
    s2[own, torch.arange(20)] = 0.0
    img_c, txt_c = sample_candidates_ranks(s2, own, num_candidates=5, seed=0)
    assert img_c.tolist() == [4] * 20
    n_own = torch.bincount(own, minlength=8)
    assert txt_c.tolist() == [5 - int(n) if n else 20 for n in n_own]


def test_candidate_protocol_exact_cases() -> None:
    n_img, per_img = 150, 5
    own = torch.arange(n_img).repeat_interleave(per_img)  # 750 captions
    # every positive scores below every negative: rank = number of negatives drawn, whatever was drawn
    s = torch.ones(n_img, n_img * per_img)
    s[own, torch.arange(own.numel())] = 0.0
    img_r, txt_r = sample_candidates_ranks(s, own, num_candidates=100, seed=3)
    assert img_r.tolist() == [99] * own.numel()
    assert txt_r.tolist() == [95] * n_img
    # every positive first: rank 0 whatever was drawn
    img_r, txt_r = sample_candidates_ranks(1 - s, own, num_candidates=100, seed=3)
    assert img_r.max().item() == 0 and txt_r.max().item() == 0


def test_candidate_protocol_seeded_and_full_when_pool_small() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.rand(120, 240, generator=g)
    own = torch.arange(240) // 2
    a = sample_candidates_ranks(s, own, num_candidates=100, seed=7)
    b = sample_candidates_ranks(s, own, num_candidates=100, seed=7)
    c = sample_candidates_ranks(s, own, num_candidates=100, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # a subset of candidates can only move the positive up, and never past the candidate count
    assert (a[0] <= image_retrieval_ranks(s, own)).all() and (a[0] < 100).all()
    assert (a[1] <= text_retrieval_ranks(s, own)).all() and (a[1] < 100).all()
    # a candidate count at least the pool size uses every item: the full ranks
    full = sample_candidates_ranks(SCORES, CAPTION_IMAGE, num_candidates=100, seed=0)
    assert full[0].tolist() == [0, 2, 1, 0, 1] and full[1].tolist() == [0, 1, 0]
    m = retrieval_metrics(SCORES, CAPTION_IMAGE)
    assert m["image_retrieval"]["r1"] == pytest.approx(40.0)
    assert m["text_retrieval_100cand"] == m["text_retrieval"]


# ----------------------------------------------------------------------------------------- pretraining


def test_pretraining_metrics_hand_computed() -> None:
    ln2 = math.log(2)
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, ln2, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 2]])
    # position 1: softmax [1/4, 1/2, 1/4], label 1 -> right, nll ln 2; position 2: uniform, argmax 0 != 2,
    # nll ln 3
    tok = masked_token_stats(logits, labels)
    assert tok["correct"] == 1 and tok["count"] == 2
    assert tok["nll"] == pytest.approx(math.log(6))

    mrm = torch.tensor([[[0.0, 0.0, 0.0], [ln2, 0.0, 0.0], [9.0, 0.0, 0.0]]])
    target = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    masked = torch.tensor([[1, 1, 0]])
    # KL([.5,.5,0] || uniform) = ln 1.5; KL([1,0,0] || [.5,.25,.25]) = ln 2; region 2 not masked
    reg = masked_region_kl_stats(mrm, target, masked)
    assert reg["count"] == 2
    assert reg["kl"] == pytest.approx(math.log(1.5) + ln2)

    al = alignment_stats(torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert al == {"correct": 2, "count": 4}

    summary = pretrain_summary(tok, reg, al)
    assert summary["masked_token_accuracy"] == pytest.approx(50.0)
    assert summary["perplexity"] == pytest.approx(math.sqrt(6))
    assert summary["masked_region_kl"] == pytest.approx(math.log(3) / 2)
    assert summary["alignment_accuracy"] == pytest.approx(50.0)
    # nothing masked: counts are zero, no division by zero
    empty = masked_token_stats(logits, torch.full((1, 3), -100))
    assert empty["count"] == 0
    assert "perplexity" not in pretrain_summary(empty, {"kl": 0.0, "count": 0}, al)


def test_candidate_ranks_with_other_text_scores_draw_the_same_candidates() -> None:
    g = torch.Generator().manual_seed(7)
    image_scores, text_scores = torch.randn(6, 15, generator=g), torch.randn(6, 15, generator=g)
    own = torch.arange(15) // 3
    img, txt = sample_candidates_ranks(image_scores, own, num_candidates=4, seed=2, text_scores=text_scores)
    # the same as two runs of one matrix each: the seed alone fixes the candidate sets
    assert torch.equal(img, sample_candidates_ranks(image_scores, own, num_candidates=4, seed=2)[0])
    assert torch.equal(txt, sample_candidates_ranks(text_scores, own, num_candidates=4, seed=2)[1])
    assert not torch.equal(txt, sample_candidates_ranks(image_scores, own, num_candidates=4, seed=2)[1])
