"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from softkd.losses.dkd import dkd_objective
from softkd.methods.base import Method, MethodParams, register_method
from softkd.methods.teacher_outputs import teacher_logits_of


class DKDParams(MethodParams):
    temperature: float = Field(4.0, gt=0, allow_inf_nan=False)
    """T: softens the teacher's and student's distributions."""
    alpha: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Weight of the target-class term TCKD."""
    beta: float = Field(8.0, ge=0, allow_inf_nan=False)
    """Weight of the non-target-class term NCKD (the paper's default 8 for CIFAR-100)."""
    ce_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Weight of cross-entropy on the labeled samples."""
    warmup: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Epochs over which the distillation terms' weight rises linearly from 0 to 1 (0: none)."""
    standardize: bool = False
    """z-score each sample's teacher and student logits before T (Sun et al. 2024)."""


@register_method
class DKD(Method):
    """ce_weight · CE + w(epoch) · (α · TCKD + β · NCKD), w rising linearly to 1 over ``warmup``
    epochs (:func:`softkd.losses.dkd.dkd_objective`). TCKD matches the teacher's probability of
    the target class against all others, NCKD its distribution among the other classes; plain KD
    weighs NCKD by 1 − p_target of the teacher, which DKD replaces by β. Needs >= 3 classes."""

    name = "dkd"
    aliases = ("decoupled-kd",)
    summary = "decoupled KD (Zhao et al. 2022): CE + α·TCKD + β·NCKD, warm-up"
    Params = DKDParams
    terms = ("loss", "ce", "tckd", "nckd")
    graph_inputs = ("x", "y", "teacher_logits")
    graph_safe = True  # the warm-up factor is a tensor updated in place (begin_step)

    def __init__(self, params=None, *, teachers=(), teacher=None, **values):
        super().__init__(params, teachers=teachers, teacher=teacher, **values)
        self.register_buffer("warmup_factor", torch.ones(()), persistent=False)

    def begin_step(self, epochs_done: float) -> None:
        warmup = self.params.warmup
        self.warmup_factor.fill_(min(epochs_done / warmup, 1.0) if warmup > 0 else 1.0)

    def forward(self, model: nn.Module, batch: dict, *, labeled_count=None, sample_count=None) -> dict[str, torch.Tensor]:
        student_logits = model(batch["x"])
        p = self.params
        return self.loss(dkd_objective, student_logits, batch["y"], teacher_logits_of(self, batch),
                         temperature=p.temperature, alpha=p.alpha, beta=p.beta, ce_weight=p.ce_weight,
                         warmup_factor=self.warmup_factor, standardize=p.standardize,
                         labeled_count=labeled_count, sample_count=sample_count)

    def describe(self) -> str:
        p = self.params
        warm = f", warm-up {p.warmup:g} epoch{'' if p.warmup == 1 else 's'}" if p.warmup else ""
        std = ", standardized" if p.standardize else ""
        return f"loss = {p.ce_weight:g}·ce + {p.alpha:g}·tckd + {p.beta:g}·nckd (T={p.temperature:g}{warm}{std})"
