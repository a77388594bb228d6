"""Loss functions compiled into a few fused kernels, for training steps replayed from CUDA graphs.

A distillation loss is some thirty tiny kernels per step (softmaxes, KL, CE, their backward
passes); inside a CUDA graph each still costs its launch gap on the device. ``fused(fn)`` is ``fn``
compiled by ``torch.compile`` (one graph, static shapes): its forward and its backward become a
few fused kernels each. Compiling needs Triton on GPUs and a C++ compiler on CPUs; where it fails
(the first call tells), ``fn`` itself runs, after one warning.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from softkd.errors import SoftKDError, first_line

_FUSED: dict[Callable, "_Fused"] = {}


def fused(fn: Callable) -> Callable:
    """``fn`` compiled (one cached wrapper per function); ``fn`` itself where compiling fails."""
    if fn not in _FUSED:
        _FUSED[fn] = _Fused(fn)
    return _FUSED[fn]


class _Fused:
    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled: Callable | None = torch.compile(fn, fullgraph=True, dynamic=False)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except SoftKDError:
                raise  # the function's own error about its input
            except Exception as error:  # noqa: BLE001 - no compiler, or an op it cannot compile
                self.compiled = None
                warnings.warn(f"softkd could not compile {self.fn.__name__} ({type(error).__name__}: "
                              f"{first_line(error)}); it runs uncompiled.",
                              RuntimeWarning, stacklevel=2)
        return self.fn(*args, **kwargs)
