"""A tiny ViLBERT overfits one small batch of every task through the trainer's own forward + loss."""

from __future__ import annotations

import pytest
import torch

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks
from vilbert_core.training.optim import build_optimizer
from vilbert_core.training.tasks import MaskingSpec, compute_losses, validation_scores

VOCAB, D, C_DET, T, R = 60, 16, 1601, 10, 7  # R = 6 regions + the global [IMG] region
PAD, CLS, SEP, MASK = 0, 2, 3, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _text(g: torch.Generator, *lead: int) -> dict[str, torch.Tensor]:
    """Random [CLS] w.. [SEP] [PAD].. rows of shape (*lead, T)."""
    ids = torch.randint(5, VOCAB, (*lead, T), generator=g)
    lengths = torch.randint(4, T + 1, lead, generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).long()
    ids[..., 0] = CLS
    ids.scatter_(-1, (lengths - 1).unsqueeze(-1), SEP)
    ids = ids * mask
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}


def _image(g: torch.Generator, *lead: int) -> dict[str, torch.Tensor]:
    """Regions with the global [IMG] region first and some padding, as the datasets pad them."""
    n_real = torch.randint(3, R, lead, generator=g)  # real regions besides [IMG]
    mask = (torch.arange(R) <= n_real.unsqueeze(-1)).long()
    feat = torch.rand(*lead, R, D, generator=g) * mask.unsqueeze(-1)
    feat[..., 0, :] = feat[..., 1:, :].sum(-2) / n_real.unsqueeze(-1)
    loc = torch.rand(*lead, R, 5, generator=g) * mask.unsqueeze(-1)
    loc[..., 0, :] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    target = torch.softmax(torch.randn(*lead, R, C_DET, generator=g) * 3, -1) * mask.unsqueeze(-1)
    target[..., 0, :] = 0
    return {"image_feat": feat, "image_loc": loc, "image_mask": mask, "image_target": target}


def make_batch(task: str, b: int = 4, seed: int = 0, num_answers: int = 5) -> dict:
    """A batch in the layout of docs/contracts.md section 4 for one task."""
    g = torch.Generator().manual_seed(seed)
    if task == "vcr":
        batch = {**_text(g, b, 4), **_image(g, b), "label": torch.randint(0, 4, (b,), generator=g)}
    elif task == "retrieval":
        batch = {**_text(g, b, 4), **_image(g, b, 4), "label": torch.zeros(b, dtype=torch.long)}
    else:
        batch = {**_text(g, b), **_image(g, b)}
    if task == "pretrain":
        batch["align_label"] = torch.tensor([1.0, 0.0] * (b // 2))
    elif task == "vqa":
        target = torch.zeros(b, num_answers)
        target[torch.arange(b), torch.randint(0, num_answers, (b,), generator=g)] = 1.0
        target[torch.arange(b), torch.randint(0, num_answers, (b,), generator=g)] += 0.3
        batch["vqa_target"] = target.clamp(max=1.0)
    elif task == "refcoco":
        iou = torch.rand(b, R, generator=g) * batch["image_mask"]
        iou[:, 0] = 0
        batch["region_iou"] = iou
        batch["region_target"] = torch.where(iou >= 0.5, iou, 0.0)
    batch["image_id"] = [f"img{i}" for i in range(b)]
    return batch


def _bce_floor(batch: dict, task: str) -> float:
    """The lowest reachable loss of the soft-target BCE tasks (entropy of the targets), else 0."""

    def entropy(t: torch.Tensor) -> torch.Tensor:
        t = t.clamp(1e-7, 1 - 1e-7)
        return -(t * t.log() + (1 - t) * (1 - t).log())

    if task == "vqa":
        return (entropy(batch["vqa_target"]).mean() * batch["vqa_target"].shape[1]).item()
    if task == "refcoco":
        return ((entropy(batch["region_target"]) * batch["image_mask"]).sum() / len(batch["image_id"])).item()
    return 0.0


def tiny_config() -> ViLBERTConfig:
    """The tiny preset sized for these synthetic batches."""
    return ViLBERTConfig.preset(
        "tiny", vocab_size=VOCAB, v_feature_size=D, v_target_size=C_DET, num_answers=5
    )


@pytest.mark.parametrize("task", ["pretrain", "vqa", "vcr", "refcoco", "retrieval"])
def test_tiny_model_overfits_one_batch(task):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ViLBERTForPretraining(cfg) if task == "pretrain" else ViLBERTForTasks(cfg)
    model.train()
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.0)
    batch = make_batch(task)
    masking = MaskingSpec(MASK, VOCAB, (PAD, CLS, SEP), torch.Generator())
    losses = []
    for _ in range(80):
        masking.generator.manual_seed(1)  # the same masks every step: one fixed batch to memorise
        out = compute_losses(model, batch, task, masking)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    # BCE against soft targets cannot go below the targets' entropy: measure the excess over it
    floor = _bce_floor(batch, task)
    first, last = sum(losses[:3]) / 3 - floor, sum(losses[-5:]) / 5 - floor
    assert last < 0.35 * first, f"{task}: loss {first:.3f} -> {last:.3f}"
    if task in ("vqa", "vcr", "retrieval", "refcoco"):
        model.eval()
        assert validation_scores(model, batch, task).mean().item() >= 0.75
