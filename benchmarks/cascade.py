"""The cascade on finished runs: every distilled student of each run directory as the first stage
(its scratch twin beside it), the threshold chosen on the validation split for the teacher's
validation accuracy, then scored and timed on the test split:

    OMP_NUM_THREADS=1 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824 \\
        python benchmarks/cascade.py RUN_DIR [RUN_DIR ...] [--threads 1] [--budget 20]

Each call is `softkd cascade RUN_DIR --student <name>` (softkd.cascade.calibrate_run); the run's
best-validated student goes last, so RUN_DIR/cascade/ and its report keep that one. Writes
benchmarks/results/cascade.json (every seed, and mean ± std per run) and prints the table of docs/cascade.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from softkd.cascade import calibrate_run
from softkd.export import list_students

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds each model is timed for, at most")
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
            result = calibrate_run(run, student=s["name"], threads=args.threads, budget_s=args.budget)
            seeds.append({"student": s["name"], "seed": s["seed"], "fraction": s["fraction"], **_row(result)})
            print(f"{run.name} {s['name']}: {result['sentence']}. {result['comparison']}", flush=True)
        args.images.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "cascade" / "cascade.png", args.images / f"cascade-{run.name}.png")
        results[run.name] = {"seeds": seeds, "mean_std": _pooled(seeds), "threads": args.threads,
                             "device": result["latency"]["device"], "teacher": result["teacher"]["model"],
                             "teacher_weights": result["teacher"]["weights"]}
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
    def ms(entry, key, scale=100, digits=1):
        m = entry["mean_std"].get(key)
        return "n/a" if m is None else f"{scale * m['mean']:.{digits}f} ± {scale * m['std']:.{digits}f}"

    lines = ["| first stage | seeds | teacher | student alone | cascade | deferred (test) | cost of teacher | "
             "scratch first: cascade | scratch: deferred |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        model = entry["seeds"][0]["model"]
        lines.append(f"| distilled {model} ({name}) | {len(entry['seeds'])} | {ms(entry, 'teacher_test', digits=2)} | "
                     f"{ms(entry, 'student_test', digits=2)} | {ms(entry, 'cascade_test', digits=2)} | "
                     f"{ms(entry, 'deferred_test')} % | {ms(entry, 'cost_of_teacher', digits=0)} % | "
                     f"{ms(entry, 'scratch_cascade_test', digits=2)} | {ms(entry, 'scratch_deferred_test')} % |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
