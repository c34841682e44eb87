"""AdamW with the reference's parameter groups, and the warmup + linear decay schedule.

Weight decay applies to weight matrices only: biases and LayerNorm parameters get none. Parameters
initialised from BERT can train at a smaller learning rate (the reference uses 0.1x in pretraining).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay: every bias and every LayerNorm parameter."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, nn.LayerNorm) or p_name == "bias":
                names.add(full)
    return names


def parameter_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.01,
    bert_param_names: Collection[str] = (),
    bert_lr_mult: float = 1.0,
) -> list[dict]:
    """Split trainable parameters into (decay, no decay) x (BERT-initialised, fresh) AdamW groups."""
    skip_decay = no_decay_names(model)
    bert = set(bert_param_names)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    names: dict[tuple[bool, bool], list[str]] = {}
    for name, param in model.named_parameters():  # tied weights appear once
        if not param.requires_grad:
            continue
        key = (name not in skip_decay, name in bert)
        groups.setdefault(key, []).append(param)
        names.setdefault(key, []).append(name)
    out = []
    for (decay, from_bert), params in sorted(groups.items()):
        mult = bert_lr_mult if from_bert else 1.0
        out.append(
            {
                "params": params,
                "param_names": names[(decay, from_bert)],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": lr * mult,
                "lr_mult": mult,
            }
        )
    return out


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    bert_param_names: Collection[str] = (),
    bert_lr_mult: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over parameter_groups(); betas 0.9/0.98 as the reference; the fused kernel on CPUs and GPUs."""
    groups = parameter_groups(
        model, lr=lr, weight_decay=weight_decay, bert_param_names=bert_param_names, bert_lr_mult=bert_lr_mult
    )
    # fused: one kernel per parameter tensor with no temporaries (the for-loop kernel allocates a
    # parameter-sized one per tensor, the multi-tensor "foreach" one copies of all of them at once)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def step_in_backward(
    optimizer: torch.optim.Optimizer, observe: Callable[[torch.Tensor], None] | None = None
) -> Callable[[], None]:
    """Apply each parameter's update as soon as backward has its gradient, and free that gradient.

    The full set of gradients (as large as the parameters) then never exists at once. The updates
    equal optimizer.step() after backward, so this is only for loops that step once per backward and
    do nothing to the gradients in between: no global-norm clipping (it needs every gradient first),
    no gradient accumulation, no DistributedDataParallel, no fp16 loss scaling. observe(grad) sees each
    gradient before its update (e.g. to sum the squared norm). Returns a function that removes the hooks.
    """

    def apply(param: torch.Tensor) -> None:
        if observe is not None:
            observe(param.grad)
        # every other parameter has no gradient at this point (not computed yet, or applied and freed),
        # so step() updates this one alone, with its own state, group and learning rate
        optimizer.step()
        param.grad = None

    handles = [
        p.register_post_accumulate_grad_hook(apply) for g in optimizer.param_groups for p in g["params"]
    ]

    def remove() -> None:
        for h in handles:
            h.remove()

    return remove


def warmup_linear_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor at a step: linear 0 -> 1 over warmup, then linear 1 -> 0 at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = total_steps - step
    return max(0.0, remaining / max(1, total_steps - warmup_steps))


def warmup_linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """LambdaLR applying warmup_linear_factor to every group's own base learning rate."""
    return LambdaLR(optimizer, lambda step: warmup_linear_factor(step, warmup_steps, total_steps))
