"""Reference models built by name, adapted to the input shape and class count.

``build_model("mlp-128", input_shape=(1, 28, 28), num_classes=10)``; ``list_models("mlp*")``.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from softkd.registry import Registry

MODELS: Registry = Registry("model")


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    factory, parsed = MODELS.resolve(name)
    return factory(input_shape=tuple(input_shape), num_classes=num_classes, **parsed)


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _int_suffix(prefix: str):
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)")

    def match(name: str):
        m = pattern.fullmatch(name)
        return {"width": int(m.group(1))} if m and int(m.group(1)) > 0 else None

    return match


@MODELS.register_pattern("mlp-<h>", _int_suffix("mlp-"))
def mlp(*, input_shape, num_classes, width):
    """One hidden layer of ``width`` ReLU units."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Linear(width, num_classes)
    )


@MODELS.register_pattern("hinton-mlp-<h>", _int_suffix("hinton-mlp-"))
def hinton_mlp(*, input_shape, num_classes, width):
    """Hinton et al. 2015's MNIST teacher: two hidden layers of ``width`` ReLU units with dropout."""
    return nn.Sequential(
        nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(width, num_classes),
    )


@MODELS.register_pattern("tinycnn-<w>", _int_suffix("tinycnn-"))
def tinycnn(*, input_shape, num_classes, width):
    """Two 3×3 conv layers of ``width`` and ``2·width`` channels with batch norm, then global pooling."""
    channels = input_shape[0] if len(input_shape) == 3 else 1
    return nn.Sequential(
        _AsImage(input_shape),
        nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


class _AsImage(nn.Module):
    """Reshapes flat or (H, W) inputs to (N, C, H, W) so conv nets take any image-like data."""

    def __init__(self, input_shape):
        super().__init__()
        if len(input_shape) == 3:
            self.shape = tuple(input_shape)
        elif len(input_shape) == 2:
            self.shape = (1, *input_shape)
        else:
            side = math.isqrt(math.prod(input_shape))
            if side * side != math.prod(input_shape):
                raise ValueError(f"Conv models need image inputs; got shape {input_shape}.")
            self.shape = (1, side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)
