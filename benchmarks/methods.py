"""The methods benchmark: recipes from configs/ run with `softkd run`, one result row per student,
method and label regime, each beside its equal-budget scratch twin (mean ± std over seeds).

    python benchmarks/methods.py run CONFIG... [--out runs/methods] [--results benchmarks/results/methods.json]
                                 [--set KEY=VALUE ... --as NAME]
    python benchmarks/methods.py table [--results benchmarks/results/methods.json]
    python benchmarks/methods.py headline [--results benchmarks/results/methods.json]

`run` runs each config in its own process (`python -m softkd.cli run CONFIG --out OUT/<name>`),
timing it (`wall_s_this_call`: stages an earlier call left stamped are reused, not timed; each
row's `train_s_per_student` is the mean training time of one student, read from the run's
`metrics.jsonl`), and adds its rows to the results JSON as soon as it finishes (a rerun of a config
replaces its rows), so a long list can be split across cores and stopped midway. `table`
prints the methods table of the docs from the JSON; `headline`, the soft-target recipes' table of
docs/benchmarks.md (the 93.04 % teacher), which a test holds that page to.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from softkd.report.curves import best_validation, training_seconds

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "methods.json"


def run(configs: list[str], out: Path, results: Path, overrides: list[str] = (), name: str | None = None) -> None:
    """``overrides`` (``--set`` of softkd run) apply to every config; ``name`` replaces the config's
    file name as its rows' and run directory's name (one config: a variant of a recipe)."""
    if name is not None and len(configs) != 1:
        raise SystemExit("--as names one config's variant; give exactly one config")
    for config in configs:
        label = name or Path(config).stem
        started = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        sets = [arg for override in overrides for arg in ("--set", override)]
        proc = subprocess.run([sys.executable, "-m", "softkd.cli", "run", config, "--out", str(out / label), *sets],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            print(f"{label}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        report = json.loads((out / label / "report.json").read_text())
        metrics = out / label / "metrics.jsonl"
        _save(results, label, rows(label, report, wall, stage_seconds(metrics), stage_validation(metrics)))
        print(f"{label}: {wall / 60:.1f} min", flush=True)


def stage_seconds(metrics: Path) -> dict[tuple[str, float, str], float]:
    """Mean training seconds of one student over seeds, per (kind, labeled fraction, peer name
    or ""); a mutual-learning cohort trains as one "distilled" run."""
    return _seed_mean(training_seconds(metrics))


def stage_validation(metrics: Path) -> dict[tuple[str, float, str], float]:
    """Mean over seeds of each student's validation accuracy at its best epoch, per (kind, labeled
    fraction, peer name or ""): what recipes are selected on, never the test split."""
    return _seed_mean(best_validation(metrics))


def _seed_mean(per_seed: dict) -> dict:
    grouped = {}
    for (kind, fraction, name, _seed), value in per_seed.items():
        grouped.setdefault((kind, fraction, name), []).append(value)
    return {k: sum(v) / len(v) for k, v in grouped.items()}


def rows(config: str, report: dict, wall_s: float, seconds: dict, validation: dict | None = None) -> list[dict]:
    """One row per student and regime: what the docs tables show, and the runs behind it."""
    out = []
    teacher = report.get("teacher")
    for student, entry in report["students"].items():
        peer = student if "model" in entry else ""
        for regime, r in entry["regimes"].items():
            fraction = r["labeled_fraction"]
            out.append({
                "config": config, "student": f"{student} ({entry['model']})" if peer else student,
                "params": entry["params"], "regime": regime,
                "num_labeled": r["num_labeled"], "method": report["method"],
                "teacher": teacher["model"] if teacher else None,
                "teacher_accuracy": teacher["accuracy"] if teacher else None,
                "teachers": [{"model": t["model"], "accuracy": t["accuracy"]} for t in report.get("teachers", [])],
                "scratch": r["scratch"]["accuracy"], "distilled": r["distilled"]["accuracy"],
                "gap_recovered": r.get("gap_recovered"), "verdict": r["verdict"],
                "ece": {"scratch": r["scratch"]["ece"]["mean"], "distilled": r["distilled"]["ece"]["mean"]},
                "train_s_per_student": {kind: round(seconds[key], 1) for kind, key in
                                        (("scratch", ("scratch", fraction, peer)), ("distilled", ("distilled", fraction, "")))
                                        if key in seconds},
                "agreement": r.get("agreement"),
                "val_accuracy": {kind: round(validation[kind, fraction, peer], 4) for kind in ("scratch", "distilled")
                                 if (kind, fraction, peer) in (validation or {})},
                "wall_s_this_call": round(wall_s, 1), "softkd": report["versions"]["softkd"],
                "torch": report["versions"]["torch"], "device": report["hardware"]["device"],
            })
    return out


def _save(results: Path, config: str, new: list[dict]) -> None:
    """Replace ``config``'s rows, under a lock: two `run`s (one per core) share the file."""
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = json.loads(results.read_text()) if results.exists() else []
        kept = [r for r in kept if r["config"] != config] + new
        tmp = results.with_suffix(".tmp")
        tmp.write_text(json.dumps(kept, indent=2) + "\n")
        tmp.replace(results)


METHOD_ORDER = ("soft-target", "dkd", "dist", "multi-teacher", "feature", "mutual")


def table(results: Path, *, validation: bool = False) -> str:
    """The methods table of the docs: by student, then label regime (all labels first), then method; with
    ``validation``, also the distilled students' mean validation accuracy (what a sweep selects on)."""
    val_head, val_rule = (" val (d) |", "---:|") if validation else ("", "")
    lines = ["| student | labels | method | loss | teacher | scratch | distilled | change | gap recovered "
             f"| ECE s → d | verdict | min per student (s / d) |{val_head}",
             f"|---|---|---|---|---:|---:|---:|---:|---:|---|---|---:|{val_rule}"]
    found = json.loads(results.read_text())
    found.sort(key=lambda r: (r["student"], -r["num_labeled"], METHOD_ORDER.index(r["method"]["name"]),
                              r["config"]))
    for r in found:
        change = 100 * (r["distilled"]["mean"] - r["scratch"]["mean"])
        gap = "n/a" if r["gap_recovered"] is None else f"{100 * r['gap_recovered']:.0f} %"
        lines.append(
            f"| {r['student']} | {r['regime'].removesuffix(' labels')} | `{r['method']['name']}` "
            f"| {r['method']['formula'].removeprefix('loss = ')} | "
            f"{'–' if r['teacher_accuracy'] is None else format(100 * r['teacher_accuracy'], '.1f')} "
            f"| {_ms(r['scratch'])} | {_ms(r['distilled'])} | {change:+.1f} | {gap} "
            f"| {r['ece']['scratch']:.3f} → {r['ece']['distilled']:.3f} | {r['verdict'].split(':')[0]} "
            f"| {_minutes(r.get('train_s_per_student', {}))} |"
            + (f" {_pct(r.get('val_accuracy', {}).get('distilled'))} |" if validation else ""))
    return "\n".join(lines)


HEADLINE = ("soft-target-mlp128_from_resnet64-fashion-mnist", "soft-target-mlp128_from_resnet64-fashion-mnist-labels3pct",
            "soft-target-tinycnn16_from_resnet64-fashion-mnist",
            "soft-target-tinycnn16_from_resnet64-fashion-mnist-labels3pct")


def headline(results: Path) -> str:
    """README's results table: the four soft-target recipes, each beside its scratch twin."""
    lines = ["| student | labels | teacher | scratch | distilled (soft-target) | change | gap recovered | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    found = {r["config"]: r for r in json.loads(results.read_text())}
    for config in HEADLINE:
        r = found[config]
        change = 100 * (r["distilled"]["mean"] - r["scratch"]["mean"])
        lines.append(f"| {r['student']} | {r['regime'].removesuffix(' labels')} | {100 * r['teacher_accuracy']:.1f} "
                     f"| {_ms(r['scratch'])} | {_ms(r['distilled'])} | {change:+.1f} "
                     f"| {100 * r['gap_recovered']:.0f} % | {r['verdict'].split(':')[0]} |")
    return "\n".join(lines)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _minutes(seconds: dict) -> str:
    return " / ".join(f"{seconds[k] / 60:.1f}" if k in seconds else "–" for k in ("scratch", "distilled"))


def _ms(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("configs", nargs="+")
    p_run.add_argument("--out", type=Path, default=ROOT / "runs" / "methods")
    p_run.add_argument("--results", type=Path, default=RESULTS)
    p_run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p_run.add_argument("--as", dest="name", default=None, help="the rows' name for a variant of one config")
    p_table = sub.add_parser("table")
    p_table.add_argument("--results", type=Path, default=RESULTS)
    p_table.add_argument("--validation", action="store_true", help="add the distilled students' validation accuracy")
    p_headline = sub.add_parser("headline")
    p_headline.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.verb == "run":
        run(args.configs, args.out, args.results, args.overrides, args.name)
    elif args.verb == "headline":
        print(headline(args.results))
    else:
        print(table(args.results, validation=args.validation))


if __name__ == "__main__":
    main()
