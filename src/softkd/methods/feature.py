"""Adaptive Feature-wise Transfer: soft targets plus FitNets hints and attention transfer on
intermediate features of student and teacher, taken by forward hooks at module paths."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from softkd.errors import ConfigError
from softkd.losses.features import Adapter, Adapters, attention_loss, hint_loss
from softkd.losses.logits import kd_objective
from softkd.methods.base import Method, MethodParams, dry_forward, register_method
from softkd.models.taps import check_paths, tapped


class FeatureParams(MethodParams):
    student_layers: list[str] = Field(min_length=1)
    """Module paths of the student's tapped features (``softkd ls layers MODEL``), e.g. ["4"]."""
    teacher_layers: list[str] = Field(min_length=1)
    """The teacher's module paths, one per student path, e.g. ["stages.1"]."""
    hint: float = Field(1.0, ge=0, allow_inf_nan=False)
    """γ of the hint term: MSE between adapted student and teacher features (FitNets)."""
    attention: float = Field(0.0, ge=0, allow_inf_nan=False)
    """Weight of attention transfer (p = 2; the authors' code uses 1000)."""
    temperature: float = Field(4.0, gt=0, allow_inf_nan=False)
    """T of the soft-target term."""
    beta: float = Field(0.9, gt=0, le=1)
    """β: the soft-target term's share; 1 − β goes to cross-entropy."""

    @model_validator(mode="after")
    def _pairs(self):
        if len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(f"student_layers and teacher_layers pair up one to one; got {len(self.student_layers)} "
                             f"and {len(self.teacher_layers)} paths")
        if self.hint == 0 and self.attention == 0:
            raise ValueError("hint and attention are both 0: no feature is transferred (use method soft-target)")
        return self


@register_method
class Feature(Method):
    """(1 − β)·CE + β·T²·KL + hint·Σ_l MSE(adapter_l(f_s,l), f_t,l) + attention·Σ_l AT(f_s,l, f_t,l).

    The teacher's features and logits come from the batch when cached (``teacher_feature<i>``,
    ``teacher_logits``), else the teacher runs on it; the adapters, one per tapped pair with
    shapes from one dry forward (:class:`softkd.losses.features.Adapter`), are the method's
    trainable parts: optimised and checkpointed with the student, never in its weights file.
    """

    name = "feature"
    aliases = ("afw-tt", "hints")
    summary = "feature transfer: soft targets + FitNets hints / attention transfer through adapters"
    Params = FeatureParams
    needs = "features"
    terms = ("loss", "ce", "kd", "hint", "attention")

    def check_models(self, student: nn.Module, teachers=()) -> None:
        check_paths(student, self.params.student_layers, role="student")
        for teacher in teachers:
            check_paths(getattr(teacher, "module", teacher), self.params.teacher_layers, role="teacher")

    def setup(self, model: nn.Module, batch: dict, *, seed: int = 0) -> None:
        p, teacher = self.params, self.teacher.module
        self.check_models(model, [teacher])
        x = batch["x"][:2]
        with tapped(model, p.student_layers) as fs, tapped(teacher, p.teacher_layers) as ft:
            dry_forward(model, x)
            dry_forward(teacher, x)
        for path, f in [*zip(p.student_layers, fs), *zip(p.teacher_layers, ft)]:
            if not isinstance(f, torch.Tensor):
                raise RuntimeError(f"The module at '{path}' did not run in the forward pass (or returned no tensor); "
                                   "tap one that does.")
        if p.attention and any(f.ndim != 4 for f in [*fs, *ft]):
            flat = next(path for path, f in [*zip(p.student_layers, fs), *zip(p.teacher_layers, ft)] if f.ndim != 4)
            raise ConfigError(f"Attention transfer needs (C, H, W) feature maps; the module at '{flat}' gives "
                              "flat features: tap a convolutional stage or set attention: 0.")
        self.teacher_shapes = [tuple(t.shape[1:]) for t in ft]  # to unflatten cached features
        if p.hint:  # attention maps need no adapter: with no hint term there are none to train
            self.parts = Adapters(Adapter(s.shape[1:], t.shape[1:]) for s, t in zip(fs, ft))
            self.use_parts(self.parts)

    def forward(self, model: nn.Module, batch: dict, *, labeled_count=None, sample_count=None) -> dict[str, torch.Tensor]:
        p = self.params
        if p.hint and self.run_parts is None:
            raise RuntimeError("Feature.setup(model, batch) builds the adapters before training.")
        # paths name the student's own modules (with several processes ``model`` is its DDP wrapper)
        own = model.module if isinstance(model, DistributedDataParallel) else model
        x = batch["x"]
        if "teacher_feature0" in batch:  # a feature cache: the teacher does not run
            teacher_logits = batch["teacher_logits"]
            ft = [batch[f"teacher_feature{i}"].float().reshape(len(x), *shape)
                  for i, shape in enumerate(self.teacher_shapes)]
            with tapped(own, p.student_layers) as fs:
                student_logits = model(x)
        else:
            with tapped(own, p.student_layers) as fs, tapped(self.teacher.module, p.teacher_layers) as ft:
                student_logits = model(x)
                teacher_logits = self.teacher(x)
        terms = kd_objective(student_logits, batch["y"], teacher_logits, temperature=p.temperature, beta=p.beta,
                             labeled_count=labeled_count, sample_count=sample_count)
        zero = student_logits.new_zeros(())
        hint = sum((hint_loss(a, t, count=sample_count) for a, t in zip(self.run_parts(fs), ft)), zero) \
            if p.hint else zero
        attention = sum((attention_loss(s, t, count=sample_count) for s, t in zip(fs, ft)), zero) \
            if p.attention else zero
        return {**terms, "loss": terms["loss"] + p.hint * hint + p.attention * attention,
                "hint": hint.detach(), "attention": attention.detach()}

    def describe(self) -> str:
        p = self.params
        parts = [f"{1 - p.beta:g}·ce", f"{p.beta:g}·T²·KL(T={p.temperature:g})"]
        layers = ", ".join(f"{s}→{t}" for s, t in zip(p.student_layers, p.teacher_layers))
        if p.hint:
            parts.append(f"{p.hint:g}·hint")
        if p.attention:
            parts.append(f"{p.attention:g}·attention")
        return f"loss = {' + '.join(parts)} ({layers})"
