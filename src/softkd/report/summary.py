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

from softkd.evaluate.speed import headline
from softkd.report.search import search_lines, search_summary
from softkd.train.distributed import Distributed
from softkd.train.runtime import describe_device, kernel_set, select_device
from softkd.utils import atomic_write_text


def stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "runs": values,
    }


def outcome(scratch: dict, distilled: dict) -> tuple[str, float, float | None]:
    """("helped" | "hurt" | "no clear difference" | "one seed", distilled − scratch mean accuracy,
    twice its standard error over seeds (None with one seed))."""
    delta = distilled["mean"] - scratch["mean"]
    n = len(scratch["runs"])
    if n < 2:
        return "one seed", delta, None
    two_se = 2 * math.sqrt((scratch["std"] ** 2 + distilled["std"] ** 2) / n)
    return ("helped" if delta > two_se else "hurt" if delta < -two_se else "no clear difference"), delta, two_se


def verdict(scratch: dict, distilled: dict) -> str:
    """Distilled minus scratch accuracy against twice its standard error over seeds."""
    kind, delta, two_se = outcome(scratch, distilled)
    points = f"{100 * delta:+.1f} points"
    if kind == "one seed":
        return f"{points} (one seed: no error estimate)"
    if kind == "no clear difference":
        return f"no clear difference: {points} is within 2 standard errors ({100 * two_se:.1f})"
    return f"distillation {kind}: {points}"


def in_words(student: str, regime: str, entry: dict) -> str:
    """One regime's outcome as a sentence: whether distillation beat the equal-budget scratch
    student, by how much, and the share of the gap to the teacher it recovered."""
    scratch, distilled = entry["scratch"]["accuracy"], entry["distilled"]["accuracy"]
    kind, delta, two_se = outcome(scratch, distilled)
    seeds = len(scratch["runs"])
    figures = (f"{student} with {regime} scored {_mean_std(distilled)} % distilled against {_mean_std(scratch)} % "
               f"from scratch ({100 * delta:+.1f} points, {seeds} seed{'s' if seeds > 1 else ''})")
    if kind == "helped":
        sentence = f"Distillation beat the equal-budget scratch student: {figures}, more than twice the standard error"
    elif kind == "hurt":
        sentence = (f"Distillation did worse than the equal-budget scratch student: {figures}, more than twice "
                    "the standard error")
    elif kind == "no clear difference":
        sentence = (f"Distillation made no clear difference: {figures}, within twice the standard error "
                    f"({100 * two_se:.1f} points)")
    else:
        sentence = (f"With one seed there is no error estimate: {figures}; run more seeds (train.seeds) to tell "
                    "this from noise")
    gap = entry.get("gap_recovered")
    if gap is not None and kind != "one seed":
        teacher = entry["teacher"]["accuracy"]["mean"]
        sentence += (f"; it recovered {100 * gap:.0f} % of the gap to the teacher ({_pct(teacher)} %)" if gap >= 0 else
                     f"; the gap to the teacher ({_pct(teacher)} %) grew by {-100 * gap:.0f} % instead of closing")
    return sentence + "."


def pool_details(details: list[dict | None]) -> dict | None:
    """One detail over seeds: per-class accuracy and top-5 averaged, confusion counts and
    reliability bins summed (each bin's confidence and accuracy weighted by its count)."""
    details = [d for d in details if d]
    if not details:
        return None
    n_classes = len(details[0]["per_class_accuracy"])
    per_class = []
    for c in range(n_classes):
        values = [d["per_class_accuracy"][c] for d in details if d["per_class_accuracy"][c] is not None]
        per_class.append(statistics.fmean(values) if values else None)
    confusion = None
    if all(d.get("confusion") is not None for d in details):
        confusion = [[sum(d["confusion"][i][j] for d in details) for j in range(n_classes)] for i in range(n_classes)]
    bins = [d["reliability"] for d in details]
    count = [sum(b["count"][i] for b in bins) for i in range(len(bins[0]["count"]))]

    def weighted(field, i):
        return (sum(b[field][i] * b["count"][i] for b in bins if b["count"][i]) / count[i]) if count[i] else None

    top5 = [d["top5"] for d in details if d.get("top5") is not None]
    return {"top5": statistics.fmean(top5) if top5 else None, "per_class_accuracy": per_class,
            "confusion": confusion,
            "reliability": {"edges": bins[0]["edges"], "count": count,
                            "confidence": [weighted("confidence", i) for i in range(len(count))],
                            "accuracy": [weighted("accuracy", i) for i in range(len(count))]}}


SCHEMA_VERSION = 4
"""report.json's layout. 4 (softkd 0.4): each regime's ``scratch`` and ``distilled`` have a
``detail`` pooled over seeds (top-5, per-class accuracy, confusion counts, reliability bins), the
teacher has its own ``detail``, and ``speed`` holds this machine's latency and throughput of the
teacher and each student architecture, with ``headlines``: the trade in one line per student and
regime (timings vary between runs, so they stay out of ``students``). 3 (softkd 0.3): a run without a teacher (``mutual``) has no ``teacher``
and no per-regime ``teacher``, ``gap_recovered`` or ``agreement``; ``students`` is keyed by peer
name (``peer0``...) with each peer's ``model`` when the method trains several. 2 (softkd 0.2): ``schema_version``, ``method`` holds the method's own
parameters and its ``formula``, ``teachers`` lists each teacher when there are several (``teacher``
is then their ensemble). 1 (0.1, no ``schema_version``): ``method`` with temperature and beta."""


def build_report(config, method, teacher_evals: list[dict], teacher_eval: dict | None, runs: list[dict],
                 splits, speed: dict | None = None) -> dict:
    """``teacher_evals``: each teacher's test metrics (model, params, accuracy...); ``teacher_eval``:
    what they predict together (the one teacher's, or the ensemble's); both empty / None for a
    method without a teacher, whose report then has no teacher fields. One entry per student the
    method trains (the student, or each peer by name), each beside its own scratch twin. ``speed``:
    evaluate.speed.time_models' figures for ``"teacher"`` and each student architecture."""
    import softkd

    metrics = ("accuracy", "ece", "nll", *(("agreement",) if teacher_eval else ()))
    device = select_device(config.train.device)
    students, headlines = {}, {}
    for name, model in method.student_specs(config.student.model).items():
        regimes = {}
        for fraction in config.data.fractions:
            by_kind = {kind: [r for r in runs if r["kind"] == kind and r["labeled_fraction"] == fraction
                              and r.get("student", "") == name] for kind in ("scratch", "distilled")}
            first = by_kind["distilled"][0]
            entry = {"labeled_fraction": fraction, "num_labeled": first["num_labeled"],
                     "transfer_size": first["transfer_size"]}
            for kind, kind_runs in by_kind.items():
                entry[kind] = {m: stats([r[m] for r in kind_runs]) for m in metrics}
                entry[kind]["detail"] = pool_details([r.get("detail") for r in kind_runs])
            scratch_acc, distilled_acc = entry["scratch"]["accuracy"]["mean"], entry["distilled"]["accuracy"]["mean"]
            if teacher_eval is not None:
                teacher_acc = teacher_eval["accuracy"]
                entry["teacher"] = {"accuracy": stats([teacher_acc])}
                entry["gap_recovered"] = ((distilled_acc - scratch_acc) / (teacher_acc - scratch_acc)
                                          if teacher_acc > scratch_acc else None)
                entry["agreement"] = entry["distilled"]["agreement"]
            entry["ece"] = entry["distilled"]["ece"]
            entry["params"] = first["params"]
            entry["verdict"] = verdict(entry["scratch"]["accuracy"], entry["distilled"]["accuracy"])
            search = search_summary(by_kind["distilled"])
            if search is not None:
                entry["search"] = search
            timed = speed["models"] if speed else {}
            if teacher_eval is not None and "teacher" in timed and model in timed:  # timings vary: kept in speed
                headlines.setdefault(name or model, {})[f"{fraction:.0%} labels"] = headline(
                    timed["teacher"], timed[model], 100 * (distilled_acc - teacher_acc))
            regimes[f"{fraction:.0%} labels"] = entry
        params = regimes[next(iter(regimes))]["params"]
        students[name or model] = {**({"model": model} if name else {}), "params": params, "regimes": regimes}
    teacher = None
    if teacher_evals:
        teacher = {**teacher_evals[0], "detail": teacher_eval.get("detail")} if len(teacher_evals) == 1 else {
            "model": f"ensemble of {len(teacher_evals)} ({', '.join(t['model'] for t in teacher_evals)})",
            "params": sum(t["params"] for t in teacher_evals), **teacher_eval}
    return {
        "schema_version": SCHEMA_VERSION,
        **({"teacher": teacher} if teacher is not None else {}),
        **({"teachers": teacher_evals} if len(teacher_evals) > 1 else {}),
        "students": students,
        **({"speed": {**speed, "headlines": headlines}} if speed else {}),
        "data": {"name": config.data.name, "train": len(splits.train),
                 "val": len(splits.val) if splits.val is not None else 0, "test": len(splits.test)},
        "method": {**method.key(), "formula": method.describe()},
        "seeds": config.train.seeds,
        "config": config.model_dump(mode="json"),
        "hardware": {"device": describe_device(device),
                     "precision": config.train.precision, "processes": Distributed().world,
                     # CPU results differ in the last bits between kernel sets (README: Reproducibility);
                     # the students' may differ from this invocation's: resumed, or reused from a run elsewhere.
                     # On a GPU: its name (a GPU run's figures do not depend on the host CPU's set)
                     "cpu_kernels": kernel_set(device),
                     "students_cpu_kernels": sorted({k for r in runs for k in r.get("cpu_kernels", ["not recorded"])})},
        "versions": {"softkd": softkd.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def table_rows(report: dict) -> list[list[str]]:
    """One row per student and regime: the figures a user needs to judge the distillation."""
    rows = []
    teacher = report.get("teacher")
    for student, entry in report["students"].items():
        label = f"{student} ({entry['model']})" if "model" in entry else student
        for regime, r in entry["regimes"].items():
            gap = r.get("gap_recovered")
            rows.append([
                label, regime, _pct(r["teacher"]["accuracy"]["mean"]) if teacher else "–",
                _mean_std(r["scratch"]["accuracy"]), _mean_std(r["distilled"]["accuracy"]),
                "n/a" if gap is None else f"{100 * gap:.0f}%",
                f"{_pct(r['scratch']['agreement']['mean'])} → {_pct(r['distilled']['agreement']['mean'])}"
                if teacher else "–",
                f"{r['scratch']['ece']['mean']:.3f} → {r['distilled']['ece']['mean']:.3f}",
                f"{entry['params']:,} / {teacher['params']:,}" if teacher else f"{entry['params']:,}",
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
    """report.json, then report.md and report.html rendered from it, into the run directory."""
    from softkd.report.html import render_html

    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", f"# softkd report: {report['data']['name']}\n\n" + markdown_section(report))
    atomic_write_text(out / "report.html", render_html([(out, report)]))


def markdown_section(report: dict) -> str:
    """What report.md says about one run: the method, the table, the outcome in words."""
    seeds = len(report["seeds"])
    words = [in_words(student, regime, r) for student, entry in report["students"].items()
             for regime, r in entry["regimes"].items()]
    headlines = [f"- **{student}, {regime}**: {line}" for student, lines in headlines_of(report).items()
                 for regime, line in lines.items()]
    return "\n".join([
        (f"Teacher `{report['teacher']['model']}`, method" if "teacher" in report else "No teacher, method") +
        f" `{report['method']['name']}`: "
        f"{report['method']['formula']}.{_teachers_line(report)} Accuracy on the "
        f"{report['data']['test']:,}-sample test split, mean ± std over {seeds} seed(s); scratch and distilled "
        "students share architecture, initialisation, data and step budget" +
        ("; each peer of the cohort is beside its own scratch twin." if _has_peers(report) else "."),
        "",
        markdown_table(report),
        "",
        *[line for w in words for line in (w, "")],
        *(headlines + [""] if headlines else []),
        *search_lines(report),
        *(_cascade_lines(report["cascade"]) if report.get("cascade") else []),
        _hardware_line(report),
        "",
    ])


def cascade_note(cascade: dict) -> str:
    """How the cascade was chosen and measured, in one sentence."""
    target = cascade["target"]
    goal = (f"deferring at most {100 * target['max_teacher_fraction']:.0f} %" if "max_teacher_fraction" in target
            else f"{100 * target['accuracy']:.2f} % validation accuracy" +
            (f" ({target['default']})" if target.get("default") else ""))
    latency = cascade["latency"]
    return (f"Threshold on the student's {cascade['confidence']} confidence, chosen on the "
            f"{cascade['splits']['val']:,}-sample validation split for {goal}; the test split played no part. "
            f"Cost: latency per sample at batch {latency['batch_size']}, measured on {latency['batches']} test "
            f"batches with {latency['threads']} thread(s) on {latency['device']}.")


def _cascade_lines(cascade: dict) -> list[str]:
    rows = ["| first stage | threshold | val acc % | deferred (val) | test acc % | deferred (test) | cost of teacher |",
            "|---|---|---|---|---|---|---|"]
    for role, s in cascade["students"].items():
        if "test" not in s:
            rows.append(f"| {role} {s['model']} | target not reached | | | | | |")
            continue
        rows.append(f"| {role} {s['model']} | {s['threshold']:.4f} | {100 * s['val']['accuracy']:.2f} | "
                    f"{100 * s['val']['fraction']:.1f} % | {100 * s['test']['accuracy']:.2f} | "
                    f"{100 * s['test']['fraction']:.1f} % | {100 * s['test']['cost_of_teacher']:.0f} % |")
    return ["## Cascade", "", f"**{cascade['sentence']}**", "", *rows, "", cascade["comparison"], "",
            cascade_note(cascade), ""]


def headlines_of(report: dict) -> dict[str, dict[str, str]]:
    """The trade in one line per student and regime ("student: 60× fewer parameters, 8.1× lower
    latency at batch 1, −1.6 points" against the teacher), when the run was timed."""
    return report.get("speed", {}).get("headlines", {})


def _has_peers(report: dict) -> bool:
    return any("model" in entry for entry in report["students"].values())


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
    return (f"Ran on {device_words(hw)}, {hw['precision']}, {processes} process{'es' if processes > 1 else ''} "
            f"(torch {report['versions']['torch']}, softkd {report['versions']['softkd']}).{kernels_note(hw)}")


def kernels_note(hw: dict) -> str:
    """' Its students trained on kernel sets AVX2, AVX512 ...' when they differ from this invocation's
    (a resumed run, or students reused from an earlier run elsewhere); else ''."""
    trained = hw.get("students_cpu_kernels") or []
    if not trained or trained == [hw.get("cpu_kernels")]:
        return ""
    return (f" Its students trained on kernel sets {', '.join(trained)} (over resumed sittings, or reused "
            "from an earlier run): figures differ in their last bits between kernel sets.")


def device_words(hw: dict) -> str:
    """'cpu (1 thread) (AVX2 kernels)', 'cuda:0 (NVIDIA H200)': the device, and on a CPU its kernel set."""
    kernels = hw.get("cpu_kernels") if str(hw.get("device", "")).startswith("cpu") else None
    return f"{hw.get('device', '?')}{f' ({kernels} kernels)' if kernels else ''}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean_std(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
