"""The teacher: frozen, always in eval mode, never receiving gradients."""

from __future__ import annotations

import torch
from torch import nn


class Teacher(nn.Module):
    """Wraps a trained model for distillation.

    The wrapped module is frozen in place (``requires_grad_(False)``), kept in eval mode even when
    a caller switches everything to train mode, and run under ``no_grad``. ``no_grad`` rather than
    ``inference_mode``: its outputs become loss targets, which autograd may need to save.
    """

    graph_safe = True  # as safe in a CUDA graph as the module it wraps, which is checked on its own

    def __init__(self, module: nn.Module):
        super().__init__()
        if isinstance(module, Teacher):
            module = module.module
        self.module = module
        module.requires_grad_(False)
        for p in module.parameters():
            p.grad = None  # stale gradients from its own training would only hold memory
        self.train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @torch.no_grad()
    def predict_logits(self, batches) -> torch.Tensor:
        """Teacher logits for every batch of an unshuffled loader, concatenated in dataset order."""
        device = next(self.module.parameters(), torch.empty(0)).device
        return torch.cat([self(batch["x"].to(device)).float().cpu() for batch in batches])
