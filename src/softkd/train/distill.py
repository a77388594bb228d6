"""distill(): Soft-Target Distillation of a student from a teacher, in one call.

Pipeline (the original write-up): the teacher produces soft labels for the transfer set
(labeled or not) → they are validated → the student trains on (1 − β)·CE + β·T²·KL + λ·R(θ)
until convergence (patience) or the step budget.
"""

from __future__ import annotations

import torch
from torch import nn

from softkd.data.datasets import as_dataset
from softkd.data.loader import build_loader
from softkd.errors import ConfigError, DataError
from softkd.losses.logits import check_beta, check_temperature, soften, validate_soft_targets
from softkd.methods.soft_target import SoftTarget
from softkd.models.teacher import Teacher
from softkd.train.checks import check_classes
from softkd.train.loop import FitResult, fit
from softkd.train.runtime import inference_batch_size


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    train_data,
    *,
    val_data=None,
    temperature: float = 4.0,
    beta: float = 0.9,
    soft_targets: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    augment=None,
    **fit_kwargs,
) -> FitResult:
    """Distill ``teacher`` into ``student`` on the transfer set ``train_data``.

    ``train_data``: a ``Dataset`` (items ``(x, y)``, ``x`` or dicts; label -1 = unlabeled), an
    ``(x, y)`` tuple of tensors, or a ``DataLoader`` (then the teacher runs on every batch).
    For datasets the teacher runs once over the transfer set and its soft labels are validated
    before training. ``teacher_logits`` (N, C), already computed for ``train_data`` in order,
    spare that pass (e.g. across seeds); ``soft_targets`` (N, C) probabilities at temperature T may
    replace the teacher. Both are validated. Other keyword arguments go to :func:`softkd.fit` (epochs, max_steps, patience, lr,
    weight_decay = λ, ...). Returns a :class:`FitResult` whose ``model`` is the trained student.

    With ``augment`` (:class:`softkd.data.augment.ShiftFlip`) the student trains on seeded views
    and is taught on exactly those views: either ``teacher_logits`` of shape (N, K, C) hold the
    teacher's logits for K views per sample (a soft-label cache built with the same augment), or
    the teacher runs on every augmented batch. Static targets of shape (N, C) with augmentation
    are refused: they would teach each view with another view's answer.
    """
    check_temperature(temperature)
    check_beta(beta)
    if teacher is None and soft_targets is None and teacher_logits is None:
        raise ConfigError("distill() needs a teacher, 'teacher_logits' or 'soft_targets'; got none.")
    if soft_targets is not None and teacher_logits is not None:
        raise ConfigError("Give distill() 'teacher_logits' or 'soft_targets', not both.")
    train = as_dataset(train_data, name="train_data")
    teacher = Teacher(teacher) if teacher is not None else None
    precomputed = soft_targets is not None or teacher_logits is not None
    if precomputed and isinstance(train, torch.utils.data.DataLoader):
        raise DataError("Precomputed 'soft_targets' or 'teacher_logits' need a Dataset in a fixed order, not a DataLoader.")
    views = _check_views(augment, soft_targets, teacher_logits)
    extras = None
    if soft_targets is not None:
        extras = {"soft_targets": torch.as_tensor(soft_targets).float()}
    elif not isinstance(train, torch.utils.data.DataLoader) and (augment is None or teacher_logits is not None):
        if teacher_logits is None:
            teacher_logits = teacher.predict_logits(build_loader(train, batch_size=inference_batch_size(teacher)))
        extras = {"teacher_logits": torch.as_tensor(teacher_logits).float()}
    targets = next(iter(extras.values())) if extras else None
    if targets is not None:  # feasibility of the distribution the student will be taught
        validate_soft_targets(targets if soft_targets is not None else soften(targets, temperature),
                              num_samples=len(train))
    check_classes(student, teacher, train, soft_targets=targets)
    objective = SoftTarget(teacher=teacher, temperature=temperature, beta=beta)
    return fit(student, train, objective=objective, val_data=val_data, extras=extras, augment=augment, views=views,
               **fit_kwargs)


def _check_views(augment, soft_targets, teacher_logits) -> int | None:
    """The number of cached views (None: the teacher runs on every batch, or no augmentation)."""
    if augment is None:
        if teacher_logits is not None and torch.as_tensor(teacher_logits).ndim == 3:
            raise ConfigError(f"teacher_logits of shape {tuple(teacher_logits.shape)} hold one row per view; "
                              "pass the augment they were computed with (augment=...).")
        return None
    if soft_targets is not None or (teacher_logits is not None and torch.as_tensor(teacher_logits).ndim != 3):
        raise ConfigError("Random augmentation with static soft labels (one row per sample) would teach each view "
                          "with another view's answer; cache K views per sample (cache.views >= 2, "
                          "teacher_logits of shape (N, K, C)) or let the teacher run on every batch.")
    return None if teacher_logits is None else int(teacher_logits.shape[1])
