"""The student alone, exported from a run directory: ONNX (run in onnxruntime), a torch.export
program (``.pt2``), or safetensors weights whose metadata say how to build the model again.

Only the plain student module is exported — never a method's adapters, the other peers of a
cohort, a teacher or the objective — in eval mode, on the CPU, with a dynamic batch dimension.
Every export is checked before it reaches its path: written to a temporary file in the same
folder, run on the whole test split of the run's data (batch 256, and the first 64 samples at
batch 1), compared with the eager student, and renamed into place only when the top-1
predictions agree on at least 99.9 % of the samples. A failed export leaves nothing behind and
never replaces a good file.

The exported model takes what the run's data pipeline gives the student: float32 inputs of the
run's input shape (digits: 1×8×8 pixels / 16; MNIST and Fashion-MNIST: 1×28×28 pixels / 255;
image folders: pixels scaled to [0, 1]; arrays as stored), with no further normalisation.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from softkd.evaluate.speed import OnnxModel, time_models
from softkd.errors import ConfigError, DataError, SoftKDError, first_line
from softkd.models.loading import resolve_model
from softkd.models.weights import load_weights
from softkd.runs import list_students, load_run_student, load_student  # noqa: F401 (softkd.export's API in 0.4.0)
from softkd.utils import atomic_write_text, temporary_beside

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "safetensors": ".safetensors"}
MIN_AGREEMENT = 0.999
"""Top-1 agreement with the eager student an export needs, at each batch size checked."""
CHECK_BATCH = 256
BATCH1_SAMPLES = 64
"""The batch-1 check runs on the first samples of the test split only (one call per sample)."""
CONSTRUCTION_KEY = "softkd.construction"
"""The safetensors metadata entry holding how to build the model (JSON)."""
_ONNX_HINT = "pip install 'softkd[onnx]'"


class ExportError(SoftKDError):
    """An export cannot be made, or made one that does not behave like the student."""


def export_student(run_dir: str | Path, *, format: str = "onnx", student: str | None = None,
                   out: str | Path | None = None) -> dict:
    """Export one student of a run (chosen as in :func:`load_student`) to ``format`` (``onnx``,
    ``pt2`` or ``safetensors``) at ``out`` (default ``<run_dir>/export/<student>.<ext>``), checked
    on the run's test split before it is written. Returns the check (also written beside the file
    as ``<file>.json``): ``path``, ``format``, ``exporter``, ``agreement`` (batch 256, whole test
    split), ``agreement_batch1``, ``max_abs_diff`` (largest |logit difference|), ``accuracy_eager``,
    ``accuracy_exported``, ``size_bytes``, how the student was built and, for ONNX, ``speed``: the
    eager student and the export timed on this machine (``time_models``; ``ratios.onnxruntime``
    is eager ÷ onnxruntime)."""
    if format not in FORMATS:
        close = difflib.get_close_matches(str(format), list(FORMATS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"Unknown export format '{format}'; {hint}use one of: {', '.join(FORMATS)}.")
    if format == "onnx":
        _require_onnx()
    ext, run = FORMATS[format], Path(run_dir)
    if out is not None and not Path(out).is_dir() and Path(out).suffix != ext:
        raise ConfigError(f"The export path '{out}' must end in {ext} for format '{format}'; rename it or "
                          "choose the format that fits.")
    model, info, splits = load_run_student(run, student)
    target = run / "export" if out is None else Path(out)
    target = target / f"{info['name']}{ext}" if out is None or target.is_dir() else target
    x, labels = splits.test.x.float(), splits.test.y
    eager = predict_in_batches(model, x, CHECK_BATCH)
    made_folder = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = temporary_beside(target, suffix=f".tmp{target.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        exporter = _WRITERS[format](model, x[:2], tmp, info)
        run_exported, _ = load_exported(tmp, format=format)
        check = _check(run_exported, eager, x, labels, format=format, student=info["name"])
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, target)
    except BaseException:
        for leftover in tmp.parent.glob(f"{tmp.name}*"):  # the file and anything an exporter put beside it
            leftover.unlink(missing_ok=True)
        if made_folder and not any(target.parent.iterdir()):
            target.parent.rmdir()
        raise
    speed = _onnx_speed(model, target, info["input_shape"]) if format == "onnx" else None
    result = {"path": str(target), "format": format, "exporter": exporter, "student": info["name"],
              "selected_by": info["selected_by"], "model": info["model"], "kwargs": info["kwargs"],
              "input_shape": list(info["input_shape"]), "input_dtype": "float32", "num_classes": info["num_classes"],
              "data": info["data"], **check, "accuracy_run": info["test_accuracy"],
              "size_bytes": target.stat().st_size, **({"speed": speed} if speed else {}),
              "softkd_version": _version(), "torch_version": torch.__version__}
    atomic_write_text(target.with_name(target.name + ".json"), json.dumps(result, indent=2))
    return result


def load_exported(path: str | Path, *, format: str | None = None) -> tuple[Callable, dict]:
    """An exported student as a function of a float32 batch (B, *input_shape) giving logits (B, C),
    and what the file says about it: a safetensors export's construction (``model``, ``kwargs``,
    ``input_shape``, ``num_classes``, ``student``...), an ONNX model's input shape; ``format`` is
    read from the file's suffix when not given."""
    path = Path(path)
    format = format or next((f for f, ext in FORMATS.items() if path.suffix == ext), None)
    if format not in FORMATS:
        raise ConfigError(f"Cannot tell the format of '{path}'; exported students end in "
                          f"{', '.join(FORMATS.values())}.")
    if not path.is_file():
        raise DataError(f"Exported model '{path}' not found.")
    return _LOADERS[format](path)


def _onnx_speed(model: nn.Module, path: Path, input_shape) -> dict:
    """The eager student and its ONNX export timed taking turns on this machine (a few seconds):
    what deploying the export buys here, as time_models reports it."""
    return time_models({"eager": model, "onnxruntime": OnnxModel(path)}, tuple(input_shape), budget_s=3.0,
                       reference="eager")


def write_onnx(model: nn.Module, path: str | Path, *, input_shape) -> str:
    """``model`` (eval mode, CPU) as an ONNX file with a dynamic batch dimension, unchecked: for a
    plain module outside a run (a benchmark, your own model). Returns the exporter used. Exports
    from a run go through :func:`export_student`, which checks them first."""
    _require_onnx()
    example = torch.zeros((2, *input_shape))
    return _write_onnx(model.eval().cpu(), example, Path(path), {"name": type(model).__name__, "model": "module"})


# --- writers: a temporary file each; the exporter they used -----------------------------------------


def _batch_dim() -> dict:
    return {0: torch.export.Dim("batch", min=1)}


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, info: dict) -> str:
    try:
        with _quiet():
            torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=(_batch_dim(),),
                              input_names=["input"], output_names=["logits"], external_data=False, verbose=False)
        return "torch.onnx (dynamo)"
    except Exception as exc:  # any failure of the newer exporter: try the older one before giving up
        dynamo_failure = first_line(exc)
    try:
        with _quiet():
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:
        raise ExportError(f"ONNX export of '{info['name']}' ({info['model']}) failed: dynamo exporter: "
                          f"{dynamo_failure}; TorchScript exporter: {first_line(exc)}.") from None
    return f"torch.onnx (TorchScript; the dynamo exporter failed: {dynamo_failure})"


def _write_pt2(model: nn.Module, example: torch.Tensor, path: Path, info: dict) -> str:
    try:
        with _quiet():
            program = torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(),))
            torch.export.save(program, str(path))
    except Exception as exc:
        raise ExportError(f"torch.export of '{info['name']}' ({info['model']}) failed: {first_line(exc)}.") from None
    return "torch.export"


def _write_safetensors(model: nn.Module, example: torch.Tensor, path: Path, info: dict) -> str:
    construction = {"model": info["model"], "kwargs": info["kwargs"], "input_shape": list(info["input_shape"]),
                    "num_classes": info["num_classes"], "student": info["name"], "data": info["data"],
                    "softkd_version": _version()}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.write_bytes(save(state, metadata={CONSTRUCTION_KEY: json.dumps(construction)}))
    return "safetensors"


_WRITERS = {"onnx": _write_onnx, "pt2": _write_pt2, "safetensors": _write_safetensors}


# --- loaders: run an exported file -----------------------------------------------------------------


def _load_onnx(path: Path):
    _require_onnx()
    model = OnnxModel(path)
    return (lambda x: torch.from_numpy(model(x))), {"input_shape": model.input_shape_}


def _load_pt2(path: Path):
    try:
        with _quiet():
            module = torch.export.load(str(path)).module()
    except Exception as exc:
        raise DataError(f"Cannot load the exported program '{path}': {first_line(exc)}") from None
    return module, {}


def _load_safetensors(path: Path):
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # not a safetensors file
        raise DataError(f"Cannot read '{path}': {first_line(exc)}") from None
    if CONSTRUCTION_KEY not in metadata:
        raise DataError(f"'{path}' holds weights without softkd's construction metadata; give the model spec "
                        "(--model) or export it with `softkd export RUN_DIR --format safetensors`.")
    construction = json.loads(metadata[CONSTRUCTION_KEY])
    with torch.random.fork_rng(devices=[]):
        model = resolve_model(construction["model"], input_shape=tuple(construction["input_shape"]),
                              num_classes=int(construction["num_classes"]), kwargs=construction.get("kwargs") or {})
    load_weights(model, path)
    return model.eval(), construction


_LOADERS = {"onnx": _load_onnx, "pt2": _load_pt2, "safetensors": _load_safetensors}


# --- the check --------------------------------------------------------------------------------------


@torch.no_grad()
def predict_in_batches(run: Callable, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``run`` (a module, or an exported model's callable) over ``x`` in batches: float logits."""
    return torch.cat([torch.as_tensor(run(x[i:i + batch_size])).float() for i in range(0, len(x), batch_size)])


def _check(run: Callable, eager: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, *, format: str,
           student: str) -> dict:
    """The exported ``run`` against the eager logits on the whole test split (batch 256) and its
    first samples (batch 1); an :class:`ExportError` naming what differed when they disagree."""
    where = f"The {format} export of '{student}'"
    try:
        exported = predict_in_batches(run, x, CHECK_BATCH)
        one = predict_in_batches(run, x[:BATCH1_SAMPLES], 1)
    except SoftKDError:
        raise
    except Exception as exc:
        raise ExportError(f"{where} fails on the test split: {first_line(exc)}.") from None
    for got, n in ((exported, len(x)), (one, min(len(x), BATCH1_SAMPLES))):
        if got.shape != (n, eager.shape[1]):
            raise ExportError(f"{where} gives logits of shape {tuple(got.shape)} for {n} samples; the student gives "
                              f"{(n, eager.shape[1])}.")
    if not (torch.isfinite(exported).all() and torch.isfinite(one).all()):
        raise ExportError(f"{where} gives non-finite logits on the test split where the student does not.")
    agreement = float((exported.argmax(-1) == eager.argmax(-1)).float().mean())
    agreement_one = float((one.argmax(-1) == eager[:len(one)].argmax(-1)).float().mean())
    diff = max(float((exported - eager).abs().max()), float((one - eager[:len(one)]).abs().max()))
    labeled = labels >= 0
    accuracy = {name: float((logits[labeled].argmax(-1) == labels[labeled]).float().mean()) if labeled.any() else None
                for name, logits in (("eager", eager), ("exported", exported))}
    if agreement < MIN_AGREEMENT or agreement_one < MIN_AGREEMENT:
        raise ExportError(
            f"{where} does not match the student: top-1 agreement {100 * agreement:.2f}% at batch {CHECK_BATCH} "
            f"and {100 * agreement_one:.2f}% at batch 1 (need >= {100 * MIN_AGREEMENT:.1f}%), max |Δlogit| "
            f"{diff:.3g}, accuracy {_percent(accuracy['eager'])} eager vs {_percent(accuracy['exported'])} exported; "
            "nothing was written.")
    return {"test_samples": len(x), "batch1_samples": len(one), "agreement": agreement,
            "agreement_batch1": agreement_one, "max_abs_diff": diff, "accuracy_eager": accuracy["eager"],
            "accuracy_exported": accuracy["exported"]}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _require_onnx():
    """onnxruntime, after checking onnx imports too; a one-line error naming the extra otherwise."""
    for name in ("onnx", "onnxruntime"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise ExportError(f"ONNX needs the '{name}' package, which is not installed; {_ONNX_HINT}.") from None
    return module


@contextlib.contextmanager
def _quiet():
    """The exporters' warnings and log lines (optional operator sets, deprecations) kept off the
    terminal; their errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _version() -> str:
    from softkd import __version__

    return __version__
