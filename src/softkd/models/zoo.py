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


@MODELS.register_pattern("mlp-<h>", _int_suffix("mlp-"), examples=("mlp-16", "mlp-128"))
def mlp(*, input_shape, num_classes, width):
    """One hidden layer of ``width`` ReLU units."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Linear(width, num_classes)
    )


@MODELS.register_pattern("hinton-mlp-<h>", _int_suffix("hinton-mlp-"), examples=("hinton-mlp-800", "hinton-mlp-1200"))
def hinton_mlp(*, input_shape, num_classes, width):
    """Hinton et al. 2015's MNIST teacher: two hidden layers of ``width`` ReLU units with dropout."""
    return nn.Sequential(
        nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(width, num_classes),
    )


@MODELS.register_pattern("tinycnn-<w>", _int_suffix("tinycnn-"), examples=("tinycnn-16", "tinycnn-32"))
def tinycnn(*, input_shape, num_classes, width):
    """Two 3×3 conv layers of ``width`` and ``2·width`` channels, each with batch norm, ReLU and
    2×2 max pooling, then a linear layer on the flattened features (tinycnn-16 on 28×28: 20.5k
    parameters)."""
    as_image = _AsImage(input_shape)
    channels, height, width_px = as_image.shape
    return nn.Sequential(
        as_image,
        nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (height // 4) * (width_px // 4), num_classes),
    )


class _AsImage(nn.Module):
    """Reshapes flat or (H, W) inputs to (N, C, H, W) so conv nets take any image-like data."""

    graph_safe = True  # no host reads, no Python state between steps: CUDA graphs may replay it

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


@MODELS.register("lenet5")
def lenet5(*, input_shape, num_classes):
    """LeCun et al. 1998 (ReLU and max pooling): conv 6@5×5 → pool → conv 16@5×5 → pool → 120 → 84."""
    as_image = _AsImage(input_shape)
    channels, height, width = as_image.shape
    pad = 0 if min(height, width) // 2 >= 5 else 2  # inputs under 10×10 (digits) keep the 5×5 conv valid
    return nn.Sequential(
        as_image,
        nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(5), nn.Flatten(),  # 5×5 for 28×28 inputs, as in the original
        nn.Linear(16 * 25, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
    )


class BasicBlock(nn.Module):
    """Two 3×3 convs with batch norm and a residual connection (He et al. 2016)."""

    graph_safe = True  # no host reads, no Python state between steps: CUDA graphs may replay it

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block of wide ResNets (Zagoruyko & Komodakis 2016)."""

    graph_safe = True  # no host reads, no Python state between steps: CUDA graphs may replay it

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class ResNet(nn.Module):
    """3×3 stem, then stages of residual blocks (the first of each stage after the first strides
    by 2), global average pooling and a linear classifier. Any input size and channel count."""

    graph_safe = True  # no host reads, no Python state between steps: CUDA graphs may replay it

    def __init__(self, input_shape, num_classes, *, stem: int, widths, blocks: int, block=BasicBlock):
        super().__init__()
        channels = input_shape[0] if len(input_shape) == 3 else 1
        self.as_image = _AsImage(input_shape)
        self.stem = nn.Sequential(nn.Conv2d(channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        if block is PreActBlock:  # pre-activation nets put the stem's norm inside the first block
            self.stem = nn.Conv2d(channels, stem, 3, 1, 1, bias=False)
        layers, in_channels = [], stem
        for i, width in enumerate(widths):
            for j in range(blocks):
                layers.append(block(in_channels, width, stride=2 if i > 0 and j == 0 else 1))
                in_channels = width
        self.stages = nn.Sequential(*layers)
        self.head_norm = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU()) if block is PreActBlock else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        x = self.head_norm(self.stages(self.stem(self.as_image(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _channels_last(model: nn.Module) -> nn.Module:
    """Conv-heavy nets in channels-last layout: a resnet-64 training step took 0.76× the time on
    this 2-core CPU (oneDNN's fast path; the same holds for GPU tensor cores)."""
    return model.to(memory_format=torch.channels_last)


@MODELS.register_pattern("resnet-<w>", _int_suffix("resnet-"), examples=("resnet-16", "resnet-64"))
def resnet(*, input_shape, num_classes, width):
    """A small residual net for 28×28 inputs: stem of ``w`` channels and three stages of one
    basic block each, ``w``, ``2w`` and ``4w`` channels (resnet-64: 1.2M parameters, ~0.17 GMAC)."""
    return _channels_last(ResNet(input_shape, num_classes, stem=width, widths=(width, 2 * width, 4 * width), blocks=1))


@MODELS.register("resnet8x4")
def resnet8x4(*, input_shape, num_classes):
    """CIFAR-style ResNet-8 with 4× width (Tian et al. 2020's CRD student): stages 64/128/256, one block each."""
    return _channels_last(ResNet(input_shape, num_classes, stem=32, widths=(64, 128, 256), blocks=1))


@MODELS.register("resnet32x4")
def resnet32x4(*, input_shape, num_classes):
    """CIFAR-style ResNet-32 with 4× width (CRD's teacher): stages 64/128/256, five blocks each."""
    return _channels_last(ResNet(input_shape, num_classes, stem=32, widths=(64, 128, 256), blocks=5))


def _wrn(depth: int, k: int):
    def build(*, input_shape, num_classes):
        return _channels_last(ResNet(input_shape, num_classes, stem=16, widths=(16 * k, 32 * k, 64 * k),
                                     blocks=(depth - 4) // 6, block=PreActBlock))

    build.__doc__ = f"Wide ResNet WRN-{depth}-{k} (pre-activation blocks, {(depth - 4) // 6} per stage)."
    return build


MODELS.register("wrn-16-2")(_wrn(16, 2))
MODELS.register("wrn-40-2")(_wrn(40, 2))
