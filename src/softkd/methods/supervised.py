"""Plain supervised training: the teacher's pretraining and the from-scratch baseline."""

from __future__ import annotations

import torch
from torch import nn

from softkd.losses.logits import supervised_objective
from softkd.methods.base import OBJECTIVES, GraphSafe


@OBJECTIVES.register("supervised", aliases=("scratch",))
class Supervised(GraphSafe, nn.Module):
    """CE(s, y) over the labeled samples of the batch; unlabeled samples are ignored."""

    terms = ("loss", "ce")
    graph_inputs = ("x", "y")
    graph_safe = True

    def forward(self, model: nn.Module, batch: dict, *, labeled_count=None, sample_count=None) -> dict[str, torch.Tensor]:
        return self.loss(supervised_objective, model(batch["x"]), batch["y"], labeled_count=labeled_count)
