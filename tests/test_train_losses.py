"""Training losses against values computed by hand on tiny tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vilbert_core.training.losses import (
    alignment_loss,
    mlm_loss,
    mrm_loss,
    multiple_choice_loss,
    pretraining_losses,
    refer_loss,
    vqa_loss,
)


def _bce(x: float, t: float) -> float:
    """Binary cross-entropy of one logit, written out."""
    s = 1.0 / (1.0 + math.exp(-x))
    return -(t * math.log(s) + (1 - t) * math.log(1 - s))


def test_mlm_loss_hand_computed():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -1.0, 0.5]]])  # (1, 3, 3)
    labels = torch.tensor([[1, -100, 0]])
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    lse2 = math.log(math.exp(5) + math.exp(-1) + math.exp(0.5))
    expected = ((lse0 - 2.0) + (lse2 - 5.0)) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_mrm_loss_hand_computed_and_safe_without_masked_regions():
    logits = torch.zeros(1, 3, 3, requires_grad=True)  # softmax = 1/3 each
    target = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 1]])
    # KL(p||q) = sum p log(p/q): region 1 -> log(1.5), region 2 -> log(3); divided by 2 masked
    expected = (math.log(1.5) + math.log(3.0)) / 2
    assert mrm_loss(logits, target, labels).item() == pytest.approx(expected, rel=1e-6)

    none = mrm_loss(logits, target, torch.full((1, 3), -100))
    assert none.item() == 0.0 and not torch.isnan(none)
    none.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_alignment_loss_hand_computed():
    logit = torch.tensor([0.0, 2.0, -1.0])
    label = torch.tensor([1.0, 0.0, 1.0])
    expected = (math.log(2) + math.log(1 + math.exp(2)) + math.log(1 + math.exp(1))) / 3
    assert alignment_loss(logit, label).item() == pytest.approx(expected, rel=1e-6)


def test_pretraining_losses_ignore_misaligned_pairs():
    torch.manual_seed(0)
    out = SimpleNamespace(
        mlm_logits=torch.randn(2, 3, 5),
        mrm_logits=torch.randn(2, 4, 6),
        align_logit=torch.tensor([0.3, -0.2]),
    )
    mlm_labels = torch.tensor([[-100, 2, -100], [1, 3, 4]])
    region_labels = torch.tensor([[-100, 1, -100, -100], [-100, 1, 1, 1]])
    target = torch.softmax(torch.randn(2, 4, 6), -1)
    align = torch.tensor([1.0, 0.0])  # pair 1 misaligned: its MLM/MRM labels must not count
    got = pretraining_losses(out, mlm_labels, region_labels, target, align)

    exp_mlm = mlm_loss(out.mlm_logits[:1], mlm_labels[:1])
    exp_mrm = mrm_loss(out.mrm_logits[:1], target[:1], region_labels[:1])
    exp_align = (_bce(0.3, 1.0) + _bce(-0.2, 0.0)) / 2
    assert got["mlm"].item() == pytest.approx(exp_mlm.item(), rel=1e-6)
    assert got["mrm"].item() == pytest.approx(exp_mrm.item(), rel=1e-6)
    assert got["align"].item() == pytest.approx(exp_align, rel=1e-6)
    assert got["loss"].item() == pytest.approx(exp_mlm.item() + exp_mrm.item() + exp_align, rel=1e-6)


def test_vqa_loss_is_bce_times_answer_count():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.3, 0.6]])
    mean_bce = sum(_bce(x, t) for x, t in zip(logits[0].tolist(), target[0].tolist(), strict=True)) / 4
    assert vqa_loss(logits, target).item() == pytest.approx(mean_bce * 4, rel=1e-6)


def test_multiple_choice_loss_hand_computed():
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    label = torch.tensor([0, 1])
    l0 = math.log(math.exp(1) + 3) - 1
    l1 = math.log(math.exp(3) + 3) - 0
    assert multiple_choice_loss(logits, label).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_refer_loss_excludes_padded_regions():
    logits = torch.tensor([[0.0, 1.0, -2.0, 50.0]])
    target = torch.tensor([[0.0, 0.8, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # region 3 is padding with a huge wrong logit
    expected = _bce(0.0, 0.0) + _bce(1.0, 0.8) + _bce(-2.0, 0.0)
    assert refer_loss(logits, target, mask).item() == pytest.approx(expected, rel=1e-6)


def test_pretraining_step_on_masked_positions_only_equals_the_full_computation():
    """compute_losses runs the MLM/MRM heads on the masked positions only; losses and gradients equal the
    heads over every position with the losses written out here (ignore_index CE, KL over masked regions)."""
    import torch.nn.functional as F

    from vilbert_core import ViLBERTConfig, ViLBERTForPretraining
    from vilbert_core.training.masking import mask_regions, mask_tokens
    from vilbert_core.training.tasks import MaskingSpec, compute_losses

    cfg = ViLBERTConfig.preset("tiny", v_feature_norm="standardize")  # dropout 0.1 stays on
    torch.manual_seed(0)
    model = ViLBERTForPretraining(cfg).train()
    model.set_feature_stats(torch.rand(cfg.v_feature_size), torch.rand(cfg.v_feature_size) + 0.5)
    g = torch.Generator().manual_seed(0)
    b, t, r = 6, 9, 7
    attention_mask = (torch.arange(t) < torch.tensor([9, 5, 7, 9, 3, 8])[:, None]).long()
    image_mask = (torch.arange(r) < torch.tensor([7, 4, 7, 2, 6, 7])[:, None]).long()
    batch = {
        "input_ids": torch.randint(5, cfg.vocab_size, (b, t), generator=g) * attention_mask,
        "token_type_ids": torch.zeros(b, t, dtype=torch.long),
        "attention_mask": attention_mask,
        "image_feat": torch.randn(b, r, cfg.v_feature_size, generator=g),
        "image_loc": torch.rand(b, r, 5, generator=g),
        "image_mask": image_mask,
        "image_target": torch.softmax(torch.randn(b, r, cfg.v_target_size, generator=g), -1),
        "align_label": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]),
    }
    spec = dict(mask_token_id=4, vocab_size=cfg.vocab_size, special_token_ids=(0, 1, 2))

    rows: dict[str, int] = {}
    for name in ("mlm_head", "mrm_head"):
        getattr(model, name).register_forward_hook(lambda m, i, o, n=name: rows.__setitem__(n, i[0].shape[0]))
    torch.manual_seed(5)
    got = compute_losses(model, batch, "pretrain", MaskingSpec(**spec, generator=torch.Generator().manual_seed(3)))
    heads_rows = dict(rows)
    got["loss"].backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # the same masks, drawn in the same order from the same seed; the heads over every position
    mask_gen = torch.Generator().manual_seed(3)
    ids, mlm_labels = mask_tokens(batch["input_ids"], attention_mask, generator=mask_gen, **spec)
    feat, region_labels = mask_regions(batch["image_feat"], image_mask, generator=mask_gen)
    torch.manual_seed(5)
    out = model(**{**{k: batch[k] for k in ("token_type_ids", "attention_mask", "image_loc", "image_mask")},
                   "input_ids": ids, "image_feat": feat})  # fmt: skip
    aligned = batch["align_label"].bool()[:, None]
    labels = mlm_labels.masked_fill(~aligned, -100)
    exp_mlm = F.cross_entropy(out.mlm_logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), ignore_index=-100)
    picked = (region_labels == 1) & aligned
    p = batch["image_target"]
    kl = (p * (p.log() - out.mrm_logits.log_softmax(-1))).sum(-1)
    exp_mrm = (kl * picked).sum() / picked.sum()
    exp_align = F.binary_cross_entropy_with_logits(out.align_logit, batch["align_label"])
    expected = exp_mlm + exp_mrm + exp_align
    expected.backward()
    assert int((labels != -100).sum()) > 3 and int(picked.sum()) > 1  # the test really masks something
    # the heads saw only the scored positions: masked tokens / regions of aligned pairs
    assert heads_rows == {"mlm_head": int((labels != -100).sum()), "mrm_head": int(picked.sum())}
    for name, value in (("mlm", exp_mlm), ("mrm", exp_mrm), ("align", exp_align), ("loss", expected)):
        torch.testing.assert_close(got[name].detach(), value.detach(), atol=1e-6, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(got_grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
