"""Masking statistics for MLM / MRM over many samples, and that labels mark exactly the masked positions."""

from __future__ import annotations

import pytest
import torch

from vilbert_core.training.masking import IGNORE_INDEX, mask_regions, mask_tokens

PAD, CLS, SEP, MASK = 0, 101, 102, 103
VOCAB = 5000


def _text_batch(b: int = 4000, t: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sentences [CLS] w... [SEP] [PAD]... with varying lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (b, t), generator=g)
    lengths = torch.randint(3, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return ids, mask


def test_mlm_rates_and_labels_mark_exactly_the_masked_positions():
    ids, mask = _text_batch()
    gen = torch.Generator().manual_seed(1)
    masked, labels = mask_tokens(
        ids, mask, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=[PAD, CLS, SEP], generator=gen
    )
    candidates = mask.bool() & (ids != CLS) & (ids != SEP)
    picked = labels != IGNORE_INDEX

    # never padding, [CLS] or [SEP]; labels hold the original ids
    assert not (picked & ~candidates).any()
    assert torch.equal(labels[picked], ids[picked])
    # every changed token is a labelled one; outside the picked positions input is untouched
    assert not ((masked != ids) & ~picked).any()
    assert torch.equal(masked[~picked], ids[~picked])

    n_cand, n_picked = candidates.sum().item(), picked.sum().item()
    assert abs(n_picked / n_cand - 0.15) < 0.01
    to_mask = (masked == MASK) & picked
    kept = (masked == ids) & picked
    random = picked & ~to_mask & ~kept
    assert abs(to_mask.sum().item() / n_picked - 0.8) < 0.02
    # a random draw equals the original (or [MASK]) with probability ~2/VOCAB: kept rate ~0.1
    assert abs(kept.sum().item() / n_picked - 0.1) < 0.015
    assert abs(random.sum().item() / n_picked - 0.1) < 0.015
    assert (masked >= 0).all() and (masked < VOCAB).all()


def test_mlm_is_deterministic_per_generator_seed():
    ids, mask = _text_batch(b=50)
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=[PAD, CLS, SEP])
    a = mask_tokens(ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    b = mask_tokens(ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    c = mask_tokens(ids, mask, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mrm_rates_never_touch_global_region_or_padding():
    b, r, d = 3000, 37, 8
    g = torch.Generator().manual_seed(2)
    feat = torch.rand(b, r, d, generator=g) + 0.1  # strictly positive: zeroed rows are unambiguous
    n_real = torch.randint(11, r + 1, (b,), generator=g)
    image_mask = (torch.arange(r)[None, :] < n_real[:, None]).long()
    masked_feat, labels = mask_regions(feat, image_mask, generator=torch.Generator().manual_seed(3))

    picked = labels == 1
    assert set(labels.unique().tolist()) <= {1, IGNORE_INDEX}
    assert not picked[:, 0].any()
    assert not (picked & (image_mask == 0)).any()
    zeroed = (masked_feat == 0).all(-1)
    # only picked regions change, and a changed region is zeroed entirely
    assert not (zeroed & ~picked).any()
    assert torch.equal(masked_feat[~zeroed], feat[~zeroed])

    candidates = image_mask.bool().clone()
    candidates[:, 0] = False
    n_picked = picked.sum().item()
    assert abs(n_picked / candidates.sum().item() - 0.15) < 0.01
    assert abs(zeroed.sum().item() / n_picked - 0.9) < 0.015


@pytest.mark.cuda
def test_cpu_generator_masks_cuda_batches_as_it_masks_cpu_ones():
    """The trainer's masking generator lives on the CPU while its batches are on the GPU."""
    ids, mask = _text_batch(b=64)
    feat = torch.rand(64, 5, 8) + 0.1
    image_mask = torch.ones(64, 5, dtype=torch.long)
    kw = {"mask_token_id": MASK, "vocab_size": VOCAB, "special_token_ids": [PAD, CLS, SEP]}
    on_cpu = (
        *mask_tokens(ids, mask, generator=torch.Generator().manual_seed(4), **kw),
        *mask_regions(feat, image_mask, generator=torch.Generator().manual_seed(5)),
    )
    on_gpu = (
        *mask_tokens(ids.cuda(), mask.cuda(), generator=torch.Generator().manual_seed(4), **kw),
        *mask_regions(feat.cuda(), image_mask.cuda(), generator=torch.Generator().manual_seed(5)),
    )
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b.is_cuda and torch.equal(a, b.cpu())
