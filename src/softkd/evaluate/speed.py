"""A user's own latency report: it measures the user's machine, so it gives absolute times with the
device and thread count, and the teacher/student ratio beside them.

``time_models({"teacher": teacher, "student": OnnxModel("student.onnx")}, (1, 28, 28),
reference="teacher")``; ``footprint(student)``; ``headline(teacher_stats, student_stats, -1.6)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from torch import nn

from softkd.errors import ConfigError, DataError, first_line
from softkd.models.zoo import count_params
from softkd.train.runtime import describe_device


def footprint(model: nn.Module) -> dict[str, int]:
    """``params`` (distinct parameters) and ``size_bytes``: the length of the state dict written
    as safetensors, which is what ``save_weights`` puts on disk (buffers and header included)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return {"params": count_params(model), "size_bytes": len(save(state))}


class OnnxModel:
    """An ONNX file run by onnxruntime on the CPU, called like a model on a tensor or array batch.

    ``threads`` (intra-op) defaults to torch's current thread count, so that eager PyTorch and
    onnxruntime are timed on the same number of threads.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError("Running an ONNX model needs onnxruntime; pip install 'softkd[onnx]'.") from None
        if not Path(path).is_file():
            raise DataError(f"ONNX file '{path}' not found; export the model first or fix the path.")
        self.path = str(path)
        self.threads = torch.get_num_threads() if threads is None else threads
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1  # one sequential graph: a second pool would only contend
        options.log_severity_level = 3  # errors only
        try:
            self.session_ = onnxruntime.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise DataError(f"onnxruntime cannot load '{path}': {first_line(exc)}") from None
        given = self.session_.get_inputs()[0]
        self.input_name_ = given.name
        self.input_shape_ = [d if isinstance(d, int) else None for d in given.shape[1:]]
        """The input's shape after the batch dimension (None where the file leaves it dynamic)."""

    def __call__(self, x) -> np.ndarray:
        array = (x.detach().float().contiguous().cpu().numpy() if isinstance(x, torch.Tensor)
                 else np.asarray(x, dtype=np.float32))
        return self.session_.run(None, {self.input_name_: array})[0]


def time_models(models: dict, input_shape: tuple[int, ...], *, batch_sizes=(1, 256), warmup: int = 3,
                repeats: int = 50, budget_s: float = 10.0, min_repeats: int = 5, reference: str | None = None,
                seed: int = 0) -> dict:
    """Latency of each model on random float32 batches of shape (batch, *input_shape).

    Models are ``nn.Module``s (timed in eval mode, on their parameters' device) or callables taking
    a tensor batch (``OnnxModel``). For each batch size they run in turn, A, B, A, B..., first
    ``warmup`` untimed rounds, then up to ``repeats`` timed ones; a model stops early once its
    timed runs add up to ``budget_s`` seconds, but never before ``min_repeats`` runs. Returns
    ``{"device", "threads", "torch", "batch_sizes", "reference", "models": {name: {batch:
    {"p50_ms", "p95_ms", "throughput_per_s", "runs"}}}, "ratios": {name: {batch: ref p50 / p50}}}``
    where each ``batch`` key is ``"batch<size>"`` (``"batch1"``: the keys survive report.json), and
    a ratio of 8 reads "8× lower latency than the reference".
    """
    if not models:
        raise ConfigError("time_models needs at least one model; got none.")
    if reference is not None and reference not in models:
        raise ConfigError(f"The 'reference' of time_models must be one of {', '.join(models)}; got '{reference}'.")
    if warmup < 0 or repeats < 1 or min_repeats < 1:
        raise ConfigError(f"time_models needs warmup >= 0, repeats >= 1 and min_repeats >= 1; "
                          f"got {warmup}, {repeats} and {min_repeats}.")
    devices = {name: _device_of(model) for name, model in models.items()}
    was_training = {name: m.training for name, m in models.items() if isinstance(m, nn.Module)}
    generator = torch.Generator().manual_seed(seed)
    results = {name: {} for name in models}
    try:
        for model in models.values():
            if isinstance(model, nn.Module):
                model.eval()
        with torch.inference_mode():
            for batch in batch_sizes:
                x = torch.randn((batch, *input_shape), generator=generator)
                # one copy per device, made before timing: no model pays for another's transfer
                inputs = {name: x.to(device) for name, device in devices.items()}
                times = _alternate(models, inputs, devices, warmup=warmup, repeats=repeats,
                                   budget_s=budget_s, min_repeats=min(min_repeats, repeats))
                for name, seconds in times.items():
                    results[name][f"batch{batch}"] = _summary(seconds, batch)
    finally:
        for name, training in was_training.items():
            models[name].train(training)
    ratios = {}
    if reference is not None:
        ratios = {name: {b: results[reference][b]["p50_ms"] / stats["p50_ms"] for b, stats in per_batch.items()}
                  for name, per_batch in results.items() if name != reference}
    return {
        "device": ", ".join(sorted({describe_device(d) for d in devices.values()})),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_sizes": list(batch_sizes),
        "reference": reference,
        "models": results,
        "ratios": ratios,
    }


def _device_of(model) -> torch.device:
    """Where a module's parameters live; the CPU for parameter-free modules and other callables."""
    if isinstance(model, nn.Module):
        first = next(model.parameters(), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _alternate(models, inputs, devices, *, warmup, repeats, budget_s, min_repeats) -> dict[str, list[float]]:
    """Seconds per timed call of each model, the models taking turns so that load from other
    processes on a shared machine falls on all of them alike."""
    def call(name):
        start = time.perf_counter()
        models[name](inputs[name])
        if devices[name].type == "cuda":  # kernels run asynchronously: wait for them to finish
            torch.cuda.synchronize(devices[name])
        return time.perf_counter() - start

    for _ in range(warmup):  # first calls allocate memory and pick kernels
        for name in models:
            call(name)
    times = {name: [] for name in models}
    running = list(models)
    for _ in range(repeats):
        for name in running:
            times[name].append(call(name))
        running = [n for n in running if len(times[n]) < min_repeats or sum(times[n]) < budget_s]
        if not running:
            break
    return times


def _summary(seconds: list[float], batch: int) -> dict:
    median = float(np.median(seconds))
    return {
        "p50_ms": 1000 * median,
        "p95_ms": 1000 * float(np.percentile(seconds, 95)),
        "throughput_per_s": batch / median,
        "runs": len(seconds),
    }


def headline(teacher_stats: dict, student_stats: dict, accuracy_points: float | None) -> str:
    """One line such as "student: 60× fewer parameters, 8.1× lower latency at batch 1, −1.6 points".

    Each stats dict is ``footprint(model)``, ``time_models(...)["models"][name]``, or both merged
    (``{**footprint(m), **timing["models"][name]}``); ``accuracy_points`` is student minus teacher
    accuracy in percentage points. A figure missing on either side leaves its clause out; the
    latency clause uses the smallest batch size both were timed at.
    """
    clauses = []
    if teacher_stats.get("params") and student_stats.get("params"):
        clauses.append(_times(teacher_stats["params"] / student_stats["params"], "fewer", "more") + " parameters")
    batches = sorted(int(k[5:]) for k in teacher_stats if k.startswith("batch") and k[5:].isdigit()
                     and k in student_stats)
    if batches:
        b = batches[0]
        ratio = teacher_stats[f"batch{b}"]["p50_ms"] / student_stats[f"batch{b}"]["p50_ms"]
        clauses.append(_times(ratio, "lower", "higher") + f" latency at batch {b}")
    if accuracy_points is not None:
        points = round(accuracy_points, 1)
        sign = "\u2212" if points < 0 else "+" if points > 0 else ""
        clauses.append(f"{sign}{abs(points):.1f} points")
    return "student: " + (", ".join(clauses) if clauses else "no figures to compare")


def _times(ratio: float, better: str, worse: str) -> str:
    """'8.1× lower' for a ratio of 8.1, '2.0× higher' for 0.5: a factor always reads as ≥ 1."""
    word = better if ratio >= 1 else worse
    factor = ratio if ratio >= 1 else 1 / ratio
    return f"{factor:.0f}× {word}" if factor >= 10 else f"{factor:.1f}× {word}"
