"""Soft-Target Distillation (Hinton, Vinyals & Dean 2015)."""

from __future__ import annotations

import torch
from torch import nn

from softkd.errors import InfeasibleSoftTargetsError
from softkd.losses.logits import check_beta, check_temperature, kd_objective
from softkd.methods.base import OBJECTIVES, GraphSafe
from softkd.models.teacher import Teacher


@OBJECTIVES.register("soft-target", aliases=("soft-td",))
class SoftTarget(GraphSafe, nn.Module):
    """(1 − β) · CE(s, y) + β · T² · KL(softmax(t/T) ‖ softmax(s/T)).

    Teacher targets come from the batch when precomputed (``teacher_logits``, or validated
    ``soft_targets`` probabilities), else from running the frozen teacher on the batch.
    """

    terms = ("loss", "ce", "kd")
    graph_inputs = ("x", "y", "teacher_logits", "soft_targets")
    graph_safe = True  # a teacher it holds is checked on its own

    def __init__(self, *, teacher: nn.Module | None = None, temperature: float = 4.0, beta: float = 0.9):
        super().__init__()
        check_temperature(temperature)
        check_beta(beta)
        self.teacher = Teacher(teacher) if teacher is not None else None
        self.temperature = temperature
        self.beta = beta

    def forward(self, model: nn.Module, batch: dict, *, labeled_count=None, sample_count=None) -> dict[str, torch.Tensor]:
        """``labeled_count`` / ``sample_count``: the whole batch's counts when this is one of several
        accumulated micro-batches (see :func:`softkd.losses.kd_objective`)."""
        student_logits = model(batch["x"])
        teacher_logits = batch.get("teacher_logits")
        soft_targets = batch.get("soft_targets")
        if teacher_logits is None and soft_targets is None:
            teacher_logits = self.teacher(batch["x"])
            # On accelerators this check would make the host wait for the device every step, and with
            # several processes only one might stop; there a non-finite teacher shows as a non-finite
            # 'kd' term, which the training loop reports on every process at the same step.
            alone = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                         and torch.distributed.get_world_size() > 1)
            if teacher_logits.device.type == "cpu" and alone and not torch.isfinite(teacher_logits).all():
                raise InfeasibleSoftTargetsError(
                    "The teacher produced NaN or inf logits on a training batch; check its weights and inputs."
                )
        return self.loss(
            kd_objective, student_logits, batch["y"], teacher_logits, soft_targets=soft_targets,
            temperature=self.temperature, beta=self.beta, labeled_count=labeled_count, sample_count=sample_count,
        )
