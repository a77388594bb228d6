"""Training objectives, one per file, registered by name. Each is an ``nn.Module`` called as
``objective(model, batch) -> {"loss": ..., "ce": ..., ...}``; its own trainable parameters
(adapters, peers) are optimised with the model's."""

from softkd.methods.base import OBJECTIVES, build_objective
from softkd.methods.soft_target import SoftTarget
from softkd.methods.supervised import Supervised

__all__ = ["OBJECTIVES", "SoftTarget", "Supervised", "build_objective"]
