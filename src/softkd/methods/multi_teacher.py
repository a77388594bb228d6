"""Several teachers, one student: soft targets averaged (or weighted) over an ensemble."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from softkd.errors import ConfigError
from softkd.losses.logits import ensemble_targets, kd_objective
from softkd.methods.base import Method, MethodParams, register_method
from softkd.methods.teacher_outputs import teacher_logits_of


class MultiTeacherParams(MethodParams):
    temperature: float = Field(4.0, gt=0, allow_inf_nan=False)
    """T: softens the teacher's and student's distributions."""
    beta: float = Field(0.9, gt=0, le=1)
    """β: the distillation term's share; 1 − β goes to cross-entropy."""
    combine: Literal["probs", "logits"] = "probs"
    """probs: the mean of the teachers' softened probabilities; logits: softmax of their mean logits."""
    weights: list[float] | None = None
    """One weight per teacher, in the order of ``teachers:`` (normalised to sum 1); null: equal."""

    @field_validator("weights")
    @classmethod
    def _positive(cls, weights):
        if weights is not None and (not weights or any(not w >= 0 for w in weights) or sum(weights) <= 0):
            raise ValueError("must be non-negative numbers, not all zero")
        return weights


@register_method
class MultiTeacher(Method):
    """(1 − β) · CE(s, y) + β · T² · KL(p_ens ‖ softmax(s/T)), with p_ens = Σ_m w_m softmax(t_m/T)
    (``combine: probs``) or softmax(Σ_m w_m t_m / T) (``combine: logits``). Reads ``teacher_logits``
    of shape (B, M, C): one cache per teacher, or every teacher run on the batch."""

    name = "multi-teacher"
    aliases = ("ensemble",)
    summary = "several teachers: KD toward their (weighted) mean soft targets"
    Params = MultiTeacherParams
    teachers_needed = "several"
    terms = ("loss", "ce", "kd")
    graph_inputs = ("x", "y", "teacher_logits")
    graph_safe = True

    def __init__(self, params=None, *, teachers=(), teacher=None, **values):
        super().__init__(params, teachers=teachers, teacher=teacher, **values)
        count = len(self.params.weights) if self.params.weights is not None else len(self.teachers)
        if len(self.teachers) and count != len(self.teachers):
            raise ConfigError(f"The 'method.weights' of method 'multi-teacher' has {count} entries for "
                              f"{len(self.teachers)} teachers; give one weight per teacher.")
        weights = torch.tensor(self.params.weights or [1.0] * max(count, 1), dtype=torch.float32)
        self.register_buffer("teacher_weights", weights / weights.sum(), persistent=False)

    def forward(self, model: nn.Module, batch: dict, *, labeled_count=None, sample_count=None) -> dict[str, torch.Tensor]:
        student_logits = model(batch["x"])
        all_logits = teacher_logits_of(self, batch)
        weights = self.teacher_weights
        if self.params.weights is None and weights.shape[0] != all_logits.shape[1]:  # precomputed logits, no teachers
            weights = torch.full((all_logits.shape[1],), 1 / all_logits.shape[1], device=all_logits.device)
        p = self.params
        return self.loss(_objective, student_logits, batch["y"], all_logits, weights, temperature=p.temperature,
                         beta=p.beta, combine=p.combine, labeled_count=labeled_count, sample_count=sample_count)

    def combined_teacher_logits(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """The ensemble at T = 1: log Σ_m w_m softmax(t_m) (combine: probs) or Σ_m w_m t_m."""
        combined, probs = ensemble_targets(torch.stack(logits, 1), self.teacher_weights.cpu(), temperature=1.0,
                                           combine=self.params.combine)
        return combined if combined is not None else probs.clamp(min=1e-30).log()

    def describe(self) -> str:
        p = self.params
        weights = "equal weights" if p.weights is None else "weights " + "/".join(f"{w:g}" for w in p.weights)
        return f"loss = {1 - p.beta:g}·ce + {p.beta:g}·T²·KL(ensemble of {p.combine}, {weights}; T={p.temperature:g})"


def _objective(student_logits, labels, all_logits, weights, *, temperature, beta, combine, labeled_count,
               sample_count):
    teacher_logits, soft_targets = ensemble_targets(all_logits, weights, temperature=temperature, combine=combine)
    return kd_objective(student_logits, labels, teacher_logits, soft_targets=soft_targets, temperature=temperature,
                        beta=beta, labeled_count=labeled_count, sample_count=sample_count)
