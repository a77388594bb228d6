"""fit(): the one visible training loop.

zero grad → forward → loss → backward → step → log → evaluate → keep best / stop early.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from softkd.data.datasets import as_dataset
from softkd.data.loader import build_loader
from softkd.errors import ConfigError
from softkd.evaluate.metrics import evaluate
from softkd.losses.logits import label_mass
from softkd.methods.base import Method
from softkd.methods.supervised import Supervised
from softkd.train.checks import check_classes
from softkd.models.weights import save_weights
from softkd.train.checkpoint import (RunState, load_latest, load_trained_state, restore, rng_states, save_checkpoint,
                                     snapshot, trained_state)
from softkd.train.graphs import graphed_step
from softkd.train.optim import build_optimizer, build_scheduler, trainable_parameters
from softkd.train.distributed import Distributed
from softkd.train.runtime import autocast, grad_scaler, kernel_set
from softkd.train.loss_guard import StepTerms


MONITORS = {"accuracy": 1.0, "loss": -1.0, "nll": -1.0, "ece": -1.0}  # sign: higher is better


@dataclass
class FitResult:
    """What a run learned: the model (best weights restored when validated) and its history."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    epochs: int = 0
    best_epoch: int | None = None
    best_score: float | None = None
    stopped_by: str = "epochs"  # "epochs", "max_steps" or "patience"
    graphed_steps: int = 0  # steps replayed from a CUDA graph (see fit's cuda_graphs)
    resumed_s: float = 0.0  # seconds the run had trained before this call resumed it (0 when it did not)
    cpu_kernels: list[str] = field(default_factory=list)
    """The kernel sets it trained on, over every resume: a CPU's ('AVX2') or a GPU's name ('CUDA
    NVIDIA H200'), see :func:`~softkd.train.runtime.kernel_set` ('not recorded' for the sittings of
    a checkpoint written before checkpoints kept them)."""
    students: dict[str, nn.Module] = field(default_factory=dict)
    """Every trained student by name: ``{"": model}``, or each peer of a mutual-learning cohort."""


def fit(
    model: nn.Module,
    train_data,
    *,
    objective: nn.Module | None = None,
    val_data=None,
    epochs: int = 15,
    max_steps: int | None = None,
    batch_size: int = 256,
    accumulate: int = 1,
    optimizer: str = "adamw",
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    nesterov: bool = False,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    clip_grad_norm: float | None = None,
    precision: str = "fp32",
    cuda_graphs: bool | str = "auto",
    patience: int | None = None,
    monitor: str = "accuracy",
    seed: int = 0,
    extras: dict[str, torch.Tensor] | None = None,
    augment: Callable | None = None,
    views: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    keep_last: int = 2,
    resume: bool = False,
    run_key: dict | None = None,
    log: Callable[[dict], None] | None = None,
    log_every: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train_data`` with ``objective`` (default: cross-entropy).

    Stops after ``epochs``, or ``max_steps`` optimizer steps, or when the validation score has
    not improved for ``patience`` epochs (convergence); with ``val_data`` the best epoch's
    weights are restored. ``monitor`` chooses the validation metric that decides both:
    ``accuracy`` (higher is better), ``loss`` (the objective's), ``nll`` or ``ece`` (lower is
    better); without labels in the validation set it falls back to the objective's loss.
    ``extras`` are per-sample tensors added to each batch (e.g. precomputed ``teacher_logits``).

    ``augment`` (e.g. :class:`softkd.data.augment.ShiftFlip`) replaces each training batch's
    inputs by one seeded view per sample: with ``views`` = K, view ``augment.pick(id, epoch, K)``
    of the K a soft-label cache holds, and ``teacher_logits`` extras of shape (N, K, C) give that
    view's logits; without ``views``, a fresh view every epoch. A :class:`~softkd.data.augment.Mixup`
    without a pool draws its partners from ``train_data``, and blends the labels too.

    ``batch_size`` is the batch of one optimizer step; ``accumulate`` splits it into that many
    micro-batches whose losses are normalised by the whole batch's labeled and total sample
    counts, so the gradient equals the large batch's (batch-norm statistics aside).
    ``lr_schedule``: constant, cosine, onecycle or step, per step, after ``warmup_steps`` of
    linear warm-up. ``precision``: fp32, or bf16 / fp16 autocast (fp16 with loss scaling).
    ``cuda_graphs``: "auto" replays steps from a CUDA graph, with a compiled loss, where that is
    known to be safe (CUDA, one process, one micro-batch per step, fp32 or bf16, a built-in
    objective, zoo or plain ``torch.nn`` models; :func:`softkd.train.graphs.graph_inputs`);
    True also for other models, whose forward must not read values on the host; False never.

    With ``checkpoint_dir``, full state is saved every ``checkpoint_every`` steps and at each
    epoch's end (the last ``keep_last`` kept, plus ``best.safetensors``); ``resume`` continues
    from the newest one exactly as if never interrupted, after checking that it was written
    with the same ``run_key`` settings. Under torchrun / accelerate launch each process trains
    on its share of every step's batch and gradients are summed (see ``Distributed``).

    ``log`` receives one record per epoch (train terms, validation metrics, epoch seconds,
    images/s) and, every ``log_every`` steps, a ``{"kind": "step", ...}`` record (loss terms of
    that step, learning rate, images/s since the last one).
    """
    _check_budget(epochs, max_steps, patience)
    if monitor not in MONITORS:
        raise ConfigError(f"The 'monitor' of train must be one of {', '.join(MONITORS)}; got {monitor!r}.")
    dist = Distributed()
    if accumulate < 1 or batch_size % (accumulate * dist.world):
        raise ConfigError(f"'batch_size' ({batch_size}) must be a multiple of 'accumulate' ({accumulate}) times "
                          f"the number of processes ({dist.world}).")
    objective = objective if objective is not None else Supervised()
    train_data = as_dataset(train_data, name="train_data")
    if getattr(augment, "pool", False) is None:  # mixup's partners: the data it trains on
        augment = augment.bind(train_data)
    # Every process walks the same micro-batches of the global order and trains on its share
    # of each step (see step()); in-memory data makes walking the others' shares free.
    micro_batches = build_loader(train_data, batch_size=batch_size // (accumulate * dist.world), shuffle=True,
                                 seed=seed, extras=extras)
    check_classes(model, None, train_data)
    torch.manual_seed(seed)
    val_batches = None
    if val_data is not None:
        val_batches = build_loader(as_dataset(val_data, name="val_data"), batch_size=max(batch_size, 1024))
    device, parts, params = _trainables(model, objective, train_data, extras, seed)
    opt = build_optimizer(params, name=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum,
                          nesterov=nesterov)
    group_size = accumulate * dist.world
    steps_per_epoch = -(-len(micro_batches) // group_size)
    total_steps = min(epochs * steps_per_epoch, max_steps or epochs * steps_per_epoch)
    scheduler = build_scheduler(opt, lr_schedule, total_steps, warmup_steps=warmup_steps, max_lr=lr)
    if not dist.is_main:  # one process logs; checkpoints are written by it and read by all
        log = None
    scaler = grad_scaler(precision, device)
    autocast(precision, device)  # an unknown precision fails here, before any step
    generator = getattr(micro_batches, "generator", None)
    result = FitResult(model=model, cpu_kernels=[kernel_set(device)])
    # Every process must stack the same terms; one process may take them from its first batch.
    keys = getattr(objective, "terms", ("loss",) if dist.world > 1 else None)
    terms_log = StepTerms(keys, device, folder=Path(checkpoint_dir) if checkpoint_dir is not None else None,
                          processes=dist.world)
    run = RunState()
    run_key = dict(run_key or {}, method=objective.key(), batch_size=batch_size, accumulate=accumulate, seed=seed,
                   epochs=epochs, precision=precision, processes=dist.world, views=views, monitor=monitor,
                   augment=getattr(augment, "describe", lambda: repr(augment))())
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and folder is not None:
        saved = load_latest(folder, run_key=run_key)
        if saved is not None:
            run = restore(saved, model, objective, opt, scheduler, scaler, result, rank=dist.rank)
            terms_log.reset(run.totals)
    began = time.perf_counter()  # a checkpoint carries the seconds trained so far, over every resume
    # With several processes every trainable module trains through DDP (gradients summed over
    # processes in the backward pass); the teacher never does. Processes start from rank 0's state.
    student = dist.wrap(model)
    objective.use_parts(dist.wrap(objective.parts))
    wrapped = [m for m in (student, objective.run_parts) if m is not None]

    def checkpoint(epoch: int, done: int, epoch_start) -> None:
        if folder is None:
            return
        run.totals = terms_log.sums()  # checked first: a checkpoint is only ever written from good weights
        rngs = dist.gather_object(rng_states())  # every process's: each resumes with its own
        state = snapshot(model, objective, opt, scheduler, scaler, result, run, epoch, done, epoch_start, run_key,
                         rngs, train_s=result.resumed_s + time.perf_counter() - began)
        dist.on_main(lambda: save_checkpoint(folder, state, keep_last=keep_last))

    def forward_backward(batch: dict, counts: dict, *, cache: bool = True, weight: float = 1.0) -> torch.Tensor:
        """One micro-batch's loss and gradients; returns its terms as one device tensor."""
        with autocast(precision, device, cache=cache):
            terms = objective(student, batch, **counts)
        if dist.world == 1:  # several processes check the summed terms in step(), all stopping together
            terms_log.check(terms, result.steps + 1)
        scaler.scale(terms["loss"] * weight if weight != 1.0 else terms["loss"]).backward()
        return terms_log.stack(terms)

    def update() -> None:
        if clip_grad_norm is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        scaler.step(opt)  # skipped (and the scale lowered) when fp16 gradients overflowed
        scaler.update()

    def prepare(batch: dict, epoch: int) -> dict:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return _augmented(batch, augment, epoch, views) if augment is not None else batch

    def train_labels(epoch: int) -> Callable[[dict], torch.Tensor]:
        if not hasattr(augment, "mix_labels"):
            return lambda batch: batch["y"]
        return lambda batch: augment.mix_labels(batch["y"], batch["id"], augment.pick(batch["id"], epoch, views))

    def one_step(batch: dict) -> torch.Tensor:  # what a CUDA graph records
        opt.zero_grad(set_to_none=True)
        values = forward_backward(batch, {}, cache=False)
        update()
        return values

    graphed, feed = graphed_step(objective, model, micro_batches, one_step, opt, prepare,
                                 augmented=augment is not None, mode=cuda_graphs, device=device,
                                 processes=dist.world, accumulate=accumulate, precision=precision)

    def step(group: list[dict], epoch: int) -> torch.Tensor:
        """One optimizer step on a global batch: this process trains on its share of the
        micro-batches, each normalised by the whole batch's counts, and gradients are summed."""
        # The graph is recorded on a full batch (an epoch's short last one runs eagerly).
        if graphed is not None and (len(micro_batches) == 1 or _samples(group[0]) == batch_size):
            summed = graphed(feed(group[0], epoch))
            if summed is not None:
                scheduler.step()
                return summed
        if getattr(micro_batches, "lazy", False):
            group = [micro_batches.gather(b["index"]) for b in group]
        opt.zero_grad(set_to_none=True)
        counts = _counts(group, train_labels(epoch)) if len(group) > 1 or dist.world > 1 else {}
        summed = None  # this step's terms on the device (in terms_log's order): reading them would wait for it
        for batch, sync, weight in dist.share(group, accumulate):
            with dist.no_sync(wrapped, sync):
                values = forward_backward(prepare(batch, epoch), counts, weight=weight)
            if weight:
                summed = values if summed is None else summed + values
        if dist.world > 1:  # a process with no samples adds zeros
            summed = dist.sum_(summed.double() if summed is not None else torch.zeros(len(keys), dtype=torch.float64,
                                                                                      device=device))
            terms_log.check_sums(summed, result.steps + 1)  # before the optimizer touches the weights
        update()
        scheduler.step()
        dist.sync_buffers_(model, *parts)  # batch-norm statistics: rank 0's
        return summed

    for epoch in range(run.epoch, epochs + 1):
        if run.epoch_start is not None and generator is not None:
            generator.set_state(run.epoch_start)  # resuming: replay this epoch's order, skip what was done
            run.epoch_start = None
        epoch_start = generator.get_state() if generator is not None else None
        model.train()
        objective.train()
        group, position = [], 0
        terms_log.reset(run.totals)
        epoch_began = logged_at = time.perf_counter()
        seen_at_log = run.seen
        for position, batch in enumerate(micro_batches, start=1):
            if position <= run.done:
                continue
            group.append(batch)
            if len(group) < group_size and position < len(micro_batches):
                continue
            objective.begin_step(result.steps / steps_per_epoch)
            n = sum(_samples(b) for b in group)
            terms_log.add(step(group, epoch), step=result.steps + 1, samples=n)
            run.seen += n
            group = []
            result.steps += 1
            if log is not None and log_every and result.steps % log_every == 0:
                terms = terms_log.last()
                now = time.perf_counter()
                log({"kind": "step", "epoch": epoch, "step": result.steps, "lr": opt.param_groups[0]["lr"],
                     **{f"train_{k}": v for k, v in terms.items()},
                     "images_per_s": (run.seen - seen_at_log) / max(now - logged_at, 1e-9)})
                logged_at, seen_at_log = now, run.seen
            if on_step is not None:
                on_step(result.steps)
            if max_steps is not None and result.steps >= max_steps:
                result.stopped_by = "max_steps"
                break
            if checkpoint_every and result.steps % checkpoint_every == 0 and position < len(micro_batches):
                run.done = position
                checkpoint(epoch, position, epoch_start)
        run.done = 0
        totals = terms_log.sums()
        seconds = time.perf_counter() - epoch_began
        record = {"epoch": epoch, "step": result.steps,
                  **{f"train_{k}": v / max(run.seen, 1) for k, v in totals.items()},
                  "epoch_s": seconds, "images_per_s": run.seen / max(seconds, 1e-9)}
        if graphed is not None:  # on CUDA: how many steps so far were replayed from the graph
            record["graphed_steps"] = graphed.replays
        terms_log.reset()
        run.totals, run.seen = {}, 0
        if val_batches is not None:
            val = _validate(model, objective, val_batches, monitor)
            record.update({f"val_{k}": v for k, v in val.items()})
            if _keep_if_best(val, monitor, epoch, result, run, model, objective) and folder is not None:
                dist.on_main(lambda: save_weights(model, folder / "best.safetensors"))
        result.history.append(record)
        result.epochs = epoch
        if log is not None:
            log(record)
        if patience is not None and run.stale >= patience and result.stopped_by != "max_steps":
            result.stopped_by = "patience"
        checkpoint(epoch + 1, 0, generator.get_state() if generator is not None else None)
        if result.stopped_by != "epochs":
            break
    opt.zero_grad(set_to_none=True)
    result.graphed_steps = graphed.replays if graphed is not None else 0
    if run.best_state is not None:
        load_trained_state(run.best_state, model, objective)
    objective.use_parts(objective.parts)
    result.students = objective.students(model)
    for student in result.students.values():
        student.eval()
    return result


def _samples(batch: dict) -> int:
    return batch["x"].shape[0] if "x" in batch else len(batch["index"])


def _augmented(batch: dict, augment, epoch: int, views: int | None) -> dict:
    """The batch with each sample's view of this epoch, and that view's cached teacher logits."""
    view = augment.pick(batch["id"], epoch, views)
    batch = dict(batch, x=augment(batch["x"], batch["id"], view))
    if hasattr(augment, "mix_labels"):  # mixup: the labels blend as the inputs did
        batch["y"] = augment.mix_labels(batch["y"], batch["id"], view)
    if batch.get("teacher_logits") is not None and views is not None:  # (B, K, ...) -> (B, ...)
        view = view.to(batch["teacher_logits"].device)
        batch["teacher_logits"] = batch["teacher_logits"][torch.arange(len(view), device=view.device), view]
    return batch


def _validate(model: nn.Module, objective, val_batches, monitor: str) -> dict:
    """Validation metrics of the student; of a cohort (several students), each one's as
    ``<name>_<metric>`` and their mean as the metric itself, which picks the best epoch."""
    students = objective.students(model)
    if len(students) == 1:
        return evaluate(model, val_batches, objective=objective, with_loss=monitor == "loss")
    each = {name: evaluate(student, val_batches) for name, student in students.items()}
    out = {}
    for metric in next(iter(each.values())):
        values = [v[metric] for v in each.values()]
        out[metric] = None if None in values else sum(values) / len(values)
    if out.get("accuracy") is None or monitor == "loss":
        out["loss"] = evaluate(model, val_batches, objective=objective, with_loss=True)["loss"]
    return {**out, **{f"{name}_{k}": v for name, metrics in each.items() for k, v in metrics.items()}}


def _trainables(model: nn.Module, objective, train_data, extras, seed: int) -> tuple[torch.device, list, list]:
    """The device, the method's trainable parts (built by its ``setup`` from one dry forward, when
    it has one) and every trainable parameter: the optimizer's."""
    device = next(model.parameters()).device
    if type(objective).setup is not Method.setup:
        batch = next(iter(build_loader(train_data, batch_size=64, extras=extras)))
        batch = {k: v.to(device) for k, v in batch.items()}
        # ``seed`` since 0.3 (a cohort's peers are seeded from it); methods written for 0.2 take none
        takes_seed = "seed" in inspect.signature(objective.setup).parameters
        objective.setup(model, batch, **({"seed": seed} if takes_seed else {}))
    objective.to(device)  # its parts and buffers (a warm-up factor, teacher weights) beside the student
    parts = [objective.parts] if objective.parts is not None else []
    return device, parts, trainable_parameters(model, *parts)


def _counts(group: list[dict], labels: Callable[[dict], torch.Tensor]) -> dict:
    """The whole step's label mass (:func:`softkd.losses.logits.label_mass` of each micro-batch's
    ``labels(batch)``) and sample count: every micro-batch is normalised by them."""
    return {"labeled_count": sum(float(label_mass(labels(b))) for b in group),
            "sample_count": sum(b["x"].shape[0] for b in group)}


def _keep_if_best(val: dict, monitor: str, epoch: int, result: FitResult, run: RunState, model, objective) -> bool:
    """Score the epoch on ``monitor`` (the objective's loss without labels); keep the student's and
    the method's parts' state when it is the best so far. Returns whether it was."""
    watched = monitor if val.get(monitor) is not None else "loss"
    score = val[watched] * MONITORS[watched]  # higher is better
    if result.best_score is not None and score <= result.best_score:
        run.stale += 1
        return False
    result.best_score, result.best_epoch, run.stale = score, epoch, 0
    run.best_state = copy.deepcopy(trained_state(model, objective))
    return True


def _check_budget(epochs: int, max_steps: int | None, patience: int | None) -> None:
    if epochs < 1:
        raise ConfigError(f"The 'epochs' of train must be >= 1; got {epochs}.")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"The 'max_steps' of train must be >= 1 or null; got {max_steps}.")
    if patience is not None and patience < 1:
        raise ConfigError(f"The 'patience' of train must be >= 1 or null; got {patience}.")
