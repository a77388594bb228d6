"""fit(): the one visible training loop.

zero grad → forward → loss → backward → step → log → evaluate → keep best / stop early.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from softkd.data.datasets import as_dataset
from softkd.data.loader import build_loader
from softkd.errors import ConfigError, TrainingError
from softkd.evaluate.metrics import evaluate
from softkd.methods.supervised import Supervised
from softkd.train.checks import check_classes
from softkd.train.optim import build_optimizer, build_scheduler, trainable_parameters


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


def fit(
    model: nn.Module,
    train_data,
    *,
    objective: nn.Module | None = None,
    val_data=None,
    epochs: int = 15,
    max_steps: int | None = None,
    batch_size: int = 256,
    optimizer: str = "adamw",
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    patience: int | None = None,
    lr_schedule: str = "constant",
    seed: int = 0,
    extras: dict[str, torch.Tensor] | None = None,
    log: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train_data`` with ``objective`` (default: cross-entropy).

    Stops after ``epochs``, or ``max_steps`` optimizer steps, or when the validation score has
    not improved for ``patience`` epochs (convergence); with ``val_data`` the best epoch's
    weights are restored. ``lr_schedule``: "constant" or "cosine" (per step, to 0 at the end of
    the budget). The score is validation accuracy, or minus the objective's loss when
    the validation set has no labels. ``extras`` are per-sample tensors added to each batch
    (e.g. precomputed ``teacher_logits``).
    """
    _check_budget(epochs, max_steps, patience)
    objective = objective if objective is not None else Supervised()
    train_data = as_dataset(train_data, name="train_data")
    train_batches = build_loader(train_data, batch_size=batch_size, shuffle=True, seed=seed, extras=extras)
    check_classes(model, None, train_data)
    torch.manual_seed(seed)
    val_batches = None
    if val_data is not None:
        val_batches = build_loader(as_dataset(val_data, name="val_data"), batch_size=max(batch_size, 1024))
    opt = build_optimizer(trainable_parameters(model, objective), name=optimizer, lr=lr, weight_decay=weight_decay)
    total_steps = min(epochs * len(train_batches), max_steps or epochs * len(train_batches))
    scheduler = build_scheduler(opt, lr_schedule, total_steps)
    device = next(model.parameters()).device
    result = FitResult(model=model)
    best_state, stale = None, 0

    for epoch in range(1, epochs + 1):
        model.train()
        objective.train()
        totals: dict[str, float] = {}
        seen = 0
        for batch in train_batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            opt.zero_grad(set_to_none=True)
            terms = objective(model, batch)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise TrainingError(_nonfinite_message(terms, result.steps + 1))
            loss.backward()
            opt.step()
            scheduler.step()
            result.steps += 1
            n = batch["x"].shape[0]
            seen += n
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) * n
            if on_step is not None:
                on_step(result.steps)
            if max_steps is not None and result.steps >= max_steps:
                result.stopped_by = "max_steps"
                break
        record = {"epoch": epoch, "step": result.steps, **{f"train_{k}": v / max(seen, 1) for k, v in totals.items()}}
        if val_batches is not None:
            val = evaluate(model, val_batches, objective=objective)
            record.update({f"val_{k}": v for k, v in val.items()})
            score = val["accuracy"] if val.get("accuracy") is not None else -val["loss"]
            if result.best_score is None or score > result.best_score:
                result.best_score, result.best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        result.history.append(record)
        result.epochs = epoch
        if log is not None:
            log(record)
        if result.stopped_by == "max_steps":
            break
        if patience is not None and stale >= patience:
            result.stopped_by = "patience"
            break
    opt.zero_grad(set_to_none=True)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def _check_budget(epochs: int, max_steps: int | None, patience: int | None) -> None:
    if epochs < 1:
        raise ConfigError(f"The 'epochs' of train must be >= 1; got {epochs}.")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"The 'max_steps' of train must be >= 1 or null; got {max_steps}.")
    if patience is not None and patience < 1:
        raise ConfigError(f"The 'patience' of train must be >= 1 or null; got {patience}.")


def _nonfinite_message(terms: dict, step: int) -> str:
    bad = [k for k, v in terms.items() if k != "loss" and not math.isfinite(float(v))] or ["loss"]
    return (
        f"The training loss became non-finite at step {step} (term(s): {', '.join(bad)}); "
        "lower the learning rate or check the inputs and teacher for NaN/inf."
    )
