"""A saved model scored on a dataset's test split (``softkd evaluate``): a run's student or teacher
weights, an exported student (``.onnx`` in onnxruntime, ``.pt2``, safetensors with softkd's
construction metadata), or any weights file with its model spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from softkd.config import RunConfig, load_config
from softkd.data.datasets import Splits, load_splits, run_splits
from softkd.errors import DataError, ShapeMismatchError
from softkd.evaluate.metrics import detailed_metrics
from softkd.export import CONSTRUCTION_KEY, FORMATS, load_exported, predict_in_batches
from softkd.runs import build_run_student, list_students
from softkd.models.loading import check_num_classes, resolve_model
from softkd.models.weights import load_weights

EVAL_BATCH = 256


def evaluate_checkpoint(checkpoint: str | Path, *, data: str, model: str | None = None,
                        teacher: str | Path | None = None) -> dict:
    """Metrics of ``checkpoint`` on the test split of ``data`` (a dataset name or a path
    :func:`softkd.data.datasets.load_splits` reads; the run's own data section when ``data`` names
    the data of the run the checkpoint belongs to): :func:`detailed_metrics`'s, with agreement
    and KL to ``teacher`` (another checkpoint, found the same way) when given. ``model``, a model
    spec, builds a weights file that is neither in a run directory nor carries its construction."""
    checkpoint = Path(checkpoint)
    for path in (checkpoint, teacher):
        if path is not None and not Path(path).is_file():  # before the data are read
            raise DataError(f"Checkpoint '{path}' not found.")
    splits = _test_data(data, _run_config_of(checkpoint))
    x, labels = splits.test.x.float(), splits.test.y
    shape, classes = splits.train.input_shape, splits.train.num_classes
    run, architecture = load_classifier(checkpoint, input_shape=shape, num_classes=classes, model=model)
    logits = predict_in_batches(run, x, EVAL_BATCH)
    out = {"checkpoint": str(checkpoint), "architecture": architecture, "data": data, "test_samples": len(x)}
    teacher_logits = None
    if teacher is not None:
        teacher_run, teacher_architecture = load_classifier(Path(teacher), input_shape=shape, num_classes=classes)
        teacher_logits = predict_in_batches(teacher_run, x, EVAL_BATCH)
        out["teacher"] = {"checkpoint": str(teacher), "architecture": teacher_architecture,
                          "accuracy": detailed_metrics(teacher_logits, labels)["accuracy"]}
    for name, got in (("checkpoint", logits), ("teacher", teacher_logits)):
        if got is not None and got.shape != (len(x), classes):
            raise ShapeMismatchError(f"The {name} gives logits of shape {tuple(got.shape)} on '{data}', which has "
                                     f"{len(x)} test samples and {classes} classes.")
    out["metrics"] = detailed_metrics(logits, labels, teacher_logits=teacher_logits)
    return out


def load_classifier(path: Path, *, input_shape, num_classes: int,
                    model: str | None = None) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A function from a float32 batch to logits, and how its architecture was found."""
    if not path.is_file():
        raise DataError(f"Checkpoint '{path}' not found.")
    if path.suffix in (FORMATS["onnx"], FORMATS["pt2"]):
        run, info = load_exported(path)
        expected = info.get("input_shape")
        if expected and any(d is not None and d != s for d, s in zip(expected, input_shape)):
            raise ShapeMismatchError(f"'{path}' takes inputs of shape {tuple(expected)}; the data's are "
                                     f"{tuple(input_shape)}.")
        return run, _exported_description(path)
    if model is not None:
        return _built(path, model, {}, input_shape, num_classes), f"{model} (--model)"
    if path.suffix == FORMATS["safetensors"] and _has_construction(path):
        run, construction = load_exported(path, format="safetensors")
        if tuple(construction["input_shape"]) != tuple(input_shape):
            raise ShapeMismatchError(f"'{path}' was exported for inputs of shape {tuple(construction['input_shape'])}; "
                                     f"the data's are {tuple(input_shape)}.")
        return run, f"{construction['model']} (from the file's metadata)"
    config = _run_config_of(path)
    if config is not None and path.parent.name == "students":
        entry = next((s for s in list_students(path.parent.parent) if s["name"] == path.stem), None)
        if entry is not None:
            net = build_run_student(config, entry, input_shape=input_shape, num_classes=num_classes)
            load_weights(net, path)
            return net.eval(), f"{entry['model']} (the run's {path.stem})"
    if config is not None and path.name.startswith("teacher") and config.teacher is not None:
        t = config.teacher
        return _built(path, t.model, t.kwargs, input_shape, num_classes), f"{t.model} (the run's teacher)"
    raise DataError(f"Cannot tell which model '{path}' holds: it is not a run's student or teacher, nor an exported "
                    "student; give its architecture with --model SPEC (e.g. --model tinycnn-16).")


def _exported_description(path: Path) -> str:
    """What the check written beside an export (``<file>.json``) says the file is."""
    try:
        check = json.loads(path.with_name(path.name + ".json").read_text())
        return f"{check['model']} (exported {check['student']}, {check['format']})"
    except (OSError, ValueError, KeyError, TypeError):
        return f"an exported model ({path.suffix[1:]})"


def _built(path: Path, spec: str, kwargs: dict, input_shape, num_classes: int):
    with torch.random.fork_rng(devices=[]):
        net = resolve_model(spec, input_shape=tuple(input_shape), num_classes=num_classes, kwargs=kwargs)
    check_num_classes(net, input_shape=tuple(input_shape), num_classes=num_classes, role="model")
    load_weights(net, path)
    return net.eval()


def _has_construction(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return CONSTRUCTION_KEY in (f.metadata() or {})
    except Exception:  # not a safetensors file: load_weights says so
        return False


def _run_config_of(path: Path) -> RunConfig | None:
    """The config.yaml of the run ``path`` belongs to (beside it, or one folder up), if any."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return load_config(folder / "config.yaml")
    return None


def _test_data(data: str, config: RunConfig | None) -> Splits:
    d = config.data if config is not None else None
    if d is not None and data in (d.name, d.path):  # the run's own data: its test file or fraction too
        return run_splits(d)
    if Path(data).exists():
        return load_splits(Path(data).stem, path=data)
    return load_splits(data)


