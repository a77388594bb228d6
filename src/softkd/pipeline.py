"""The whole experiment a run config describes: teacher → soft labels → scratch and distilled
students for every regime and seed → evaluation → report. ``softkd run`` and ``softkd demo``
call :func:`run_experiment`; everything here is also reachable piece by piece from Python.

Each stage leaves a stamp (the hash of the config it depends on) beside its outputs; running
again into the same folder skips every stage whose stamp matches, so a changed config reruns
only what it affects.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from softkd.config import RunConfig, dump_config
from softkd.data.augment import build_augment
from softkd.data.datasets import Splits, keep_labels, load_splits
from softkd.data.loader import build_loader
from softkd.errors import ConfigError
from softkd.evaluate.metrics import classification_metrics, predict, teacher_metrics
from softkd.models.weights import load_weights, save_weights
from softkd.models.teacher import Teacher
from softkd.models.loading import check_num_classes, resolve_model
from softkd.models.zoo import count_params
from softkd.report.run_log import RunLog, summary_writer
from softkd.methods import build_method
from softkd.report.summary import build_report, write_report
from softkd.cache.for_run import feature_caches, features_cached, open_or_build, transfer_logits
from softkd.stages import augment_key, data_key, note_stale, read_stamp, stage_hash, train_key, write_stamp
from softkd.train.distill import distill
from softkd.train.loop import fit
from softkd.train.distributed import Distributed
from softkd.train.runtime import deterministic_algorithms, inference_batch_size, resident, select_device
from softkd.utils import atomic_write_text, cpu_threads

if TYPE_CHECKING:
    from softkd.cache import SoftLabelCache

KINDS = ("scratch", "distilled")


def run_experiment(config: RunConfig, *, out_dir: str | Path, progress=None, resume: bool = False) -> dict:
    """Run ``config`` into ``out_dir`` (config.yaml, metrics.jsonl, teacher.safetensors and
    teacher.json, students/, report.json, report.md), reusing stages already there that match.
    With ``train.checkpoint_every`` each student run saves full state as it goes, and ``resume``
    continues an interrupted one from its last checkpoint. Returns the report. ``progress`` is
    an optional rich Progress.

    Every student the method trains (one; or each peer of a mutual-learning cohort, trained
    together) is saved as ``students/distilled[-<name>]-labels<f>-seed<s>`` beside its own scratch
    twin (``scratch[-<name>]-...``: the same architecture, initial weights, data and budget).

    Under torchrun / accelerate launch every process runs this with the same arguments: each
    student trains data-parallel, the soft-label cache is built in shards across processes,
    and only the main process writes the run directory (the others get the same report)."""
    dist = Distributed()
    with _runtime(config):
        splits, teachers = _prepare(config)  # bad data, names or checkpoints fail before a file is written
        out = _open_run_dir(config, out_dir)
        with RunLog(out, progress, total=_count_epochs(config), tensorboard=config.output.tensorboard) as logger:
            teacher_key = _teacher_stage(config, teachers, splits, out, logger, resume)
            teachers = [Teacher(t) for t in teachers]
            method = build_method(config.method, teachers=teachers)
            each_test = [_predict_in_shares(t, splits.test, dist) for t in teachers]
            teacher_test_logits = (method.combined_teacher_logits([logits for logits, _ in each_test]) if teachers
                                   else None)
            stages = _StudentStages(config, method, splits, teachers, teacher_key, teacher_test_logits, out, logger,
                                    resume)
            runs = []
            for fraction in config.data.fractions:
                transfer = keep_labels(splits.train, fraction, seed=config.data.seed)
                for seed in config.train.seeds:
                    for kind in KINDS:
                        runs += stages.run(kind, transfer, fraction, seed)
        test_labels = splits.test.y
        teacher_evals = [{"model": t.model, "params": count_params(m), **classification_metrics(logits, test_labels)}
                         for t, m, (logits, _) in zip(config.teacher_list, teachers, each_test)]
        teacher_eval = classification_metrics(teacher_test_logits, test_labels) if teachers else None
        report = build_report(config, method, teacher_evals, teacher_eval, runs, splits)
        # The run directory is complete before any process returns.
        dist.on_main(lambda: write_report(report, out))
        return report


class _StudentStages:
    """The student stages of one experiment: for each regime, seed and kind, every student the
    method trains (stamped, trained when its stamp does not match, evaluated on the test split)."""

    def __init__(self, config, method, splits, teachers, teacher_key, teacher_test_logits, out, logger, resume):
        self.config, self.method, self.splits, self.teachers = config, method, splits, teachers
        self.teacher_key, self.teacher_test_logits = teacher_key, teacher_test_logits
        self.out, self.logger, self.resume = out, logger, resume
        self.specs = method.student_specs(config.student.model)
        self.transfer_logits = None  # the teachers' pass over the transfer set, shared by every run
        self.transfer_features = None  # a feature method's cached teacher features (see cache/for_run.py)

    def run(self, kind: str, transfer, fraction: float, seed: int) -> list[dict]:
        """Scratch: each student's twin, one run each. Distilled: one run trains them all."""
        if kind == "scratch":
            return [r for name in self.specs for r in self._stage(kind, transfer, fraction, seed, [name])]
        return self._stage(kind, transfer, fraction, seed, list(self.specs))

    def _stage(self, kind, transfer, fraction, seed, names) -> list[dict]:
        config, method, dist = self.config, self.method, Distributed()
        distilled = kind == "distilled"
        cache_key = config.cache.model_dump(exclude={"dir", "shard_size", "views", "features"})
        if method.needs == "features":  # cached (fp16) or live features: the same run, not the same arithmetic
            cache_key["features"] = features_cached(config)
        files = {name: f"{kind}{'-' + name if name else ''}-labels{fraction:g}-seed{seed}" for name in names}
        keys = {name: stage_hash(self.teacher_key, data_key(config), kind, fraction, seed, config.student,
                                 train_key(config), method.key() if distilled else None,
                                 cache_key if distilled else None, *augment_key(config),
                                 *([{"student": name, "model": self.specs[name]}] if name else []))
                for name in names}
        stamps = {name: self.out / "students" / f"{files[name]}.json" for name in names}
        results = [read_stamp(stamps[name], keys[name]) for name in names]
        if all(r is not None for r in results):
            for name in names:
                self.logger.skip(config.train.epochs if name == names[0] else 0, f"{files[name]} (up to date)")
            return results
        for name in names:
            note_stale(stamps[name], self.logger)
        features = method.needs == "features" and features_cached(config)
        if distilled and self.transfer_logits is None and (method.needs == "logits" or features):
            self.transfer_logits = transfer_logits(config, self.teachers, self.splits, self.out, self.logger)
        if distilled and self.transfer_features is None and features:
            caches = feature_caches(config, self.teachers[0], self.splits, self.out, self.logger)
            self.transfer_features = [cache.rows() for cache in caches]
        twin = {"student": names[0]} if not distilled and names[0] else {}  # a peer's scratch twin
        log = self.logger.bind(stage=kind, labeled_fraction=fraction, seed=seed, **twin)
        resume_from = _checkpoints(config, self.out / "students" / f"{files[names[0]]}.ckpt", self.resume)
        run_key = {"teacher": self.teacher_key, "kind": kind, "labeled_fraction": fraction,
                   "student": config.student.model_dump(mode="json"), "train": train_key(config), **twin}
        trained = _train_students(kind, config, method, self.splits, transfer, self.teachers, self.transfer_logits,
                                  self.transfer_features, seed, log, names, checkpoint_dir=resume_from,
                                  resume=self.resume, run_key=run_key)
        results = []
        for name in names:
            student = trained[name]
            logits, labels = _predict_in_shares(student, self.splits.test, dist)
            result = {"kind": kind, "labeled_fraction": fraction, "seed": seed,
                      **({"student": name, "model": self.specs[name]} if name else {}),
                      "num_labeled": transfer.num_labeled, "transfer_size": len(transfer),
                      **classification_metrics(logits, labels),
                      **(teacher_metrics(logits, self.teacher_test_logits) if self.teachers else {}),
                      "params": count_params(student)}
            dist.on_main(lambda: _save_student(self.out, files[name], student, keys[name], result))
            results.append(result)
        if resume_from is not None and dist.is_main:  # finished: the weights and stamps replace it
            shutil.rmtree(resume_from, ignore_errors=True)
        return results


def train_teacher(config: RunConfig, *, out_dir: str | Path, progress=None, resume: bool = False) -> dict:
    """Only the teacher stage: config.yaml, metrics.jsonl, teacher.safetensors (the best
    validation epoch; teacher-last.safetensors after every epoch while training) and teacher.json
    with its test metrics, which it returns. An up-to-date teacher in ``out_dir`` is kept.
    Trains data-parallel under torchrun / accelerate launch (see :func:`run_experiment`)."""
    if config.teachers is not None:
        raise ConfigError("'softkd teacher' trains the one 'teacher:' of a config; train each of 'teachers:' with a "
                          "config of its own and give its checkpoint.")
    if config.teacher is None:
        raise ConfigError(f"This config has no teacher to train: method '{config.method.name}' trains without one "
                          "(run it with `softkd run`).")
    with _runtime(config):
        splits, teachers = _prepare(config, load=False)
        out = _open_run_dir(config, out_dir)
        with RunLog(out, progress, total=config.teacher.epochs, tensorboard=config.output.tensorboard) as logger:
            _teacher_stage(config, teachers, splits, out, logger, resume)
        Distributed().barrier()  # teacher.json is written
        return json.loads((out / "teacher.json").read_text())["result"]


def build_cache(config: RunConfig, *, out_dir: str | Path, progress=None) -> list[SoftLabelCache]:
    """Only the cache stage (``softkd cache build``): each teacher (loaded from its
    ``checkpoint`` or trained into ``out_dir``) runs once over the transfer set, its shards split
    across processes under torchrun / accelerate launch. Returns the caches, in teacher order, then
    a feature method's feature caches (one per teacher layer) when its features are cached."""
    if not config.teacher_list:
        raise ConfigError(f"Method '{config.method.name}' trains without a teacher: there is no soft-label cache to build.")
    with _runtime(config):
        splits, teachers = _prepare(config)
        out = _open_run_dir(config, out_dir)
        with RunLog(out, progress, total=_teacher_epochs(config)) as logger:
            _teacher_stage(config, teachers, splits, out, logger)
            caches = [open_or_build(config, i, Teacher(t), splits, out, logger) for i, t in enumerate(teachers)]
            if build_method(config.method).needs == "features" and features_cached(config):
                caches += feature_caches(config, Teacher(teachers[0]), splits, out, logger)
            return caches


def _prepare(config: RunConfig, *, load: bool = True):
    """The splits and the teachers (weights loaded from their checkpoints), on the run's device."""
    if config.output.tensorboard:
        summary_writer()  # missing package: fail before anything is written
    d = config.data
    splits = load_splits(d.name, path=d.path, test_path=d.test_path, unlabeled_path=d.unlabeled_path,
                         label_column=d.label_column, data_dir=d.dir, val_fraction=d.val_fraction,
                         test_fraction=d.test_fraction, seed=d.seed)
    shape, classes = splits.train.input_shape, splits.train.num_classes
    if config.cache.top_k is not None and config.cache.top_k > classes:
        raise ConfigError(f"The 'cache.top_k' must be <= the data's {classes} classes; got {config.cache.top_k} "
                          "(use top_k: null to store all logits).")
    if config.teachers is not None and load:
        missing = [i for i, t in enumerate(config.teachers) if not t.checkpoint]
        if missing:
            raise ConfigError(f"teachers[{missing[0]}] has no checkpoint: a run with several teachers loads each one; "
                              "train it first with `softkd teacher` (a config with it as 'teacher:').")
    torch.manual_seed(config.data.seed)
    teachers = []
    for i, t in enumerate(config.teacher_list):
        role = "teacher" if config.teachers is None else f"teachers[{i}]"
        teacher = resolve_model(t.model, input_shape=shape, num_classes=classes, kwargs=t.kwargs)
        check_num_classes(teacher, input_shape=shape, num_classes=classes, role=role)
        if load and t.checkpoint:
            load_weights(teacher, t.checkpoint)
        teachers.append(teacher.to(select_device(config.train.device)))
    student = resolve_model(config.student.model, input_shape=shape, num_classes=classes, kwargs=config.student.kwargs)
    check_num_classes(student, input_shape=shape, num_classes=classes, role="student")
    build_method(config.method).check_models(student, teachers)  # e.g. a feature method's layer paths
    return splits, teachers


def _predict_in_shares(model, data, dist: Distributed) -> tuple[torch.Tensor, torch.Tensor]:
    """predict() over ``data``, each process taking a contiguous share (a teacher's pass over
    the test set is the largest fixed cost of a multi-process run); every process gets it all."""
    share = -(-len(data) // dist.world)
    start, stop = min(dist.rank * share, len(data)), min((dist.rank + 1) * share, len(data))
    mine = None
    if stop > start:
        part = data if dist.world == 1 else data.subset(torch.arange(start, stop))
        mine = predict(model, build_loader(part, batch_size=inference_batch_size(model)))
    parts = [p for p in dist.gather_object(mine) if p is not None]
    return torch.cat([logits for logits, _ in parts]), torch.cat([labels for _, labels in parts])


def _save_student(out: Path, name: str, student, key: str, result: dict) -> None:
    save_weights(student, out / "students" / f"{name}.safetensors")
    write_stamp(out / "students" / f"{name}.json", key, result)


def _open_run_dir(config: RunConfig, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    dist = Distributed()

    def create() -> None:
        (out / "students").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(config))

    dist.on_main(create)  # every process reads the folder as the main process left it
    return out


def _teacher_stage(config: RunConfig, teachers: list, splits: Splits, out: Path, logger: RunLog,
                   resume: bool = False) -> str:
    """Train the teacher unless it was loaded or an up-to-date one is in ``out``; returns its key
    (several teachers: all loaded, the key of their checkpoints)."""
    if not teachers:
        logger.skip(0, f"no teacher (method '{config.method.name}' trains without one)")
        return stage_hash("no teacher")
    if config.teachers is not None:
        logger.skip(0, f"{len(teachers)} teachers (loaded)")
        return stage_hash("checkpoints", [hashlib.sha256(Path(t.checkpoint).read_bytes()).hexdigest()
                                     for t in config.teachers])
    t, teacher = config.teacher, teachers[0]
    if t.checkpoint:
        logger.skip(t.epochs, "teacher (loaded)")
        return stage_hash("checkpoint", hashlib.sha256(Path(t.checkpoint).read_bytes()).hexdigest())
    key = stage_hash(config.data.model_dump(exclude={"labeled_fraction"}), t.model_dump(exclude={"checkpoint"}))
    weights = out / "teacher.safetensors"
    if read_stamp(out / "teacher.json", key) is not None and weights.is_file():
        load_weights(teacher, weights)
        logger.skip(t.epochs, "teacher (up to date)")
        return key

    log = logger.bind(stage="teacher")
    dist = Distributed()

    def log_and_keep(record: dict) -> None:  # fit() logs on the main process only
        if record.get("kind") != "step":
            save_weights(teacher, out / "teacher-last.safetensors")  # a long run killed midway keeps its epochs
        log(record)

    fit(teacher, splits.train, val_data=splits.val, epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay,
        batch_size=t.batch_size, lr_schedule=t.lr_schedule, seed=config.data.seed, log=log_and_keep,
        log_every=config.train.log_every, cuda_graphs=config.train.cuda_graphs,
        checkpoint_dir=_checkpoints(config, out / "teacher.ckpt", resume), resume=resume,
        checkpoint_every=config.train.checkpoint_every, keep_last=config.train.keep_last,
        run_key={"data": config.data.model_dump(mode="json", exclude={"labeled_fraction"}),
                 "teacher": t.model_dump(mode="json", exclude={"checkpoint"})})

    def save() -> None:
        save_weights(teacher, weights)
        (out / "teacher-last.safetensors").unlink(missing_ok=True)
        shutil.rmtree(out / "teacher.ckpt", ignore_errors=True)
        logits, labels = predict(teacher, build_loader(splits.test, batch_size=inference_batch_size(teacher)))
        write_stamp(out / "teacher.json", key, {"model": t.model, "params": count_params(teacher),
                                                 "data": config.data.name,
                                                 "test": classification_metrics(logits, labels)})

    dist.on_main(save)
    return key


def _checkpoints(config: RunConfig, folder: Path, resume: bool) -> Path | None:
    """The student run's checkpoint folder when checkpoints are on; a fresh start clears it."""
    if config.train.checkpoint_every is None:
        return None
    if not resume and Distributed().is_main:
        shutil.rmtree(folder, ignore_errors=True)
    return folder


def _train_students(kind, config: RunConfig, method, splits: Splits, transfer, teachers, transfer_logits,
                    transfer_features, seed: int, log, names: list[str], **checkpointing) -> dict:
    """The students ``names`` of one stage, trained, by name: each from the same initial weights and
    with the same data and budget as its twin of the other kind; only the objective differs."""
    torch.manual_seed(seed)
    first = resolve_model(config.student.model, input_shape=splits.train.input_shape,
                          num_classes=splits.train.num_classes, kwargs=config.student.kwargs)
    train = config.train
    device = select_device(train.device)
    first = first.to(device)
    transfer, val, transfer_logits = resident(device, transfer, splits.val, transfer_logits)
    budget = dict(val_data=val, epochs=train.epochs, max_steps=train.max_steps, batch_size=train.batch_size,
                  accumulate=train.accumulate, optimizer=train.optimizer, lr=train.lr,
                  weight_decay=train.weight_decay, momentum=train.momentum, nesterov=train.nesterov,
                  lr_schedule=train.lr_schedule, warmup_steps=train.warmup_steps,
                  clip_grad_norm=train.clip_grad_norm, precision=train.precision, cuda_graphs=train.cuda_graphs,
                  patience=train.patience, monitor=train.monitor, seed=seed,
                  checkpoint_every=train.checkpoint_every, keep_last=train.keep_last, log=log,
                  log_every=train.log_every, **checkpointing)
    augment = _augment(config)
    if kind == "scratch":  # the same views as the distilled student
        student = first if names == [""] else method.build_students(
            first, seed=seed, input_shape=splits.train.input_shape, num_classes=splits.train.num_classes)[names[0]]
        views = config.cache.views if augment is not None and config.cache.enabled else None
        return {names[0]: fit(student, transfer, augment=augment, views=views, **budget).model}
    return distill(first, teachers, transfer, method=config.method, teacher_logits=transfer_logits,
                   teacher_features=transfer_features, augment=augment, **budget).students


def _augment(config: RunConfig):
    return build_augment(config.data.augment, shift=config.data.shift, seed=config.data.seed)


@contextmanager
def _runtime(config: RunConfig):
    """The process-wide torch settings a command runs under, restored afterwards."""
    with cpu_threads(config.train.threads), deterministic_algorithms(config.train.deterministic):
        yield


def _teacher_epochs(config: RunConfig) -> int:
    return 0 if config.teachers is not None or config.teacher is None else config.teacher.epochs


def _count_epochs(config: RunConfig) -> int:
    peers = len(build_method(config.method).student_specs(config.student.model))
    students = len(config.data.fractions) * len(config.train.seeds) * (peers + 1)  # one cohort run, N scratch
    return _teacher_epochs(config) + students * config.train.epochs
