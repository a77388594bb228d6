"""Optimizers. λ (``weight_decay``) applies to weights only, never to biases or norm parameters."""

from __future__ import annotations

import math

import torch
from torch import nn

from softkd.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")


def param_groups(params, weight_decay: float) -> list[dict]:
    """Decay on weight matrices and conv kernels (ndim >= 2); none on biases and norm scales."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(params, *, name: str = "adamw", lr: float = 2e-3, weight_decay: float = 5e-4,
                    momentum: float = 0.9, nesterov: bool = False) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or SGD with momentum, optionally Nesterov (decay = gradient of λ/2·‖w‖²)."""
    if weight_decay < 0:
        raise ConfigError(f"The 'weight_decay' (λ) of train must be >= 0; got {weight_decay}.")
    if not lr > 0:
        raise ConfigError(f"The 'lr' of train must be > 0; got {lr}.")
    groups = param_groups(params, weight_decay)
    # On GPUs the fused kernels update every parameter in one launch (small students are
    # launch-bound there) and can be replayed from CUDA graphs. Elsewhere PyTorch's defaults.
    fused = True if all(p.is_cuda for group in groups for p in group["params"]) else None
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=fused)
    raise ConfigError(f"Unknown optimizer '{name}'; use one of {', '.join(OPTIMIZERS)}.")


SCHEDULES = ("constant", "cosine", "onecycle", "step")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, *, warmup_steps: int = 0,
                    max_lr: float | None = None):
    """Per-step learning-rate schedule over ``total_steps``: constant; cosine to 0; onecycle
    (up to ``max_lr`` over the first 30 %, then down); step (×0.1 at 50 % and 75 %). With
    ``warmup_steps`` the rate first rises linearly from 0 (onecycle has its own warm-up)."""
    total = max(total_steps, 1)
    if name not in SCHEDULES:
        raise ConfigError(f"Unknown lr_schedule '{name}'; use one of {', '.join(SCHEDULES)}.")
    if warmup_steps < 0 or warmup_steps >= total and warmup_steps:
        raise ConfigError(f"'warmup_steps' must be in [0, {total}) for a {total}-step run; got {warmup_steps}.")
    if name == "onecycle":
        max_lrs = [group["lr"] for group in optimizer.param_groups] if max_lr is None else max_lr
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total, pct_start=0.3)
    decay = total - warmup_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(decay, 1)
        if name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if name == "step":
            return 0.1 ** ((t >= 0.5) + (t >= 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_parameters(*modules: nn.Module) -> list[torch.nn.Parameter]:
    seen, params = set(), []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
