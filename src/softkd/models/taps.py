"""Taps: the outputs of named modules of any model, captured by forward hooks.

A module path is the dotted name ``model.named_modules()`` gives it: ``"4"`` is the fifth child of
a ``Sequential``, ``"stages.1"`` the second block of a ResNet's ``stages``. Nothing in the model's
code changes, so zoo models, import-string models and plain modules from Python all work.
Hooks exist only while :func:`tapped` is open: a model leaves it exactly as it came in (nothing
of a tap reaches a checkpoint or an export).
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from softkd.errors import ConfigError


def module_paths(model: nn.Module) -> list[str]:
    """Every submodule's path (the model itself, path ``""``, left out)."""
    return [name for name, _ in model.named_modules() if name]


def find_module(model: nn.Module, path: str, *, role: str = "model") -> nn.Module:
    """The submodule at ``path``; an unknown path is a one-line error naming the closest ones."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        paths = module_paths(model)
        close = difflib.get_close_matches(path, paths, n=3, cutoff=0.3) or paths[:3]
        raise ConfigError(f"The {role} has no module '{path}'; closest: {', '.join(close) or 'none'} "
                          f"(`softkd ls layers MODEL` lists them all).") from None


def check_paths(model: nn.Module, paths, *, role: str) -> None:
    for path in paths:
        find_module(model, path, role=role)


@contextmanager
def tapped(model: nn.Module, paths) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, ``features[i]`` is the latest output of the module at ``paths[i]`` (a
    tuple output gives its first tensor). The hooks are removed on leaving it."""
    features: list[torch.Tensor | None] = [None] * len(paths)
    handles = []

    def keep(i: int):
        def hook(_module, _inputs, output):
            features[i] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    try:
        for i, path in enumerate(paths):
            handles.append(find_module(model, path).register_forward_hook(keep(i)))
        yield features
    finally:
        for handle in handles:
            handle.remove()


def layer_table(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, tuple[int, ...] | None]]:
    """(path, module type, output shape without the batch axis) of every submodule for input ``x``
    (``softkd ls layers``); modules the forward never calls have shape None."""
    paths = module_paths(model)
    was_training = model.training
    model.eval()
    try:
        with tapped(model, paths) as features, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    return [(p, type(modules[p]).__name__,
             tuple(f.shape[1:]) if isinstance(f, torch.Tensor) else None) for p, f in zip(paths, features)]
