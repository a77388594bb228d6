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


def build_report(config, teacher_eval: dict, teacher_params: int, runs: list[dict], splits) -> dict:
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
    return {
        "teacher": {"model": config.teacher.model, "params": teacher_params, **teacher_eval},
        "students": {config.student.model: {"params": regimes[next(iter(regimes))]["params"], "regimes": regimes}},
        "data": {"name": config.data.name, "train": len(splits.train),
                 "val": len(splits.val) if splits.val is not None else 0, "test": len(splits.test)},
        "method": config.method.model_dump(),
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
        f"Teacher `{report['teacher']['model']}`, method `{report['method']['name']}` "
        f"(T = {report['method']['temperature']}, β = {report['method']['beta']}). Accuracy on the "
        f"{report['data']['test']}-sample test split, mean ± std over {seeds} seed(s); scratch and distilled "
        "students share architecture, initialisation, data and step budget.",
        "",
        markdown_table(report),
        "",
        _hardware_line(report),
        "",
    ]))


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
