"""Retrieval and VCR scoring that computes each side's part before co-attention once: same scores as
the full forward pass of every pair."""

from __future__ import annotations

import pytest
import torch

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks
from vilbert_core.evaluation.loading import LoadedModel
from vilbert_core.evaluation.metrics import retrieval_ranks
from vilbert_core.tasks.retrieval import rerank_top_k, score_all_pairs, score_pair_list
from vilbert_core.tasks.vcr import vcr_pair_logits


def _model(kind: str, **layers: object) -> torch.nn.Module:
    """A tiny model with visual layers before co-attention too, standardised features, random stats.

    A wide initialisation makes the pair scores O(1), so that the tolerance below is a real test.
    """
    layers = layers or {"v_num_hidden_layers": 3, "v_biattention_id": [1, 2]}
    cfg = ViLBERTConfig.preset("tiny", v_feature_norm="standardize", initializer_range=0.3, **layers)
    torch.manual_seed(0)
    model = (ViLBERTForTasks if kind == "tasks" else ViLBERTForPretraining)(cfg).eval()
    model.set_feature_stats(torch.rand(cfg.v_feature_size), torch.rand(cfg.v_feature_size) + 0.5)
    return model


def _padded(lengths: list[int], size: int) -> torch.Tensor:
    """(N, size) 1/0 mask with lengths[i] leading ones."""
    return (torch.arange(size) < torch.tensor(lengths)[:, None]).long()


def _retrieval_set(cfg: ViLBERTConfig) -> tuple[dict, dict]:
    """5 images with 3-7 regions and 7 captions with 3-9 tokens (padded)."""
    g = torch.Generator().manual_seed(1)
    image_mask = _padded([7, 3, 5, 7, 4], 7)
    images = {
        "image_feat": torch.randn(5, 7, cfg.v_feature_size, generator=g) * image_mask[..., None],
        "image_loc": torch.rand(5, 7, 5, generator=g),
        "image_mask": image_mask,
    }
    attention_mask = _padded([9, 3, 6, 9, 4, 8, 5], 9)
    text = {
        "input_ids": torch.randint(5, cfg.vocab_size, (7, 9), generator=g) * attention_mask,
        "token_type_ids": torch.zeros(7, 9, dtype=torch.long),
        "attention_mask": attention_mask,
    }
    return images, text


@pytest.mark.parametrize(
    ("kind", "layers"),
    [
        ("tasks", {}),
        ("pretraining", {}),
        # two layers of each stream after the last co-attention layer, the first with no layer before it
        ("tasks", {"num_hidden_layers": 6, "v_num_hidden_layers": 4, "v_biattention_id": [0, 2]}),
    ],
)
def test_score_all_pairs_equals_the_full_forward_of_every_pair(kind: str, layers: dict) -> None:
    model = _model(kind, **layers)
    images, text = _retrieval_set(model.config)
    head = "pair_logit" if kind == "tasks" else "align_logit"
    expected = torch.empty(5, 7)
    with torch.no_grad():
        for i in range(5):
            for c in range(7):
                out = model(**{k: v[c : c + 1] for k, v in text.items()}, **{k: v[i : i + 1] for k, v in images.items()})
                expected[i, c] = getattr(out, head)[0]
    loaded = LoadedModel(model, kind, None, None, 9, 6, "retrieval", None, torch.device("cpu"))
    # batches that straddle images and caption chunks smaller than the caption count
    for batch_size, chunk in ((4, 3), (64, 1024), (1, 7)):
        got = score_all_pairs(loaded, images, text, batch_size, progress=False, caption_chunk=chunk)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert expected.std() > 0.1  # the scores differ from pair to pair


def _reranked_order(first: list[float], exact: list[float], k: int) -> list[int]:
    """Plain re-ranking of one query's pool: its k best by `first` in `exact` order, then the rest by `first`."""
    by_first = sorted(range(len(first)), key=lambda j: -first[j])
    return sorted(by_first[:k], key=lambda j: -exact[j]) + by_first[k:]


@pytest.mark.parametrize(("k", "ties"), [(1, False), (2, False), (3, False), (10, False), (2, True), (3, True)])
def test_rerank_top_k_puts_each_querys_top_k_first_in_exact_order(k: int, ties: bool) -> None:
    model = _model("tasks")
    images, text = _retrieval_set(model.config)
    loaded = LoadedModel(model, "tasks", None, None, 9, 6, "retrieval", None, torch.device("cpu"))
    exact = score_all_pairs(loaded, images, text, 64, progress=False)
    # a first stage that disagrees with the exact scores (as a bf16 pass can, only more so)
    first = exact + 0.5 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(3))
    if ties:  # coarse first-stage scores, as bf16 rounds them: ties go to the lower index
        first = (first * 2).round() / 2
        assert len(first.unique()) < first.numel() / 2
    image_scores, text_scores, stats = rerank_top_k(loaded, images, text, first, k, batch_size=4, progress=False)

    own = torch.tensor([0, 0, 1, 2, 3, 4, 4])  # caption -> image
    ranks = retrieval_ranks(image_scores, own, num_candidates=100, text_scores=text_scores)
    by_images, by_texts = set(), set()  # the pairs each direction rescored
    for c in range(7):  # image retrieval: each caption ranks the 5 images
        order = _reranked_order(first[:, c].tolist(), exact[:, c].tolist(), k)
        by_images |= {(i, c) for i in order[:k]}
        assert ranks["image_retrieval"][c] == order.index(int(own[c])), c
    for i in range(5):  # text retrieval: each image ranks the 7 captions; its best own caption counts
        order = _reranked_order(first[i].tolist(), exact[i].tolist(), k)
        by_texts |= {(i, c) for c in order[:k]}
        assert ranks["text_retrieval"][i] == min(order.index(c) for c in range(7) if own[c] == i), i
    # fewer than 100 candidates: the candidate protocol ranks by the same (per-direction) scores
    assert torch.equal(ranks["text_retrieval_100cand"], ranks["text_retrieval"])
    assert torch.equal(ranks["image_retrieval_100cand"], ranks["image_retrieval"])
    assert stats["pairs"] == len(by_images | by_texts)  # a pair in both directions' top k is scored once
    # the rescored pairs hold their exact scores, shifted by one constant above every first-stage score
    for scores, pairs in ((image_scores, by_images), (text_scores, by_texts)):
        shifts = torch.tensor([float(scores[i, c] - exact[i, c]) for i, c in pairs], dtype=torch.float64)
        torch.testing.assert_close(shifts, shifts[:1].expand_as(shifts), atol=1e-5, rtol=0)
        assert min(float(scores[i, c]) for i, c in pairs) > float(first.max())
    if k >= 7:  # every pair rescored: the exact ranking
        want = retrieval_ranks(exact, own)
        for name in ("image_retrieval", "text_retrieval"):
            assert torch.equal(ranks[name], want[name])


def test_score_pairs_under_bf16_autocast_keeps_the_scoring_head_in_fp32() -> None:
    model = _model("tasks")
    images, text = _retrieval_set(model.config)
    cap, img = torch.arange(7), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        t, i = model.vilbert.embed_text(**text)[cap], model.vilbert.embed_image(**images)[img]
        masks = (text["attention_mask"][cap], images["image_mask"][img])
        got = model.score_pairs(t, i, *masks)
        pooled = model.vilbert.fuse(t, i, *masks, pooled_only=True).pooled
    assert pooled.dtype == torch.bfloat16 and got.dtype == torch.float32
    want = pooled.float() @ model.pair_head.weight[0] + model.pair_head.bias[0]  # the head by hand, in fp32
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, got.bfloat16().float())  # not rounded to bf16's 8 significant bits


def test_score_pair_list_scores_any_pairs_in_any_order() -> None:
    model = _model("pretraining")
    images, text = _retrieval_set(model.config)
    loaded = LoadedModel(model, "pretraining", None, None, 9, 6, "retrieval", None, torch.device("cpu"))
    full = score_all_pairs(loaded, images, text, 64, progress=False)
    img, cap = torch.tensor([4, 0, 4, 2, 1]), torch.tensor([6, 0, 2, 6, 3])  # repeats, unsorted
    got = score_pair_list(loaded, images, text, img, cap, batch_size=2, progress=False, caption_chunk=3)
    torch.testing.assert_close(got, full[img, cap], atol=2e-5, rtol=1e-5)


def test_vcr_pair_logits_equal_the_forward_on_repeated_images() -> None:
    model = _model("tasks")
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    b, c, t, r = 3, 4, 8, 6
    attention_mask = (torch.arange(t) < torch.randint(3, t + 1, (b, c, 1), generator=g)).long()
    batch = {
        "input_ids": torch.randint(5, cfg.vocab_size, (b, c, t), generator=g) * attention_mask,
        "token_type_ids": torch.randint(0, 2, (b, c, t), generator=g),
        "attention_mask": attention_mask,
        "image_feat": torch.randn(b, r, cfg.v_feature_size, generator=g),
        "image_loc": torch.rand(b, r, 5, generator=g),
        "image_mask": _padded([6, 4, 5], r),
    }
    with torch.no_grad():
        flat = {k: batch[k].reshape(b * c, t) for k in ("input_ids", "token_type_ids", "attention_mask")}
        flat |= {k: batch[k].repeat_interleave(c, dim=0) for k in ("image_feat", "image_loc", "image_mask")}
        expected = model(**flat).pair_logit.view(b, c)
        got = vcr_pair_logits(model, batch)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert got.shape == (b, c) and expected.std() > 0.1
