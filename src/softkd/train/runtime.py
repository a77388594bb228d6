"""Numeric precision of a training step: autocast for bf16/fp16 and loss scaling for fp16.

Weights and optimizer state stay float32; only the forward pass runs in low precision, and the
losses upcast to float32 before their reductions (softkd.losses)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from softkd.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """The context a forward pass runs in for ``precision``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"Unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (its narrow exponent underflows small gradients); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
