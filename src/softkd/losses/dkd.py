"""Decoupled knowledge distillation (Zhao et al., CVPR 2022): the KD term split into its
target-class and non-target-class parts, each with its own weight. A pure function of logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from softkd.errors import ConfigError, ShapeMismatchError
from softkd.losses.logits import (_compute_dtype, _masked_mean, check_temperature, cross_entropy,
                                  standardize_logits, zero_masked_rows)


def non_target_index(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C−1) indices of each row's classes other than ``target`` (static shapes: no boolean
    masking, so the loss compiles into one graph)."""
    others = torch.arange(num_classes - 1, device=target.device).expand(target.shape[0], -1)
    return others + (others >= target[:, None]).long()


def dkd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 4.0,
    mask: torch.Tensor | None = None,
    count: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each T² times a KL averaged over unmasked samples.

    With p = softmax(z/T) and g the target class of each sample:
      TCKD = T² · KL(b_t ‖ b_s),  b = (p_g, 1 − p_g)            (target vs. all other classes)
      NCKD = T² · KL(p̂_t ‖ p̂_s),  p̂_j = p_j / (1 − p_g), j ≠ g  (among the non-target classes)
    so that KL(p_t ‖ p_s) = KL(b_t ‖ b_s) + (1 − p_g^t) · KL(p̂_t ‖ p̂_s) (Zhao et al., eq. 5).
    Everything is in log space: log p_g = z_g/T − LSE(z/T) and log(1 − p_g) = LSE_{j≠g}(z_j/T) −
    LSE(z/T), never the log of a probability (the reference code's log(p + 1e-7) is where its
    NaN and bias come from). Shapes: logits (N, C) with C >= 3, ``target`` (N,) class indices.
    ``count`` overrides the denominator (accumulation, several processes).
    """
    check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ShapeMismatchError(f"DKD needs student and teacher logits of the same shape (N, C); got "
                                 f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}.")
    num_classes = student_logits.shape[-1]
    if num_classes < 3:
        raise ConfigError(f"DKD needs at least 3 classes (its non-target term is empty below that); the data has "
                          f"{num_classes}: use method 'soft-target'.")
    student_logits, teacher_logits = zero_masked_rows(mask, student_logits, teacher_logits)
    others = non_target_index(target, num_classes)
    per_model = []
    for logits in (teacher_logits.detach(), student_logits):
        z = _compute_dtype(logits) / temperature
        lse_all = torch.logsumexp(z, dim=-1)
        z_others = z.gather(1, others)  # (N, C−1)
        lse_others = torch.logsumexp(z_others, dim=-1)
        log_binary = torch.stack([z.gather(1, target[:, None]).squeeze(1) - lse_all, lse_others - lse_all], -1)
        log_non_target = z_others - lse_others[:, None]
        per_model.append((log_binary, log_non_target))
    (t_binary, t_rest), (s_binary, s_rest) = per_model
    tckd = F.kl_div(s_binary, t_binary, reduction="none", log_target=True).sum(-1)
    nckd = F.kl_div(s_rest, t_rest, reduction="none", log_target=True).sum(-1)
    scale = temperature**2
    return scale * _masked_mean(tckd, mask, count), scale * _masked_mean(nckd, mask, count)


def dkd_target(labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Each sample's target class: its label, or for an unlabeled sample (label < 0) the
    teacher's top class."""
    return torch.where(labels >= 0, labels, teacher_logits.argmax(-1))


def dkd_objective(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    ce_weight: float = 1.0,
    warmup_factor: float | torch.Tensor = 1.0,
    standardize: bool = False,
    labeled_count: float | torch.Tensor | None = None,
    sample_count: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """ce_weight · CE(s, y) + w · (α · TCKD + β · NCKD), w the warm-up factor in [0, 1].

    The target class of an unlabeled sample (label -1) is the teacher's top class (it has no CE
    term). ``standardize`` z-scores both logits before the temperature (Sun et al. 2024; CE
    keeps the raw logits). Returns ``{"loss", "ce", "tckd", "nckd"}`` (the last two with T²).
    """
    if labels.is_floating_point():
        raise ConfigError("DKD splits each student output at its sample's target class, and blended labels "
                          "(data.augment: mixup) have none; use soft-target or dist with mixup, or another augment.")
    target = dkd_target(labels, teacher_logits)
    kd_student, kd_teacher = student_logits, teacher_logits
    if standardize:
        kd_student, kd_teacher = standardize_logits(student_logits), standardize_logits(teacher_logits.detach())
    tckd, nckd = dkd_terms(kd_student, kd_teacher, target, temperature=temperature, count=sample_count)
    ce = cross_entropy(student_logits, labels, count=labeled_count)
    loss = ce_weight * ce + warmup_factor * (alpha * tckd + beta * nckd)
    return {"loss": loss, "ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach()}
