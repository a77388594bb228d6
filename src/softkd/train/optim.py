"""Optimizers. λ (``weight_decay``) applies to weights only, never to biases or norm parameters."""

from __future__ import annotations

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
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or SGD with momentum (decay = gradient of λ/2·‖w‖²)."""
    if weight_decay < 0:
        raise ConfigError(f"The 'weight_decay' (λ) of train must be >= 0; got {weight_decay}.")
    if not lr > 0:
        raise ConfigError(f"The 'lr' of train must be > 0; got {lr}.")
    groups = param_groups(params, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ConfigError(f"Unknown optimizer '{name}'; use one of {', '.join(OPTIMIZERS)}.")


SCHEDULES = ("constant", "cosine")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int):
    """Per-step learning-rate schedule: constant, or cosine from ``lr`` to 0 over ``total_steps``."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    raise ConfigError(f"Unknown lr_schedule '{name}'; use one of {', '.join(SCHEDULES)}.")


def trainable_parameters(*modules: nn.Module) -> list[torch.nn.Parameter]:
    seen, params = set(), []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
