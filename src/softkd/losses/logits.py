"""Distillation losses on logits: pure functions, the formula in each docstring.

Notation: teacher logits ``t``, student logits ``s``, temperature ``T``, labels ``y`` (``-1`` marks
an unlabeled sample). Soft targets ``p_T = softmax(t / T)``, student ``q_T = softmax(s / T)``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from softkd.errors import ConfigError, InfeasibleSoftTargetsError, ShapeMismatchError

UNLABELED = -1
"""Label value of a sample without a label (an unlabeled transfer-set sample)."""

SUM_TOLERANCE = 1e-4
"""How far a float32 soft-label row may sum from 1 and still be feasible."""


def _as_number(value) -> float | None:
    """ints, floats, numpy scalars and one-element tensors as a float; None for anything else."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def check_temperature(temperature: float) -> None:
    t = _as_number(temperature)
    if t is None or not math.isfinite(t) or t <= 0:
        raise ConfigError(f"The 'temperature' of method must be a finite number > 0; got {temperature!r}.")


def check_beta(beta: float) -> None:
    b = _as_number(beta)
    if b is None or not 0 < b <= 1:
        raise ConfigError(
            f"The 'beta' of method must be in (0, 1] (the weight of the distillation term); got {beta!r}."
        )


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Low-precision logits are upcast to float32; float64 stays float64 (exact gradient checks)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def soften(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft targets ``softmax(logits / T)`` in float32 (the write-up's soft label distribution α)."""
    check_temperature(temperature)
    return torch.softmax(_compute_dtype(logits) / temperature, dim=-1)


def validate_soft_targets(
    soft_targets: torch.Tensor, *, num_classes: int | None = None, num_samples: int | None = None
) -> torch.Tensor:
    """Check that soft labels are a feasible distribution and return them unchanged.

    Feasible: shape (N, C) or (B, L, C), every entry finite and in [0, 1], each row summing to 1
    within 1e-4 (float32/64; low-precision dtypes get C·eps more). Infeasible input raises
    :class:`InfeasibleSoftTargetsError` naming the first offending rows and why; it is never
    renormalised silently.
    """
    if not isinstance(soft_targets, torch.Tensor):
        soft_targets = torch.as_tensor(soft_targets)
    if soft_targets.ndim not in (2, 3) or soft_targets.shape[-1] < 2:
        raise ShapeMismatchError(
            f"Soft labels must have shape (N, C) or (B, L, C) with C >= 2 classes; got {tuple(soft_targets.shape)}."
        )
    if not soft_targets.is_floating_point():
        raise InfeasibleSoftTargetsError(
            f"Soft labels must be floating-point probabilities; got dtype {soft_targets.dtype}."
        )
    if num_classes is not None and soft_targets.shape[-1] != num_classes:
        raise ShapeMismatchError(
            f"Soft labels have {soft_targets.shape[-1]} classes but the student predicts {num_classes}; "
            "produce them with a teacher over the same classes."
        )
    if num_samples is not None and soft_targets.shape[0] != num_samples:
        raise ShapeMismatchError(
            f"Soft labels have {soft_targets.shape[0]} rows but the transfer set has {num_samples} samples; "
            "give one row per sample, in dataset order."
        )
    rows = soft_targets.detach().reshape(-1, soft_targets.shape[-1])
    tolerance = SUM_TOLERANCE
    if rows.dtype not in (torch.float32, torch.float64):
        # Rounding each entry by ≤ eps/2 of itself moves a row's sum by ≤ eps/2 in all.
        tolerance += torch.finfo(rows.dtype).eps
    rows = rows.double()
    checks = (
        (~torch.isfinite(rows).all(dim=1), "has NaN or inf entries"),
        ((rows < 0).any(dim=1), "has negative entries"),
        ((rows > 1).any(dim=1), "has entries greater than 1"),
    )
    for bad, reason in checks:
        if bad.any():
            raise InfeasibleSoftTargetsError(_offending(bad, reason))
    sums = rows.sum(dim=1)
    bad = (sums - 1).abs() > tolerance
    if bad.any():
        first = int(bad.nonzero()[0])
        raise InfeasibleSoftTargetsError(
            _offending(bad, f"does not sum to 1 within {tolerance:.0e} (row {first} sums to {float(sums[first]):.6g})")
        )
    return soft_targets


def _offending(bad: torch.Tensor, reason: str) -> str:
    rows = bad.nonzero().flatten().tolist()
    shown = ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
    return (
        f"Infeasible soft labels: row(s) {shown} {reason}; soft labels must be finite, in [0, 1] and "
        "sum to 1 per row — pass teacher logits or softmax outputs, not raw scores."
    )


def soft_target_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    soft_targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    count: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over unmasked samples.

    Give either ``teacher_logits`` (exact, computed in log space) or ``soft_targets`` (probabilities
    already at temperature T, e.g. from a file; zero entries contribute 0·log 0 = 0).
    Shapes: (N, C) or (B, L, C) with mask (N,) or (B, L). ``count`` overrides the denominator (the
    true number of samples under gradient accumulation or data parallelism).
    Hinton, Vinyals & Dean 2015, eq. (2) and §2: the T² keeps gradients comparable across T.
    """
    check_temperature(temperature)
    if (teacher_logits is None) == (soft_targets is None):
        raise ConfigError("soft_target_kl needs exactly one of 'teacher_logits' or 'soft_targets'.")
    target = teacher_logits if teacher_logits is not None else soft_targets
    if target.shape != student_logits.shape:
        raise ShapeMismatchError(
            f"Student logits {tuple(student_logits.shape)} and teacher targets {tuple(target.shape)} differ in shape; "
            "teacher and student must predict the same classes."
        )
    if mask is not None and mask.shape == student_logits.shape[:-1]:
        # Masked rows (padding) may hold anything, NaN included: zero them before they reach a gradient.
        keep = (mask != 0).unsqueeze(-1)
        student_logits = torch.where(keep, student_logits, torch.zeros_like(student_logits))
        if teacher_logits is not None:
            teacher_logits = torch.where(keep, teacher_logits, torch.zeros_like(teacher_logits))
        else:
            soft_targets = torch.where(keep, soft_targets, torch.zeros_like(soft_targets))
    student_log_probs = F.log_softmax(_compute_dtype(student_logits) / temperature, dim=-1)
    if teacher_logits is not None:
        teacher_log_probs = F.log_softmax(_compute_dtype(teacher_logits.detach()) / temperature, dim=-1)
        if mask is None:  # fewest kernels (this runs every step): one sum over samples and classes
            total = F.kl_div(student_log_probs, teacher_log_probs, reduction="sum", log_target=True)
            denominator = student_log_probs[..., 0].numel() if count is None else count
            return temperature**2 * _divide(total, denominator)
        per_sample = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    else:
        probs = soft_targets.detach().to(student_log_probs.dtype)
        # log(softmax(x)) and log_softmax(x) differ in the last bit: keep round-off from going below 0.
        per_sample = (torch.xlogy(probs, probs) - probs * student_log_probs).sum(-1).clamp(min=0)
    return temperature**2 * _masked_mean(per_sample, mask, count)


def kd_objective(
    student_logits: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_logits: torch.Tensor | None = None,
    *,
    soft_targets: torch.Tensor | None = None,
    temperature: float = 4.0,
    beta: float = 0.9,
    kd_scale: float = 1.0,
    standardize: bool = False,
    mask: torch.Tensor | None = None,
    labeled_count: float | torch.Tensor | None = None,
    sample_count: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """(1 − β) · CE(s, y) + β · kd_scale · T² · KL(p_T ‖ q_T).

    CE averages over the labeled unmasked samples (label >= 0; -1 marks unlabeled), the
    distillation term over all unmasked samples; unlabeled samples contribute only the distillation term. ``labeled_count`` and
    ``sample_count`` override the two denominators. λ·R(θ) is the optimizer's weight decay.
    ``kd_scale`` (default 1) multiplies the distillation term beyond β's cap of 1 (to match
    another method's total distillation weight). ``standardize``: both logits z-scored per sample
    before the temperature (:func:`standardize_logits`; Sun et al. 2024); CE keeps the raw logits.
    Returns ``{"loss", "ce", "kd"}`` (``kd`` is T²·KL, without β or ``kd_scale``).
    """
    check_beta(beta)
    if standardize:
        if soft_targets is not None:
            raise ConfigError("'standardize' z-scores the teacher's logits; it cannot apply to soft_targets "
                              "(probabilities): give teacher logits or set standardize: false.")
        kd_student = standardize_logits(student_logits)
        if teacher_logits is not None:  # none: soft_target_kl says what it needs
            teacher_logits = standardize_logits(teacher_logits.detach())
    else:
        kd_student = student_logits
    kd = soft_target_kl(
        kd_student, teacher_logits, soft_targets=soft_targets, temperature=temperature,
        mask=mask, count=sample_count,
    )
    ce = cross_entropy(student_logits, labels, mask=mask, count=labeled_count)
    return {"loss": (1 - beta) * ce + (beta * kd_scale) * kd, "ce": ce.detach(), "kd": kd.detach()}


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each sample's logits z-scored over the classes: (z − mean(z)) / √(var(z) + eps²), population
    std, in float32 (float64 stays). Logit standardisation (Sun et al., CVPR 2024): adding a
    constant to a sample's logits or scaling them by a positive factor changes nothing, so the
    student matches the teacher's logit *shape*, not its range."""
    z = _compute_dtype(logits)
    centred = z - z.mean(dim=-1, keepdim=True)
    # eps inside the root: the same value as std + eps up to eps², and a finite gradient when a
    # row's logits are all equal (the root's derivative at 0 is infinite).
    return centred / (centred.pow(2).mean(dim=-1, keepdim=True) + eps**2).sqrt()


def ensemble_targets(teacher_logits: torch.Tensor, weights: torch.Tensor, *, temperature: float,
                     combine: str = "probs") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Several teachers' logits (B, M, C) as one target, ``(teacher_logits, soft_targets)`` with
    one of them None: ``probs``: soft targets Σ_m w_m · softmax(t_m / T); ``logits``: the logits
    Σ_m w_m · t_m (softened by T later). ``weights`` (M,) sum to 1."""
    check_temperature(temperature)
    if teacher_logits.ndim != 3 or teacher_logits.shape[1] != weights.shape[0]:
        raise ShapeMismatchError(f"Multi-teacher logits must have shape (B, {weights.shape[0]}, C), one row per "
                                 f"teacher; got {tuple(teacher_logits.shape)}.")
    t = _compute_dtype(teacher_logits.detach())
    w = weights.to(t.dtype)[None, :, None]
    if combine == "logits":
        return (t * w).sum(1), None
    return None, (torch.softmax(t / temperature, dim=-1) * w).sum(1)


def supervised_objective(
    logits: torch.Tensor, labels: torch.Tensor | None, *, labeled_count: float | torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """CE(s, y) over the labeled samples (the from-scratch baseline's objective): ``{"loss", "ce"}``."""
    ce = cross_entropy(logits, labels, count=labeled_count)
    return {"loss": ce, "ce": ce.detach()}


def label_mass(labels: torch.Tensor) -> torch.Tensor:
    """How much label a batch carries, the denominator of :func:`cross_entropy`: the number of
    labeled samples, or the sum of label targets (B, C), in float64 so that a step's micro-batches
    add up to what the whole batch sums to."""
    return labels.sum(dtype=torch.float64) if labels.is_floating_point() else (labels >= 0).sum()


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    mask: torch.Tensor | None = None,
    count: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over labeled (label >= 0), unmasked samples; 0 when there are none.

    Any negative label is ignored (-1 is softkd's, -100 PyTorch's convention). ``labels`` may
    also be label targets (B, C), floats (mixup's blends, :meth:`softkd.data.augment.Mixup.mix_labels`):
    then it is ``Σ_i −Σ_c y_ic · log q_ic`` over the label mass ``Σ y`` (:func:`label_mass`), which
    is the plain mean when every row is one label.
    """
    logits = _compute_dtype(logits.reshape(-1, logits.shape[-1]))
    if labels is None:
        return logits.sum() * 0.0
    if labels.is_floating_point():
        targets = labels.reshape(-1, logits.shape[-1]).to(logits.dtype)
        if mask is not None:
            keep = mask.reshape(-1).bool()
            # Masked rows (padding) may hold anything, NaN included: zeroed, or NaN would reach the gradient.
            logits = torch.where(keep[:, None], logits, torch.zeros_like(logits))
            targets = targets * keep[:, None]
        total = -(targets * torch.log_softmax(logits, dim=-1)).sum()
        return _divide(total, label_mass(targets) if count is None else count)
    labels = labels.reshape(-1)
    labeled = labels >= 0
    if mask is None:
        # Fewest kernels (this runs every step): unlabeled rows are ignored inside the loss itself.
        total = F.cross_entropy(logits, labels.clamp(min=UNLABELED), ignore_index=UNLABELED, reduction="sum")
        denominator = labeled.sum() if count is None else count
        return _divide(total, denominator)
    labeled = labeled & mask.reshape(-1).bool()
    # Masked rows (padding) may hold anything, NaN included: zeroed, or NaN would reach the gradient.
    logits = torch.where(labeled[:, None], logits, torch.zeros_like(logits))
    per_sample = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return _masked_mean(per_sample, labeled, count)


def _masked_mean(
    per_sample: torch.Tensor, mask: torch.Tensor | None, count: float | torch.Tensor | None
) -> torch.Tensor:
    if mask is not None:
        if mask.shape != per_sample.shape:
            raise ShapeMismatchError(
                f"Mask shape {tuple(mask.shape)} does not match the samples' shape {tuple(per_sample.shape)}."
            )
        # where, not multiply: NaN or inf in a masked-out row (padding) must not leak in.
        weights = mask.to(per_sample.dtype)
        per_sample = torch.where(weights != 0, per_sample * weights, torch.zeros_like(per_sample))
        denominator = weights.sum() if count is None else count
    else:
        denominator = per_sample.numel() if count is None else count
    return _divide(per_sample.sum(), denominator)


def zero_masked_rows(mask: torch.Tensor | None, *logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``logits`` (N, C) or (B, L, C) with the rows ``mask`` leaves out set to 0: masked rows (padding) may hold
    anything, NaN included, and must not reach a value or a gradient."""
    if mask is None:
        return logits
    keep = (mask != 0).unsqueeze(-1)
    return tuple(torch.where(keep, x, torch.zeros_like(x)) for x in logits)


def _divide(total: torch.Tensor, denominator: float | torch.Tensor) -> torch.Tensor:
    """``total / max(denominator, 1)``: no samples give 0, not NaN."""
    if isinstance(denominator, torch.Tensor):
        return total / denominator.clamp(min=1)
    return total / max(float(denominator), 1.0)
