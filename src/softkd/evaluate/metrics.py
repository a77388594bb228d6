"""Metrics of a classifier on a dataset: accuracy, NLL, ECE, and agreement / KL with a teacher;
``detailed_metrics`` adds top-5, per-class accuracy, the confusion matrix and the reliability diagram."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softkd.errors import ShapeMismatchError
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


def _confidence_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int):
    """(confidence, correct, edges, masks): the max softmax probability, whether the argmax is the
    label, and one mask per bin (lo, hi] of ``n_bins`` equal-width bins. ECE and the reliability
    diagram share it, so the diagram's bins add up to the ECE exactly."""
    confidence, prediction = logits.softmax(-1).max(-1)
    correct = (prediction == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    masks = [(confidence > lo) & (confidence <= hi) for lo, hi in zip(edges[:-1], edges[1:])]
    return confidence, correct, edges, masks


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017):
    Σ_b (n_b / N) · |mean confidence_b − accuracy_b| over bins (lo, hi], confidence = max softmax."""
    confidence, correct, _, masks = _confidence_bins(logits, labels, n_bins)
    ece = torch.zeros(())
    for in_bin in masks:
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


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Fraction of samples whose label is among the ``k`` highest logits (1.0 when k ≥ classes)."""
    top = logits.topk(min(k, logits.shape[1]), dim=-1).indices  # (N, k)
    return float((top == labels[:, None]).any(-1).float().mean())


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Accuracy within each true class c: #(argmax = c and label = c) / #(label = c); None when
    no sample is labeled c."""
    correct = logits.argmax(-1) == labels
    total = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels[correct], minlength=num_classes)
    return [float(h) / int(t) if t else None for h, t in zip(hits.tolist(), total.tolist())]


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Counts m[true][predicted], rows = true class, columns = argmax class."""
    cells = labels * num_classes + logits.argmax(-1)  # one bincount instead of a C² loop
    return torch.bincount(cells, minlength=num_classes**2).reshape(num_classes, num_classes).tolist()


def reliability_diagram(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict:
    """Per confidence bin (lo, hi]: ``count``, mean ``confidence`` and ``accuracy`` (None when the
    bin is empty), with ``edges`` (n_bins + 1 floats). The bins are ECE's, so
    ECE = Σ_b count_b / N · |confidence_b − accuracy_b|."""
    confidence, correct, edges, masks = _confidence_bins(logits, labels, n_bins)
    count = [int(m.sum()) for m in masks]
    return {
        "edges": edges.tolist(),
        "count": count,
        "confidence": [float(confidence[m].mean()) if n else None for m, n in zip(masks, count)],
        "accuracy": [float(correct[m].mean()) if n else None for m, n in zip(masks, count)],
    }


def detailed_metrics(logits: torch.Tensor, labels: torch.Tensor, *, teacher_logits: torch.Tensor | None = None,
                     n_bins: int = 15, max_confusion_classes: int = 100) -> dict:
    """Every metric of a classifier as plain Python (JSON-serialisable), on labeled samples:
    ``accuracy``, ``top5`` (None with ≤ 5 classes, where it is always 1), ``nll``, ``ece``,
    ``per_class_accuracy``, ``confusion`` (None past ``max_confusion_classes`` classes) and
    ``reliability``; all None when no sample is labeled. With ``teacher_logits`` (all samples, same
    order), also ``agreement`` and ``kl_to_teacher`` over all samples, as in ``teacher_metrics``."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ShapeMismatchError(f"detailed_metrics needs logits (N, C) and labels (N,); "
                                 f"got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    if teacher_logits is not None and teacher_logits.shape != logits.shape:
        raise ShapeMismatchError(f"The 'teacher_logits' of detailed_metrics must have the student's shape "
                                 f"{tuple(logits.shape)}; got {tuple(teacher_logits.shape)}.")
    logits = logits.float()
    num_classes = logits.shape[1]
    labeled = labels != UNLABELED
    out = dict.fromkeys(("accuracy", "top5", "nll", "ece", "per_class_accuracy", "confusion", "reliability"))
    if labeled.any():
        y_logits, y = logits[labeled], labels[labeled]
        out.update(
            accuracy=float((y_logits.argmax(-1) == y).float().mean()),
            top5=top_k_accuracy(y_logits, y, k=5) if num_classes > 5 else None,
            nll=float(F.cross_entropy(y_logits, y)),
            ece=expected_calibration_error(y_logits, y, n_bins),
            per_class_accuracy=per_class_accuracy(y_logits, y, num_classes),
            confusion=confusion_matrix(y_logits, y, num_classes) if num_classes <= max_confusion_classes else None,
            reliability=reliability_diagram(y_logits, y, n_bins),
        )
    if teacher_logits is not None:
        out.update(teacher_metrics(logits, teacher_logits.float()))
    return out


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
