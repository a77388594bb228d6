"""report.json: teacher, scratch and distilled students side by side, per student and regime,
with mean ± std over seeds, gap recovered and a plain verdict; report.md renders it."""

from __future__ import annotations

import json
import math
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from softkd.train.distributed import Distributed
from softkd.train.runtime import describe_device, select_device
from softkd.utils import atomic_write_text


def stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "runs": values,
    }


def verdict(scratch: dict, distilled: dict) -> str:
    """Distilled minus scratch accuracy against twice its standard error over seeds."""
    delta = distilled["mean"] - scratch["mean"]
    n = len(scratch["runs"])
    se = math.sqrt((scratch["std"] ** 2 + distilled["std"] ** 2) / n) if n > 1 else 0.0
    points = f"{100 * delta:+.1f} points"
    if n < 2:
        return f"{points} (one seed: no error estimate)"
    if delta > 2 * se:
        return f"distillation helped: {points}"
    if delta < -2 * se:
        return f"distillation hurt: {points}"
    return f"no clear difference: {points} is within 2 standard errors ({100 * 2 * se:.1f})"


SCHEMA_VERSION = 2
"""report.json's layout. 2 (softkd 0.2): ``schema_version``, ``method`` holds the method's own
parameters and its ``formula``, ``teachers`` lists each teacher when there are several (``teacher``
is then their ensemble). 1 (0.1, no ``schema_version``): ``method`` with temperature and beta."""


def build_report(config, method, teacher_evals: list[dict], teacher_eval: dict, runs: list[dict], splits) -> dict:
    """``teacher_evals``: each teacher's test metrics (model, params, accuracy...); ``teacher_eval``:
    what they predict together (the one teacher's, or the ensemble's)."""
    import softkd

    regimes = {}
    for fraction in config.data.fractions:
        by_kind = {
            kind: [r for r in runs if r["kind"] == kind and r["labeled_fraction"] == fraction]
            for kind in ("scratch", "distilled")
        }
        entry = {"labeled_fraction": fraction, "num_labeled": by_kind["distilled"][0]["num_labeled"],
                 "transfer_size": by_kind["distilled"][0]["transfer_size"],
                 "teacher": {"accuracy": stats([teacher_eval["accuracy"]])}}
        for kind, kind_runs in by_kind.items():
            entry[kind] = {m: stats([r[m] for r in kind_runs]) for m in ("accuracy", "ece", "nll", "agreement")}
        teacher_acc = teacher_eval["accuracy"]
        scratch_acc, distilled_acc = entry["scratch"]["accuracy"]["mean"], entry["distilled"]["accuracy"]["mean"]
        entry["gap_recovered"] = (
            (distilled_acc - scratch_acc) / (teacher_acc - scratch_acc) if teacher_acc > scratch_acc else None
        )
        entry["agreement"] = entry["distilled"]["agreement"]
        entry["ece"] = entry["distilled"]["ece"]
        entry["params"] = by_kind["distilled"][0]["params"]
        entry["verdict"] = verdict(entry["scratch"]["accuracy"], entry["distilled"]["accuracy"])
        regimes[f"{fraction:.0%} labels"] = entry
    teacher = dict(teacher_evals[0]) if len(teacher_evals) == 1 else {
        "model": f"ensemble of {len(teacher_evals)} ({', '.join(t['model'] for t in teacher_evals)})",
        "params": sum(t["params"] for t in teacher_evals), **teacher_eval}
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": teacher,
        **({"teachers": teacher_evals} if len(teacher_evals) > 1 else {}),
        "students": {config.student.model: {"params": regimes[next(iter(regimes))]["params"], "regimes": regimes}},
        "data": {"name": config.data.name, "train": len(splits.train),
                 "val": len(splits.val) if splits.val is not None else 0, "test": len(splits.test)},
        "method": {**method.key(), "formula": method.describe()},
        "seeds": config.train.seeds,
        "config": config.model_dump(mode="json"),
        "hardware": {"device": describe_device(select_device(config.train.device)),
                     "precision": config.train.precision, "processes": Distributed().world},
        "versions": {"softkd": softkd.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def table_rows(report: dict) -> list[list[str]]:
    """One row per student and regime: the figures a user needs to judge the distillation."""
    rows = []
    for student, entry in report["students"].items():
        for regime, r in entry["regimes"].items():
            gap = r["gap_recovered"]
            rows.append([
                student, regime, _pct(r["teacher"]["accuracy"]["mean"]),
                _mean_std(r["scratch"]["accuracy"]), _mean_std(r["distilled"]["accuracy"]),
                "n/a" if gap is None else f"{100 * gap:.0f}%",
                f"{_pct(r['scratch']['agreement']['mean'])} → {_pct(r['distilled']['agreement']['mean'])}",
                f"{r['scratch']['ece']['mean']:.3f} → {r['distilled']['ece']['mean']:.3f}",
                f"{entry['params']:,} / {report['teacher']['params']:,}",
                r["verdict"],
            ])
    return rows


HEADERS = ["student", "regime", "teacher", "scratch", "distilled", "gap rec.",
           "agree s→d", "ECE s→d", "params s/t", "verdict"]


def markdown_table(report: dict) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    seeds = len(report["seeds"])
    atomic_write_text(out / "report.md", "\n".join([
        f"# softkd report: {report['data']['name']}",
        "",
        f"Teacher `{report['teacher']['model']}`, method `{report['method']['name']}`: "
        f"{report['method']['formula']}.{_teachers_line(report)} Accuracy on the "
        f"{report['data']['test']}-sample test split, mean ± std over {seeds} seed(s); scratch and distilled "
        "students share architecture, initialisation, data and step budget.",
        "",
        markdown_table(report),
        "",
        _hardware_line(report),
        "",
    ]))


def _teachers_line(report: dict) -> str:
    if "teachers" not in report:
        return ""
    each = ", ".join(f"{t['model']} {_pct(t['accuracy'])}" for t in report["teachers"])
    return f" Teachers' own test accuracy: {each}; the ensemble's {_pct(report['teacher']['accuracy'])}."


def _hardware_line(report: dict) -> str:
    """This invocation's device; students reused from an earlier run (same stamp) may have trained elsewhere."""
    hw = report.get("hardware")
    if not hw:
        return ""
    processes = hw["processes"]
    return (f"Ran on {hw['device']}, {hw['precision']}, {processes} process{'es' if processes > 1 else ''} "
            f"(torch {report['versions']['torch']}, softkd {report['versions']['softkd']}).")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean_std(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
