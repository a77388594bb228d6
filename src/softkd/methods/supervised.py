"""Plain supervised training: the teacher's pretraining and the from-scratch baseline. Not a
distillation method (not registered): every run trains it as the distilled student's twin."""

from __future__ import annotations

import torch
from torch import nn

from softkd.losses.logits import supervised_objective
from softkd.methods.base import Method


class Supervised(Method):
    """CE(s, y) over the labeled samples of the batch; unlabeled samples are ignored."""

    name = "supervised"
    summary = "cross-entropy on the labels only: the scratch twin of every run"
    needs = "none"
    teachers_needed = "none"
    terms = ("loss", "ce")
    graph_inputs = ("x", "y")
    graph_safe = True

    def forward(self, model: nn.Module, batch: dict, *, labeled_count=None, sample_count=None) -> dict[str, torch.Tensor]:
        return self.loss(supervised_objective, model(batch["x"]), batch["y"], labeled_count=labeled_count)

    def describe(self) -> str:
        return "loss = ce"
