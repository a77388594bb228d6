"""Feature-transfer losses and the adapters that map a student's features to its teacher's shape.

Pure functions of feature tensors; both are averaged per sample and then over the batch, so
gradient accumulation and data parallelism pass the true sample count as ``count``.

- Hints (FitNets; Romero et al. 2015): ``mean((adapter(f_s) − f_t)²)`` per sample.
- Attention transfer (Zagoruyko & Komodakis 2017), p = 2: the attention map of a feature
  ``f`` (B, C, H, W) is ``Q = mean_c f_c²``, flattened and L2-normalised per sample; the loss is
  ``mean_j (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)²_j`` per sample: the authors' code (``at_loss``: mean over
  the map's positions and the batch) rather than the paper's sum of a p-norm, so the weight that
  code uses (β = 1000) carries over. A student map of another size is resized to the teacher's
  (area-averaged or bilinear) before the normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from softkd.errors import ConfigError, ShapeMismatchError
from softkd.losses.logits import _compute_dtype, _divide


def hint_loss(student: torch.Tensor, teacher: torch.Tensor, *, count: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference per sample, averaged over the samples (``count``: the true number)."""
    if student.shape != teacher.shape:
        raise ShapeMismatchError(f"Adapted student features {tuple(student.shape)} and teacher features "
                                 f"{tuple(teacher.shape)} differ in shape.")
    diff = _compute_dtype(student) - _compute_dtype(teacher.detach())
    per_sample = diff.pow(2).flatten(1).mean(1)
    return _divide(per_sample.sum(), per_sample.numel() if count is None else count)


def attention_map(feature: torch.Tensor, size: tuple[int, int] | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Q = mean over channels of f², (B, H·W), L2-normalised per sample; resized to ``size`` first."""
    if feature.ndim != 4:
        raise ShapeMismatchError(f"Attention transfer needs (B, C, H, W) feature maps; got {tuple(feature.shape)}.")
    q = _compute_dtype(feature).pow(2).mean(1, keepdim=True)
    if size is not None and tuple(q.shape[-2:]) != tuple(size):
        larger = q.shape[-2] >= size[0] and q.shape[-1] >= size[1]
        q = F.adaptive_avg_pool2d(q, size) if larger else F.interpolate(q, size=size, mode="bilinear",
                                                                        align_corners=False)
    return F.normalize(q.flatten(1), dim=1, eps=eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, *,
                   count: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of the normalised attention maps per sample, averaged over the samples."""
    qt = attention_map(teacher.detach())
    qs = attention_map(student, size=tuple(teacher.shape[-2:]))
    per_sample = (qs - qt).pow(2).mean(1)
    return _divide(per_sample.sum(), per_sample.numel() if count is None else count)


class Adapter(nn.Sequential):
    """Maps one student feature to its teacher feature's shape (shapes without the batch axis):

    - maps of the same size: 1×1 conv + batch norm (FitNets' regressor);
    - a larger student map, an integer k times the teacher's: 3×3 conv of stride k + batch norm;
    - any other size: 1×1 conv + batch norm, then bilinear interpolation to the teacher's size;
    - a flat teacher feature (C,): the student's flattened, then a linear layer.
    """

    def __init__(self, student_shape, teacher_shape):
        s, t = tuple(student_shape), tuple(teacher_shape)
        if len(t) == 1:
            super().__init__(nn.Flatten(), nn.Linear(math.prod(s), t[0]))
        elif len(s) == 3 and len(t) == 3:
            (cs, hs, ws), (ct, ht, wt) = s, t
            k = hs // ht if ht else 0
            if (hs, ws) == (ht, wt):
                layers = [nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct)]
            elif k > 1 and hs == k * ht and ws == k * wt:
                layers = [nn.Conv2d(cs, ct, 3, stride=k, padding=1, bias=False), nn.BatchNorm2d(ct)]
            else:
                layers = [nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct), nn.Upsample(size=(ht, wt),
                                                                                           mode="bilinear")]
            super().__init__(*layers)
        else:
            raise ConfigError(f"No adapter maps a student feature of shape {s} to a teacher feature of shape {t}: "
                              "tap (C, H, W) maps on both, or a flat teacher feature.")
        self.student_shape, self.teacher_shape = s, t


class Adapters(nn.ModuleList):
    """One :class:`Adapter` per tapped pair; called on the list of student features."""

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [adapter(f) for adapter, f in zip(self, features)]
