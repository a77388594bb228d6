"""Feature caches: a teacher's intermediate features on the transfer set, computed once.

A feature method (``feature``) needs the teacher's output at tapped module paths for every
training sample. Running the teacher on every batch makes a CPU epoch an order of magnitude
slower; a feature cache runs it once. It is a :class:`~softkd.cache.SoftLabelCache` whose
"teacher" is :class:`FeatureTap` (the flattened output at one path), so it has the same manifest,
fingerprint (with the path and the feature's shape in ``preprocessing``), per-shard sha256,
resumable and multi-process build, and the same refusal of a cache built for another run.
Features are stored in fp16 (fp32 with ``cache.dtype: fp32``), one shard, memory-mapped.
"""

from __future__ import annotations

import torch
from torch import nn

from softkd.models.taps import tapped


class FeatureTap(nn.Module):
    """``teacher``'s output at module ``path``, flattened to (B, D): what a feature cache stores."""

    def __init__(self, teacher: nn.Module, path: str):
        super().__init__()
        self.teacher, self.path = getattr(teacher, "module", teacher), path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with tapped(self.teacher, [self.path]) as features:
            self.teacher(x)
        return features[0].flatten(1)


def feature_shape(teacher: nn.Module, path: str, x: torch.Tensor) -> tuple[int, ...]:
    """The shape (without the batch axis) of ``teacher``'s output at ``path`` for inputs like ``x``."""
    from softkd.methods.base import dry_forward

    module = getattr(teacher, "module", teacher)
    with tapped(module, [path]) as features:
        dry_forward(module, x[:1])
    return tuple(features[0].shape[1:])
