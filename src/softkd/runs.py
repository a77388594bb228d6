"""A run directory: the config it was written with and the students it saved, found, chosen and
built again the way the pipeline built them (for export, evaluation and the cascade)."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from torch import nn

from softkd.config import RunConfig, load_config
from softkd.data.datasets import Splits, run_splits
from softkd.errors import DataError, UnknownNameError
from softkd.methods import build_method
from softkd.models.weights import load_weights
from softkd.report.curves import best_validation
from softkd.stages import build_run_students


def list_students(run_dir: str | Path) -> list[dict]:
    """Every student a run saved (``students/<name>.safetensors`` with its stamp): ``name``,
    ``kind``, ``fraction`` (labeled), ``seed``, ``peer`` (None outside a cohort), ``model`` (its
    architecture spec), ``test_accuracy``, ``val_accuracy`` (its best epoch's, None when the run
    had no validation split) and ``default`` (the one :func:`load_student` loads without a name).
    Distilled students first, then by peer, most labels, seed."""
    run = Path(run_dir)
    students = _students(run, run_dir_config(run))
    default = _select(students, None, run)[0]["name"] if any(s["kind"] == "distilled" for s in students) else None
    return [{**s, "default": s["name"] == default} for s in students]


def load_student(run_dir: str | Path, name: str | None = None) -> tuple[nn.Module, dict]:
    """The student ``name`` of a run, built from the run's config, its weights loaded, in eval
    mode on the CPU; with a dict describing it (``list_students``'s keys, plus ``kwargs``,
    ``input_shape``, ``num_classes``, ``data``, ``weights`` and ``selected_by``).

    ``name`` is a stamp name (``distilled-labels1-seed0``), a peer name (``peer0``: that peer's
    distilled student with the best validation accuracy), or None: the distilled student with the
    best validation accuracy. Ties go to the larger labeled fraction, then the lower seed, then
    the name; without validation scores that order alone decides. Test accuracy never does."""
    model, info, _ = load_run_student(Path(run_dir), name)
    return model, info


def run_dir_config(run: Path) -> RunConfig:
    """The config a run directory was written with; a folder without one is refused."""
    if not (run / "config.yaml").is_file():
        raise DataError(f"'{run}' is not a run directory (no config.yaml); give the folder `softkd run` or "
                        "`softkd demo` wrote.")
    return load_config(run / "config.yaml")


def _students(run: Path, config: RunConfig) -> list[dict]:
    metrics = run / "metrics.jsonl"
    best = best_validation(metrics) if metrics.is_file() else {}
    found = []
    for weights in sorted((run / "students").glob("*.safetensors")):
        try:
            r = json.loads(weights.with_suffix(".json").read_text())["result"]
            kind, fraction, seed = r["kind"], float(r["labeled_fraction"]), int(r["seed"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a student whose stage never finished
        peer = r.get("student")
        found.append({"name": weights.stem, "kind": kind, "fraction": fraction, "seed": seed, "peer": peer,
                      "model": r.get("model", config.student.model), "test_accuracy": r.get("accuracy"),
                      "val_accuracy": best.get((kind, fraction, peer or "", seed))})
    return sorted(found, key=lambda s: (s["kind"] != "distilled", s["peer"] or "", -s["fraction"], s["seed"]))


def _select(students: list[dict], name: str | None, run: Path) -> tuple[dict, str]:
    """The student ``name`` names (see :func:`load_student`) and how it was chosen."""
    if name is not None:
        name = name.removesuffix(".safetensors").removesuffix(".json")
        exact = [s for s in students if s["name"] == name]
        if exact:
            return exact[0], "chosen by name"
    pool = [s for s in students if s["kind"] == "distilled" and (name is None or s["peer"] == name)]
    if name is not None and not pool:
        peers = sorted({s["peer"] for s in students if s["peer"]})
        names = [s["name"] for s in students] + peers
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise UnknownNameError(f"No student '{name}' in '{run}'; {hint}available: {', '.join(names) or 'none'}.")
    if not pool:
        raise DataError(f"'{run}' holds no distilled student yet; finish the run, or name a student with --student.")
    ranked = sorted(pool, key=lambda s: (s["val_accuracy"] is None, -(s["val_accuracy"] or 0.0), -s["fraction"],
                                         s["seed"], s["name"]))
    top, what = ranked[0], f"{len(pool)} distilled student(s)" + (f" of {name}" if name else "")
    if top["val_accuracy"] is None:
        return top, f"no validation scores among {what}: the one with most labels, then lowest seed"
    return top, f"best validation accuracy ({100 * top['val_accuracy']:.2f}%) among {what}"


def load_run_student(run: Path, name: str | None) -> tuple[nn.Module, dict, Splits]:
    """:func:`load_student`, with the run's data splits it was built for."""
    config = run_dir_config(run)
    entry, selected_by = _select(_students(run, config), name, run)
    splits = run_splits(config.data)
    shape, classes = splits.train.input_shape, splits.train.num_classes
    model = build_run_student(config, entry, input_shape=shape, num_classes=classes)
    weights = run / "students" / f"{entry['name']}.safetensors"
    load_weights(model, weights)
    # The peers of a cohort other than the first are built without the student's kwargs unless
    # they share its architecture (see Mutual.build_students).
    kwargs = config.student.kwargs if entry["model"] == config.student.model else {}
    info = {**entry, "kwargs": kwargs, "input_shape": tuple(shape), "num_classes": classes, "data": config.data.name,
            "weights": str(weights), "selected_by": selected_by}
    return model.eval().cpu(), info, splits


def build_run_student(config: RunConfig, entry: dict, *, input_shape, num_classes: int) -> nn.Module:
    """The untrained architecture of the run's student ``entry`` (a :func:`list_students` item),
    built the way the pipeline builds it: the config's student, or the method's peer of that name.
    The global random state is left as it was."""
    built = build_run_students(config, build_method(config.method), seed=entry["seed"],
                               input_shape=tuple(input_shape), num_classes=num_classes)
    peer = entry["peer"] or ""
    if peer not in built:
        raise DataError(f"The student '{entry['name']}' names peer '{peer}', which the run's method does not build "
                        f"(it builds {', '.join(map(repr, built))}); was config.yaml edited after the run?")
    return built[peer].cpu()
