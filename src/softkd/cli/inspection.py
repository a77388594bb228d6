"""Commands that check and list without training: validate, ls."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from softkd.cli import SET_HELP, _user_errors, app, console, load_user_config
from softkd.errors import ConfigError, DataError, SoftKDError, first_line


@app.command()
@_user_errors
def validate(
    path: Path = typer.Argument(..., metavar="PATH", help="A YAML run config, or soft labels (.npy, .npz or .pt; shape (N, C))."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Check a run config as `softkd run` checks it before writing anything (data, models,
    checkpoints, method), without training; or check that a soft-label file is a feasible
    distribution (finite, in [0, 1], rows summing to 1).

    Examples: softkd validate configs/soft-target-mlp16_from_tinycnn32-digits.yaml;
    softkd validate soft_labels.npy
    """
    if path.suffix not in (".yaml", ".yml", ".npy", ".npz", ".pt"):
        raise ConfigError(f"'{path}' is neither a run config (.yaml) nor soft labels (.npy, .npz or .pt); "
                          "give `softkd validate` one of those.")
    if path.suffix in (".npy", ".npz", ".pt"):
        from softkd.losses.logits import validate_soft_targets

        soft = validate_soft_targets(_load_array(path))
        console.print(f"OK: {path} holds {soft.shape[0]} feasible soft-label rows over {soft.shape[-1]} classes.",
                      soft_wrap=True)
        return
    from softkd.pipeline import check_run

    cfg = load_user_config(path, set_)
    found = check_run(cfg, out_dir=cfg.output.dir)  # what `softkd run` checks before it writes anything
    teachers = "; ".join(f"teacher {t['model']} ({t['params']:,} parameters"
                         + (f", weights from {t['checkpoint']})" if t["checkpoint"] else ", to be trained)")
                         for t in found["teachers"]) or "no teacher"
    shape = "×".join(map(str, found["input_shape"]))
    console.print(f"OK: {path} is a valid run config, checked as `softkd run` checks it before writing anything: "
                  f"data {cfg.data.name} ({found['train']:,} train / {found['val']:,} validation / "
                  f"{found['test']:,} test samples of {shape}, {found['classes']} classes); {teachers}; "
                  f"student {cfg.student.model}; method {cfg.method.name}.", soft_wrap=True)


def _load_array(path: Path):
    import numpy as np
    import torch

    from softkd.models.weights import load_tensors

    if not path.is_file():
        raise DataError(f"File '{path}' not found.")
    try:
        if path.suffix == ".pt":
            value = load_tensors(path)
        else:
            value = np.load(path, allow_pickle=False)
            if path.suffix == ".npz":
                keys = list(value.keys())
                key = "soft_targets" if "soft_targets" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise DataError(f"'{path}' holds arrays {keys}; name the soft labels 'soft_targets'.")
                value = value[key]
    except (ValueError, OSError, RuntimeError, EOFError) as exc:
        raise DataError(f"Cannot read '{path}': {first_line(exc)}") from None
    if isinstance(value, dict) or not hasattr(value, "shape"):
        raise DataError(f"'{path}' must hold one (N, C) array of soft labels; got {type(value).__name__}.")
    if len(value.shape) != 2:
        raise DataError(f"'{path}' holds an array of shape {tuple(value.shape)}; soft labels are one (N, C) array "
                        "(a row of class probabilities per sample).")
    return torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value


@app.command("ls")
@_user_errors
def ls(what: str = typer.Argument("models", metavar="WHAT", help="models, datasets, methods or layers"),
       model: Optional[str] = typer.Argument(None, metavar="MODEL", help="for layers: a zoo name or 'package.module:factory'"),
       input_shape: str = typer.Option("1,28,28", "--input-shape", help="for layers: one sample's shape"),
       classes: int = typer.Option(10, "--classes", help="for layers: the number of classes")):
    """List the registered models (with parameter counts for 1×28×28 inputs and 10 classes),
    datasets or methods; `softkd ls layers MODEL` prints a model's module paths (what a feature
    method taps) with each one's output shape.

    Example: softkd ls layers resnet-64 --input-shape 1,28,28"""
    from softkd.data.datasets import DATASETS
    from softkd.methods import METHODS
    from softkd.models.zoo import MODELS

    registries = {"models": MODELS, "datasets": DATASETS, "methods": METHODS}
    if what == "layers":
        _list_layers(model, input_shape, classes)
        return
    if what not in registries:
        raise SoftKDError(f"Cannot list '{what}'; use one of: {', '.join(registries)}, layers MODEL.")
    registry = registries[what]
    if what == "methods":
        _list_methods(registry)
        return
    for name in registry.names():
        aliases = [a for a, target in registry.aliases().items() if target == name]
        line = name + (f"  (alias: {', '.join(aliases)})" if aliases else "")
        if what == "models":
            from softkd.models.zoo import build_model, count_params

            sizes = [f"{example} {count_params(build_model(example, input_shape=(1, 28, 28), num_classes=10)):,}"
                     for example in registry.examples(name)]
            line = f"{line:<16} params: {', '.join(sizes)}"
        console.print(line, highlight=False)


def _list_layers(model: str | None, input_shape: str, classes: int) -> None:
    import torch

    from softkd.models.loading import resolve_model
    from softkd.models.taps import layer_table

    if not model:
        raise SoftKDError("Name the model: softkd ls layers MODEL (e.g. softkd ls layers tinycnn-16).")
    try:
        shape = tuple(int(d) for d in input_shape.split(","))
    except ValueError:
        raise SoftKDError(f"--input-shape must be comma-separated sizes such as 1,28,28; got {input_shape!r}.") from None
    net = resolve_model(model, input_shape=shape, num_classes=classes)
    for path, kind, out in layer_table(net, torch.zeros(2, *shape)):
        console.print(f"{path:<24} {kind:<20} {'not called' if out is None else '×'.join(map(str, out))}",
                      highlight=False)


NEEDS_TEXT = {"logits": "teacher logits (soft-label cache or live teacher)",
              "features": "a live teacher's intermediate features", "none": "no teacher"}


def _list_methods(registry) -> None:
    """Each method: name and aliases, one line, what it needs, and its parameters."""
    from softkd.methods.base import parameter_table

    for name in registry.names():
        cls = registry.resolve(name)[0]
        aliases = [a for a, target in registry.aliases().items() if target == name]
        teachers = {"one": "one teacher", "several": "several teachers", "none": "no teacher"}[cls.teachers_needed]
        console.print(f"{name}" + (f"  (alias: {', '.join(aliases)})" if aliases else ""), style="bold",
                      highlight=False)
        console.print(f"  {cls.summary}", highlight=False)
        needs = NEEDS_TEXT[cls.needs] + ("" if cls.needs == "none" else f"; {teachers}")
        console.print(f"  needs: {needs}", highlight=False)
        for param, default, bounds, description in parameter_table(cls):
            console.print(f"    {param:<12} default {default:<8} {bounds}", highlight=False)
            if description:
                console.print(f"      {description}", highlight=False)
