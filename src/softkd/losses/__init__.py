"""Distillation losses."""

from softkd.losses.logits import (
    UNLABELED,
    cross_entropy,
    kd_objective,
    soft_target_kl,
    soften,
    supervised_objective,
    validate_soft_targets,
)

__all__ = ["UNLABELED", "cross_entropy", "kd_objective", "soft_target_kl", "soften", "supervised_objective",
           "validate_soft_targets"]
