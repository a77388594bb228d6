"""Commands that train: demo, run, teacher."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from softkd.cli import SET_HELP, _progress, _user_errors, app, console, load_user_config, set_help


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
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML run config (see configs/)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, help="Run directory; default output.dir or runs/<config name>."),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue an interrupted student run from its last checkpoint (needs "
                                "train.checkpoint_every)."),
):
    """Run a config: train (or load) the teacher, produce and validate soft labels, train the
    scratch and distilled students for every seed and regime, evaluate, and write the report.
    Stages already in the run directory for the same settings are reused, not rerun.

    Example: softkd run configs/soft-target-mlp16_from_tinycnn32-digits.yaml --set train.seeds=[0]
    """
    cfg = load_user_config(config, set_)
    _run(cfg, out or Path(cfg.output.dir or Path("runs") / config.stem), reuse=True, resume=resume)


@app.command()
@_user_errors
def teacher(
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML run config; its data and teacher sections are used."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=set_help("teacher.epochs=10")),
    out: Optional[Path] = typer.Option(None, help="Output folder; default runs/<config name>-teacher."),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue from the last checkpoint (train.checkpoint_every)."),
):
    """Train only the teacher and save it (teacher.safetensors, teacher.json with test metrics),
    for later runs to load with teacher.checkpoint. An up-to-date teacher in --out is kept.

    Example: softkd teacher configs/teacher-resnet64-fashion-mnist.yaml --out teachers/resnet64
    """
    from softkd.pipeline import train_teacher

    cfg = load_user_config(config, set_)
    target = out or Path("runs") / f"{config.stem}-teacher"
    with _progress() as progress:
        summary = train_teacher(cfg, out_dir=target, progress=progress, resume=resume)
    test = summary["test"]
    console.print(f"Teacher {summary['model']} ({summary['params']:,} params) on {summary['data']}: "
                  f"test accuracy {100 * test['accuracy']:.2f}%, ECE {test['ece']:.3f}. Saved to "
                  f"{target / 'teacher.safetensors'}")


def _run(config, out: Path, *, reuse: bool = False, resume: bool = False) -> None:
    """``reuse``: run into ``out`` as it is, skipping up-to-date stages (``run``); otherwise into
    a fresh folder beside it (``demo``)."""
    from softkd.pipeline import run_experiment
    from softkd.report.summary import headlines_of, table_rows
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
    for student, lines in headlines_of(report).items():
        for regime, line in lines.items():
            console.print(f"{student}, {regime}: {line}", highlight=False)
    console.print(f"Run directory: {out} (config.yaml, metrics.jsonl, report.json, report.md, report.html)", soft_wrap=True)
    console.print(f"Open the report: {(Path(out) / 'report.html').resolve().as_uri()}", highlight=False, soft_wrap=True)
