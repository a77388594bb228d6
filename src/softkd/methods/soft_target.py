"""Soft-Target Distillation (Hinton, Vinyals & Dean 2015), optionally with logit standardisation."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from softkd.losses.logits import kd_objective
from softkd.methods.base import Method, MethodParams, register_method
from softkd.methods.teacher_outputs import teacher_logits_of


class SoftTargetParams(MethodParams):
    temperature: float = Field(4.0, gt=0, allow_inf_nan=False)
    """T: softens the teacher's and student's distributions."""
    beta: float = Field(0.9, gt=0, le=1)
    """β: the distillation term's share; 1 − β goes to cross-entropy (β = 1: soft targets only)."""
    kd_scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Multiplies the distillation term beyond β's cap (to match another method's total weight)."""
    standardize: bool = False
    """z-score each sample's teacher and student logits before T (Sun et al. 2024)."""


@register_method
class SoftTarget(Method):
    """(1 − β) · CE(s, y) + β · kd_scale · T² · KL(softmax(t/T) ‖ softmax(s/T)).

    Teacher targets come from the batch when precomputed (``teacher_logits``, or validated
    ``soft_targets`` probabilities), else from running the frozen teacher on the batch.
    """

    name = "soft-target"
    aliases = ("soft-td",)
    summary = "Hinton et al. 2015: (1−β)·CE + β·T²·KL(teacher ‖ student)"
    Params = SoftTargetParams
    terms = ("loss", "ce", "kd")
    takes_soft_targets = True
    graph_inputs = ("x", "y", "teacher_logits", "soft_targets")
    graph_safe = True  # a teacher it holds is checked on its own

    def forward(self, model: nn.Module, batch: dict, *, labeled_count=None, sample_count=None) -> dict[str, torch.Tensor]:
        """``labeled_count`` / ``sample_count``: the whole batch's counts when this is one of several
        accumulated micro-batches (see :func:`softkd.losses.kd_objective`)."""
        student_logits = model(batch["x"])
        soft_targets = batch.get("soft_targets")
        teacher_logits = None if soft_targets is not None else teacher_logits_of(self, batch)
        p = self.params
        return self.loss(
            kd_objective, student_logits, batch["y"], teacher_logits, soft_targets=soft_targets,
            temperature=p.temperature, beta=p.beta, kd_scale=p.kd_scale, standardize=p.standardize,
            labeled_count=labeled_count, sample_count=sample_count,
        )

    def describe(self) -> str:
        p = self.params
        kd = f"{p.beta * p.kd_scale:g}·T²·KL(T={p.temperature:g}{', standardized' if p.standardize else ''})"
        return f"loss = {1 - p.beta:g}·ce + {kd}"
