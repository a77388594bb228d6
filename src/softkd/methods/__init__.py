"""Distillation methods, one per file, registered by name (``softkd ls methods``). Each is a
:class:`~softkd.methods.base.Method` called as ``method(model, batch) -> {"loss": ..., ...}``;
see ``methods/base.py`` for what a method declares."""

from softkd.methods.base import (METHODS, Method, MethodParams, build_method, build_objective, method_class,
                                 method_params, register_method)
from softkd.methods.auto import Auto
from softkd.methods.dist import DIST
from softkd.methods.dkd import DKD
from softkd.methods.feature import Feature
from softkd.methods.multi_teacher import MultiTeacher
from softkd.methods.mutual import Mutual
from softkd.methods.soft_target import SoftTarget
from softkd.methods.supervised import Supervised

OBJECTIVES = METHODS  # the registry's name before 0.2

__all__ = ["Auto", "DIST", "DKD", "Feature", "METHODS", "Method", "MethodParams", "MultiTeacher", "Mutual", "OBJECTIVES", "SoftTarget",
           "Supervised", "build_method", "build_objective", "method_class", "method_params", "register_method"]
