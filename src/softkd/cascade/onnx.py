"""A calibrated cascade as two ONNX models and its threshold in one folder, run by onnxruntime.

``export_cascade(run_dir)`` writes ``<run_dir>/export/cascade/`` (``student.onnx``,
``teacher.onnx``, ``cascade.json``) from the run's ``softkd cascade`` result, after checking it on
the whole test split against the PyTorch cascade; ``load_cascade(folder)`` runs it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from softkd.cascade.calibrate import load_run_teacher
from softkd.cascade.model import CONFIDENCES, combine, confidence, defer
from softkd.errors import DataError
from softkd.evaluate.speed import OnnxModel
from softkd.export import MIN_AGREEMENT, ExportError, write_onnx
from softkd.runs import load_run_student, run_dir_config
from softkd.utils import atomic_write_text


class OnnxCascade:
    """An exported cascade folder: ``cascade(x)`` gives ``(logits, deferred)`` as numpy arrays for a
    float32 batch, the teacher run only on the deferred samples."""

    def __init__(self, folder: str | Path, *, threads: int | None = None):
        folder = Path(folder)
        spec = folder / "cascade.json"
        if not spec.is_file():
            raise DataError(f"'{folder}' is not an exported cascade (no cascade.json); make one with "
                            "`softkd cascade RUN_DIR --export`.")
        self.spec_ = json.loads(spec.read_text())
        if self.spec_.get("confidence") not in CONFIDENCES:
            raise DataError(f"{spec} names an unknown confidence {self.spec_.get('confidence')!r}.")
        self.threshold, self.confidence = float(self.spec_["threshold"]), self.spec_["confidence"]
        self.student = OnnxModel(folder / "student.onnx", threads=threads)
        self.teacher = OnnxModel(folder / "teacher.onnx", threads=threads)

    def __call__(self, x) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        logits = self.student(x)
        deferred = defer(confidence(torch.from_numpy(logits), self.confidence), self.threshold).numpy()
        if deferred.any():
            logits = logits.copy()
            logits[deferred] = self.teacher(x[deferred])
        return logits, deferred


def load_cascade(folder: str | Path, *, threads: int | None = None) -> OnnxCascade:
    """The cascade exported into ``folder``, ready to run under onnxruntime."""
    return OnnxCascade(folder, threads=threads)


def export_cascade(run_dir: str | Path, *, out: str | Path | None = None) -> dict:
    """The run's calibrated cascade (``softkd cascade`` first) as ``student.onnx``, ``teacher.onnx``
    and ``cascade.json`` in ``out`` (default ``<run_dir>/export/cascade``). Checked on the whole
    test split against the PyTorch cascade (predictions and deferrals agree on >= 99.9 %) before
    the folder is put in place; a failed export leaves nothing and keeps an older folder."""
    run = Path(run_dir)
    calibrated = run / "cascade" / "cascade.json"
    if not calibrated.is_file():
        raise DataError(f"'{run}' has no calibrated cascade ({calibrated} is missing); run `softkd cascade {run}` "
                        "first.")
    result = json.loads(calibrated.read_text())
    first = next(iter(result["students"].values()))
    if "threshold" not in first:
        raise DataError(f"The cascade in {calibrated} reached no threshold; run `softkd cascade` with another target.")
    config = run_dir_config(run)
    student, info, splits = load_run_student(run, first["name"])
    teacher, _ = load_run_teacher(run, config, splits.train.input_shape, splits.train.num_classes)
    target = Path(out) if out is not None else run / "export" / "cascade"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        shape = tuple(info["input_shape"])
        exporters = {name: write_onnx(model, tmp / f"{name}.onnx", input_shape=shape)
                     for name, model in (("student", student), ("teacher", teacher))}
        spec = {"threshold": first["threshold"], "confidence": result["confidence"], "student": info["name"],
                "student_model": info["model"], "teacher_model": config.teacher.model, "input_shape": list(shape),
                "input_dtype": "float32", "num_classes": info["num_classes"], "data": info["data"],
                "exporters": exporters}
        atomic_write_text(tmp / "cascade.json", json.dumps(spec, indent=2))
        check = _check(OnnxCascade(tmp), student, teacher, splits.test, spec)
        atomic_write_text(tmp / "cascade.json", json.dumps({**spec, "check": check}, indent=2))
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(target), **spec, "check": check}


@torch.inference_mode()
def _check(exported: OnnxCascade, student, teacher, test, spec: dict) -> dict:
    x, y = test.x.float(), test.y
    batches = range(0, len(x), 256)
    eager = [combine(student(x[i:i + 256]).float(), teacher(x[i:i + 256]).float(), spec["threshold"],
                     spec["confidence"]) for i in batches]
    got = [exported(x[i:i + 256]) for i in batches]
    eager_pred = torch.cat([e.logits.argmax(-1) for e in eager])
    eager_deferred = torch.cat([e.deferred for e in eager])
    pred = torch.from_numpy(np.concatenate([g[0] for g in got]).argmax(-1))
    deferred = torch.from_numpy(np.concatenate([g[1] for g in got]))
    agreement = float((pred == eager_pred).float().mean())
    same_deferral = float((deferred == eager_deferred).float().mean())
    labeled = y >= 0
    check = {"test_samples": len(x), "agreement": agreement, "deferral_agreement": same_deferral,
             "deferred": float(deferred.float().mean()),
             "accuracy_eager": float((eager_pred[labeled] == y[labeled]).float().mean()),
             "accuracy_exported": float((pred[labeled] == y[labeled]).float().mean())}
    if agreement < MIN_AGREEMENT or same_deferral < MIN_AGREEMENT:
        raise ExportError(f"The exported cascade does not match the PyTorch cascade on the test split: predictions "
                          f"agree on {100 * agreement:.2f}% and deferrals on {100 * same_deferral:.2f}% (need >= "
                          f"{100 * MIN_AGREEMENT:.1f}%); nothing was written.")
    return check
