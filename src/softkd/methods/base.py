"""The method seam: what every distillation method declares, and the registry that finds it.

A method is one file under ``methods/``: a :class:`MethodParams` subclass holding its
parameters with their ranges, and a :class:`Method` subclass registered with
:func:`register_method`. The pipeline, :func:`softkd.distill`, the training loop, checkpoints
and the report ask the method; none of them branches on its name.

What a method declares:

- ``name``, ``aliases`` and a one-line ``summary``;
- ``Params``: its parameters (a pydantic model; an unknown or out-of-range one is a one-line
  error listing the method's parameters);
- ``needs``: what it takes from the teacher: ``"logits"`` (cached or live), ``"features"``
  (a live teacher, for intermediate outputs) or ``"none"``; and ``teachers_needed``: how many
  (``"one"``, ``"several"`` or ``"none"``);
- its trainable parts beyond the student (``parts``, e.g. adapters or the other peers of a
  cohort), built in :meth:`setup` from one dry forward before the optimizer exists; the training
  loop optimises, checkpoints, restores (best epoch) and synchronises them (DDP) with the
  student. Teachers are frozen and never in a checkpoint;
- the students a run yields (:meth:`student_specs`, :meth:`build_students`, :meth:`students`):
  the one student by default, every peer for mutual learning; each is validated, saved,
  reported against its own scratch twin and exportable by name;
- :meth:`forward`: the loss terms of a batch, with the weights applied in one visible place,
  and :meth:`describe`: the formula the report and logs print.
"""

from __future__ import annotations

import difflib
import warnings
from contextlib import contextmanager
from typing import Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from softkd.errors import ConfigError
from softkd.losses.fused import fused
from softkd.models.teacher import Teacher
from softkd.registry import Registry

METHODS: Registry = Registry("method")
NEEDS = ("logits", "features", "none")

SCRATCH_NAMES = ("supervised", "scratch")
"""Not methods: the scratch twin every run trains beside the distilled student."""


class MethodParams(BaseModel):
    """A method's parameters: ``name`` and, in each subclass, its own fields with their ranges."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    name: str


class GraphSafe:
    """Mixin for an objective whose training step may be captured in a CUDA graph and replayed.

    Its forward runs the student (and a frozen teacher) on ``graph_inputs``, the batch entries it
    reads, then a pure loss function of tensors through :meth:`loss`: no reads on the host, no
    Python state that changes between steps (values that change, such as a warm-up factor, live in
    tensors updated in place). Inside :meth:`fusing` that loss runs compiled
    (:func:`softkd.losses.fused.fused`), which the training loop turns on for captured steps only.
    A class that is safe says so with ``graph_safe = True`` in its own body (a subclass that
    changes the forward is not assumed safe; see :func:`softkd.train.graphs.known_safe`).
    """

    graph_inputs: tuple[str, ...] = ()
    _fusing = False

    def loss(self, fn: Callable, *args, **kwargs):
        return (fused(fn) if self._fusing else fn)(*args, **kwargs)

    @contextmanager
    def fusing(self):
        self._fusing = True
        try:
            yield
        finally:
            self._fusing = False


class Method(GraphSafe, nn.Module):
    """Base class of every method (and of the supervised objective of scratch twins).

    Called as ``method(model, batch, labeled_count=..., sample_count=...)`` with the student (or
    its DDP wrapper) and a batch dict (``x``, ``y``, and ``teacher_logits`` when precomputed);
    returns ``{"loss": ..., <term>: ...}`` with the terms named in ``terms``.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    needs: ClassVar[str] = "logits"
    teachers_needed: ClassVar[str] = "one"  # "one", "several" or "none"
    terms: ClassVar[tuple[str, ...]] = ("loss",)
    takes_soft_targets: ClassVar[bool] = False  # probabilities in place of teacher logits
    searches: ClassVar[bool] = False  # a search over whole runs (auto), which the pipeline carries out

    def __init__(self, params: MethodParams | None = None, *, teachers=(), teacher: nn.Module | None = None,
                 **values):
        """``params``, or the parameters as keywords (``SoftTarget(teacher=t, temperature=2)``);
        ``teachers`` (or one ``teacher``)."""
        super().__init__()
        if teacher is not None:
            teachers = [teacher, *teachers]
        self.params = params if params is not None else method_params(type(self), **values)
        if params is not None and values:
            raise ConfigError(f"Give {type(self).__name__} its params or keyword values, not both.")
        # Frozen, in eval mode and outside every checkpoint (see parts_state); a ModuleList so
        # that .to(device) and the CUDA-graph safety check see them.
        self.teachers = nn.ModuleList(Teacher(t) for t in teachers)
        self.parts: nn.Module | None = None  # trainable modules beyond the student (adapters)
        self.use_parts(None)

    def __getattr__(self, key: str):
        params = self.__dict__.get("params")
        if params is not None and key in type(params).model_fields:
            return getattr(params, key)  # self.temperature reads the validated parameter
        return super().__getattr__(key)

    def use_parts(self, runner: nn.Module | None) -> None:
        """What :meth:`forward` calls as ``self.run_parts``: the parts, or their DDP wrapper while
        several processes train. Kept out of the module tree: the parts are registered once."""
        object.__setattr__(self, "run_parts", runner)

    @property
    def teacher(self) -> Teacher | None:
        return self.teachers[0] if len(self.teachers) else None

    def setup(self, model: nn.Module, batch: dict, *, seed: int = 0) -> None:
        """Build trainable parts (``self.parts``) whose shapes one dry forward of ``batch`` tells
        (:func:`dry_forward`); called by the training loop, with the run's ``seed``, before the
        optimizer is built. Most methods have none."""

    def check_models(self, student: nn.Module, teachers=()) -> None:
        """Refuse, with a one-line error, a student or teacher (plain modules) this method cannot
        use, e.g. a module path that is not there; the pipeline calls it before anything is written."""

    def student_specs(self, student: str) -> dict[str, str]:
        """The students a run of this method trains, by name, each with its architecture (the
        config's ``student`` model is the first): one student, named ``""``, by default."""
        return {"": student}

    def build_students(self, first: nn.Module, *, seed: int, input_shape, num_classes: int) -> dict[str, nn.Module]:
        """Every student of :meth:`student_specs`, freshly initialised, ``first`` (built from the
        run's seed) the first: a pipeline trains each one's scratch twin from these weights."""
        return {"": first}

    def students(self, model: nn.Module) -> dict[str, nn.Module]:
        """The trained students, by name (names as :meth:`student_specs`)."""
        return {"": model}

    def begin_step(self, epochs_done: float) -> None:
        """Called before every training step with the epochs done so far (a fraction). A method
        whose loss changes with progress (a warm-up) updates a tensor in place here."""

    def combined_teacher_logits(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """What the teachers predict together, as logits at T = 1 (for the report's teacher
        accuracy, agreement and KL): one teacher's own logits by default."""
        return logits[0]

    def describe(self) -> str:
        """The loss as a formula with this run's values, e.g. ``0.1·ce + 0.9·T²·KL(T=4)``."""
        return self.name

    def key(self) -> dict:
        """The name and every parameter: part of each stage stamp and resume key."""
        return self.params.model_dump(mode="json")

    def parts_state(self) -> dict:
        """The trainable parts' state for a checkpoint (never a teacher's weights)."""
        return self.parts.state_dict() if self.parts is not None else {}

    def load_parts_state(self, state: dict) -> None:
        if self.parts is not None:
            self.parts.load_state_dict(state)
        elif state:
            raise ConfigError("The checkpoint holds trainable method parts this method does not have; "
                              "resume with the method that wrote it.")

    def train(self, mode: bool = True):
        super().train(mode)
        for teacher in self.teachers:
            teacher.train(False)
        return self


@torch.no_grad()
def dry_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in eval mode, without gradients: shapes for :meth:`Method.setup`, with no
    change to the model (batch-norm statistics included)."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: find ``cls`` by its ``name`` and ``aliases`` (``softkd ls methods``)."""
    if cls.needs not in NEEDS:
        raise ValueError(f"{cls.__name__}.needs must be one of {NEEDS}; got {cls.needs!r}")
    METHODS.register(cls.name, aliases=cls.aliases)(cls)
    return cls


def method_class(name: str) -> type[Method]:
    """The registered method ``name`` (or alias); the scratch objective is refused, saying why."""
    if name in SCRATCH_NAMES:
        raise ConfigError(f"'{name}' is not a distillation method: every run already trains the student from "
                          f"scratch beside the distilled one. Choose a method: {', '.join(METHODS.names())}.")
    return METHODS.resolve(name)[0]


def method_params(method: str | type[Method] | MethodParams, /, **values) -> MethodParams:
    """Validated parameters of ``method`` (a name, a class or params to update with ``values``)."""
    if isinstance(method, MethodParams):
        if not values:
            return method
        values, method = {**method.model_dump(exclude={"name"}), **values}, method.name
    cls = method if isinstance(method, type) else method_class(method)
    try:
        return cls.Params(**{**values, "name": cls.name})
    except ValidationError as exc:
        raise ConfigError(_describe_error(cls, exc.errors()[0])) from None


def _describe_error(cls: type[Method], error: dict) -> str:
    field = ".".join(str(p) for p in error["loc"])
    known = ", ".join(f for f in cls.Params.model_fields if f != "name") or "none"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field, [f for f in cls.Params.model_fields if f != "name"], n=1)
        hint = f" did you mean '{close[0]}'?" if close else ""
        return f"Unknown parameter 'method.{field}' for method '{cls.name}':{hint} its parameters are {known}."
    return (f"The 'method.{field}' of method '{cls.name}' is invalid: {error['msg'].removeprefix('Value error, ')}; "
            f"got {error.get('input')!r}.")


def build_method(method: str | MethodParams = "soft-target", /, *, teachers=(), **values) -> Method:
    """The method ``method`` (name or params) with ``teachers``, e.g.
    ``build_method("dkd", teachers=[teacher], beta=8.0)``."""
    params = method_params(method, **values)
    cls = method_class(params.name)
    count = len(teachers)
    if cls.teachers_needed == "several" and count == 1:
        raise ConfigError(f"Method '{cls.name}' combines several teachers; got one (list them under 'teachers:').")
    if cls.teachers_needed == "one" and count > 1:
        raise ConfigError(f"Method '{cls.name}' learns from one teacher; got {count}: use method 'multi-teacher' "
                          "to combine several.")
    if cls.teachers_needed == "none" and count:
        raise ConfigError(f"Method '{cls.name}' trains without a teacher; got {count}.")
    return cls(params, teachers=teachers)


def build_objective(name: str, **kwargs) -> Method:
    """Deprecated since 0.2: use :func:`build_method`."""
    warnings.warn("softkd.build_objective is deprecated; use softkd.build_method(name, teachers=[...], **params).",
                  DeprecationWarning, stacklevel=2)
    teacher = kwargs.pop("teacher", None)
    return build_method(name, teachers=[teacher] if teacher is not None else [], **kwargs)


def parameter_table(cls: type[Method]) -> list[tuple[str, str, str, str]]:
    """(parameter, default, range, description) of each of ``cls``'s parameters (``softkd ls methods``)."""
    rows = []
    for name, field in cls.Params.model_fields.items():
        if name == "name":
            continue
        bounds = []
        for m in field.metadata:
            for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                if getattr(m, attr, None) is not None:
                    bounds.append(f"{sign} {getattr(m, attr)}")
        choices = getattr(field.annotation, "__args__", None)
        if not bounds and choices and all(isinstance(a, str) for a in choices):
            bounds.append(" | ".join(choices))
        kind = getattr(field.annotation, "__name__", None) if not bounds else None
        rows.append((name, "required" if field.is_required() else repr(field.default), ", ".join(bounds) or kind or str(field.annotation),
                     field.description or ""))
    return rows
