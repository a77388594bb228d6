"""The cascade on finished runs: every distilled student of each run directory as the first stage
(its scratch twin beside it), the threshold chosen on the validation split for the teacher's
validation accuracy (less ``--within`` points), then scored and timed on the test split:

    OMP_NUM_THREADS=1 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824 \\
        python benchmarks/cascade.py RUN_DIR [RUN_DIR ...] [--threads 1] [--budget 20] [--within 0.1]

Each call is `softkd cascade RUN_DIR --student <name>` (softkd.cascade.calibrate_run); the run's
best-validated student goes last, so RUN_DIR/cascade/ and its report keep that one. Writes
benchmarks/results/cascade.json (every seed, and mean ± std per run) and prints the table of
docs/cascade.md and README, which `python benchmarks/cascade.py` alone (no run) prints from the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from softkd.cascade import calibrate_run
from softkd.runs import list_students

ROOT = Path(__file__).resolve().parents[1]
RULE = "fewest deferrals from which the validation curve stays at or above the target up to its best"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds each model is timed for, at most")
    parser.add_argument("--within", type=float, default=0.0,
                        help="aim at the teacher's validation accuracy less this many points")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cascade.json")
    parser.add_argument("--images", type=Path, default=ROOT / "docs" / "images",
                        help="where each run's cascade.png is copied as cascade-<run>.png")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for run in args.runs:
        students = [s for s in list_students(run) if s["kind"] == "distilled"]
        students.sort(key=lambda s: s["default"])  # the default one last
        seeds = []
        for s in students:
            result = calibrate_run(run, student=s["name"], within=args.within, threads=args.threads,
                                   budget_s=args.budget)
            seeds.append({"student": s["name"], "seed": s["seed"], "fraction": s["fraction"], **_row(result)})
            print(f"{run.name} {s['name']}: {result['sentence']}. {result['comparison']}", flush=True)
        args.images.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "cascade" / "cascade.png", args.images / f"cascade-{run.name}.png")
        key = run.name + (f" within {args.within:g}" if args.within else "")
        weights = Path(result["teacher"]["weights"]).resolve()
        results[key] = {"run": run.name, "target": result["target"]["default"], "within": args.within, "rule": RULE,
                        "seeds": seeds, "mean_std": _pooled(seeds), "threads": args.threads,
                        "device": result["latency"]["device"], "teacher": result["teacher"]["model"],
                        "teacher_weights": str(weights.relative_to(ROOT) if weights.is_relative_to(ROOT) else weights)}
        args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


def _row(result: dict) -> dict:
    d, s = result["students"]["distilled"], result["students"].get("scratch", {})
    row = {"teacher_test": result["teacher"]["test_accuracy"], "teacher_val": result["teacher"]["val_accuracy"],
           "model": d["model"], "student_test": d["test_accuracy_alone"], "cascade_test": d["test"]["accuracy"],
           "deferred_test": d["test"]["fraction"], "deferred_val": d["val"]["fraction"],
           "cost_of_teacher": d["test"]["cost_of_teacher"], "threshold": d["threshold"],
           "teacher_ms_per_sample": result["latency"]["models"]["teacher"]["ms_per_sample"],
           "cascade_ms_per_sample": d["test"]["ms_per_sample"]}
    if "test" in s:
        row.update(scratch_test=s["test_accuracy_alone"], scratch_cascade_test=s["test"]["accuracy"],
                   scratch_deferred_val=s["val"]["fraction"], scratch_deferred_test=s["test"]["fraction"],
                   scratch_cost_of_teacher=s["test"]["cost_of_teacher"])
    return row


def _pooled(seeds: list[dict]) -> dict:
    keys = [k for k, v in seeds[0].items() if isinstance(v, float) and all(k in s for s in seeds)]
    return {k: {"mean": statistics.fmean(s[k] for s in seeds),
                "std": statistics.stdev([s[k] for s in seeds]) if len(seeds) > 1 else 0.0} for k in keys}


def table(results: dict) -> str:
    """The table of docs/cascade.md and README: the runs measured with the current rule (older rows,
    such as the first teacher's, stay in the JSON), distilled first stage by first stage."""
    def ms(entry, key, scale=100, digits=1):
        m = entry["mean_std"].get(key)
        return "n/a" if m is None else f"{scale * m['mean']:.{digits}f} ± {scale * m['std']:.{digits}f}"

    rows = [e for e in results.values() if e.get("rule") == RULE]
    models = list(dict.fromkeys(e["seeds"][0]["model"] for e in rows))
    rows.sort(key=lambda e: (models.index(e["seeds"][0]["model"]), -e.get("within", 0.0)))
    lines = ["| first stage | validation target | teacher | student alone | cascade | deferred (test) | cost of teacher "
             "| scratch first: cascade | scratch: deferred |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in rows:
        within = e.get("within", 0.0)
        target = 100 * (e["mean_std"]["teacher_val"]["mean"] - within / 100)
        lines.append(f"| distilled {e['seeds'][0]['model']} | teacher{f' − {within:g} points' if within else ''} "
                     f"({target:.2f} %) | {100 * e['mean_std']['teacher_test']['mean']:.2f} "
                     f"| {ms(e, 'student_test', digits=2)} | {ms(e, 'cascade_test', digits=2)} "
                     f"| {ms(e, 'deferred_test')} % | {ms(e, 'cost_of_teacher', digits=0)} % "
                     f"| {ms(e, 'scratch_cascade_test', digits=2)} | {ms(e, 'scratch_deferred_test')} % |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
