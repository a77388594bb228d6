"""What logit methods read from the teacher: cached logits from the batch, or the live teacher."""

from __future__ import annotations

import torch

from softkd.errors import InfeasibleSoftTargetsError


def teacher_logits_of(method, batch: dict) -> torch.Tensor:
    """The batch's ``teacher_logits`` (precomputed: the soft-label cache), else every teacher of
    ``method`` run on ``batch["x"]``: (B, C) for one teacher, (B, M, C) for M teachers."""
    logits = batch.get("teacher_logits")
    if logits is not None:
        return logits
    outputs = [teacher(batch["x"]) for teacher in method.teachers]
    logits = outputs[0] if len(outputs) == 1 else torch.stack(outputs, 1)
    # On accelerators this check would make the host wait for the device every step, and with
    # several processes only one might stop; there a non-finite teacher shows as a non-finite
    # distillation term, which the training loop reports on every process at the same step.
    alone = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                 and torch.distributed.get_world_size() > 1)
    if logits.device.type == "cpu" and alone and not torch.isfinite(logits).all():
        raise InfeasibleSoftTargetsError("The teacher produced NaN or inf logits on a training batch; "
                                         "check its weights and inputs.")
    return logits
