"""The objective registry, and what an objective declares to have its steps replayed from CUDA graphs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

from softkd.losses.fused import fused
from softkd.registry import Registry

OBJECTIVES: Registry = Registry("method")


def build_objective(name: str, **kwargs):
    factory, parsed = OBJECTIVES.resolve(name)
    return factory(**parsed, **kwargs)


class GraphSafe:
    """Mixin for an objective whose training step may be captured in a CUDA graph and replayed.

    Its forward runs the student (and a frozen teacher) on ``graph_inputs``, the batch entries it
    reads, then a pure loss function of tensors through :meth:`loss`: no reads on the host, no
    Python state that changes between steps. Inside :meth:`fusing` that loss runs compiled
    (:func:`softkd.losses.fused.fused`), which the training loop turns on for captured steps only.
    A class that is safe says so with ``graph_safe = True`` in its own body (a subclass that
    changes the forward is not assumed safe; see :func:`softkd.train.graphs.known_safe`).
    """

    graph_inputs: tuple[str, ...] = ()
    _fusing = False

    def loss(self, fn: Callable, *args, **kwargs):
        return (fused(fn) if self._fusing else fn)(*args, **kwargs)

    @contextmanager
    def fusing(self):
        self._fusing = True
        try:
            yield
        finally:
            self._fusing = False
