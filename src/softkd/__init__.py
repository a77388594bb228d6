"""softkd: knowledge distillation for PyTorch that says what distillation bought you."""

__version__ = "0.3.0"

from softkd.cache import SoftLabelCache
from softkd.config import RunConfig, load_config
from softkd.data import ArrayDataset, build_dataset, build_loader, keep_labels
from softkd.errors import SoftKDError
from softkd.evaluate.metrics import evaluate
from softkd.losses import kd_objective, soft_target_kl, soften, validate_soft_targets
from softkd.methods import (DIST, DKD, Feature, Method, MethodParams, MultiTeacher, Mutual, SoftTarget, Supervised,
                            build_method, build_objective)
from softkd.models import Teacher, build_model, list_models
from softkd.pipeline import run_experiment
from softkd.train.distill import distill
from softkd.train.loop import FitResult, fit

__all__ = [
    "DIST", "DKD", "ArrayDataset", "Feature", "FitResult", "Method", "MethodParams", "MultiTeacher", "Mutual",
    "RunConfig", "SoftKDError",
    "SoftLabelCache", "SoftTarget", "Supervised", "Teacher",
    "__version__", "build_dataset", "build_loader", "build_method", "build_model", "build_objective", "distill",
    "evaluate", "fit", "kd_objective", "keep_labels", "list_models", "load_config", "run_experiment",
    "soft_target_kl", "soften", "validate_soft_targets",
]
