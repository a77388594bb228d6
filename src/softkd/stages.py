"""A run's stages and their stamps: the hash of what a stage's output depends on, written beside
it, so that a run into the same folder skips every stage whose stamp matches and reruns only what
a changed config affects; and the student stages themselves — for each regime, seed and kind,
every student the method trains, trained when its stamp is stale and evaluated on the test split
(see :func:`softkd.pipeline.run_experiment`)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from softkd.cache.for_run import feature_caches, features_cached, transfer_logits
from softkd.config import RunConfig
from softkd.data.augment import augment_of
from softkd.data.datasets import Splits
from softkd.data.loader import build_loader
from softkd.evaluate.metrics import detailed_metrics, predict
from softkd.methods import build_method
from softkd.models.loading import resolve_model
from softkd.models.weights import load_weights, save_weights
from softkd.models.zoo import count_params
from softkd.train.distill import distill
from softkd.train.distributed import Distributed
from softkd.train.loop import FitResult, fit
from softkd.train.runtime import inference_batch_size, resident, select_device
from softkd.utils import atomic_write_bytes, atomic_write_text

STAMP_FORMAT = 2  # stage stamps written by softkd 0.2 (0.1's have no "format")


def data_key(config: RunConfig) -> dict:
    """The data a student trains and is validated on (a loaded teacher's key does not cover it)."""
    return config.data.key(mode="json", exclude={"labeled_fraction", "augment", "shift", "mixup_alpha"})


def augment_key(config: RunConfig) -> list:
    """Augmentation settings for a student's stamp (nothing without augmentation, so runs
    stamped before augmentation existed stay valid)."""
    if config.data.augment is None:
        return []
    views = config.cache.views if config.cache.enabled else None
    d = config.data
    mixup = {"mixup_alpha": d.mixup_alpha} if d.augment == "mixup" else {}
    return [{"augment": d.augment, "shift": d.shift, "views": views, **mixup}]


def train_key(config: RunConfig) -> dict:
    """Training settings that change what a student learns (not how often it is checkpointed, nor
    threads or deterministic algorithms, which only change how the arithmetic is scheduled)."""
    return config.train.model_dump(mode="json", exclude={"seeds", "threads", "checkpoint_every", "keep_last",
                                                         "log_every", "deterministic", "cuda_graphs"})


def stage_hash(*parts) -> str:
    def plain(part):
        return part.model_dump(mode="json") if hasattr(part, "model_dump") else part

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_stamp(path: Path, key: str):
    """The stage's result when ``path`` holds a stamp with ``key``; else None."""
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stamp.get("result") if stamp.get("key") == key else None


def write_stamp(path: Path, key: str, result: dict) -> None:
    atomic_write_text(path, json.dumps({"key": key, "format": STAMP_FORMAT, "result": result}, indent=2))


def note_stale(path: Path, logger) -> None:
    """Say so when a student is trained again because softkd 0.1 wrote its stamp (0.2 changed
    every distilled student's key: the method's own parameters are in it)."""
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if "format" not in stamp:
        logger.note(f"{path.stem}: written by softkd 0.1 with the old method settings; training it again.")


class StudentStages:
    """The student stages of one experiment: for each regime, seed and kind, every student the
    method trains (stamped, trained when its stamp does not match, evaluated on the test split)."""

    def __init__(self, config, method, splits, teachers, teacher_key, teacher_test_logits, out, logger, resume):
        self.config, self.method, self.splits, self.teachers = config, method, splits, teachers
        self.teacher_key, self.teacher_test_logits = teacher_key, teacher_test_logits
        self.out, self.logger, self.resume = out, logger, resume
        self.specs = method.student_specs(config.student.model)
        self.transfer_logits = None  # the teachers' pass over the transfer set, shared by every run
        self.transfer_features = None  # a feature method's cached teacher features (see cache/for_run.py)
        self.scratch = {}  # (fraction, seed) -> the scratch twin's result, which a search compares with

    def run(self, kind: str, transfer, fraction: float, seed: int) -> list[dict]:
        """Scratch: each student's twin, one run each. Distilled: one run trains them all; for a
        search (method auto), one run per candidate and the best on validation (after scratch)."""
        if kind == "scratch":
            results = [r for name in self.specs for r in self._stage(kind, transfer, fraction, seed, [name])]
            self.scratch[(fraction, seed)] = results
            return results
        if self.method.searches:
            return [self._search(transfer, fraction, seed)]
        return self._stage(kind, transfer, fraction, seed, list(self.specs))

    def _search(self, transfer, fraction: float, seed: int) -> dict:
        """Method auto: every candidate setting trained as a distilled student with the scratch
        twin's initial weights, data and budget; the distilled student is whichever of them and the
        scratch twin is best on the validation split (scratch on a tie). The test split plays no part."""
        (scratch,) = self.scratch[(fraction, seed)]
        tried = [(tag, self._stage("candidate", transfer, fraction, seed, [""], tag=tag,
                                   method=build_method(params, teachers=self.teachers))[0])
                 for tag, params in self.method.candidates()]
        chosen, best = best_on_validation([("scratch", scratch), *tried])
        search = {"chosen": chosen, "scratch_val_accuracy": scratch["val_accuracy"],
                  "scratch_train_s": scratch["train_s"], "runs": len(tried),
                  "train_s": sum(r["train_s"] for _, r in tried),
                  "candidates": [{"setting": tag, "method": r["method"], "val_accuracy": r["val_accuracy"],
                                  "train_s": r["train_s"]} for tag, r in tried]}
        source = self.out / "students" / f"{best['file']}.safetensors"
        result = {**{k: v for k, v in best.items() if k not in ("file", "key")}, "kind": "distilled",
                  "chosen": chosen, "method": best.get("method"), "search": search}
        file = f"distilled-labels{fraction:g}-seed{seed}"
        key = stage_hash("search", self.method.key(), [(tag, r["key"]) for tag, r in [("scratch", scratch), *tried]])
        if read_stamp(self.out / "students" / f"{file}.json", key) is None:
            def write():
                atomic_write_bytes(self.out / "students" / f"{file}.safetensors", source.read_bytes())
                write_stamp(self.out / "students" / f"{file}.json", key, {**result, "file": file})
            Distributed().on_main(write)
        return {**result, "file": file}

    def _stage(self, kind, transfer, fraction, seed, names, *, method=None, tag=None) -> list[dict]:
        """``kind`` scratch or distilled, or candidate: one setting of a search (``method``, named ``tag``)."""
        config, method, dist = self.config, method or self.method, Distributed()
        distilled = kind != "scratch"
        cache_key = config.cache.model_dump(exclude={"dir", "shard_size", "views", "features"})
        if method.needs == "features":  # cached (fp16) or live features: the same run, not the same arithmetic
            cache_key["features"] = features_cached(config)
        files = {name: f"{kind}{'-' + (tag or name) if (tag or name) else ''}-labels{fraction:g}-seed{seed}"
                 for name in names}

        def key_of(kind, name):
            return stage_hash(self.teacher_key, data_key(config), kind, fraction, seed, config.student,
                              train_key(config), method.key() if distilled else None,
                              cache_key if distilled else None, *augment_key(config),
                              *([{"student": name, "model": self.specs[name]}] if name else []))

        keys = {name: key_of(kind, name) for name in names}
        stamps = {name: self.out / "students" / f"{files[name]}.json" for name in names}
        results = [read_stamp(stamps[name], keys[name]) for name in names]
        if kind == "distilled" and names == [""] and results[0] is None:  # a search here may have trained it
            results = [self._from_search(files[""], keys[""], key_of("candidate", ""), fraction, seed)]
        if all(r is not None for r in results):
            for name in names:
                self.logger.skip(config.train.epochs if name == names[0] else 0, f"{files[name]} (up to date)")
            return [{**self._with_detail(r, name, files[name], keys[name], seed), "file": files[name], "key": keys[name]}
                    for r, name in zip(results, names)]
        for name in names:
            note_stale(stamps[name], self.logger)
        features = method.needs == "features" and features_cached(config)
        if distilled and self.transfer_logits is None and (method.needs == "logits" or features):
            self.transfer_logits = transfer_logits(config, self.teachers, self.splits, self.out, self.logger)
        if distilled and self.transfer_features is None and features:
            caches = feature_caches(config, self.teachers[0], self.splits, self.out, self.logger)
            self.transfer_features = [cache.rows() for cache in caches]
        twin = {"student": names[0]} if not distilled and names[0] else {}  # a peer's scratch twin
        setting = {"setting": tag} if tag else {}
        log = self.logger.bind(stage=kind, labeled_fraction=fraction, seed=seed, **twin, **setting)
        resume_from = checkpoint_folder(config, self.out / "students" / f"{files[names[0]]}.ckpt", self.resume)
        run_key = {"teacher": self.teacher_key, "kind": kind, "labeled_fraction": fraction,
                   "student": config.student.model_dump(mode="json"), "train": train_key(config), **twin, **setting}
        started = time.perf_counter()
        trained, fitted = train_students(kind, config, method, self.splits, transfer, self.teachers,
                                         self.transfer_logits, self.transfer_features, seed, log, names,
                                         checkpoint_dir=resume_from, resume=self.resume, run_key=run_key)
        train_s = time.perf_counter() - started + fitted.resumed_s  # a resumed run's earlier sittings count too
        results = []
        for name in names:
            student = trained[name]
            logits, labels = predict_in_shares(student, self.splits.test, dist)
            result = {"kind": kind, "labeled_fraction": fraction, "seed": seed,
                      **({"student": name, "model": self.specs[name]} if name else {}),
                      **({"setting": tag, "method": method.key()} if tag else {}),
                      "num_labeled": transfer.num_labeled, "transfer_size": len(transfer),
                      **self.test_metrics(logits, labels), **self._val_accuracy(student),
                      "params": count_params(student), "train_s": train_s,
                      "cpu_kernels": fitted.cpu_kernels}  # every sitting's: CPU results differ between them
            dist.on_main(lambda: save_student(self.out, files[name], student, keys[name], result))
            results.append({**result, "file": files[name], "key": keys[name]})
        if resume_from is not None and dist.is_main:  # finished: the weights and stamps replace it
            shutil.rmtree(resume_from, ignore_errors=True)
        return results

    def _from_search(self, file: str, key: str, candidate_key: str, fraction: float, seed: int) -> dict | None:
        """The distilled student ``file`` as an earlier search (method auto) into this folder trained
        it: the candidate whose stamp has this student's key but for the stage's kind (the same
        teacher, data, budget, seed, initial weights and method settings: the same training; auto
        runs its candidates as distilled students). Its weights and result become this student's
        stamp; None when no search trained it."""
        folder = self.out / "students"
        for stamp in sorted(folder.glob(f"candidate-*-labels{fraction:g}-seed{seed}.json")):
            found = read_stamp(stamp, candidate_key)
            weights = stamp.with_suffix(".safetensors")
            if found is None or not weights.is_file():
                continue
            result = {**{k: v for k, v in found.items() if k not in ("setting", "method")},
                      "kind": "distilled", "trained_as": stamp.stem}

            def write():
                atomic_write_bytes(folder / f"{file}.safetensors", weights.read_bytes())
                write_stamp(folder / f"{file}.json", key, result)
                shutil.rmtree(folder / f"{file}.ckpt", ignore_errors=True)  # a stopped run of it, now done
            Distributed().on_main(write)
            self.logger.note(f"{file}: the search's {stamp.stem} trained it (the same settings), reused")
            return result
        return None

    def test_metrics(self, logits, labels, *, teacher: bool = True) -> dict:
        """Accuracy, NLL, ECE (and agreement, KL to the teacher) flat, as the report aggregates
        them; top-5, per-class accuracy, confusion and reliability bins under ``detail``."""
        metrics = detailed_metrics(logits, labels, teacher_logits=self.teacher_test_logits if teacher else None)
        flat = ("accuracy", "nll", "ece", "agreement", "kl_to_teacher")
        return {**{k: metrics[k] for k in flat if k in metrics},
                "detail": {k: v for k, v in metrics.items() if k not in flat}}

    def _val_accuracy(self, student) -> dict:
        """Accuracy on the validation split (what a search chooses by), when there is one."""
        if self.splits.val is None:
            return {}
        logits, labels = predict_in_shares(student, self.splits.val, Distributed())
        return {"val_accuracy": float((logits.argmax(1) == labels).float().mean())}

    def _with_detail(self, result: dict, name: str, file: str, key: str, seed: int) -> dict:
        """A stamp written before softkd 0.4 has no ``detail`` (before 0.5 no ``val_accuracy``): the
        saved student is evaluated again (no training) and its stamp completed under the same key."""
        weights = self.out / "students" / f"{file}.safetensors"
        missing_val = "val_accuracy" not in result and self.splits.val is not None
        if ("detail" in result and not missing_val) or not weights.exists():
            return result
        shape, classes = self.splits.train.input_shape, self.splits.train.num_classes
        student = build_run_students(self.config, self.method, seed=seed, input_shape=shape,
                                     num_classes=classes)[name]
        load_weights(student, weights)
        logits, labels = predict_in_shares(student.to(select_device(self.config.train.device)), self.splits.test,
                                            Distributed())
        result = {**result, **self.test_metrics(logits, labels), **self._val_accuracy(student)}
        Distributed().on_main(lambda: write_stamp(self.out / "students" / f"{file}.json", key, result))
        return result


def best_on_validation(choices: list[tuple[str, dict]]) -> tuple[str, dict]:
    """The (tag, result) with the highest ``val_accuracy``; of equals, the first (scratch, listed
    first by a search, wins a tie: no distillation for nothing)."""
    return max(choices, key=lambda choice: choice[1]["val_accuracy"])


def build_run_students(config: RunConfig, method, *, seed: int, input_shape, num_classes: int) -> dict:
    """The run's students by name, untrained, built as a stage builds them (the config's student
    first, the method's other peers after it): to load saved weights into, or to time. The global
    random state is left as it was."""
    with torch.random.fork_rng(devices=[]):  # building a model draws initial weights
        first = resolve_model(config.student.model, input_shape=tuple(input_shape), num_classes=num_classes,
                              kwargs=config.student.kwargs)
        return method.build_students(first, seed=seed, input_shape=tuple(input_shape), num_classes=num_classes)


def predict_in_shares(model, data, dist: Distributed) -> tuple[torch.Tensor, torch.Tensor]:
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


def save_student(out: Path, name: str, student, key: str, result: dict) -> None:
    save_weights(student, out / "students" / f"{name}.safetensors")
    write_stamp(out / "students" / f"{name}.json", key, result)


def checkpoint_folder(config: RunConfig, folder: Path, resume: bool) -> Path | None:
    """The student run's checkpoint folder when checkpoints are on; a fresh start clears it."""
    if config.train.checkpoint_every is None:
        return None
    if not resume and Distributed().is_main:
        shutil.rmtree(folder, ignore_errors=True)
    return folder


def train_students(kind, config: RunConfig, method, splits: Splits, transfer, teachers, transfer_logits,
                    transfer_features, seed: int, log, names: list[str], **checkpointing) -> tuple[dict, FitResult]:
    """The students ``names`` of one stage, trained, by name: each from the same initial weights and
    with the same data and budget as its twin of the other kind; only the objective differs. With
    them, the run's FitResult (the seconds trained before a resume, the CPU kernel sets trained on)."""
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
    augment = augment_of(config.data, pool=transfer)
    if kind == "scratch":  # the same views as the distilled student
        student = first if names == [""] else method.build_students(
            first, seed=seed, input_shape=splits.train.input_shape, num_classes=splits.train.num_classes)[names[0]]
        views = config.cache.views if augment is not None and config.cache.enabled else None
        result = fit(student, transfer, augment=augment, views=views, **budget)
        return {names[0]: result.model}, result
    result = distill(first, teachers, transfer, method=method.params, teacher_logits=transfer_logits,
                     teacher_features=transfer_features, augment=augment, **budget)
    return result.students, result


