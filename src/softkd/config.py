"""A run's configuration: pydantic models for each section, YAML loading and ``--set`` overrides.

Unknown keys are an error with a "did you mean"; every error is one line naming the key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from softkd.errors import ConfigError, SoftKDError, UnknownNameError
from softkd.methods.base import MethodParams, method_class, method_params


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    name: str = "digits"
    """A registered dataset (softkd ls datasets), or just a label for the user data in ``path``."""
    dir: str | None = None
    path: str | None = None
    """Your data: a .npz (x, optional y), a .csv (features + label column) or an image folder."""
    test_path: str | None = None
    """Test data in the same format; default: a fixed stratified ``test_fraction`` of ``path``."""
    unlabeled_path: str | None = None
    """Extra data added to the transfer set without labels (the semi-supervised case)."""
    label_column: str = "label"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    labeled_fraction: float | list[float] = 1.0
    """One fraction, or several: each is a regime run and reported side by side."""
    seed: int = 0
    augment: Literal["shift", "shift-flip", "mixup"] | None = None
    """Seeded augmentation of the training inputs (each view fixed by seed, sample id and view
    index); with the soft-label cache on, needs ``cache.views`` >= 2. ``mixup`` blends each input
    with a partner from the transfer set and the labels with the same weight."""
    shift: int = Field(2, ge=0)
    """Largest translation of ``augment``, in pixels."""
    mixup_alpha: float = Field(1.0, gt=0)
    """``mixup``'s blend weight λ ~ Beta(alpha, alpha) (1: uniform)."""

    def key(self, *, mode: str = "python", exclude: set[str] = frozenset()) -> dict:
        """The settings as a dict for stage and checkpoint keys; ``mixup_alpha`` only with mixup, so
        keys made before it existed still match."""
        return self.model_dump(mode=mode, exclude=set(exclude) | ({"mixup_alpha"} if self.augment != "mixup" else set()))

    @model_validator(mode="after")
    def _known_dataset(self):
        from softkd.data.datasets import DATASETS

        if self.path is None:
            _registered(DATASETS, self.name)
        return self

    @field_validator("labeled_fraction")
    @classmethod
    def _fractions(cls, value):
        for f in value if isinstance(value, list) else [value]:
            if not 0 < f <= 1:
                raise ValueError(f"each fraction must be in (0, 1], and {f} is not" if isinstance(value, list)
                                 else "must be in (0, 1]")
        if isinstance(value, list) and not value:
            raise ValueError("must list at least one fraction")
        return value

    @property
    def fractions(self) -> list[float]:
        return self.labeled_fraction if isinstance(self.labeled_fraction, list) else [self.labeled_fraction]


def _registered(registry, name: str) -> str:
    try:
        registry.resolve(name)
    except UnknownNameError as exc:
        raise ValueError(str(exc)) from None
    return name


def _known_model(name: str) -> str:
    """A zoo name is checked now; 'package.module:factory', 'torchvision:' and 'timm:' specs when
    the model is built (importing user code is not validation's business)."""
    if ":" in name:
        return name
    from softkd.models.zoo import MODELS

    return _registered(MODELS, name)


class TeacherConfig(_Section):
    model: str = "hinton-mlp-1200"
    kwargs: dict = Field(default_factory=dict)
    """Keyword arguments for a 'package.module:factory', torchvision: or timm: model."""
    checkpoint: str | None = None
    cache_dir: str | None = None
    """This teacher's soft-label cache (in a ``teachers:`` list); default ``<cache.dir or run
    directory/cache>/teacher<i>``. Naming the folder a single-teacher run built reuses it."""
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    lr_schedule: Literal["constant", "cosine", "onecycle", "step"] = "constant"
    augment: Literal["shift", "shift-flip"] | None = None
    """Augmentation of the teacher's own training images (a fresh seeded view every epoch, at most
    ``data.shift`` pixels); independent of ``data.augment``, which is the students'."""

    _model = field_validator("model")(classmethod(lambda cls, v: _known_model(v)))


class StudentConfig(_Section):
    model: str = "mlp-16"
    kwargs: dict = Field(default_factory=dict)

    _model = field_validator("model")(classmethod(lambda cls, v: _known_model(v)))


class TrainConfig(_Section):
    epochs: int = Field(15, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    """λ: the weight of R(θ) = ½‖w‖² on weights (not norms and biases), applied as weight decay."""
    patience: int | None = Field(None, ge=1)
    """Stop after this many epochs without a better ``monitor`` score (convergence)."""
    monitor: Literal["accuracy", "loss", "nll", "ece"] = "accuracy"
    """The validation metric that picks the best epoch (restored at the end) and drives ``patience``."""
    lr_schedule: Literal["constant", "cosine", "onecycle", "step"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    accumulate: int = Field(1, ge=1)
    """Micro-batches per optimizer step; batch_size is the whole step's batch."""
    clip_grad_norm: float | None = Field(None, gt=0)
    checkpoint_every: int | None = Field(None, ge=1)
    """Save full training state every N steps and at each epoch end (softkd run --resume)."""
    keep_last: int = Field(2, ge=1)
    log_every: int | None = Field(50, ge=1)
    """Write a step record (loss terms, lr, images/s) to metrics.jsonl every N steps."""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Forward-pass precision: bf16 / fp16 autocast (fp16 with loss scaling); weights stay fp32."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int | None = Field(None, ge=1)
    """CPU threads for torch (null: torch's default). Tiny models run fastest on 1."""
    cuda_graphs: Literal["auto"] | bool = "auto"
    """Replay each training step from a CUDA graph, its loss compiled into a few fused kernels:
    auto where known to be safe (CUDA, one process, no accumulation, fp32/bf16, zoo or plain
    torch.nn models); true also for other models (their forward must not read values on the
    host); false never. Changes how fast, not what a student learns."""
    deterministic: bool = False
    """Deterministic algorithms only (cuDNN autotuning off; an op without one stops the run, named):
    GPU runs then repeat bit for bit, somewhat slower. CPU runs repeat bit for bit either way."""


class CacheConfig(_Section):
    """The soft-label cache: the teacher's raw logits on the transfer set, computed once."""

    enabled: bool = True
    dir: str | None = None
    """Default: <run directory>/cache, rebuilt when stale. A folder named here can be shared by
    runs; one built for another teacher or data is refused, naming what differs."""
    dtype: Literal["fp16", "fp32"] = "fp16"
    top_k: int | None = Field(None, ge=1)
    """Store only the k largest logits and the tail's mass (large label spaces)."""
    views: int = Field(1, ge=1)
    """Augmented views cached per sample (with ``data.augment``); each epoch trains on one of them."""
    features: bool = True
    """Feature methods read the teacher's tapped features from a cache built once beside the
    soft-label cache (disk: samples × feature size × 2 bytes in fp16); false: the teacher runs on
    every batch. With data.augment the teacher always runs live for features."""
    shard_size: int = Field(16384, ge=1)
    """Samples per shard file; shards are the unit of resuming and of splitting a build across processes."""


class OutputConfig(_Section):
    dir: str | None = None
    """Run directory; default ``runs/<config file name>``."""
    tensorboard: bool = False
    """Also write TensorBoard event files under ``<run dir>/tensorboard/`` (needs ``tensorboard``)."""
    latency: bool = True
    """At the end of a run, time the teacher and each student architecture on this machine
    (batch 1 latency, batch 256 throughput; seconds on CPU): the report's speed figures."""


class RunConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig | None = Field(default_factory=TeacherConfig)
    """The teacher; ``null`` (or left out) for a method that trains without one (``mutual``)."""
    teachers: list[TeacherConfig] | None = None
    """Several teachers (method multi-teacher), each with the keys of ``teacher``, instead of ``teacher``."""
    student: StudentConfig = Field(default_factory=StudentConfig)
    method: SerializeAsAny[MethodParams] = Field(default_factory=lambda: method_params("soft-target"))
    """The distillation method: ``name`` and that method's own parameters (softkd ls methods)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, raw):
        if isinstance(raw, MethodParams):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"must be a mapping with the method's name and parameters; got {raw!r}")
        values = dict(raw)
        try:
            return method_params(values.pop("name", "soft-target"), **values)
        except SoftKDError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _teachers_fit_the_method(self):
        needed = method_class(self.method.name).teachers_needed
        several = needed == "several"
        if needed == "none":
            if self.teachers is not None or ("teacher" in self.model_fields_set and self.teacher is not None):
                raise ValueError(f"method '{self.method.name}' trains without a teacher (its peers teach each other); "
                                 "remove 'teacher:' or set teacher: null")
            self.__dict__["teacher"] = None  # the default teacher does not apply (no re-validation on assignment)
            return self
        if self.teacher is None and self.teachers is None:
            raise ValueError(f"method '{self.method.name}' needs a teacher; give 'teacher:' (model and checkpoint)")
        if self.teachers is not None:
            if "teacher" in self.model_fields_set:
                raise ValueError("give either 'teacher' (one) or 'teachers' (a list), not both")
            if len(self.teachers) < 2:
                raise ValueError("'teachers' must list at least 2 teachers; give one as 'teacher'")
            if not several:
                raise ValueError(f"'teachers' lists {len(self.teachers)} teachers but method '{self.method.name}' "
                                 "learns from one; use method.name: multi-teacher")
        elif several:
            raise ValueError(f"method '{self.method.name}' combines several teachers: list them under 'teachers:'")
        return self

    @model_validator(mode="after")
    def _a_search_has_validation_data(self):
        if method_class(self.method.name).searches and self.data.val_fraction == 0:
            raise ValueError(f"method '{self.method.name}' chooses by validation accuracy, and data.val_fraction is 0 "
                             "(no validation split); set data.val_fraction > 0, e.g. 0.1")
        return self

    @property
    def teacher_list(self) -> list[TeacherConfig]:
        """The run's teachers: ``teachers``, or the one ``teacher`` (none for a teacher-free method)."""
        if self.teachers is not None:
            return list(self.teachers)
        return [self.teacher] if self.teacher is not None else []

    @model_validator(mode="after")
    def _views_match_augmentation(self):
        augment, cache = self.data.augment, self.cache
        if augment is not None and cache.enabled and cache.views == 1:
            raise ValueError(f"data.augment '{augment}' with a static soft-label cache (cache.views: 1) would teach "
                             "each augmented view with the un-augmented image's logits; set cache.views to K >= 2 "
                             "(K cached views per sample) or cache.enabled: false (the teacher runs on every batch)")
        if augment is None and cache.views > 1:
            raise ValueError(f"cache.views: {cache.views} needs data.augment (shift, shift-flip or mixup) to make the views; "
                             "set data.augment or cache.views: 1")
        return self

    @model_validator(mode="after")
    def _mixup_has_class_targets(self):
        if self.data.augment == "mixup" and self.method.name == "dkd":
            raise ValueError("method 'dkd' splits each output at its sample's target class, and mixup's blended "
                             "labels have none; use soft-target or dist with data.augment: mixup")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from the defaults) and apply ``a.b=c`` overrides."""
    where = "--set overrides"
    raw: dict = {}
    if path is not None:
        path = Path(path)
        where = str(path)
        if path.is_dir():
            raise ConfigError(f"'{path}' is a folder, not a config file; give the path of a YAML run config "
                              "(see configs/).")
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' not found; give the path of a YAML run config (see configs/).")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"'{path}' is not valid YAML{line}: {getattr(exc, 'problem', exc)}.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"'{path}' must hold a mapping of sections (data, teacher, ...); got {type(raw).__name__}.")
    for override in overrides or []:
        _apply_override(raw, override)
    return config_from_dict(raw, where=where)


def config_from_dict(raw: dict, *, where: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], where)) from None


def _apply_override(raw: dict, override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"Override '{override}' must look like section.key=value (e.g. method.temperature=2).")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override '{override}': '{part}' is a value, not a section.")
    node[leaf] = yaml.safe_load(value) if value.strip() else None


def _describe(error: dict, where: str) -> str:
    loc = [str(p) for p in error["loc"]]
    dotted = ".".join(loc)
    if error["type"] == "extra_forbidden":
        model = RunConfig
        for part in loc[:-1]:
            model = model.model_fields[part].annotation
        close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(model.model_fields)}."
        return f"Unknown key '{dotted}' in {where}: {hint}"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    got_text = "" if isinstance(got, dict) or error["type"].startswith("unknown") else f"; got {got!r}"
    if not loc:  # a check across sections: the message names its keys
        return f"In {where}: {message}."
    if loc == ["method"]:  # the method's own errors name the parameter, its range and the method's others
        return f"{message.rstrip('.')} (in {where})."
    if "Unknown " in message:  # registry errors already name the value and the fix
        return f"{dotted} in {where}: {message}"
    return f"The '{dotted}' in {where} is invalid: {message}{got_text}."


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
