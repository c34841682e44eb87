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
