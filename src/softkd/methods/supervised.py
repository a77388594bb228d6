"""Plain supervised training: the teacher's pretraining and the from-scratch baseline."""

from __future__ import annotations

import torch
from torch import nn

from softkd.losses.logits import cross_entropy
from softkd.methods.base import OBJECTIVES


@OBJECTIVES.register("supervised", aliases=("scratch",))
class Supervised(nn.Module):
    """CE(s, y) over the labeled samples of the batch; unlabeled samples are ignored."""

    terms = ("loss", "ce")

    def forward(self, model: nn.Module, batch: dict, *, labeled_count=None, sample_count=None) -> dict[str, torch.Tensor]:
        ce = cross_entropy(model(batch["x"]), batch["y"], count=labeled_count)
        return {"loss": ce, "ce": ce.detach()}
