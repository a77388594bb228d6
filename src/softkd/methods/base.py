"""The objective registry."""

from __future__ import annotations

from softkd.registry import Registry

OBJECTIVES: Registry = Registry("method")


def build_objective(name: str, **kwargs):
    factory, parsed = OBJECTIVES.resolve(name)
    return factory(**parsed, **kwargs)
