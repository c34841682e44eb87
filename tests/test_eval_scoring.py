"""Retrieval and VCR scoring that computes each side's part before co-attention once: same scores as
the full forward pass of every pair."""

from __future__ import annotations

import pytest
import torch

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks
from vilbert_core.evaluation.loading import LoadedModel
from vilbert_core.tasks.retrieval import score_all_pairs
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
