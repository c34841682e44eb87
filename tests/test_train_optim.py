"""Optimiser groups, the warmup + linear decay schedule, and RNG state capture for resuming."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from vilbert_core.training.checkpointing import capture_rng_state, restore_rng_state
from vilbert_core.training.optim import build_optimizer, warmup_linear_schedule


class _Toy(nn.Module):
    """Embedding + Linear + LayerNorm: every kind of parameter group."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def test_groups_decay_and_bert_lr_multiplier():
    model = _Toy()
    opt = build_optimizer(
        model,
        lr=1e-3,
        weight_decay=0.01,
        bert_param_names={"emb.weight", "proj.weight", "proj.bias"},
        bert_lr_mult=0.1,
    )
    seen = {}
    for g in opt.param_groups:
        for name in g["param_names"]:
            seen[name] = (g["weight_decay"], g["lr"])
    assert seen == {
        "emb.weight": (0.01, pytest.approx(1e-4)),
        "proj.weight": (0.01, pytest.approx(1e-4)),
        "proj.bias": (0.0, pytest.approx(1e-4)),
        "norm.weight": (0.0, pytest.approx(1e-3)),
        "norm.bias": (0.0, pytest.approx(1e-3)),
        "head.weight": (0.01, pytest.approx(1e-3)),
        "head.bias": (0.0, pytest.approx(1e-3)),
    }
    assert opt.defaults["betas"] == (0.9, 0.98)


def test_warmup_then_linear_decay_hand_values():
    model = _Toy()
    opt = build_optimizer(model, lr=1.0, bert_param_names={"emb.weight"}, bert_lr_mult=0.1)
    sched = warmup_linear_schedule(opt, warmup_steps=2, total_steps=6)
    lrs, lrs_bert = [], []
    for _ in range(7):
        by_name = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
        lrs.append(by_name["head.weight"])
        lrs_bert.append(by_name["emb.weight"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert lrs_bert == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025, 0.0])


def test_rng_state_round_trip_through_a_file(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state({"masking": gen})
    torch.save(state, tmp_path / "s.pt")
    first = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    restore_rng_state(torch.load(tmp_path / "s.pt", weights_only=True), {"masking": gen})
    second = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, in_backward: bool = False) -> list[float]:
    """n AdamW steps on a fixed toy loss (embedding lookups, tied uses of one weight); returns the losses."""
    from vilbert_core.training.optim import step_in_backward

    remove = step_in_backward(opt) if in_backward else None
    ids = torch.tensor([[1, 2, 3], [4, 5, 1]])
    losses = []
    for i in range(n):
        h = model.norm(model.proj(model.emb(ids)))
        loss = (model.head(h) - i).square().mean() + (h @ model.emb.weight.T).logsumexp(-1).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        if not in_backward:
            opt.step()
            opt.zero_grad(set_to_none=True)
    if remove:
        remove()
    return losses


def test_fused_adamw_and_step_in_backward_equal_the_plain_adamw_loop():
    """The fused kernel and updates applied inside backward give the plain for-loop AdamW's parameters."""
    torch.manual_seed(0)
    base = _Toy()
    results = []
    for kind in ("plain", "fused", "in_backward"):
        model = _Toy()
        model.load_state_dict(base.state_dict())
        if kind == "plain":
            groups = build_optimizer(model, lr=1e-2).param_groups
            opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, fused=False, foreach=False)
        else:
            opt = build_optimizer(model, lr=1e-2)
            assert opt.defaults["fused"]
        sched = warmup_linear_schedule(opt, warmup_steps=1, total_steps=4)
        losses = []
        for _ in range(4):  # the schedule changes the rate between steps
            losses += _steps(model, opt, 1, in_backward=kind == "in_backward")
            sched.step()
        results.append((losses, {k: v.clone() for k, v in model.state_dict().items()}, opt))
        if kind == "in_backward":
            assert all(p.grad is None for p in model.parameters())  # every gradient was freed once applied
    (plain_losses, plain_state, plain_opt), *others = results
    for losses, state, opt in others:
        assert losses == pytest.approx(plain_losses, rel=1e-6)
        for name, value in plain_state.items():
            torch.testing.assert_close(state[name], value, atol=1e-7, rtol=1e-6)
        assert all(float(s["step"]) == 4 for s in opt.state.values())  # one update per step, not per hook
    assert plain_state["head.weight"].ne(base.state_dict()["head.weight"]).all()
