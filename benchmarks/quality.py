"""The payoff benchmark: does distillation beat the same student trained alone? Students × label
regimes × methods × seeds, each distilled student beside its equal-budget scratch twin.

    python benchmarks/quality.py plan  [--matrix benchmarks/quality.yaml] [--results benchmarks/results/quality.json]
    python benchmarks/quality.py run   [--matrix ...] [--results ...] [--out runs/quality] [--only TEXT ...] [--device cuda]
    python benchmarks/quality.py table [--matrix ...] [--results ...] [--split test|val]
    python benchmarks/quality.py search --results RESULTS [--results ...] [--seed 0]
    python benchmarks/quality.py promote --from PENDING_RESULTS [--matrix ...] [--results ...] [--only TEXT ...]

The matrix (benchmarks/quality.yaml) names the teachers, students, regimes, methods and seeds. A
cell is one (student, regime, method, seed); `run` runs each missing cell as `softkd run` of a
config it writes (the matrix's base, the student's teacher checkpoint, the regime, the method, one
seed) into one folder per student and regime, so the scratch twin, the soft-label cache and the
teacher's test pass are shared by the methods; it adds the cell to the results JSON as soon as it
finishes, with the accuracies of the scratch twin its own run trained beside it (``twin``), and
copies its report and distilled student into the folder's ``cells/<method>-seed<seed>/`` (the
next method's run rewrites the folder's own), so a
long CPU run can stop anywhere and continue later, and a cell rerun elsewhere (another CPU's
kernels give another scratch twin) changes only its own row. A cell stopped midway starts over,
unless its budget sets `train.checkpoint_every`: then its students save their full state at each
epoch's end, and the next `run` continues the cell from there (`softkd run --resume`) to the same
weights, bit for bit. A teacher whose weights are missing is trained first (`softkd teacher`,
resumable).
`--only` keeps the cells whose name (`student/regime/method/seed`) contains every given text.
A method may name a budget (`budget: NAME`, one of the matrix's `budgets`: settings of `data`,
`train` and `cache`, such as more epochs or cached augmented views); its cells then train in their
own folder (`<student>-<regime>-<budget>`) beside their own scratch twins with the same budget, so
a recipe is never compared with a scratch student trained less. A student's recipe (method
"recipe") is one for every regime, or one per regime where each regime's validation split chose its
own. A cell whose recorded settings differ from what the matrix now names (a recipe changed) is
stale: `plan` says so, `table` leaves it out and `run` reruns it. A new recipe's test seeds run
apart (a pending matrix, ``extends: quality.yaml``, with a results file of its own); once its recipe
is moved into the matrix file and all its seeds are done, `promote` moves its cells into the
matrix's results in place of the old recipe's.
`table` renders README's table from the JSON: mean ± std over the seeds done, the change against
the scratch twins of the same seeds, the share of the teacher–scratch gap recovered, the verdict and
the training time per student. Selection (auto, recipes) only ever reads the validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the sibling module, also when a test loads this file by its path
    sys.path.insert(0, HERE)
# What the matrix names and which cells are done; this script runs cells and renders tables.
from quality_matrix import (ROOT, budget_of, load_matrix, load_results, promote, save_cell, stale,  # noqa: E402
                            states, student_methods)

MATRIX = ROOT / "benchmarks" / "quality.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "quality.json"


def run_config(matrix: dict, cell: dict, root: Path, out: Path) -> dict:
    """The `softkd run` config of one cell (the matrix's paths relative to ``root``, the repository;
    the teacher's soft-label cache in ``out``, one per teacher and augmentation)."""
    spec = matrix["students"][cell["student"]]
    teacher = matrix["teachers"][spec["teacher"]]
    config = json.loads(json.dumps(matrix["base"]))  # a deep copy
    budget = budget_of(matrix, cell["settings"])
    for section, values in (matrix["budgets"][budget] if budget else {}).items():
        config[section] = {**config.get(section, {}), **values}
    config.setdefault("data", {})["labeled_fraction"] = matrix["regimes"][cell["regime"]]
    config["teacher"] = {"model": teacher["model"], "checkpoint": str(root / teacher["folder"] / "teacher.safetensors")}
    config["student"] = {"model": cell["student"]}
    config["method"] = dict(cell["settings"]["method"])
    config.setdefault("train", {})["seeds"] = [cell["seed"]]
    data, cache = config["data"], config.get("cache", {})
    strength = data.get("mixup_alpha", 1.0) if data.get("augment") == "mixup" else data.get("shift", 2)
    views = f"-{data['augment']}{strength:g}-x{cache.get('views', 1)}" if data.get("augment") else ""
    config["cache"] = {**cache, "dir": str(out / f"cache-{spec['teacher']}{views}")}
    return config


def folder_of(matrix: dict, cell: dict, out: Path) -> Path:
    """The run folder a cell trains in: one per student, regime and budget."""
    budget = budget_of(matrix, cell["settings"])
    return out / (f"{cell['student']}-{cell['regime'].replace('%', 'pct')}" + (f"-{budget}" if budget else ""))


def run(matrix_path: Path, results: Path, out: Path, only: list[str], device: str | None = None) -> None:
    matrix = load_matrix(matrix_path)
    todo = [c for c, state in states(matrix, results) if state != "done" and all(text in c["name"] for text in only)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # `kill PID` stops the cell's `softkd run` too (subprocess.run kills its child on an exception):
    # an orphaned run would go on writing the folder the next `run` trains in
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("quality.py: stopped (SIGTERM); the running cell was stopped too"))
    for cell in todo:
        _teacher(matrix, matrix["students"][cell["student"]]["teacher"], env)
        folder = folder_of(matrix, cell, out)
        folder.mkdir(parents=True, exist_ok=True)
        config = out / "configs" / (cell["name"].replace("/", "_").replace("%", "pct") + ".yaml")
        config.parent.mkdir(parents=True, exist_ok=True)
        settings = run_config(matrix, cell, ROOT, out)
        if device is not None:
            settings["train"]["device"] = device
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "softkd.cli", "run", str(config), "--out", str(folder), "--resume"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            print(f"{cell['name']}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        save_cell(results, cell_results(cell, folder, wall), matrix_path)
        keep(cell, folder)
        print(f"{cell['name']}: {wall / 60:.1f} min", flush=True)


def _teacher(matrix: dict, name: str, env: dict) -> None:
    teacher = matrix["teachers"][name]
    if (ROOT / teacher["folder"] / "teacher.safetensors").is_file():
        return
    print(f"training teacher {name} ({teacher['config']} -> {teacher['folder']})", flush=True)
    subprocess.run([sys.executable, "-m", "softkd.cli", "teacher", teacher["config"], "--out", teacher["folder"],
                    "--resume"], cwd=ROOT, env=env, check=True)


def keep(cell: dict, folder: Path) -> None:
    """Copy the cell's report and distilled student into ``folder/cells/<method>-seed<seed>/``: the
    methods of a folder share its scratch twin, and each run rewrites the folder's report and
    ``students/distilled-*``. Each file lands whole (written beside, then renamed)."""
    kept = folder / "cells" / f"{cell['method']}-seed{cell['seed']}"
    kept.mkdir(parents=True, exist_ok=True)
    files = [folder / f"report.{ext}" for ext in ("json", "md", "html")]
    files += sorted((folder / "students").glob(f"distilled-labels*-seed{cell['seed']}.*"))
    for source in files:
        if source.is_file():
            partial = kept / (source.name + ".partial")
            shutil.copyfile(source, partial)
            os.replace(partial, kept / source.name)


def cell_results(cell: dict, folder: Path, wall_s: float) -> dict:
    """The cell's distilled student with its scratch twin of the same run (``twin``), read from the
    run's report and student stamps. Each cell carries its own twin: soft-target and auto share a
    folder, and a cell rerun on other CPU kernels may train a different one."""
    report = json.loads((folder / "report.json").read_text())
    entry = next(iter(report["students"].values()))
    regime = next(iter(entry["regimes"].values()))
    fraction, seed = regime["labeled_fraction"], cell["seed"]
    scratch, distilled = (json.loads((folder / "students" / f"{kind}-labels{fraction:g}-seed{seed}.json").read_text())
                          ["result"] for kind in ("scratch", "distilled"))
    return {"name": cell["name"], "student": cell["student"], "regime": cell["regime"], "method": cell["method"],
            "seed": seed, "teacher": report["teacher"]["model"], "teacher_accuracy": report["teacher"]["accuracy"],
            "softkd": report["versions"]["softkd"], "torch": report["versions"]["torch"],
            "device": report["hardware"]["device"],
            **cell_kernels(report, scratch, distilled),
            "settings": report["method"],
            **({"budget": cell["settings"]["budget"]} if cell["settings"].get("budget") else {}),
            "accuracy": distilled["accuracy"], "val_accuracy": distilled.get("val_accuracy"),
            "train_s": distilled.get("train_s"),
            **({"chosen": distilled["chosen"], "search": distilled["search"]} if "search" in distilled else {}),
            "wall_s": round(wall_s, 1),
            "twin": {k: scratch.get(k) for k in ("accuracy", "val_accuracy", "train_s")}}


def cell_kernels(report: dict, *stamps: dict) -> dict:
    """``cpu_kernels``: the kernel sets the cell's students trained on, over every sitting ('AVX2',
    'AVX2 + AVX512'; on a GPU its name, 'CUDA NVIDIA H200'); from a run before the stamps kept them,
    the run's own."""
    trained = {k for stamp in stamps for k in stamp.get("cpu_kernels", ())}
    if trained:
        return {"cpu_kernels": " + ".join(sorted(trained))}
    return {"cpu_kernels": report["hardware"]["cpu_kernels"]} if "cpu_kernels" in report["hardware"] else {}


def plan(matrix_path: Path, results: Path) -> str:
    matrix = load_matrix(matrix_path)
    every = states(matrix, results)
    n_stale = sum(state == "stale" for _, state in every)
    return "\n".join([f"{state:<5} {c['name']}" for c, state in every]
                     + [f"{sum(state == 'done' for _, state in every)} of {len(every)} cells done"
                        + (f" ({n_stale} stale: run with other settings than the matrix now names; "
                           "`run` reruns them)" if n_stale else "")])


def table(matrix_path: Path, results: Path, split: str = "test") -> str:
    """README's results table: one row per student, regime and method, over the seeds done; each
    seed beside the scratch twin its own run trained (with the method's budget). ``split="val"``:
    validation accuracy, the figure recipes are chosen by (the test split's figures are then left out)."""
    from softkd.report.summary import outcome, stats  # imports torch: only here

    matrix = load_matrix(matrix_path)
    by_name = {c["name"]: c for c in load_results(results)["cells"]}
    key, teacher_key = ("accuracy", "teacher_accuracy") if split == "test" else ("val_accuracy", None)
    lines = ["| student (teacher) | labels | method | teacher | scratch | distilled | change | gap recovered "
             "| verdict | seeds | min per student |", "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    mixed, unrecorded = [], {"some": [], "every": []}
    for student, spec in matrix["students"].items():
        for regime in matrix["regimes"]:
            for method, settings in student_methods(matrix, spec, regime).items():
                done = [c for c in (by_name.get(f"{student}/{regime}/{method}/{s}") for s in matrix["seeds"])
                        if c and not stale(c, settings)]
                label = f"{student} ({matrix['teachers'][spec['teacher']]['model']})"
                if not done:
                    lines.append(f"| {label} | {regime} | {method} | | | | | | not run yet | 0 | |")
                    continue
                scratch, distilled = stats([c["twin"][key] for c in done]), stats([c[key] for c in done])
                teacher = done[0][teacher_key] if teacher_key else None  # no teacher score on validation
                change = distilled["mean"] - scratch["mean"]
                gap = change / (teacher - scratch["mean"]) if teacher is not None and teacher > scratch["mean"] else None
                minutes = [c["train_s"] / 60 for c in done if c.get("train_s") is not None]
                if method.startswith("auto"):  # every candidate run is the search's cost
                    minutes = [c["search"]["train_s"] / 60 for c in done if "search" in c]
                sets = [set(c.get("cpu_kernels", "not recorded").split(" + ")) for c in done]
                if len(set.union(*sets) - {"not recorded"}) > 1:
                    mixed.append(f"{student} {regime} {method}")
                if any("not recorded" in kernels for kernels in sets):  # unknown: neither mixed nor the same
                    every = all(kernels == {"not recorded"} for kernels in sets)
                    unrecorded["every" if every else "some"].append(f"{student} {regime} {method}")
                lines.append(
                    f"| {label} | {regime} | {method} | {'' if teacher is None else f'{100 * teacher:.1f}'} "
                    f"| {_ms(scratch)} | {_ms(distilled)} "
                    f"| {100 * change:+.1f} | {'n/a' if gap is None else f'{100 * gap:.0f} %'} "
                    f"| {_verdict(outcome(scratch, distilled)[0])} | {len(done)} "
                    f"| {_mean(minutes):.1f}{' (all candidates)' if method.startswith('auto') else ''} |")
    notes = []
    if mixed:
        notes.append(f"Trained on more than one kernel set (each cell's `cpu_kernels`: its students', over every "
                     f"sitting) in: {'; '.join(mixed)}. Each seed's change is against the scratch twin of its own run.")
    if unrecorded["some"] or unrecorded["every"]:
        notes.append("Kernel sets not recorded (trained before softkd recorded them): "
                     + "; ".join(f"{which} of {', '.join(rows)}" for which, rows in
                                 (("for some seeds or sittings", unrecorded["some"]),
                                  ("for every seed", unrecorded["every"])) if rows) + ".")
    if notes:
        lines.append("\n" + " ".join(notes))
    return "\n".join(lines)


def search_table(results: list[Path], seed: int = 0) -> str:
    """How the recipes were found: every search cell (method auto) of ``seed`` in ``results``, its
    scratch twin and its best distilled candidate, on the validation split only."""
    lines = ["| student | teacher (test %) | labels | search | budget | scratch twin | best distilled setting "
             "| its accuracy | change | settings tried | CPU kernels |", "|---|---|---|---|---|---:|---|---:|---:|---:|---|"]
    found = [c for path in results for c in load_results(path)["cells"] if "search" in c and c["seed"] == seed]
    for c in sorted(found, key=lambda c: (c["student"], -c["teacher_accuracy"], c["regime"] != "all",
                                          c.get("budget") or "")):
        search = c["search"]
        best = max(search["candidates"], key=lambda x: x["val_accuracy"])
        scratch = search["scratch_val_accuracy"]
        lines.append(f"| {c['student']} | {c['teacher']} ({100 * c['teacher_accuracy']:.2f}) | {c['regime']} "
                     f"| {c['method']} | {c.get('budget') or 'base'} | {100 * scratch:.2f} "
                     f"| {best['setting']} | {100 * best['val_accuracy']:.2f} "
                     f"| {100 * (best['val_accuracy'] - scratch):+.2f} | {len(search['candidates'])} "
                     f"| {c.get('cpu_kernels', 'not recorded')} |")
    return "\n".join(lines)


def write_block(page: Path, marker: str, text: str) -> None:
    """Replace what ``page`` holds between ``<!-- MARKER:start -->`` and ``<!-- MARKER:end -->``
    with ``text`` (README and docs render their tables from the JSON this way)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    content = page.read_text()
    if start not in content or end not in content.split(start, 1)[-1]:
        sys.exit(f"error: {page} has no '{start}' ... '{end}' block to write the table into.")
    head, rest = content.split(start, 1)
    page.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def _verdict(kind: str) -> str:
    return "one seed: no error estimate" if kind == "one seed" else (
        kind if kind == "no clear difference" else f"distillation {kind}")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _ms(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _write_option(parser: argparse.ArgumentParser, marker: str) -> None:
    parser.add_argument("--write", type=Path, action="append", default=[], metavar="PAGE",
                        help=f"also write the table into PAGE's <!-- {marker}:start/end --> block (README.md, docs/...)")


def _show(text: str, pages: list[Path], marker: str) -> None:
    for page in pages:
        write_block(page, marker, text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in ("plan", "run", "table"):
        p = sub.add_parser(verb)
        p.add_argument("--matrix", type=Path, default=MATRIX)
        p.add_argument("--results", type=Path, default=RESULTS)
        if verb == "table":
            p.add_argument("--split", choices=("test", "val"), default="test",
                           help="val: the validation accuracies recipes are chosen by")
            _write_option(p, "quality")
        if verb == "run":
            p.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
            p.add_argument("--only", action="append", default=[], metavar="TEXT")
            p.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None,
                           help="train on this device (default: the matrix's, else softkd's auto); "
                                "give a GPU run its own --results, so its cells are not mixed with CPU ones")
    p = sub.add_parser("search", help="validation accuracies of every search cell (how recipes were chosen)")
    p.add_argument("--results", type=Path, action="append", required=True)
    p.add_argument("--seed", type=int, default=0)
    _write_option(p, "search")
    p = sub.add_parser("promote", help="move a pending recipe's finished cells into the matrix's results, in place "
                                       "of the old recipe's (after its recipe moved into the matrix file)")
    p.add_argument("--from", dest="pending", type=Path, required=True, metavar="PENDING_RESULTS")
    p.add_argument("--matrix", type=Path, default=MATRIX)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--only", action="append", default=[], metavar="TEXT")
    args = parser.parse_args()
    if args.verb == "promote":
        moved = promote(args.matrix.resolve(), args.results, args.pending, args.only)
        print(f"moved {len(moved)} cells from {args.pending} into {args.results}: {', '.join(moved)}")
    elif args.verb == "search":
        _show(search_table(args.results, args.seed), args.write, "search")
    elif args.verb == "run":
        run(args.matrix.resolve(), args.results, args.out.resolve(), args.only, args.device)
    elif args.verb == "plan":
        print(plan(args.matrix, args.results))
    else:
        _show(table(args.matrix, args.results, args.split), args.write, "quality" if args.split == "test" else "quality-val")


if __name__ == "__main__":
    main()
