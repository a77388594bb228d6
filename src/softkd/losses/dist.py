"""DIST (Huang et al., NeurIPS 2022): distillation from a stronger teacher by matching relations
of the softened probabilities instead of the probabilities themselves. A pure function of logits."""

from __future__ import annotations

import torch

from softkd.errors import ShapeMismatchError
from softkd.losses.logits import (_compute_dtype, _masked_mean, check_temperature, cross_entropy,
                                  zero_masked_rows)


def pearson(a: torch.Tensor, b: torch.Tensor, *, dim: int, weights: torch.Tensor | None = None,
            eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim`` (optionally weighted: masked rows get
    weight 0): the cosine similarity of the centred vectors, ``eps`` guarding a zero variance."""
    if weights is None:
        weights = torch.ones_like(a)
    total = weights.sum(dim, keepdim=True).clamp(min=1e-12)
    a = a - (weights * a).sum(dim, keepdim=True) / total
    b = b - (weights * b).sum(dim, keepdim=True) / total
    cov = (weights * a * b).sum(dim)
    # clamped inside the root: a constant column (a class no sample of the batch predicts) has
    # zero variance, where the root's derivative is infinite; its correlation is then 0.
    norms = ((weights * a * a).sum(dim) * (weights * b * b).sum(dim)).clamp(min=1e-30).sqrt()
    return cov / (norms + eps)


def dist_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    count: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra): T² · (1 − mean Pearson correlation) of p_s = softmax(s/T) and
    p_t = softmax(t/T), taken

      inter-class: along the classes of each sample, averaged over (unmasked) samples;
      intra-class: along the samples of the batch for each class, averaged over classes.

    Both are 0 when the student's probabilities equal the teacher's (or are any positive affine
    map of them per row / column) and at most 2·T². The intra-class term is a statistic of the
    whole batch, not a mean over samples (0 with fewer than two samples kept): ``count`` scales it
    by this batch's share of the samples (n / count), so micro-batches of one step add up to their
    sample-weighted mean.
    Shapes (N, C); ``mask`` (N,) leaves rows out of both.
    """
    check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ShapeMismatchError(f"DIST needs student and teacher logits of the same shape (N, C); got "
                                 f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}.")
    student_logits, teacher_logits = zero_masked_rows(mask, student_logits, teacher_logits)
    p_s = torch.softmax(_compute_dtype(student_logits) / temperature, dim=-1)
    p_t = torch.softmax(_compute_dtype(teacher_logits.detach()) / temperature, dim=-1)
    rows = None if mask is None else mask.to(p_s.dtype)
    inter = _masked_mean(1 - pearson(p_s, p_t, dim=1), mask, count)
    weights = None if rows is None else rows[:, None].expand_as(p_s)
    intra = (1 - pearson(p_s, p_t, dim=0, weights=weights)).mean()
    n = p_s.shape[0] if rows is None else rows.sum()
    intra = intra * (n >= 2)  # no relation across a batch of fewer than two samples: no term (not 1 − 0)
    if count is not None:
        intra = intra * n / count
    scale = temperature**2
    return scale * inter, scale * intra


def dist_objective(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    ce_weight: float = 1.0,
    labeled_count: float | torch.Tensor | None = None,
    sample_count: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """ce_weight · CE(s, y) + β · inter + γ · intra (:func:`dist_terms`; Huang et al. 2022, eq. 9).
    Returns ``{"loss", "ce", "inter", "intra"}``."""
    inter, intra = dist_terms(student_logits, teacher_logits, temperature=temperature, count=sample_count)
    ce = cross_entropy(student_logits, labels, count=labeled_count)
    loss = ce_weight * ce + beta * inter + gamma * intra
    return {"loss": loss, "ce": ce.detach(), "inter": inter.detach(), "intra": intra.detach()}
