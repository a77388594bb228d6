"""The ``softkd`` command: a thin layer that parses arguments and calls the library.

Every error a user can cause prints one line and exits with code 2 (``SOFTKD_DEBUG=1`` shows the
traceback).
"""

from __future__ import annotations

import functools
import os
import sys
from importlib import resources
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from softkd.errors import DataError, SoftKDError, first_line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="softkd: knowledge distillation with honest baselines.")
console = Console()
errors = Console(stderr=True)

SET_HELP = "Override a config key, e.g. --set method.temperature=2 (repeatable)."


def _user_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SoftKDError as exc:
            if os.environ.get("SOFTKD_DEBUG") == "1":
                raise
            # An error every process raised together (Distributed.together) is printed once.
            if not getattr(exc, "shared", False) or os.environ.get("RANK", "0") == "0":
                errors.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_user_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory (a fresh -2, -3... if it is taken)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Run the whole pipeline on the bundled digits data: teacher, then scratch vs distilled
    students (3 seeds, all labels and 10% labels), and print the comparison.

    Example: softkd demo --set method.temperature=2
    """
    from softkd.config import load_config

    with resources.as_file(resources.files("softkd") / "recipes" / "demo.yaml") as recipe:
        config = load_config(recipe, set_)
    _run(config, out)


@app.command()
@_user_errors
def run(
    config: Path = typer.Argument(..., help="YAML run config (see configs/)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, help="Run directory; default output.dir or runs/<config name>."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted student run from its last "
                                "checkpoint (needs train.checkpoint_every)."),
):
    """Run a config: train (or load) the teacher, produce and validate soft labels, train the
    scratch and distilled students for every seed and regime, evaluate, and write the report.
    Stages already in the run directory for the same settings are reused, not rerun.

    Example: softkd run configs/soft-target-mlp16_from_tinycnn32-digits.yaml --set train.seeds=[0]
    """
    from softkd.config import load_config

    cfg = load_config(config, set_)
    _run(cfg, out or Path(cfg.output.dir or Path("runs") / config.stem), reuse=True, resume=resume)


@app.command()
@_user_errors
def teacher(
    config: Path = typer.Argument(..., help="YAML run config; its data and teacher sections are used."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, help="Output folder; default runs/<config name>-teacher."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint (train.checkpoint_every)."),
):
    """Train only the teacher and save it (teacher.safetensors, teacher.json with test metrics),
    for later runs to load with teacher.checkpoint. An up-to-date teacher in --out is kept.

    Example: softkd teacher configs/teacher-resnet64-fashion-mnist.yaml --out teachers/resnet64
    """
    from softkd.config import load_config
    from softkd.pipeline import train_teacher

    cfg = load_config(config, set_)
    target = out or Path("runs") / f"{config.stem}-teacher"
    with _progress() as progress:
        summary = train_teacher(cfg, out_dir=target, progress=progress, resume=resume)
    test = summary["test"]
    console.print(f"Teacher {summary['model']} ({summary['params']:,} params) on {summary['data']}: "
                  f"test accuracy {100 * test['accuracy']:.2f}%, ECE {test['ece']:.3f}. Saved to "
                  f"{target / 'teacher.safetensors'}")


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=errors, transient=True, disable=int(os.environ.get("RANK", "0")) > 0)


def _run(config, out: Path, *, reuse: bool = False, resume: bool = False) -> None:
    """``reuse``: run into ``out`` as it is, skipping up-to-date stages (``run``); otherwise into
    a fresh folder beside it (``demo``)."""
    from softkd.pipeline import run_experiment
    from softkd.report.summary import table_rows
    from softkd.train.distributed import Distributed
    from softkd.utils import fresh_dir

    if not reuse:  # every process of a data-parallel run must use the main process's choice
        dist = Distributed()
        out = dist.broadcast_object(fresh_dir(out) if dist.is_main else None)
    with _progress() as progress:
        report = run_experiment(config, out_dir=out, progress=progress, resume=resume)
    students = ", ".join(report["students"])
    source = f"← {report['teacher']['model']}" if "teacher" in report else f"({report['method']['name']}, no teacher)"
    table = Table(title=f"{students} {source} on {report['data']['name']}: test accuracy % "
                        f"({report['data']['test']} samples), mean ± std over {len(report['seeds'])} seed(s)")
    rows = table_rows(report)
    # Student in the title, params and verdict as sentences below: the rest fits 80 columns.
    headers = ["labels", "teacher", "scratch", "distilled", "gap rec.", "agree s→d", "ECE s→d"]
    table.box, table.padding = None, (0, 1)
    for header in headers:
        table.add_column(header, no_wrap=True)
    for row in rows:
        cells = [row[1].removesuffix(" labels"), *row[2:-2]]
        if len(report["students"]) > 1:
            cells[0] = f"{row[0].split(' ')[0]} {cells[0]}"
        table.add_row(*(cell.replace(" → ", "→") for cell in cells))
    console.print(table)
    for row in rows:
        params = "student / teacher" if "teacher" in report else "student"
        console.print(f"{row[0]}, {row[1]}: {row[-1]} (params {params}: {row[-2]})", highlight=False)
    console.print(f"Run directory: {out} (config.yaml, metrics.jsonl, report.json, report.md)")


@app.command()
@_user_errors
def validate(
    path: Path = typer.Argument(..., help="A YAML run config, or soft labels (.npy, .npz or .pt; shape (N, C))."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Check a run config without running it, or check that a soft-label file is a feasible
    distribution (finite, in [0, 1], rows summing to 1).

    Examples: softkd validate configs/soft-target-mlp16_from_tinycnn32-digits.yaml;
    softkd validate soft_labels.npy
    """
    if path.suffix in (".npy", ".npz", ".pt"):
        from softkd.losses.logits import validate_soft_targets

        soft = validate_soft_targets(_load_array(path))
        console.print(f"OK: {path} holds {soft.shape[0]} feasible soft-label rows over {soft.shape[-1]} classes.")
        return
    from softkd.config import load_config

    cfg = load_config(path, set_)
    teachers = ("teachers " if cfg.teachers else "teacher ") + ", ".join(t.model for t in cfg.teacher_list) \
        if cfg.teacher_list else "no teacher"
    console.print(f"OK: {path} is a valid run config (data {cfg.data.name}, {teachers}, "
                  f"student {cfg.student.model}, method {cfg.method.name}).")


def _load_array(path: Path):
    import numpy as np
    import torch

    if not path.is_file():
        raise DataError(f"File '{path}' not found.")
    try:
        if path.suffix == ".pt":
            value = torch.load(path, weights_only=True)
        else:
            value = np.load(path, allow_pickle=False)
            if path.suffix == ".npz":
                keys = list(value.keys())
                key = "soft_targets" if "soft_targets" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise DataError(f"'{path}' holds arrays {keys}; name the soft labels 'soft_targets'.")
                value = value[key]
    except (ValueError, OSError, RuntimeError, EOFError) as exc:
        raise DataError(f"Cannot read '{path}': {first_line(exc)}") from None
    if isinstance(value, dict) or not hasattr(value, "shape"):
        raise DataError(f"'{path}' must hold one (N, C) array of soft labels; got {type(value).__name__}.")
    return torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value


@app.command("ls")
@_user_errors
def ls(what: str = typer.Argument("models", help="models, datasets, methods or layers"),
       model: Optional[str] = typer.Argument(None, help="for layers: a zoo name or 'package.module:factory'"),
       input_shape: str = typer.Option("1,28,28", "--input-shape", help="for layers: one sample's shape"),
       classes: int = typer.Option(10, "--classes", help="for layers: the number of classes")):
    """List the registered models (with parameter counts for 1×28×28 inputs and 10 classes),
    datasets or methods; `softkd ls layers MODEL` prints a model's module paths (what a feature
    method taps) with each one's output shape.

    Example: softkd ls layers resnet-64 --input-shape 1,28,28"""
    from softkd.data.datasets import DATASETS
    from softkd.methods import METHODS
    from softkd.models.zoo import MODELS

    registries = {"models": MODELS, "datasets": DATASETS, "methods": METHODS}
    if what == "layers":
        _list_layers(model, input_shape, classes)
        return
    if what not in registries:
        raise SoftKDError(f"Cannot list '{what}'; use one of: {', '.join(registries)}, layers MODEL.")
    registry = registries[what]
    if what == "methods":
        _list_methods(registry)
        return
    for name in registry.names():
        aliases = [a for a, target in registry.aliases().items() if target == name]
        line = name + (f"  (alias: {', '.join(aliases)})" if aliases else "")
        if what == "models":
            from softkd.models.zoo import build_model, count_params

            sizes = [f"{example} {count_params(build_model(example, input_shape=(1, 28, 28), num_classes=10)):,}"
                     for example in registry.examples(name)]
            line = f"{line:<16} params: {', '.join(sizes)}"
        console.print(line, highlight=False)


def _list_layers(model: str | None, input_shape: str, classes: int) -> None:
    import torch

    from softkd.models.loading import resolve_model
    from softkd.models.taps import layer_table

    if not model:
        raise SoftKDError("Name the model: softkd ls layers MODEL (e.g. softkd ls layers tinycnn-16).")
    try:
        shape = tuple(int(d) for d in input_shape.split(","))
    except ValueError:
        raise SoftKDError(f"--input-shape must be comma-separated sizes such as 1,28,28; got {input_shape!r}.") from None
    net = resolve_model(model, input_shape=shape, num_classes=classes)
    for path, kind, out in layer_table(net, torch.zeros(2, *shape)):
        console.print(f"{path:<24} {kind:<20} {'not called' if out is None else '×'.join(map(str, out))}",
                      highlight=False)


NEEDS_TEXT = {"logits": "teacher logits (soft-label cache or live teacher)",
              "features": "a live teacher's intermediate features", "none": "no teacher"}


def _list_methods(registry) -> None:
    """Each method: name and aliases, one line, what it needs, and its parameters."""
    from softkd.methods.base import parameter_table

    for name in registry.names():
        cls = registry.resolve(name)[0]
        aliases = [a for a, target in registry.aliases().items() if target == name]
        teachers = {"one": "one teacher", "several": "several teachers", "none": "no teacher"}[cls.teachers_needed]
        console.print(f"{name}" + (f"  (alias: {', '.join(aliases)})" if aliases else ""), style="bold",
                      highlight=False)
        console.print(f"  {cls.summary}", highlight=False)
        needs = NEEDS_TEXT[cls.needs] + ("" if cls.needs == "none" else f"; {teachers}")
        console.print(f"  needs: {needs}", highlight=False)
        for param, default, bounds, description in parameter_table(cls):
            console.print(f"    {param:<12} default {default:<8} {bounds}", highlight=False)
            if description:
                console.print(f"      {description}", highlight=False)


data_app = typer.Typer(no_args_is_help=True, help="Datasets: fetch them into the user cache.")
app.add_typer(data_app, name="data")


@data_app.command("fetch")
@_user_errors
def data_fetch(
    name: str = typer.Argument(..., help="fashion-mnist or mnist"),
    dest: Optional[Path] = typer.Option(None, help="Folder for the files; default ~/.cache/softkd/<name>."),
    base_url: Optional[str] = typer.Option(None, help="A mirror folder URL holding the same files."),
):
    """Download a dataset's files, verify their sha256, and resume a partial download.

    Example: softkd data fetch fashion-mnist
    """
    from softkd.data.download import fetch

    with _progress() as progress:
        tasks = {}

        def report(file_name, done, total):
            if file_name not in tasks:
                tasks[file_name] = progress.add_task(file_name, total=total)
            progress.update(tasks[file_name], completed=done)

        folder = fetch(name, dest, base_url=base_url, progress=report)
    console.print(f"{name}: files verified in {folder}")


cache_app = typer.Typer(no_args_is_help=True, help="The soft-label cache: the teacher's logits, computed once.")
app.add_typer(cache_app, name="cache")


@cache_app.command("build")
@_user_errors
def cache_build(
    config: Path = typer.Argument(..., help="YAML run config (its data, teacher and cache sections)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, help="Run directory; default output.dir or runs/<config name>."),
):
    """Run the teacher once over the transfer set and store its raw logits (cache.dir, or the
    run directory's cache/) and, for method feature, its tapped features (<cache>/features/<path>/).
    An interrupted build resumes from its finished shards.

    Example: softkd cache build configs/soft-target-tinycnn16_from_resnet64-fashion-mnist.yaml
    """
    from softkd.config import load_config
    from softkd.pipeline import build_cache

    cfg = load_config(config, set_)
    with _progress() as progress:
        caches = build_cache(cfg, out_dir=out or Path(cfg.output.dir or Path("runs") / config.stem),
                             progress=progress)
    for cache in caches:
        _print_cache_info(cache.info())


@cache_app.command("verify")
@_user_errors
def cache_verify(folder: Path = typer.Argument(..., help="A cache folder (holding manifest.json).")):
    """Re-hash every shard against the manifest; a damaged shard is named (exit 2)."""
    from softkd.cache import SoftLabelCache

    cache = SoftLabelCache.open(folder)
    cache.verify()
    console.print(f"OK: {folder}: {len(cache.manifest['shards'])} shard(s) match their sha256.")


@cache_app.command("info")
@_user_errors
def cache_info(folder: Path = typer.Argument(..., help="A cache folder (holding manifest.json).")):
    """Show what a cache holds and what it was built from."""
    from softkd.cache import SoftLabelCache

    _print_cache_info(SoftLabelCache.open(folder).info())


def _print_cache_info(info: dict) -> None:
    for key in ("folder", "samples", "classes", "views", "dtype", "top_k", "shards", "bytes", "bytes_per_sample",
                "version", "created"):
        console.print(f"{key:>16}: {info.get(key)}", highlight=False)
    fp = info.get("fingerprint", {})
    console.print(f"{'teacher_sha256':>16}: {fp.get('teacher_sha256')}", highlight=False)
    console.print(f"{'data':>16}: {fp.get('data')}", highlight=False)


def main() -> None:
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun / accelerate launch the main process reports
        console.quiet = True
    try:
        app()
    finally:
        # The process group the command started goes before the interpreter does (see
        # softkd.train.distributed); without one, nothing to do and torch is not imported.
        if "softkd.train.distributed" in sys.modules:
            sys.modules["softkd.train.distributed"].shutdown()


if __name__ == "__main__":
    main()
