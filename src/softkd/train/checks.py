"""Checks run before training: models, labels and soft labels agree on the classes."""

from __future__ import annotations

import torch
from torch import nn

from softkd.data.datasets import ArrayDataset
from softkd.data.loader import build_loader
from softkd.errors import DataError, ShapeMismatchError, first_line
from softkd.losses.logits import UNLABELED


def check_classes(student: nn.Module, teacher: nn.Module | None, data, *, soft_targets=None) -> int:
    """Teacher, student and labels must agree on the class count; returns it."""
    classes = {"student": num_outputs(student, data)}
    if teacher is not None:
        classes["teacher"] = num_outputs(teacher, data)
    if soft_targets is not None:  # probabilities or teacher logits, (N, C)
        classes["soft labels"] = soft_targets.shape[-1]
    if len(set(classes.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in classes.items())
        raise ShapeMismatchError(
            f"Class counts differ ({listed}); the student's output layer must match the teacher's classes."
        )
    num_classes = classes["student"]
    if isinstance(data, ArrayDataset):
        labels = data.y[data.y != UNLABELED]
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0]
            raise DataError(
                f"Label {int(bad)} in {data.name} is outside [0, {num_classes}) for a {num_classes}-class "
                "student; use -1 for unlabeled samples."
            )
    return num_classes


@torch.no_grad()
def num_outputs(model: nn.Module, data) -> int:
    """The model's output width on one sample, without touching its training state or RNG."""
    batch = next(iter(build_loader(data, batch_size=2) if not isinstance(data, torch.utils.data.DataLoader) else data))
    x = batch["x"] if isinstance(batch, dict) else (batch[0] if isinstance(batch, (tuple, list)) else batch)
    was_training = model.training
    model.eval()
    try:
        out = model(x[:2].to(next(model.parameters()).device))
    except RuntimeError as exc:
        raise ShapeMismatchError(
            f"{type(model).__name__} cannot take inputs of shape {tuple(x.shape[1:])}: {first_line(exc)}"
        ) from None
    finally:
        model.train(was_training)
    if out.ndim != 2:
        raise ShapeMismatchError(f"{type(model).__name__} must return (N, C) logits; got shape {tuple(out.shape)}.")
    return out.shape[-1]
