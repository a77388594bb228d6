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
from softkd.train.distill import distill
from softkd.train.loop import fit
from softkd.train.distributed import Distributed
from softkd.train.runtime import deterministic_algorithms, inference_batch_size, resident, select_device
from softkd.utils import atomic_write_text, cpu_threads

if TYPE_CHECKING:
    from softkd.cache import SoftLabelCache

KINDS = ("scratch", "distilled")
STAMP_FORMAT = 2  # stage stamps written by softkd 0.2 (0.1's have no "format")


def run_experiment(config: RunConfig, *, out_dir: str | Path, progress=None, resume: bool = False) -> dict:
    """Run ``config`` into ``out_dir`` (config.yaml, metrics.jsonl, teacher.safetensors and
    teacher.json, students/, report.json, report.md), reusing stages already there that match.
    With ``train.checkpoint_every`` each student run saves full state as it goes, and ``resume``
    continues an interrupted one from its last checkpoint. Returns the report. ``progress`` is
    an optional rich Progress.

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
            test_labels = each_test[0][1]
            teacher_test_logits = method.combined_teacher_logits([logits for logits, _ in each_test])
            transfer_logits = None  # the teachers' pass over the transfer set, shared by every run
            runs = []
            for fraction in config.data.fractions:
                transfer = keep_labels(splits.train, fraction, seed=config.data.seed)
                for seed in config.train.seeds:
                    for kind in KINDS:
                        name = f"{kind}-labels{fraction:g}-seed{seed}"
                        distilled = kind == "distilled"
                        cache_key = config.cache.model_dump(exclude={"dir", "shard_size", "views"})
                        key = _hash(teacher_key, _data_key(config), kind, fraction, seed, config.student,
                                    _train_key(config),
                                    method.key() if distilled else None, cache_key if distilled else None,
                                    *_augment_key(config))
                        stamp = out / "students" / f"{name}.json"
                        result = _read_stamp(stamp, key)
                        if result is None:
                            _note_stale(stamp, logger)
                            if distilled and transfer_logits is None and method.needs == "logits":
                                transfer_logits = _transfer_logits(config, teachers, splits, out, logger)
                            log = logger.bind(stage=kind, labeled_fraction=fraction, seed=seed)
                            resume_from = _checkpoints(config, out / "students" / f"{name}.ckpt", resume)
                            run_key = {"teacher": teacher_key, "kind": kind, "labeled_fraction": fraction,
                                       "student": config.student.model_dump(mode="json"), "train": _train_key(config)}
                            student = _train_student(kind, config, splits, transfer, teachers, transfer_logits,
                                                     seed, log, checkpoint_dir=resume_from, resume=resume,
                                                     run_key=run_key)
                            logits, _ = _predict_in_shares(student, splits.test, dist)
                            result = {
                                "kind": kind, "labeled_fraction": fraction, "seed": seed,
                                "num_labeled": transfer.num_labeled, "transfer_size": len(transfer),
                                **classification_metrics(logits, test_labels),
                                **teacher_metrics(logits, teacher_test_logits), "params": count_params(student),
                            }
                            dist.on_main(lambda: _save_student(out, name, student, key, result, resume_from))
                        else:
                            logger.skip(config.train.epochs, f"{name} (up to date)")
                        runs.append(result)
        teacher_evals = [{"model": t.model, "params": count_params(m), **classification_metrics(logits, test_labels)}
                         for t, m, (logits, _) in zip(config.teacher_list, teachers, each_test)]
        report = build_report(config, method, teacher_evals, classification_metrics(teacher_test_logits, test_labels),
                              runs, splits)
        # The run directory is complete before any process returns.
        dist.on_main(lambda: write_report(report, out))
        return report


def train_teacher(config: RunConfig, *, out_dir: str | Path, progress=None, resume: bool = False) -> dict:
    """Only the teacher stage: config.yaml, metrics.jsonl, teacher.safetensors (the best
    validation epoch; teacher-last.safetensors after every epoch while training) and teacher.json
    with its test metrics, which it returns. An up-to-date teacher in ``out_dir`` is kept.
    Trains data-parallel under torchrun / accelerate launch (see :func:`run_experiment`)."""
    if config.teachers is not None:
        raise ConfigError("'softkd teacher' trains the one 'teacher:' of a config; train each of 'teachers:' with a "
                          "config of its own and give its checkpoint.")
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
    across processes under torchrun / accelerate launch. Returns the caches, in teacher order."""
    with _runtime(config):
        splits, teachers = _prepare(config)
        out = _open_run_dir(config, out_dir)
        with RunLog(out, progress, total=_teacher_epochs(config)) as logger:
            _teacher_stage(config, teachers, splits, out, logger)
            return [_open_or_build_cache(config, i, Teacher(t), splits, out, logger) for i, t in enumerate(teachers)]


def _transfer_logits(config: RunConfig, teachers: list[Teacher], splits: Splits, out: Path,
                     logger) -> torch.Tensor | None:
    """The teachers' raw logits on the transfer set, in its order: (N, C) for one teacher, (N, M, C)
    for M, with a view axis after N for augmented views; from the soft-label caches, or computed
    here when the cache is off; None when the teachers must run on every augmented batch."""
    if not config.cache.enabled:
        if config.data.augment is not None:
            return None
        loader = build_loader(splits.train, batch_size=inference_batch_size(teachers[0]))
        each = [t.predict_logits(loader) for t in teachers]
    else:
        each = []
        positions = torch.arange(len(splits.train))
        for i, teacher in enumerate(teachers):
            cache = _open_or_build_cache(config, i, teacher, splits, out, logger)
            each.append(cache.logits(positions) if cache.views == 1 else
                        torch.stack([cache.logits(positions, view=v) for v in range(cache.views)], 1))  # (N, K, C)
    return each[0] if config.teachers is None else torch.stack(each, -2)


def _open_or_build_cache(config: RunConfig, index: int, teacher: Teacher, splits: Splits, out: Path,
                         logger) -> SoftLabelCache:
    from softkd.cache import CacheError, SoftLabelCache, fingerprint, ids_sha256

    d = config.data
    augment = _augment(config)
    expected = fingerprint(
        teacher=teacher, dtype=config.cache.dtype, top_k=config.cache.top_k, views=config.cache.views,
        augment_seed=augment.seed if augment is not None else None,
        preprocessing={"augment": augment.describe()} if augment is not None else None,
        data={"name": d.name, "path": d.path, "unlabeled_path": d.unlabeled_path, "split": "train",
              "val_fraction": d.val_fraction, "seed": d.seed, "n": len(splits.train),
              "ids_sha256": ids_sha256(splits.train.ids)},
    )
    folder, shared = _cache_folder(config, index, out)
    if (folder / "manifest.json").exists():
        try:
            return SoftLabelCache.open(folder, fingerprint=expected)
        except CacheError:
            if shared:  # someone else's cache: never replace it behind their back
                raise
    logger.skip(0, "teacher → soft-label cache")
    return SoftLabelCache.build(folder, teacher, splits.train, fingerprint=expected, dtype=config.cache.dtype,
                                top_k=config.cache.top_k, views=config.cache.views,
                                view_fn=augment if config.cache.views > 1 else None,
                                shard_size=config.cache.shard_size, overwrite=not shared,
                                batch_size=inference_batch_size(teacher))


def _cache_folder(config: RunConfig, index: int, out: Path) -> tuple[Path, bool]:
    """Teacher ``index``'s cache folder, and whether it is shared (named in the config: never
    replaced). One teacher: ``cache.dir`` or ``<run>/cache``; several: each one's ``cache_dir``,
    else ``teacher<i>`` inside those."""
    own = config.teacher_list[index].cache_dir if config.teachers is not None else None
    if own is not None:
        return Path(own), True
    base = Path(config.cache.dir) if config.cache.dir is not None else out / "cache"
    return (base / f"teacher{index}" if config.teachers is not None else base), config.cache.dir is not None


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


def _save_student(out: Path, name: str, student, key: str, result: dict, resume_from: Path | None) -> None:
    save_weights(student, out / "students" / f"{name}.safetensors")
    _write_stamp(out / "students" / f"{name}.json", key, result)
    if resume_from is not None:  # finished: its weights and stamp replace them
        shutil.rmtree(resume_from, ignore_errors=True)


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
    if config.teachers is not None:
        logger.skip(0, f"{len(teachers)} teachers (loaded)")
        return _hash("checkpoints", [hashlib.sha256(Path(t.checkpoint).read_bytes()).hexdigest()
                                     for t in config.teachers])
    t, teacher = config.teacher, teachers[0]
    if t.checkpoint:
        logger.skip(t.epochs, "teacher (loaded)")
        return _hash("checkpoint", hashlib.sha256(Path(t.checkpoint).read_bytes()).hexdigest())
    key = _hash(config.data.model_dump(exclude={"labeled_fraction"}), t.model_dump(exclude={"checkpoint"}))
    weights = out / "teacher.safetensors"
    if _read_stamp(out / "teacher.json", key) is not None and weights.is_file():
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
        _write_stamp(out / "teacher.json", key, {"model": t.model, "params": count_params(teacher),
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


def _train_student(kind, config: RunConfig, splits: Splits, transfer, teachers, transfer_logits, seed: int, log,
                   **checkpointing):
    """The same architecture, initialisation, data and budget; only the objective differs."""
    torch.manual_seed(seed)
    student = resolve_model(config.student.model, input_shape=splits.train.input_shape,
                            num_classes=splits.train.num_classes, kwargs=config.student.kwargs)
    train = config.train
    device = select_device(train.device)
    student = student.to(device)
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
        views = config.cache.views if augment is not None and config.cache.enabled else None
        return fit(student, transfer, augment=augment, views=views, **budget).model
    return distill(student, teachers, transfer, method=config.method, teacher_logits=transfer_logits,
                   augment=augment, **budget).model


def _data_key(config: RunConfig) -> dict:
    """The data a student trains and is validated on (a loaded teacher's key does not cover it)."""
    return config.data.model_dump(mode="json", exclude={"labeled_fraction", "augment", "shift"})


def _augment(config: RunConfig):
    return build_augment(config.data.augment, shift=config.data.shift, seed=config.data.seed)


def _augment_key(config: RunConfig) -> list:
    """Augmentation settings for a student's stamp (nothing without augmentation, so runs
    stamped before augmentation existed stay valid)."""
    if config.data.augment is None:
        return []
    views = config.cache.views if config.cache.enabled else None
    return [{"augment": config.data.augment, "shift": config.data.shift, "views": views}]


def _train_key(config: RunConfig) -> dict:
    """Training settings that change what a student learns (not how often it is checkpointed, nor
    threads or deterministic algorithms, which only change how the arithmetic is scheduled)."""
    return config.train.model_dump(mode="json", exclude={"seeds", "threads", "checkpoint_every", "keep_last",
                                                         "log_every", "deterministic", "cuda_graphs"})


@contextmanager
def _runtime(config: RunConfig):
    """The process-wide torch settings a command runs under, restored afterwards."""
    with cpu_threads(config.train.threads), deterministic_algorithms(config.train.deterministic):
        yield


def _hash(*parts) -> str:
    def plain(part):
        return part.model_dump(mode="json") if hasattr(part, "model_dump") else part

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_stamp(path: Path, key: str):
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stamp.get("result") if stamp.get("key") == key else None


def _write_stamp(path: Path, key: str, result: dict) -> None:
    atomic_write_text(path, json.dumps({"key": key, "format": STAMP_FORMAT, "result": result}, indent=2))


def _note_stale(path: Path, logger: RunLog) -> None:
    """Say so when a student is trained again because softkd 0.1 wrote its stamp (0.2 changed
    every distilled student's key: the method's own parameters are in it)."""
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if "format" not in stamp:
        logger.note(f"{path.stem}: written by softkd 0.1 with the old method settings; training it again.")


def _teacher_epochs(config: RunConfig) -> int:
    return 0 if config.teachers is not None else config.teacher.epochs


def _count_epochs(config: RunConfig) -> int:
    students = len(config.data.fractions) * len(config.train.seeds) * len(KINDS)
    return _teacher_epochs(config) + students * config.train.epochs
