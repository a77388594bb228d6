"""The cascade itself: the student answers every sample, the teacher only those the student is unsure
of; and the accuracy-against-deferral curve a threshold is chosen from.

The default confidence is the student's largest softmax probability ("max-prob"): it is the
quantity a reliability diagram and the ECE measure, so a better-calibrated student (which
distillation tends to give) defers its mistakes and keeps its right answers. "margin" (the top
probability minus the second) is offered for students whose top two classes often tie.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from softkd.errors import ConfigError

CONFIDENCES = ("max-prob", "margin")


class CascadeOutput(NamedTuple):
    logits: torch.Tensor
    """(B, C): the student's logits, replaced by the teacher's for the deferred samples."""
    deferred: torch.Tensor
    """(B,) bool: True where the teacher answered."""


def confidence(logits: torch.Tensor, kind: str = "max-prob") -> torch.Tensor:
    """(B, C) logits -> (B,) confidence in [0, 1]: max softmax probability, or its margin over the
    runner-up."""
    _check_confidence(kind)
    probs = logits.float().softmax(-1)
    if kind == "max-prob":
        return probs.max(-1).values
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    return top2[:, 0] - (top2[:, 1] if top2.shape[-1] > 1 else 0.0)


def defer(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which samples go to the teacher: confidence ≤ threshold. Threshold 0 defers nothing (not
    even a margin of exactly 0), threshold 1 everything (even a probability that rounds to 1)."""
    if threshold <= 0:
        return torch.zeros_like(conf, dtype=torch.bool)
    return conf <= threshold


class Cascade(nn.Module):
    """``student`` on the whole batch, ``teacher`` only on the samples whose student confidence is at
    most ``threshold``; returns :class:`CascadeOutput` (combined logits, which samples were
    deferred). Both models run in eval mode without gradients; the teacher is not called at all
    when no sample is deferred.

    ``Cascade(student, teacher, threshold=0.9)(x).logits.argmax(-1)`` are its predictions.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, threshold: float = 0.5,
                 confidence: str = "max-prob"):
        super().__init__()
        _check_threshold(threshold)
        _check_confidence(confidence)
        self.student, self.teacher = student, teacher
        self.threshold, self.confidence = float(threshold), confidence

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> CascadeOutput:
        logits = self.student(x).float()
        deferred = defer(confidence(logits, self.confidence), self.threshold)
        if deferred.any():
            logits = logits.clone()
            logits[deferred] = self.teacher(x[deferred]).float()
        return CascadeOutput(logits, deferred)


def combine(student_logits: torch.Tensor, teacher_logits: torch.Tensor, threshold: float,
            kind: str = "max-prob") -> CascadeOutput:
    """What :class:`Cascade` returns, from both models' logits already computed for every sample."""
    deferred = defer(confidence(student_logits, kind), threshold)
    logits = torch.where(deferred[:, None], teacher_logits.float(), student_logits.float())
    return CascadeOutput(logits, deferred)


def cascade_curve(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                  confidence_kind: str = "max-prob") -> dict[str, list]:
    """Every distinct operating point of a cascade on labelled samples: deferring the k least
    confident, for each k at which the confidence changes (ties go together, as ``≤`` sends them).
    Returns ``threshold``, ``deferred`` (count), ``correct`` (count), ``fraction`` and ``accuracy``
    lists, from threshold 0 (student alone) to everything deferred (teacher alone), and ``n``."""
    labels = labels.long()
    conf = confidence(student_logits, confidence_kind)
    student_ok = (student_logits.argmax(-1) == labels).long()
    teacher_ok = (teacher_logits.argmax(-1) == labels).long()
    order = torch.argsort(conf, stable=True)
    sorted_conf = conf[order]
    gained = torch.cumsum(teacher_ok[order] - student_ok[order], 0)  # deferring the first k changes this many
    n, base = len(labels), int(student_ok.sum())
    # k samples deferred by threshold sorted_conf[k-1] only when the next one is more confident
    cuts = torch.cat([torch.nonzero(sorted_conf[1:] > sorted_conf[:-1]).flatten() + 1, torch.tensor([n])])
    thresholds = [0.0] + sorted_conf[cuts - 1].tolist()
    deferred = [0] + cuts.tolist()
    correct = [base] + (base + gained[cuts - 1]).tolist()
    return {"n": n, "threshold": thresholds, "deferred": deferred, "correct": correct,
            "fraction": [d / n for d in deferred], "accuracy": [c / n for c in correct]}


def pick_point(curve: dict, *, target_accuracy: float | None = None,
               max_teacher_fraction: float | None = None) -> int:
    """The index of the curve's point for a target: for ``target_accuracy``, the fewest deferrals
    from which every further point up to the curve's best still reaches it (so the threshold does not
    sit on an isolated upward spike of a noisy curve, which the test split would not repeat); for
    ``max_teacher_fraction``, the best accuracy deferring at most that share (ties: fewer
    deferrals). A target the curve never reaches is a :class:`ConfigError` naming its best."""
    if (target_accuracy is None) == (max_teacher_fraction is None):
        raise ConfigError("Give exactly one of target_accuracy and max_teacher_fraction.")
    n, correct, deferred = curve["n"], curve["correct"], curve["deferred"]
    if target_accuracy is not None:
        _check_fraction("target-accuracy", target_accuracy)
        need = math.ceil(target_accuracy * n - 1e-9)  # counts, not floats: 0.93 of 6000 is 5580
        best = max(range(len(correct)), key=lambda i: (correct[i], -deferred[i]))
        if correct[best] >= need:
            i = best
            while i > 0 and correct[i - 1] >= need:
                i -= 1
            return i
        raise ConfigError(f"No threshold reaches {100 * target_accuracy:.2f}% on the validation split; the best is "
                          f"{100 * correct[best] / n:.2f}% with {100 * deferred[best] / n:.1f}% deferred. Lower "
                          "--target-accuracy or use --max-teacher-fraction.")
    _check_fraction("max-teacher-fraction", max_teacher_fraction, allow_zero=True)
    allowed = [i for i, d in enumerate(deferred) if d <= max_teacher_fraction * n + 1e-9]
    return max(allowed, key=lambda i: (correct[i], -deferred[i]))


def _check_threshold(threshold) -> None:
    if not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"The 'threshold' of a cascade must be in [0, 1] (0: student only, 1: teacher only); "
                          f"got {threshold!r}.")


def _check_confidence(kind) -> None:
    if kind not in CONFIDENCES:
        raise ConfigError(f"The 'confidence' of a cascade must be one of {', '.join(CONFIDENCES)}; got {kind!r}.")


def _check_fraction(name: str, value, *, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, (int, float)) or not (low_ok and value <= 1):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        hint = f" (a fraction: {value / 100:g} for {value:g}%)" if isinstance(value, (int, float)) and value > 1 else ""
        raise ConfigError(f"--{name} must be in {bound}{hint}; got {value!r}.")
