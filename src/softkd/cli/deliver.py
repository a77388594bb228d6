"""Commands that deliver a run's results: report, export, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from softkd.cli import _user_errors, app, console


@app.command()
@_user_errors
def report(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN_DIR", help="Run directories (each holding report.json)."),
    out: Optional[Path] = typer.Option(None, help="Where to write report.md and report.html; default the run "
                                       "directory for one, ./softkd-report for several."),
    figures: bool = typer.Option(False, "--figures",
                                 help="Also write every plot as a PNG file under figures/."),
):
    """Render report.md and one self-contained report.html (plots embedded, opens offline) from
    run directories. Several directories (seeds, methods, recipes) become one comparison: rows with
    the same data, teacher, method, student and regime are pooled over all their seeds.

    Example: softkd report runs/demo runs/demo-2 --out runs/compare
    """
    from softkd.report import render_reports

    for path in render_reports(run_dirs, out, figures=figures):
        console.print(f"Wrote {path}", highlight=False, soft_wrap=True)



@app.command()
@_user_errors
def export(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory (softkd run / softkd demo)."),
    format_: str = typer.Option("onnx", "--format", help="onnx, pt2 (torch.export) or safetensors (weights with "
                                "their construction in the metadata)."),
    student: Optional[str] = typer.Option(None, "--student", help="A student's name (see --list) or a peer name "
                                          "(its best distilled run); default: the distilled student with the best "
                                          "validation accuracy."),
    out: Optional[Path] = typer.Option(None, help="Output file or folder; default RUN_DIR/export/<student>.<ext>."),
    list_: bool = typer.Option(False, "--list", help="List the run's students and exit."),
):
    """Export one trained student alone (no adapters, peers or teacher), in eval mode on the CPU
    with a dynamic batch size. The export is run on the whole test split (batch 256, and batch 1
    on the first 64 samples) and written only if its top-1 predictions agree with the student's
    on >= 99.9 % of samples; the figures go to <file>.json beside it.

    Examples: softkd export runs/demo; softkd export runs/demo --list;
    softkd export runs/mutual --student peer1 --format pt2
    """
    from softkd.export import export_student
    from softkd.runs import list_students

    if list_:
        _list_students(list_students(run_dir))
        return
    result = export_student(run_dir, format=format_, student=student, out=out)
    console.print(f"Student {result['student']} ({result['model']}): {result['selected_by']}.", highlight=False)
    console.print(f"Exported to {result['path']} ({result['size_bytes'] / 1000:.1f} kB) with {result['exporter']}.",
                  highlight=False, soft_wrap=True)
    runner = {"onnx": "onnxruntime", "pt2": "the loaded program", "safetensors": "the rebuilt model"}[format_]
    console.print(f"Checked in {runner} on the test split ({result['test_samples']} samples at batch 256, the first "
                  f"{result['batch1_samples']} at batch 1) against the eager student:", highlight=False)
    console.print(f"  top-1 agreement {100 * result['agreement']:.2f}% (batch 1: "
                  f"{100 * result['agreement_batch1']:.2f}%), max |Δlogit| {result['max_abs_diff']:.2g}",
                  highlight=False)
    eager, exported = result["accuracy_eager"], result["accuracy_exported"]
    if eager is not None:
        delta = "identical" if exported == eager else f"exported {100 * (exported - eager):+.2f} points"
        console.print(f"  test accuracy {100 * eager:.2f}% eager, {100 * exported:.2f}% exported ({delta})",
                      highlight=False)
    if "speed" in result:
        speed, parts = result["speed"], []
        for batch in ("batch1", "batch256"):
            eager_ms, onnx_ms = (speed["models"][k][batch]["p50_ms"] for k in ("eager", "onnxruntime"))
            ratio = eager_ms / onnx_ms
            pace = f"{ratio:.1f}× faster" if ratio >= 1 else f"{1 / ratio:.1f}× slower"
            parts.append(f"batch {batch.removeprefix('batch')} {onnx_ms:.2f} ms against {eager_ms:.2f} ms ({pace})")
        console.print(f"onnxruntime against eager PyTorch, p50 on {speed['device']}: {'; '.join(parts)}",
                      highlight=False)
    console.print(f"Check written to {result['path']}.json", highlight=False, soft_wrap=True)


def _list_students(students: list[dict]) -> None:
    table = Table(box=None, padding=(0, 1))
    for header in ("student", "model", "labels", "seed", "val acc", "test acc"):
        table.add_column(header, no_wrap=True)

    def percent(value):
        return "n/a" if value is None else f"{100 * value:.2f}"

    for s in students:
        mark = " *" if s["default"] else ""
        table.add_row(s["name"] + mark, s["model"], f"{s['fraction']:.0%}", str(s["seed"]),
                      percent(s["val_accuracy"]), percent(s["test_accuracy"]))
    console.print(table)
    if any(s["default"] for s in students):
        console.print("* exported by default: the distilled student with the best validation accuracy", highlight=False)


@app.command()
@_user_errors
def evaluate(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="A run's students/<name>.safetensors or teacher.safetensors, an "
                                      "exported .onnx / .pt2 / .safetensors, or weights with --model."),
    data: str = typer.Option(..., "--data", help="A dataset name (softkd ls datasets) or a data path (.npz, .csv, "
                             "image folder); its test split is scored."),
    model: Optional[str] = typer.Option(None, "--model", help="The architecture (zoo name or "
                                        "'package.module:factory') of weights outside a run directory."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="A teacher checkpoint (found the same way): "
                                           "adds agreement and KL to it."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Where to write every metric as JSON (with "
                                            "per-class accuracy, confusion matrix, reliability bins); default "
                                            "beside the checkpoint as <CHECKPOINT>.eval.json."),
):
    """Score a saved model on a dataset's test split: accuracy, top-5, NLL, ECE, and with
    --teacher the top-1 agreement and KL(teacher ‖ model). A run's checkpoint is built from the
    run's config.yaml; an exported .onnx runs in onnxruntime.

    Examples: softkd evaluate runs/demo/export/distilled-labels1-seed0.onnx --data digits;
    softkd evaluate runs/demo/students/distilled-labels1-seed0.safetensors --data digits
    --teacher runs/demo/teacher.safetensors
    """
    import json

    from softkd.evaluate.checkpoint import evaluate_checkpoint
    from softkd.utils import atomic_write_text

    result = evaluate_checkpoint(checkpoint, data=data, model=model, teacher=teacher)
    m = result["metrics"]
    console.print(f"{checkpoint}: {result['architecture']}, on the {result['test_samples']} test samples of {data}",
                  highlight=False)
    table = Table(box=None, padding=(0, 1))
    table.add_column("metric", no_wrap=True)
    table.add_column("value", no_wrap=True, justify="right")

    def percent(value):
        return "n/a" if value is None else f"{100 * value:.2f}%"

    rows = [("accuracy", percent(m["accuracy"])), ("top-5", percent(m["top5"])),
            ("NLL", "n/a" if m["nll"] is None else f"{m['nll']:.4f}"),
            ("ECE", "n/a" if m["ece"] is None else f"{m['ece']:.4f}")]
    if "teacher" in result:
        rows += [("teacher accuracy", percent(result["teacher"]["accuracy"])),
                 ("agreement", percent(m["agreement"])), ("KL to teacher", f"{m['kl_to_teacher']:.4f}")]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    target = json_out or checkpoint.with_name(checkpoint.name + ".eval.json")
    atomic_write_text(target, json.dumps(result, indent=2))
    console.print(f"Metrics written to {target}", highlight=False)


@app.command()
@_user_errors
def cascade(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory with a teacher and a validation split."),
    student: Optional[str] = typer.Option(None, "--student", help="The first stage, named as in `softkd export "
                                          "--student`; default: the distilled student with the best validation "
                                          "accuracy. Its scratch twin gets a curve too."),
    target_accuracy: Optional[float] = typer.Option(None, "--target-accuracy", help="Validation accuracy to reach, "
                                                    "as a fraction (0.93): the fewest deferrals from which the curve "
                                                    "stays at or above it up to its best; default: the teacher's "
                                                    "validation accuracy."),
    max_teacher_fraction: Optional[float] = typer.Option(None, "--max-teacher-fraction", help="Defer at most this "
                                                         "share of inputs (0.1), with the best validation accuracy."),
    within: float = typer.Option(0.0, "--within", help="Aim at the teacher's validation accuracy less this many "
                                 "points (0.1): the default target, loosened."),
    confidence: str = typer.Option("max-prob", "--confidence", help="max-prob (largest softmax probability) or "
                                   "margin (top minus runner-up)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads while timing; default torch's."),
    budget: float = typer.Option(20.0, "--budget", help="Seconds each model is timed for, at most (the test split "
                                 "at batch 256)."),
    export_: bool = typer.Option(False, "--export",
                                 help="Also write RUN_DIR/export/cascade/ (two ONNX models and the threshold), "
                                 "checked against the PyTorch cascade on the test split."),
):
    """The student answers first and the teacher only where the student is unsure: choose the
    confidence threshold on the validation split (never the test split), then report on the test
    split the cascade's accuracy, share deferred and measured latency against the student alone
    and the teacher alone. Writes RUN_DIR/cascade/cascade.json and .png, and adds the cascade to
    the run's report.

    Examples: softkd cascade runs/demo; softkd cascade runs/demo --max-teacher-fraction 0.1 --export
    """
    from softkd.cascade import calibrate_run, export_cascade

    result = calibrate_run(run_dir, student=student, target_accuracy=target_accuracy,
                           max_teacher_fraction=max_teacher_fraction, within=within, confidence=confidence, threads=threads,
                           budget_s=budget)
    latency = result["latency"]
    table = Table(box=None, padding=(0, 1))
    for header in ("test split", "accuracy", "deferred", "ms/sample", "per s"):
        table.add_column(header, no_wrap=True)
    models = latency["models"]
    table.add_row(f"teacher {result['teacher']['model']}", f"{100 * result['teacher']['test_accuracy']:.2f}%", "100%",
                  f"{models['teacher']['ms_per_sample']:.3g}", f"{models['teacher']['throughput_per_s']:.0f}")
    for role, s in result["students"].items():
        alone = models[f"student {role}"]
        table.add_row(f"{role} {s['model']} alone", f"{100 * s['test_accuracy_alone']:.2f}%", "0%",
                      f"{alone['ms_per_sample']:.3g}", f"{alone['throughput_per_s']:.0f}")
        if "test" in s:
            t = s["test"]
            table.add_row(f"cascade ({role}, t={s['threshold']:.3f})", f"{100 * t['accuracy']:.2f}%",
                          f"{100 * t['fraction']:.1f}%", f"{t['ms_per_sample']:.3g}", f"{t['throughput_per_s']:.0f}")
    console.print(table)
    console.print(result["sentence"], highlight=False)
    console.print(result["comparison"], highlight=False)
    console.print(f"Timed at batch {latency['batch_size']} on {latency['batches']} test batches, "
                  f"{latency['threads']} thread(s), {latency['device']}. Wrote {run_dir / 'cascade' / 'cascade.json'}",
                  highlight=False)
    if export_:
        made = export_cascade(run_dir)
        check = made["check"]
        console.print(f"Exported to {made['path']}: predictions agree with the PyTorch cascade on "
                      f"{100 * check['agreement']:.2f}% of {check['test_samples']} test samples, deferrals on "
                      f"{100 * check['deferral_agreement']:.2f}%.", highlight=False, soft_wrap=True)
