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
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from softkd.config import RunConfig, dump_config
from softkd.data.augment import build_augment
from softkd.data.datasets import Splits, keep_labels, run_splits
from softkd.data.loader import build_loader
from softkd.errors import ConfigError
from softkd.evaluate.metrics import classification_metrics, predict
from softkd.evaluate.speed import footprint, time_models
from softkd.models.weights import load_weights, save_weights
from softkd.models.teacher import Teacher
from softkd.models.loading import check_num_classes, resolve_model
from softkd.models.zoo import count_params
from softkd.report.run_log import RunLog, summary_writer
from softkd.methods import build_method
from softkd.report.summary import build_report, write_report
from softkd.preflight import check_out_dir, warn_about_settings
from softkd.cache.for_run import feature_caches, features_cached, open_or_build
from softkd.stages import StudentStages, build_run_students, checkpoint_folder, predict_in_shares, read_stamp, stage_hash, write_stamp
from softkd.train.loop import fit
from softkd.train.distributed import Distributed
from softkd.train.runtime import deterministic_algorithms, inference_batch_size, select_device
from softkd.utils import atomic_write_text, cpu_threads, hold_folder

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
    check_out_dir(out_dir)
    with _runtime(config), ExitStack() as stack:
        splits, teachers = _prepare(config)  # bad data, names or checkpoints fail before a file is written
        out = stack.enter_context(_run_dir(config, out_dir, resume=resume))
        with RunLog(out, progress, total=_count_epochs(config), tensorboard=config.output.tensorboard) as logger:
            teacher_key = _teacher_stage(config, teachers, splits, out, logger, resume)
            teachers = [Teacher(t) for t in teachers]
            method = build_method(config.method, teachers=teachers)
            each_test = [predict_in_shares(t, splits.test, dist) for t in teachers]
            teacher_test_logits = (method.combined_teacher_logits([logits for logits, _ in each_test]) if teachers
                                   else None)
            stages = StudentStages(config, method, splits, teachers, teacher_key, teacher_test_logits, out, logger,
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
        teacher_eval = stages.test_metrics(teacher_test_logits, test_labels, teacher=False) if teachers else None
        speed = _measure_speed(config, method, teachers, splits) if config.output.latency else None
        report = build_report(config, method, teacher_evals, teacher_eval, runs, splits, speed=speed)
        if config.teacher is not None and config.teacher.checkpoint:  # a loaded teacher's record, as a trained
            loaded = teacher_evals[0]                                 # one's (never read back: nothing to reuse)
            record = {"model": loaded["model"], "params": loaded["params"], "data": config.data.name,
                      "checkpoint": config.teacher.checkpoint,
                      "test": {k: loaded[k] for k in ("accuracy", "nll", "ece")}}
            dist.on_main(lambda: write_stamp(out / "teacher.json", teacher_key, record))
        # The run directory is complete before any process returns.
        _save_config(config, out)
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
    if config.teacher is None:
        raise ConfigError(f"This config has no teacher to train: method '{config.method.name}' trains without one "
                          "(run it with `softkd run`).")
    if config.teacher.checkpoint:
        raise ConfigError(f"teacher.checkpoint is set ('{config.teacher.checkpoint}'): that teacher is already "
                          "trained, so 'softkd teacher' has nothing to do; remove teacher.checkpoint to train one, "
                          "or use `softkd run` to distill it.")
    check_out_dir(out_dir)
    with _runtime(config), ExitStack() as stack:
        splits, teachers = _prepare(config, load=False)
        out = stack.enter_context(_run_dir(config, out_dir, resume=resume, students=False))
        with RunLog(out, progress, total=config.teacher.epochs, tensorboard=config.output.tensorboard) as logger:
            _teacher_stage(config, teachers, splits, out, logger, resume)
        _save_config(config, out)
        Distributed().barrier()  # teacher.json is written
        return json.loads((out / "teacher.json").read_text())["result"]


def build_cache(config: RunConfig, *, out_dir: str | Path, progress=None) -> list[SoftLabelCache]:
    """Only the cache stage (``softkd cache build``): each teacher (loaded from its
    ``checkpoint`` or trained into ``out_dir``) runs once over the transfer set, its shards split
    across processes under torchrun / accelerate launch. Returns the caches, in teacher order, then
    a feature method's feature caches (one per teacher layer) when its features are cached."""
    if not config.teacher_list:
        raise ConfigError(f"Method '{config.method.name}' trains without a teacher: there is no soft-label cache to build.")
    check_out_dir(out_dir)
    with _runtime(config), ExitStack() as stack:
        splits, teachers = _prepare(config)
        out = stack.enter_context(_run_dir(config, out_dir))
        with RunLog(out, progress, total=_teacher_epochs(config)) as logger:
            _teacher_stage(config, teachers, splits, out, logger)
            caches = [open_or_build(config, i, Teacher(t), splits, out, logger) for i, t in enumerate(teachers)]
            if build_method(config.method).needs == "features" and features_cached(config):
                caches += feature_caches(config, Teacher(teachers[0]), splits, out, logger)
            return caches


def check_run(config: RunConfig, *, out_dir: str | Path | None = None) -> dict:
    """Every check ``softkd run`` makes before it writes anything, without training: the output
    folder, the data read and split, each model built and run once on the data's shape, the
    teachers' checkpoints loaded, the method's own checks (e.g. a feature method's layer paths).
    Returns what was found, for ``softkd validate``."""
    if out_dir is not None:
        check_out_dir(out_dir)
    with _runtime(config):
        splits, teachers = _prepare(config)
    return {"train": len(splits.train), "val": len(splits.val) if splits.val is not None else 0,
            "test": len(splits.test), "classes": splits.train.num_classes, "input_shape": splits.train.input_shape,
            "teachers": [{"model": t.model, "params": count_params(m), "checkpoint": t.checkpoint}
                         for t, m in zip(config.teacher_list, teachers)]}


def _prepare(config: RunConfig, *, load: bool = True):
    """The splits and the teachers (weights loaded from their checkpoints), on the run's device."""
    if config.output.tensorboard:
        summary_writer()  # missing package: fail before anything is written
    d = config.data
    splits = run_splits(d)
    shape, classes = splits.train.input_shape, splits.train.num_classes
    warn_about_settings(config, splits)
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


def _measure_speed(config: RunConfig, method, teachers: list, splits: Splits) -> dict | None:
    """Latency and throughput of the teacher(s) and of each student architecture on this machine
    (untrained copies: the time does not depend on the weights), measured by the main process
    while the others wait, so they do not compete for its cores; every process gets the figures."""
    dist = Distributed()
    shape, classes = splits.train.input_shape, splits.train.num_classes

    def measure():
        students = build_run_students(config, method, seed=0, input_shape=shape, num_classes=classes)
        specs = method.student_specs(config.student.model)
        models = {("teacher" if len(teachers) == 1 else f"teacher{i}"): t for i, t in enumerate(teachers)}
        models.update({specs[name]: s for name, s in students.items()})
        device = select_device(config.train.device)
        timing = time_models({k: m.to(device) for k, m in models.items()}, shape,
                             reference="teacher" if len(teachers) == 1 else None)
        timing["models"] = {k: {**footprint(models[k]), **t} for k, t in timing["models"].items()}
        return timing

    mine = measure() if dist.is_main else None
    return next((s for s in dist.gather_object(mine) if s is not None), None)


@contextmanager
def _run_dir(config: RunConfig, out_dir: str | Path, *, resume: bool = False, students: bool = True):
    """The run directory with the config (and ``students/``, unless only a teacher is trained),
    held by the main process until the block ends: a second run into the same folder is refused
    before it writes anything. A resumed run keeps the config it has until it finishes
    (:func:`_save_config`): a resume refused for changed settings changes nothing."""
    out = Path(out_dir)
    dist = Distributed()
    with ExitStack() as held:

        def create() -> None:
            try:
                (out / "students" if students else out).mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a race with another process, a full or read-only disk
                raise ConfigError(f"Cannot create the output folder '{out}': {exc.strerror}; give --out (or "
                                  "output.dir) another folder.") from None
            held.enter_context(hold_folder(out, "the run folder"))
            if not (resume and (out / "config.yaml").is_file()):
                atomic_write_text(out / "config.yaml", dump_config(config))

        dist.on_main(create)  # every process reads the folder as the main process left it
        yield out


def _save_config(config: RunConfig, out: Path) -> None:
    """The config the finished run ran with (a resumed run's is written only now)."""
    Distributed().on_main(lambda: atomic_write_text(out / "config.yaml", dump_config(config)))


def teacher_key(config: RunConfig) -> str:
    """The stage key of the teacher a run trains: its data and teacher settings."""
    return stage_hash(config.data.key(exclude={"labeled_fraction"}), _teacher_key(config.teacher))


def _teacher_key(t, mode: str = "python") -> dict:
    """The trained teacher's settings (without augmentation when it has none, so the teachers
    trained before ``teacher.augment`` existed stay up to date)."""
    return t.model_dump(mode=mode, exclude={"checkpoint"} | ({"augment"} if t.augment is None else set()))


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
    key = teacher_key(config)
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
        augment=build_augment(t.augment, shift=config.data.shift, seed=config.data.seed),
        log_every=config.train.log_every, cuda_graphs=config.train.cuda_graphs,
        checkpoint_dir=checkpoint_folder(config, out / "teacher.ckpt", resume), resume=resume,
        checkpoint_every=config.train.checkpoint_every, keep_last=config.train.keep_last,
        run_key={"data": config.data.key(mode="json", exclude={"labeled_fraction"}),
                 "teacher": _teacher_key(t, mode="json")})

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


@contextmanager
def _runtime(config: RunConfig):
    """The process-wide torch settings a command runs under, restored afterwards."""
    with cpu_threads(config.train.threads), deterministic_algorithms(config.train.deterministic):
        yield


def _teacher_epochs(config: RunConfig) -> int:
    return 0 if config.teachers is not None or config.teacher is None else config.teacher.epochs


def _count_epochs(config: RunConfig) -> int:
    method = build_method(config.method)
    peers = len(method.student_specs(config.student.model))
    runs = len(method.candidates()) if method.searches else 1  # a search trains every candidate
    students = len(config.data.fractions) * len(config.train.seeds) * (peers + runs)  # cohort run(s), N scratch
    return _teacher_epochs(config) + students * config.train.epochs
