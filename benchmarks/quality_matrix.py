"""The payoff matrix of benchmarks/quality.py: what a matrix file (benchmarks/quality.yaml) names,
each cell's settings, and which cells its results JSON holds, current or stale. Reads and writes
files only (no torch), so `plan` and the checks stay fast."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_matrix(path: Path) -> dict:
    """The matrix, each method's budget and each student's methods checked."""
    matrix = read_matrix(path)
    for settings in matrix["methods"].values():
        budget_of(matrix, settings)
    for student, spec in matrix["students"].items():
        for key in ("recipe", "recipe_config"):
            by_regime = spec.get(key)
            unknown = [r for r in by_regime if r not in matrix["regimes"]] if _per_regime(by_regime, key) else []
            if unknown:
                raise SystemExit(f"Student {student}'s {key} names regimes {unknown}; the matrix's regimes are "
                                 f"{list(matrix['regimes'])} (a recipe is one method with its budget, or one per regime).")
        for regime in matrix["regimes"]:
            for settings in student_methods(matrix, spec, regime).values():  # the recipe's budget too
                budget_of(matrix, settings)
    return matrix


def read_matrix(path: Path, _seen: tuple = ()) -> dict:
    """A matrix file. One with ``extends: OTHER.yaml`` (a path beside it) is that matrix with this
    file's entries merged in: mappings key by key, but a method's settings (a mapping with
    ``method``: a recipe, a matrix method) and every other value replaced whole. A pending matrix,
    which trains a candidate recipe's test seeds apart from the published cells, names only what it
    changes."""
    path = Path(path).resolve()
    if path in _seen:
        raise SystemExit(f"Matrix {path} extends itself (through {' -> '.join(p.name for p in _seen)}).")
    matrix = yaml.safe_load(path.read_text())
    base = matrix.pop("extends", None)
    return _merged(read_matrix(path.parent / base, (*_seen, path)), matrix) if base else matrix


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        whole = not isinstance(value, dict) or "method" in value or not isinstance(base.get(key), dict)
        out[key] = value if whole else _merged(base[key], value)
    return out


def cells(matrix: dict) -> list[dict]:
    """Every cell of the matrix, seed-major (so a partial run has whole seeds), each with its name."""
    found = []
    for seed in matrix["seeds"]:
        for student, spec in matrix["students"].items():
            for regime in matrix["regimes"]:
                for method, settings in student_methods(matrix, spec, regime).items():
                    found.append({"name": f"{student}/{regime}/{method}/{seed}", "student": student,
                                  "regime": regime, "method": method, "seed": seed, "settings": settings})
    return found


def budget_of(matrix: dict, settings: dict) -> str | None:
    """The name of the budget a method's settings train under (None: the matrix's base). A method
    sets nothing but ``method`` and ``budget``: whatever the scratch twin must share goes in a budget."""
    extra = set(settings) - {"method", "budget"}
    if extra:
        raise SystemExit(f"A method of the matrix sets {sorted(extra)}: put data, train and cache settings in a "
                         "named entry of 'budgets' and give the method 'budget: NAME', so its scratch twin shares them.")
    name = settings.get("budget")
    if name is not None and name not in matrix.get("budgets", {}):
        raise SystemExit(f"Unknown budget {name!r}; the matrix's budgets are {sorted(matrix.get('budgets', {}))}.")
    return name


def student_methods(matrix: dict, spec: dict, regime: str) -> dict:
    """The matrix's methods a student runs (all, or those its ``methods`` list names), then its
    recipe for ``regime`` as method "recipe" where it has one."""
    names = spec.get("methods", list(matrix["methods"]))
    unknown = [n for n in names if n not in matrix["methods"]]
    if unknown:
        raise SystemExit(f"Unknown methods {unknown} for a student; the matrix's methods are {sorted(matrix['methods'])}.")
    recipe = recipe_of(spec, regime)
    return {**{n: matrix["methods"][n] for n in names}, **({"recipe": recipe} if recipe else {})}


def recipe_of(spec: dict, regime: str, key: str = "recipe"):
    """A student's recipe for ``regime`` (``key="recipe_config"``: the config that trains it): one
    for every regime (a method with its budget; a config path), or one per regime, keyed by the
    regime's name, where each label regime's validation split chose its own."""
    value = spec.get(key)
    return value.get(regime) if _per_regime(value, key) else value


def _per_regime(value, key: str) -> bool:
    """Whether a recipe (or its config) is given per regime: a mapping keyed by regime names."""
    return isinstance(value, dict) and not (key == "recipe" and "method" in value)


def stale(done: dict, settings: dict) -> bool:
    """Whether a finished cell ran other settings than the matrix now names for it (``settings``:
    its method and budget; a recipe changed): its method differs in a setting the matrix gives (the
    run records the others too, with their defaults), or its budget differs. A cell that recorded no
    settings cannot be told apart, and counts as current."""
    def differs(recorded, given) -> bool:
        if isinstance(given, dict) and isinstance(recorded, dict):
            return any(differs(recorded.get(k), v) for k, v in given.items())
        return recorded != given

    recorded = done.get("settings")
    if recorded is None:
        return False
    return done.get("budget") != settings.get("budget") or differs(recorded, settings["method"])


def states(matrix: dict, results: Path) -> list[tuple[dict, str]]:
    """Every cell of the matrix with its state: "done", "todo" (not run) or "stale" (run with other
    settings than the matrix now names)."""
    done = {c["name"]: c for c in load_results(results)["cells"]}
    return [(c, "todo" if c["name"] not in done else "stale" if stale(done[c["name"]], c["settings"]) else "done")
            for c in cells(matrix)]


def load_results(results: Path) -> dict:
    return json.loads(results.read_text()) if results.exists() else {"cells": []}


def save_cell(results: Path, cell: dict, matrix_path: Path) -> None:
    """Add (or replace) a cell under a lock: two `run`s, one per core, may share the file."""
    _update(results, lambda kept: [c for c in kept if c["name"] != cell["name"]] + [cell], matrix_path)


def promote(matrix_path: Path, results: Path, pending: Path, only: list[str]) -> list[str]:
    """Move a pending recipe's finished cells (those of ``pending`` whose name contains every text
    in ``only``) into the matrix's ``results``, replacing the old recipe's, once the matrix names
    that recipe (its method and budget moved into the matrix file): each cell must be one the matrix
    names with the settings it ran, and every seed of its row must be done, so a row never mixes two
    recipes. They leave ``pending``, which keeps what still runs. Returns the names moved."""
    matrix = load_matrix(matrix_path)
    by_name = {c["name"]: c for c in cells(matrix)}
    chosen = [c for c in load_results(pending)["cells"] if all(text in c["name"] for text in only)]
    if not chosen:
        raise SystemExit(f"No cell of {pending} has every one of {only} in its name: nothing to promote.")
    for cell in chosen:
        named = by_name.get(cell["name"])
        if named is None or stale(cell, named["settings"]):
            raise SystemExit(f"{matrix_path} does not name {cell['name']} with the settings it ran (budget "
                             f"{cell.get('budget') or 'base'}, {cell.get('settings', {}).get('name')}): move the "
                             "recipe and its budget into the matrix file first, then promote its cells.")
    names = {c["name"] for c in chosen}
    for row in sorted({name.rsplit("/", 1)[0] for name in names}):  # student/regime/method
        missing = [s for s in matrix["seeds"] if f"{row}/{s}" not in names]
        if missing:
            raise SystemExit(f"{row} has no cell of seeds {missing} in {pending} (or --only left them out): "
                             "promote a row when all its seeds are done, so it never mixes two recipes.")
    _update(results, lambda kept: [c for c in kept if c["name"] not in names] + chosen, matrix_path)
    _update(pending, lambda kept: [c for c in kept if c["name"] not in names])
    return sorted(names)


def _update(results: Path, change, matrix_path: Path | None = None) -> None:
    """Rewrite a results file's cells (``change``: the kept cells to the new ones) under its lock,
    atomically: a reader sees the old file or the new one, never half of it."""
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = load_results(results)
        kept["cells"] = sorted(change(kept["cells"]), key=lambda c: c["name"])
        if matrix_path is not None:
            kept["matrix"] = str(matrix_path.relative_to(ROOT)) if matrix_path.is_relative_to(ROOT) else str(matrix_path)
        tmp = results.with_suffix(".tmp")
        tmp.write_text(json.dumps(kept, indent=2) + "\n")
        tmp.replace(results)
