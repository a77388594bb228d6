"""Distillation losses: pure functions of logits, the formula in each docstring."""

from softkd.losses.dist import dist_objective, dist_terms
from softkd.losses.dkd import dkd_objective, dkd_terms
from softkd.losses.logits import (
    UNLABELED,
    cross_entropy,
    ensemble_targets,
    kd_objective,
    soft_target_kl,
    soften,
    standardize_logits,
    supervised_objective,
    validate_soft_targets,
)

__all__ = ["UNLABELED", "cross_entropy", "dist_objective", "dist_terms", "dkd_objective", "dkd_terms",
           "ensemble_targets", "kd_objective", "soft_target_kl", "soften", "standardize_logits",
           "supervised_objective", "validate_soft_targets"]
