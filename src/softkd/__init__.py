"""softkd: knowledge distillation for PyTorch that says what distillation bought you."""

__version__ = "0.4.0"

from softkd.cache import SoftLabelCache
from softkd.cascade import Cascade, calibrate_run, export_cascade, load_cascade
from softkd.config import RunConfig, load_config
from softkd.data import ArrayDataset, build_dataset, build_loader, keep_labels
from softkd.errors import SoftKDError
from softkd.evaluate.checkpoint import evaluate_checkpoint
from softkd.evaluate.metrics import detailed_metrics, evaluate
from softkd.evaluate.speed import time_models
from softkd.export import export_student, load_exported
from softkd.runs import list_students, load_student
from softkd.losses import kd_objective, soft_target_kl, soften, validate_soft_targets
from softkd.methods import (DIST, DKD, Feature, Method, MethodParams, MultiTeacher, Mutual, SoftTarget, Supervised,
                            build_method, build_objective)
from softkd.models import Teacher, build_model, list_models
from softkd.pipeline import run_experiment
from softkd.report import render_reports
from softkd.train.distill import distill
from softkd.train.loop import FitResult, fit

__all__ = [
    "ArrayDataset", "Cascade", "DIST", "DKD", "Feature", "FitResult", "Method", "MethodParams", "MultiTeacher",
    "Mutual", "RunConfig", "SoftKDError", "SoftLabelCache", "SoftTarget", "Supervised", "Teacher", "__version__",
    "build_dataset", "build_loader", "build_method", "build_model", "build_objective", "calibrate_run",
    "detailed_metrics", "distill", "evaluate", "evaluate_checkpoint", "export_cascade", "export_student", "fit",
    "kd_objective", "keep_labels", "list_models", "list_students", "load_cascade", "load_config", "load_exported",
    "load_student", "render_reports", "run_experiment", "soft_target_kl", "soften", "time_models",
    "validate_soft_targets",
]
