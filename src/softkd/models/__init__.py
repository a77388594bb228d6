"""Models: the reference zoo and the teacher wrapper."""

from softkd.models.teacher import Teacher
from softkd.models.zoo import MODELS, build_model, count_params, list_models

__all__ = ["MODELS", "Teacher", "build_model", "count_params", "list_models"]
