"""A run's cascade (``softkd cascade``): the threshold chosen on the validation split, never the test
split, then the chosen cascade scored and timed on the test split against the student alone and
the teacher alone. The distilled student and its scratch twin each get a curve, so the result says
whether distillation also made the student a better first stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from softkd.cascade.model import Cascade, cascade_curve, combine, pick_point
from softkd.errors import ConfigError, DataError
from softkd.export import predict_in_batches
from softkd.runs import list_students, load_run_student, run_dir_config
from softkd.models.loading import resolve_model
from softkd.models.weights import load_weights
from softkd.train.runtime import describe_device
from softkd.utils import atomic_write_bytes, atomic_write_text

BATCH = 256
CURVE_POINTS = 200
"""Points of each curve kept in cascade.json and the report (the choice uses all of them)."""


def calibrate_run(run_dir: str | Path, *, student: str | None = None, target_accuracy: float | None = None,
                  max_teacher_fraction: float | None = None, within: float = 0.0, confidence: str = "max-prob",
                  threads: int | None = None, budget_s: float = 20.0) -> dict:
    """Choose a cascade's threshold for a run's student (named as in :func:`softkd.load_student`;
    default the distilled student with the best validation accuracy) on the validation split, for
    ``target_accuracy`` (the fewest deferrals from which the validation curve stays at or above it up
    to its best point; default: the teacher's own validation accuracy, less ``within`` points) or ``max_teacher_fraction`` (the best accuracy deferring at most that share). The
    same target is applied to the student's scratch twin. Then, on the test split: accuracy and
    fraction deferred, and the latency per sample at batch 256 of student, teacher and cascade,
    measured taking turns on the same test batches (``threads``: torch threads, default the
    current number; each model runs until ``budget_s`` seconds or the whole split).

    Writes ``<run_dir>/cascade/cascade.json`` and adds it to the run's report (report.json, .md,
    .html, re-rendered). Returns what cascade.json holds."""
    run = Path(run_dir)
    if target_accuracy is not None and max_teacher_fraction is not None:
        raise ConfigError("Give --target-accuracy or --max-teacher-fraction, not both.")
    if within and (target_accuracy is not None or max_teacher_fraction is not None):
        raise ConfigError("--within sets the target from the teacher's validation accuracy; give it alone, without "
                          "--target-accuracy or --max-teacher-fraction.")
    if isinstance(within, bool) or not isinstance(within, (int, float)) or not 0 <= within < 100:
        raise ConfigError(f"--within must be a number of accuracy points in [0, 100) (0.1 for a tenth of a point); "
                          f"got {within!r}.")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1; got {threads}.")
        torch.set_num_threads(threads)
    try:
        return _calibrate(run, student, target_accuracy, max_teacher_fraction, within, confidence, budget_s)
    finally:
        torch.set_num_threads(previous_threads)


def _calibrate(run: Path, name, target_accuracy, max_teacher_fraction, within, confidence, budget_s) -> dict:
    config = run_dir_config(run)
    model, info, splits = load_run_student(run, name)
    if splits.val is None or len(splits.val) == 0:
        raise DataError(f"The run in '{run}' has no validation split to choose a threshold on (data.val_fraction "
                        "is 0); a cascade is never calibrated on the test split. Rerun with data.val_fraction > 0.")
    teacher, teacher_weights = load_run_teacher(run, config, splits.train.input_shape, splits.train.num_classes)
    students = {info["kind"]: (model, info)}
    twin = _scratch_twin(run, info)
    if twin is not None:
        students["scratch"] = load_run_student(run, twin)[:2]

    val_x, val_y = _labeled(splits.val, "validation")
    teacher_val = predict_in_batches(teacher, val_x, BATCH)
    target = {"max_teacher_fraction": max_teacher_fraction} if max_teacher_fraction is not None else \
        {"accuracy": target_accuracy} if target_accuracy is not None else \
        {"accuracy": _accuracy(teacher_val, val_y) - within / 100, "within": within,
         "default": "the teacher's validation accuracy" + (f" less {within:g} points" if within else "")}
    chosen = {}
    for role, (m, i) in students.items():
        curve = cascade_curve(predict_in_batches(m, val_x, BATCH), teacher_val, val_y, confidence_kind=confidence)
        try:
            point = pick_point(curve, target_accuracy=target.get("accuracy"),
                               max_teacher_fraction=target.get("max_teacher_fraction"))
        except ConfigError:
            if role != "distilled" and "distilled" in students:
                chosen[role] = {"student": i, "curve": curve, "point": None}  # said in the comparison
                continue
            raise
        chosen[role] = {"student": i, "curve": curve, "point": point}
    # --- the test split: scored and timed only now, with the thresholds already fixed ---
    test_x, test_y = _labeled(splits.test, "test")
    teacher_test = predict_in_batches(teacher, test_x, BATCH)
    timed = {"teacher": teacher}
    results = {}
    for role, c in chosen.items():
        m, curve, point = students[role][0], c["curve"], c["point"]
        student_test = predict_in_batches(m, test_x, BATCH)
        entry = {"name": c["student"]["name"], "model": c["student"]["model"],
                 "val_accuracy_alone": curve["accuracy"][0], "test_accuracy_alone": _accuracy(student_test, test_y)}
        if point is not None:
            threshold = curve["threshold"][point]
            out = combine(student_test, teacher_test, threshold, confidence)
            entry.update(threshold=threshold,
                         val={"accuracy": curve["accuracy"][point], "fraction": curve["fraction"][point]},
                         test={"accuracy": _accuracy(out.logits, test_y),
                               "fraction": float(out.deferred.double().mean())})
            timed[f"cascade {role}"] = Cascade(m, teacher, threshold=threshold, confidence=confidence)
        timed[f"student {role}"] = m
        results[role] = (entry, curve, point)
    latency = time_on_batches(timed, test_x, budget_s=budget_s)
    teacher_ms = latency["models"]["teacher"]["ms_per_sample"]
    roles = {}
    for role, (entry, curve, point) in results.items():
        student_ms = latency["models"][f"student {role}"]["ms_per_sample"]
        if point is not None:
            cascade_ms = latency["models"][f"cascade {role}"]["ms_per_sample"]
            entry["test"].update(ms_per_sample=cascade_ms, cost_of_teacher=cascade_ms / teacher_ms,
                                 throughput_per_s=latency["models"][f"cascade {role}"]["throughput_per_s"])
        entry["curve"] = _thin(curve, point, student_ms=student_ms, teacher_ms=teacher_ms)
        roles[role] = entry
    result = {"schema": 1, "run": str(run), "confidence": confidence, "target": target,
              "selected_by": info["selected_by"],
              "teacher": {"model": config.teacher.model, "weights": teacher_weights,
                          "val_accuracy": _accuracy(teacher_val, val_y),
                          "test_accuracy": _accuracy(teacher_test, test_y)},
              "students": roles, "latency": latency, "splits": {"val": len(val_y), "test": len(test_y)}}
    result["sentence"] = sentence(result)
    result["comparison"] = comparison(result)
    _write(run, result)
    return result


def load_run_teacher(run: Path, config, input_shape, num_classes: int) -> tuple[nn.Module, str]:
    """The run's one teacher, built from its config and loaded from ``<run>/teacher.safetensors``
    (trained by the run) or its ``checkpoint``; eval mode, CPU. Returns it and the weights' path."""
    if config.teachers is not None:
        raise ConfigError(f"The run in '{run}' combines {len(config.teachers)} teachers; a cascade defers to one "
                          "teacher: run one with a single 'teacher:'.")
    if config.teacher is None:
        raise ConfigError(f"The run in '{run}' has no teacher (method '{config.method.name}'); a cascade needs one to "
                          "defer to.")
    t = config.teacher
    path = run / "teacher.safetensors"
    if not path.is_file():
        if not t.checkpoint or not Path(t.checkpoint).is_file():
            raise DataError(f"The teacher of '{run}' is not found: no {path}, and its checkpoint "
                            f"{t.checkpoint!r} does not exist (relative paths are read from the current folder: "
                            "run softkd where you ran the run).")
        path = Path(t.checkpoint)
    model = resolve_model(t.model, input_shape=tuple(input_shape), num_classes=num_classes, kwargs=t.kwargs)
    load_weights(model, path)
    return model.eval().cpu(), str(path)


def time_on_batches(models: dict, x: torch.Tensor, *, batch_size: int = BATCH, budget_s: float = 20.0,
                    min_batches: int = 20) -> dict:
    """Each model's latency on the real batches of ``x`` (not random inputs: a cascade's cost depends
    on what it defers). The models take turns on each batch, so every model sees the same batches
    and load from other processes falls on all alike. They go through the full batches once (again
    from the first while fewer than ``min_batches`` calls were timed), stopping together early once
    one of them has spent ``budget_s`` seconds. Returns ``{"threads", "device", "batch_size",
    "batches", "models": {name: {"ms_per_sample", "p50_batch_ms", "throughput_per_s"}}}``."""
    batches = [x[i:i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)] or [x]
    times = {name: [] for name in models}
    samples = 0
    with torch.inference_mode():
        for model in models.values():  # warm-up: first calls allocate memory and pick kernels
            model(batches[0])
        for done in range(max(len(batches), min_batches)):
            batch = batches[done % len(batches)]
            for name, model in models.items():
                start = time.perf_counter()
                model(batch)
                times[name].append(time.perf_counter() - start)
            samples += len(batch)
            if done + 1 >= min_batches and max(sum(t) for t in times.values()) >= budget_s:
                break
    return {"threads": torch.get_num_threads(), "device": describe_device(torch.device("cpu")),
            "batch_size": len(batches[0]), "batches": len(next(iter(times.values()))),
            "models": {name: {"ms_per_sample": 1000 * sum(t) / samples, "p50_batch_ms": 1000 * float(np.median(t)),
                              "throughput_per_s": samples / sum(t)} for name, t in times.items()}}


def sentence(result: dict) -> str:
    """"cascade: 93.0 % (teacher 93.0 %, student 91.4 %) at 18 % of the teacher's cost; 9 % of inputs
    deferred", for the first student, on the test split."""
    role = next(iter(result["students"]))
    s = result["students"][role]
    if "test" not in s:
        return "cascade: no threshold reaches the target on the validation split."
    t = s["test"]
    return (f"cascade: {100 * t['accuracy']:.1f} % (teacher {100 * result['teacher']['test_accuracy']:.1f} %, "
            f"student {100 * s['test_accuracy_alone']:.1f} %) at {100 * t['cost_of_teacher']:.0f} % of the teacher's "
            f"cost; {100 * t['fraction']:.0f} % of inputs deferred")


def comparison(result: dict) -> str:
    """Whether the distilled student is the better first stage: fewer deferrals for the same
    validation accuracy (or more accuracy for the same deferral budget) than its scratch twin."""
    students = result["students"]
    if "scratch" not in students or "distilled" not in students:
        return "No scratch twin in the run: the cascade is not compared with one."
    d, s = students["distilled"], students["scratch"]
    if "max_teacher_fraction" in result["target"]:
        budget = 100 * result["target"]["max_teacher_fraction"]
        gap = 100 * (d["val"]["accuracy"] - s["val"]["accuracy"])
        better = "a better" if gap > 0 else "not a better"
        return (f"Deferring at most {budget:.0f} % on validation, the distilled student's cascade reaches "
                f"{100 * d['val']['accuracy']:.2f} %, the scratch student's {100 * s['val']['accuracy']:.2f} % "
                f"({gap:+.2f} points): distillation made {better} first stage.")
    target = 100 * result["target"]["accuracy"]
    if "val" not in s:
        return (f"The scratch student's cascade cannot reach {target:.2f} % on validation at all, the distilled "
                f"student's does with {100 * d['val']['fraction']:.1f} % deferred: distillation made a better first "
                "stage.")
    fd, fs = 100 * d["val"]["fraction"], 100 * s["val"]["fraction"]
    verdict = ("distillation made a better first stage" if fd < fs else
               "distillation did not make a better first stage" if fd > fs else "no difference as a first stage")
    return (f"For {target:.2f} % on validation the distilled student defers {fd:.1f} % of inputs, the scratch "
            f"student {fs:.1f} % (test: {100 * d['test']['fraction']:.1f} % and {100 * s['test']['fraction']:.1f} %): "
            f"{verdict}.")


def _scratch_twin(run: Path, info: dict) -> str | None:
    if info["kind"] != "distilled":
        return None
    name = "scratch" + info["name"].removeprefix("distilled")
    return name if any(s["name"] == name for s in list_students(run)) else None


def _labeled(split, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    keep = split.y >= 0
    if not keep.any():
        raise DataError(f"The {what} split has no labels; a cascade is scored on labelled samples.")
    return split.x[keep].float(), split.y[keep].long()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).double().mean())


def _thin(curve: dict, point: int | None, *, student_ms: float, teacher_ms: float) -> dict:
    """At most CURVE_POINTS points of the curve (evenly spread in deferral, the chosen one kept), each
    with its cost estimated from the measured latencies: student + fraction × teacher, as a share of
    the teacher's."""
    n = len(curve["deferred"])
    keep = set(np.linspace(0, n - 1, min(n, CURVE_POINTS)).round().astype(int).tolist())
    keep |= {point} if point is not None else set()
    idx = sorted(keep)
    fraction = [curve["fraction"][i] for i in idx]
    return {"threshold": [curve["threshold"][i] for i in idx], "fraction": fraction,
            "accuracy": [curve["accuracy"][i] for i in idx],
            "cost_of_teacher": [(student_ms + f * teacher_ms) / teacher_ms for f in fraction],
            "chosen": idx.index(point) if point is not None else None}


def _write(run: Path, result: dict) -> None:
    from softkd.report.plots import cascade_curves
    from softkd.report.summary import write_report

    folder = run / "cascade"
    atomic_write_text(folder / "cascade.json", json.dumps(result, indent=2))
    png = cascade_curves(result)
    if png is not None:
        atomic_write_bytes(folder / "cascade.png", png)
    report_path = run / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report["cascade"] = result
        write_report(report, run)
