"""Metrics of a classifier on a dataset: accuracy, NLL, ECE, and agreement / KL with a teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softkd.losses.logits import UNLABELED


@torch.no_grad()
def predict(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) over all batches, in order; the model is left in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for batch in batches:
        logits.append(model(batch["x"].to(device)).float().cpu())
        labels.append(batch["y"].cpu())  # data may live on the GPU; metrics run on the CPU
    return torch.cat(logits), torch.cat(labels)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    probs = logits.softmax(-1)
    confidence, prediction = probs.max(-1)
    correct = (prediction == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
    return float(ece)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    labeled = labels != UNLABELED
    if not labeled.any():
        return {"accuracy": None, "nll": None, "ece": None}
    logits, labels = logits[labeled], labels[labeled]
    return {
        "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": expected_calibration_error(logits, labels),
    }


def teacher_metrics(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement with the teacher and KL(teacher ‖ student) at T = 1."""
    kl = F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True,
                  reduction="batchmean")
    return {
        "agreement": float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()),
        "kl_to_teacher": float(kl),
    }


@torch.no_grad()
def evaluate(model: nn.Module, batches, *, objective: nn.Module | None = None,
             with_loss: bool = False) -> dict[str, float | None]:
    """Accuracy, NLL and ECE on labeled samples; with ``objective``, also its mean loss when the
    samples have no labels or ``with_loss``."""
    logits, labels = predict(model, batches)
    out = classification_metrics(logits, labels)
    if objective is not None and (out["accuracy"] is None or with_loss):
        objective.eval()
        total, n = 0.0, 0
        for batch in batches:
            k = batch["x"].shape[0]
            total += float(objective(model, batch)["loss"]) * k
            n += k
        out["loss"] = total / max(n, 1)
    return out
