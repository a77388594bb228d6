"""The whole experiment a run config describes: teacher → soft labels → scratch and distilled
students for every regime and seed → evaluation → report. ``softkd run`` and ``softkd demo``
call :func:`run_experiment`; everything here is also reachable piece by piece from Python.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from softkd.config import RunConfig, dump_config
from softkd.data.datasets import Splits, build_dataset, keep_labels
from softkd.data.loader import build_loader
from softkd.evaluate.metrics import classification_metrics, predict, teacher_metrics
from softkd.models.checkpoint import load_weights, save_weights
from softkd.models.teacher import Teacher
from softkd.models.zoo import build_model, count_params
from softkd.report.summary import build_report, write_report
from softkd.train.distill import distill
from softkd.train.loop import fit
from softkd.utils import atomic_write_text, cpu_threads


def run_experiment(config: RunConfig, *, out_dir: str | Path, progress=None) -> dict:
    """Run ``config`` and write ``out_dir`` (config.yaml, metrics.jsonl, teacher weights,
    report.json, report.md). Returns the report. ``progress`` is an optional rich Progress."""
    with cpu_threads(config.train.threads):
        return _run(config, Path(out_dir), progress)


def _run(config: RunConfig, out: Path, progress) -> dict:
    # Everything a user can get wrong (data, model names, checkpoint) fails before a file is written.
    splits, teacher = _prepare(config)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(config))
    task = progress.add_task("softkd", total=_count_epochs(config)) if progress is not None else None
    with (out / "metrics.jsonl").open("w") as metrics_file:

        def logger(**tags):
            def log(record: dict) -> None:
                metrics_file.write(json.dumps({**tags, **record}) + "\n")
                metrics_file.flush()
                if progress is not None:
                    progress.update(task, advance=1, description=_describe_job(tags, record))
            return log

        if config.teacher.checkpoint:
            if progress is not None:
                progress.update(task, advance=config.teacher.epochs)
        else:
            _fit_teacher(config, teacher, splits, out, logger(stage="teacher"))
        teacher = Teacher(teacher)
        test_batches = build_loader(splits.test, batch_size=1024)
        teacher_logits, test_labels = predict(teacher, test_batches)
        teacher_eval = classification_metrics(teacher_logits, test_labels)
        runs = []
        for fraction in config.data.fractions:
            transfer = keep_labels(splits.train, fraction, seed=config.data.seed)
            for seed in config.train.seeds:
                for kind in ("scratch", "distilled"):
                    log = logger(stage=kind, labeled_fraction=fraction, seed=seed)
                    student = _train_student(kind, config, splits, transfer, teacher, seed, log)
                    logits, _ = predict(student, test_batches)
                    runs.append({
                        "kind": kind, "labeled_fraction": fraction, "seed": seed,
                        "num_labeled": transfer.num_labeled, "transfer_size": len(transfer),
                        **classification_metrics(logits, test_labels), **teacher_metrics(logits, teacher_logits),
                        "params": count_params(student),
                    })
    report = build_report(config, teacher_eval, count_params(teacher), runs, splits)
    write_report(report, out)
    return report


def train_teacher(config: RunConfig, *, out_dir: str | Path, progress=None) -> dict:
    """Only the teacher stage: writes config.yaml, metrics.jsonl, teacher.safetensors (the best
    validation epoch; teacher-last.safetensors after every epoch while training) and teacher.json
    with its test metrics. Returns those metrics."""
    with cpu_threads(config.train.threads):
        splits, teacher = _prepare(config, load=False)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(config))
        task = progress.add_task("teacher", total=config.teacher.epochs) if progress is not None else None
        with (out / "metrics.jsonl").open("w") as metrics_file:
            def log(record):
                metrics_file.write(json.dumps({"stage": "teacher", **record}) + "\n")
                metrics_file.flush()
                if progress is not None:
                    progress.update(task, advance=1, description=_describe_job({"stage": "teacher"}, record))
            _fit_teacher(config, teacher, splits, out, log)
        logits, labels = predict(teacher, build_loader(splits.test, batch_size=1024))
        summary = {"model": config.teacher.model, "params": count_params(teacher), "data": config.data.name,
                   "test": classification_metrics(logits, labels)}
        atomic_write_text(out / "teacher.json", json.dumps(summary, indent=2))
        return summary


def _prepare(config: RunConfig, *, load: bool = True):
    splits = build_dataset(config.data.name, val_fraction=config.data.val_fraction, seed=config.data.seed,
                           data_dir=config.data.dir)
    torch.manual_seed(config.data.seed)
    teacher = build_model(config.teacher.model, input_shape=splits.train.input_shape,
                          num_classes=splits.train.num_classes)
    if load and config.teacher.checkpoint:
        load_weights(teacher, config.teacher.checkpoint)
    return splits, teacher


def _fit_teacher(config: RunConfig, teacher, splits: Splits, out: Path, log) -> None:
    def log_and_keep(record: dict) -> None:
        save_weights(teacher, out / "teacher-last.safetensors")  # a long run killed midway keeps its epochs
        log(record)

    t = config.teacher
    fit(teacher, splits.train, val_data=splits.val, epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay,
        batch_size=t.batch_size, lr_schedule=t.lr_schedule, seed=config.data.seed, log=log_and_keep)
    save_weights(teacher, out / "teacher.safetensors")
    (out / "teacher-last.safetensors").unlink(missing_ok=True)


def _train_student(kind, config: RunConfig, splits: Splits, transfer, teacher, seed: int, log):
    """The same architecture, initialisation, data and budget; only the objective differs."""
    torch.manual_seed(seed)
    student = build_model(config.student.model, input_shape=splits.train.input_shape,
                          num_classes=splits.train.num_classes)
    train = config.train
    budget = dict(val_data=splits.val, epochs=train.epochs, max_steps=train.max_steps, batch_size=train.batch_size,
                  optimizer=train.optimizer, lr=train.lr, weight_decay=train.weight_decay,
                  patience=train.patience, lr_schedule=train.lr_schedule, seed=seed, log=log)
    if kind == "scratch":
        return fit(student, transfer, **budget).model
    return distill(student, teacher, transfer, temperature=config.method.temperature,
                   beta=config.method.beta, **budget).model


def _count_epochs(config: RunConfig) -> int:
    students = len(config.data.fractions) * len(config.train.seeds) * 2
    return config.teacher.epochs + students * config.train.epochs


def _describe_job(tags: dict, record: dict) -> str:
    name = tags["stage"]
    if "seed" in tags:
        name += f" {tags['labeled_fraction']:.0%} labels seed {tags['seed']}"
    acc = record.get("val_accuracy")
    return f"{name:<34} epoch {record['epoch']:>3}" + (f"  val acc {acc:.3f}" if acc is not None else "")
