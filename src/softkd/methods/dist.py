"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from softkd.losses.dist import dist_objective
from softkd.methods.base import Method, MethodParams, register_method
from softkd.methods.teacher_outputs import teacher_logits_of


class DISTParams(MethodParams):
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    """T: softens both distributions before their relations are taken."""
    beta: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Weight of the inter-class relation (each sample's probabilities across classes)."""
    gamma: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Weight of the intra-class relation (each class's probabilities across the batch)."""
    ce_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Weight of cross-entropy on the labeled samples."""


@register_method
class DIST(Method):
    """ce_weight · CE + β · T²·(1 − ρ_inter) + γ · T²·(1 − ρ_intra), ρ the mean Pearson
    correlation of student and teacher probabilities across classes (inter) and across the
    batch (intra) (:func:`softkd.losses.dist.dist_objective`). Matching relations rather than
    values tolerates a student that cannot reach the teacher's confidence."""

    name = "dist"
    summary = "DIST (Huang et al. 2022): CE + β·inter + γ·intra-class relations"
    Params = DISTParams
    terms = ("loss", "ce", "inter", "intra")
    graph_inputs = ("x", "y", "teacher_logits")
    graph_safe = True

    def forward(self, model: nn.Module, batch: dict, *, labeled_count=None, sample_count=None) -> dict[str, torch.Tensor]:
        p = self.params
        return self.loss(dist_objective, model(batch["x"]), batch["y"], teacher_logits_of(self, batch),
                         temperature=p.temperature, beta=p.beta, gamma=p.gamma, ce_weight=p.ce_weight,
                         labeled_count=labeled_count, sample_count=sample_count)

    def describe(self) -> str:
        p = self.params
        return f"loss = {p.ce_weight:g}·ce + {p.beta:g}·inter + {p.gamma:g}·intra (T={p.temperature:g})"
