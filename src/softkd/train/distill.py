"""distill(): a student taught by a teacher (or several) with any registered method, in one call.

Pipeline (the original write-up): the teacher produces soft labels for the transfer set
(labeled or not) → they are validated → the student trains on the method's loss, for
soft targets (1 − β)·CE + β·T²·KL + λ·R(θ), until convergence (patience) or the step budget.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from softkd.data.datasets import as_dataset
from softkd.data.loader import build_loader
from softkd.errors import ConfigError, DataError
from softkd.losses.logits import soften, validate_soft_targets
from softkd.methods.base import MethodParams, build_method, method_class, method_params
from softkd.models.teacher import Teacher
from softkd.train.checks import check_classes
from softkd.train.loop import FitResult, fit
from softkd.train.runtime import inference_batch_size

_FIT_ARGUMENTS = frozenset(inspect.signature(fit).parameters) - {"model", "train_data", "objective", "val_data",
                                                                 "extras", "augment", "views"}


def distill(
    student: nn.Module,
    teacher: nn.Module | list[nn.Module] | None,
    train_data,
    *,
    method: str | MethodParams = "soft-target",
    val_data=None,
    soft_targets: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_features: list[torch.Tensor] | None = None,
    augment=None,
    **kwargs,
) -> FitResult:
    """Distill ``teacher`` into ``student`` on the transfer set ``train_data`` with ``method``.

    ``method``: a registered name (``softkd ls methods``: soft-target, dkd, dist, multi-teacher,
    feature, mutual)
    or its params; the method's parameters are keyword arguments with the config's names, e.g.
    ``distill(student, teacher, data, method="dkd", beta=8.0, epochs=10)``. Other keyword
    arguments go to :func:`softkd.fit` (epochs, max_steps, patience, lr, weight_decay = λ, ...).
    ``teacher``: a model, a list of models for ``multi-teacher``, or None for ``mutual`` (its
    peers teach each other; ``result.students`` holds every trained peer by name).

    ``train_data``: a ``Dataset`` (items ``(x, y)``, ``x`` or dicts; label -1 = unlabeled), an
    ``(x, y)`` tuple of tensors, or a ``DataLoader`` (then the teacher runs on every batch).
    For datasets the teacher runs once over the transfer set and its soft labels are validated
    before training. ``teacher_logits``, already computed for ``train_data`` in order ((N, C),
    or (N, M, C) for M teachers), spare that pass (e.g. across seeds); ``soft_targets`` (N, C)
    probabilities at temperature T may replace the teacher for ``soft-target``. Both are
    validated. Returns a :class:`FitResult` whose ``model`` is the trained student.

    With ``augment`` (:class:`softkd.data.augment.ShiftFlip`) the student trains on seeded views
    and is taught on exactly those views: either ``teacher_logits`` with a view axis after the
    sample axis ((N, K, C), or (N, K, M, C)) hold the teacher's logits for K views per sample (a
    soft-label cache built with the same augment), or the teacher runs on every augmented batch.
    Static targets (one row per sample) with augmentation are refused: they would teach each view
    with another view's answer.

    ``teacher_features`` (method ``feature``): the teacher's outputs at each ``teacher_layers``
    path for ``train_data`` in order, one (N, D) tensor per path (flattened; any dtype, e.g. a
    memory-mapped fp16 feature cache), given with ``teacher_logits``: the teacher then never runs
    during training.
    """
    params, fit_kwargs = _split_arguments(method, kwargs)
    teachers = [] if teacher is None else list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    teachers = [Teacher(t) for t in teachers]
    if soft_targets is not None and teacher_logits is not None:
        raise ConfigError("Give distill() 'teacher_logits' or 'soft_targets', not both.")
    precomputed = soft_targets is not None or teacher_logits is not None
    cls = method_class(params.name)
    if soft_targets is not None and not cls.takes_soft_targets:
        raise ConfigError(f"Method '{cls.name}' needs teacher logits; 'soft_targets' (probabilities) only "
                          "serve 'soft-target'.")
    if cls.needs != "none" and not teachers and not precomputed:
        raise ConfigError(f"distill() with method '{cls.name}' needs a teacher, 'teacher_logits' or 'soft_targets'; "
                          "got none.")
    objective = build_method(params, teachers=teachers)
    train = as_dataset(train_data, name="train_data")
    if precomputed and isinstance(train, torch.utils.data.DataLoader):
        raise DataError("Precomputed 'soft_targets' or 'teacher_logits' need a Dataset in a fixed order, not a DataLoader.")
    per_sample_ndim = 3 if cls.teachers_needed == "several" else 2  # (N, M, C) or (N, C)
    views = _check_views(augment, soft_targets, teacher_logits, per_sample_ndim)
    extras = None
    if soft_targets is not None:
        extras = {"soft_targets": torch.as_tensor(soft_targets).float()}
    elif cls.needs == "logits" and not isinstance(train, torch.utils.data.DataLoader) and (
            augment is None or teacher_logits is not None):
        if teacher_logits is None:  # each teacher once over the transfer set
            loader = build_loader(train, batch_size=inference_batch_size(teachers[0]))
            logits = [t.predict_logits(loader) for t in teachers]
            teacher_logits = logits[0] if per_sample_ndim == 2 else torch.stack(logits, 1)
        extras = {"teacher_logits": torch.as_tensor(teacher_logits).float()}
    elif cls.needs == "features" and teacher_logits is not None:
        extras = {"teacher_logits": torch.as_tensor(teacher_logits).float()}
    if teacher_features is not None:
        _check_features(cls, teacher_features, teacher_logits, augment, len(train))
        extras = {**extras, **{f"teacher_feature{i}": f for i, f in enumerate(teacher_features)}}
    if extras:
        _validate(extras, soft_targets is not None, len(train), getattr(objective.params, "temperature", 1.0))
    targets = next(iter(extras.values())) if extras else None
    for t in teachers or [None]:
        check_classes(student, t, train, soft_targets=targets)
    return fit(student, train, objective=objective, val_data=val_data, extras=extras, augment=augment, views=views,
               **fit_kwargs)


def _split_arguments(method, kwargs: dict) -> tuple[MethodParams, dict]:
    """The method's parameters (validated) and fit's keyword arguments; anything else is refused."""
    name = method.name if isinstance(method, MethodParams) else method
    fields = set(method_class(name).Params.model_fields) - {"name"}
    unknown = sorted(set(kwargs) - fields - _FIT_ARGUMENTS)
    if unknown:
        raise ConfigError(f"distill() got unknown argument(s) {', '.join(unknown)}: method '{name}' takes "
                          f"{', '.join(sorted(fields))}; the rest go to fit() ({', '.join(sorted(_FIT_ARGUMENTS))}).")
    params = method_params(method, **{k: v for k, v in kwargs.items() if k in fields})
    return params, {k: v for k, v in kwargs.items() if k not in fields}


def _check_features(cls, features, teacher_logits, augment, num_samples: int) -> None:
    if cls.needs != "features" or teacher_logits is None or augment is not None:
        raise ConfigError("'teacher_features' (cached teacher features) serve method 'feature', given with "
                          "'teacher_logits' and without augmentation; otherwise the teacher runs on every batch.")
    for i, f in enumerate(features):
        if f.ndim != 2 or f.shape[0] != num_samples:
            raise ConfigError(f"teacher_features[{i}] must have shape ({num_samples}, D), one flattened feature per "
                              f"sample of train_data; got {tuple(f.shape)}.")


def _validate(extras: dict, probabilities: bool, num_samples: int, temperature: float) -> None:
    """Feasibility of the distribution(s) the student will be taught: each teacher's softened
    logits (every view), or the given probabilities."""
    targets = next(iter(extras.values()))
    rows = targets if probabilities else soften(targets, temperature)
    # (N, ..., C) -> (N, rows of that sample, C): every view and every teacher checked
    validate_soft_targets(rows.reshape(num_samples, -1, rows.shape[-1]) if rows.ndim > 2 else rows,
                          num_samples=num_samples)


def _check_views(augment, soft_targets, teacher_logits, per_sample_ndim: int) -> int | None:
    """The number of cached views (None: the teacher runs on every batch, or no augmentation)."""
    has_views = teacher_logits is not None and torch.as_tensor(teacher_logits).ndim == per_sample_ndim + 1
    if teacher_logits is not None and not has_views and torch.as_tensor(teacher_logits).ndim != per_sample_ndim:
        raise ConfigError(f"teacher_logits of shape {tuple(teacher_logits.shape)} do not fit this method: give "
                          f"{per_sample_ndim} dimensions per sample, with a view axis after the samples for augmented views.")
    if augment is None:
        if has_views:
            raise ConfigError(f"teacher_logits of shape {tuple(teacher_logits.shape)} hold one row per view; "
                              "pass the augment they were computed with (augment=...).")
        return None
    if soft_targets is not None or (teacher_logits is not None and not has_views):
        raise ConfigError("Random augmentation with static soft labels (one row per sample) would teach each view "
                          "with another view's answer; cache K views per sample (cache.views >= 2, "
                          "teacher_logits with a view axis) or let the teacher run on every batch.")
    return None if teacher_logits is None else int(teacher_logits.shape[1])
