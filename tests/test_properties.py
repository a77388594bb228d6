"""Property-based tests of every loss in ``softkd.losses`` and of ``validate_soft_targets``.

Random shapes, temperatures, betas, masks, unlabeled rows, logits up to ±1e4 and fp16/bf16 inputs.
Checked: finite values and gradients, non-negativity, zero when student = teacher, softmax shift
invariance, agreement with independent float64 formulas written here, masked and unlabeled rows
left out, low-precision inputs computed in float32, and bad inputs rejected with softkd's errors.

Every example is derived from a fixed seed (``derandomize``), so a failure found once is found on
every run; nothing is written to disk (``database=None``). Hypothesis also draws constants it finds
in the local modules loaded so far, so every softkd module is loaded first: the examples are the
same whether this file runs alone or after any other.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import softkd
from softkd.errors import ConfigError, InfeasibleSoftTargetsError, ShapeMismatchError
from softkd.losses.dist import dist_objective, dist_terms
from softkd.losses.dkd import dkd_objective, dkd_target, dkd_terms
from softkd.losses.features import attention_loss, hint_loss
from softkd.losses.logits import (
    SUM_TOLERANCE,
    UNLABELED,
    cross_entropy,
    ensemble_targets,
    kd_objective,
    soft_target_kl,
    soften,
    standardize_logits,
    supervised_objective,
    validate_soft_targets,
)
from softkd.losses.mutual import mutual_objective

for _module in pkgutil.walk_packages(softkd.__path__, "softkd."):
    if not _module.name.endswith("__main__"):  # running that one would start the command line
        importlib.import_module(_module.name)

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)
LIMIT = 1e4  # the largest logit magnitude drawn
LOW_PRECISION = [torch.float16, torch.bfloat16]
TEMPERATURES = st.floats(0.5, 20.0)
BETAS = st.floats(0.0, 1.0, exclude_min=True)
SEEDS = st.integers(0, 2**32 - 1)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


@st.composite
def logits_of(draw, shape: tuple[int, ...], *, moderate: bool = False) -> torch.Tensor:
    """float64 logits of ``shape`` in [-1e4, 1e4]: Gaussian at a drawn scale; unless ``moderate``,
    sometimes with entries at ±1e4 (saturated softmax) or rows of ties."""
    g = torch.Generator().manual_seed(draw(SEEDS))
    if moderate:
        return torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.floats(0.3, 5.0))
    scale = draw(st.sampled_from([1e-3, 0.3, 3.0, 30.0, 1e3, 1e4]))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    kind = draw(st.sampled_from(["gaussian", "some at ±1e4", "all at ±1e4", "ties"]))
    signs = torch.where(torch.rand(shape, generator=g) < 0.5, -LIMIT, LIMIT).double()
    if kind == "some at ±1e4":
        x = torch.where(torch.rand(shape, generator=g) < 0.3, signs, x)
    elif kind == "all at ±1e4":
        x = signs
    elif kind == "ties":
        x = x[..., :1].expand(shape).clone()
    return x.clamp(-LIMIT, LIMIT)


@dataclass
class Batch:
    student: torch.Tensor  # float64 (N, C) or (B, L, C)
    teacher: torch.Tensor
    labels: torch.Tensor  # (N,) or (B, L); -1 marks an unlabeled sample
    mask: torch.Tensor  # bool, same shape as labels
    temperature: float
    beta: float


@st.composite
def batches(draw, *, ndims=(2, 3), min_classes: int = 2, moderate: bool = False,
            unlabeled=(0.0, 0.3, 1.0), kept=(0.0, 0.5, 1.0)) -> Batch:
    ndim = draw(st.sampled_from(ndims))
    lead = (draw(st.integers(1, 64)),) if ndim == 2 else (draw(st.integers(1, 4)), draw(st.integers(1, 8)))
    classes = draw(st.integers(min_classes, 50))
    shape = lead + (classes,)
    student = draw(logits_of(shape, moderate=moderate))
    teacher = draw(logits_of(shape, moderate=moderate))
    g = torch.Generator().manual_seed(draw(SEEDS))
    labels = torch.randint(0, classes, lead, generator=g)
    labels[torch.rand(lead, generator=g) < draw(st.sampled_from(unlabeled))] = UNLABELED
    mask = torch.rand(lead, generator=g) < draw(st.sampled_from(kept))
    return Batch(student, teacher, labels, mask, draw(TEMPERATURES), draw(BETAS))


# --------------------------------------------------------------------------------------------
# Independent float64 references
# --------------------------------------------------------------------------------------------


def ref_kl_rows(student, teacher, temperature):
    """T² · Σ_c p_t (log p_t − log p_s) per sample, flattened to (samples,)."""
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    log_q = torch.log_softmax(student.double() / temperature, -1)
    rows = (log_p.exp() * (log_p - log_q)).sum(-1)
    return temperature**2 * rows.reshape(-1)


def ref_mean(rows, keep=None):
    if keep is None:
        return rows.mean()
    keep = keep.reshape(-1).double()
    return (rows * keep).sum() / max(float(keep.sum()), 1.0)


def ref_ce(student, labels, keep=None):
    logits, labels = student.double().reshape(-1, student.shape[-1]), labels.reshape(-1)
    labeled = labels >= 0
    if keep is not None:
        labeled &= keep.reshape(-1)
    if not labeled.any():
        return torch.tensor(0.0, dtype=torch.float64)
    log_q = torch.log_softmax(logits[labeled], -1)
    return -log_q[torch.arange(int(labeled.sum())), labels[labeled]].mean()


def ref_standardize(z):
    z = z.double()
    centred = z - z.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-14).sqrt()


def ref_pearson(a, b, dim):
    a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (((a * a).sum(dim) * (b * b).sum(dim)).sqrt() + 1e-8)


def close(actual, expected, *, rel, abs):
    return float(torch.as_tensor(actual).detach()) == pytest.approx(float(expected), rel=rel, abs=abs)


# --------------------------------------------------------------------------------------------
# The losses, as (student, teacher, labels, temperature, beta) -> scalar
# --------------------------------------------------------------------------------------------


def _ensemble(s, t, y, T, b):
    teachers = torch.stack([t, t.roll(1, 0), 0.5 * t], 1)  # (N, 3, C)
    logits, probs = ensemble_targets(teachers, torch.tensor([0.5, 0.25, 0.25]), temperature=T, combine="probs")
    return kd_objective(s, y, logits, soft_targets=probs, temperature=T, beta=b)["loss"]


def _as_maps(x):
    return x.reshape(x.shape[0], -1, 1, x.shape[-1])  # (N, C) -> (N, 1, 1, C); (B, L, C) -> (B, L, 1, C)


@dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable
    ndims: tuple = (2, 3)
    min_classes: int = 2
    upper: Callable | None = None  # an upper bound as a function of T, where the loss has one


LOSSES = [
    Loss("soft_target_kl", lambda s, t, y, T, b: soft_target_kl(s, t, temperature=T)),
    Loss("soft_target_kl, soft targets", lambda s, t, y, T, b: soft_target_kl(s, soft_targets=soften(t, T),
                                                                              temperature=T)),
    Loss("kd_objective", lambda s, t, y, T, b: kd_objective(s, y, t, temperature=T, beta=b)["loss"]),
    Loss("kd_objective, standardized, kd_scale", lambda s, t, y, T, b: kd_objective(
        s, y, t, temperature=T, beta=b, kd_scale=3.0, standardize=True)["loss"]),
    Loss("kd_objective, ensemble of probabilities", _ensemble, ndims=(2,)),
    Loss("dkd_terms", lambda s, t, y, T, b: sum(dkd_terms(s, t, dkd_target(y, t), temperature=T)),
         ndims=(2,), min_classes=3),
    Loss("dkd_objective", lambda s, t, y, T, b: dkd_objective(s, y, t, temperature=T)["loss"],
         ndims=(2,), min_classes=3),
    Loss("dkd_objective, standardized", lambda s, t, y, T, b: dkd_objective(s, y, t, temperature=T,
                                                                            standardize=True)["loss"],
         ndims=(2,), min_classes=3),
    Loss("dist_terms", lambda s, t, y, T, b: sum(dist_terms(s, t, temperature=T)), ndims=(2,),
         upper=lambda T: 4 * T**2),
    Loss("dist_objective", lambda s, t, y, T, b: dist_objective(s, y, t, temperature=T)["loss"], ndims=(2,)),
    Loss("mutual_objective", lambda s, t, y, T, b: mutual_objective([s, t], y, temperature=T)["loss"]),
    Loss("cross_entropy", lambda s, t, y, T, b: cross_entropy(s, y)),
    Loss("supervised_objective", lambda s, t, y, T, b: supervised_objective(s, y)["loss"]),
    Loss("hint_loss", lambda s, t, y, T, b: hint_loss(s, t)),
    # unit attention maps with entries >= 0 are at most √2 apart: per sample ≤ 2 / positions
    Loss("attention_loss", lambda s, t, y, T, b: attention_loss(_as_maps(s), _as_maps(t)), upper=lambda T: 2.0),
]
IDS = [loss.name for loss in LOSSES]


def _lower_bound(temperature):
    # A divergence computed in float32 may round to a hair below 0; a sign error would not.
    return -1e-6 * (1 + temperature**2)


# --------------------------------------------------------------------------------------------
# 1. validate_soft_targets
# --------------------------------------------------------------------------------------------

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _tolerance(dtype):
    """The sum tolerance validate_soft_targets applies (its code: 1e-4, plus eps below float32)."""
    return SUM_TOLERANCE + (0.0 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps)


@st.composite
def softmax_outputs(draw, dtype):
    ndim = draw(st.sampled_from([2, 3]))
    lead = (draw(st.integers(1, 64)),) if ndim == 2 else (draw(st.integers(1, 4)), draw(st.integers(1, 8)))
    logits = draw(logits_of(lead + (draw(st.integers(2, 50)),)))
    if draw(st.booleans()):
        return torch.softmax(logits, -1).to(dtype)  # softmax in float64, then cast
    return torch.softmax(logits.to(dtype), -1)  # softmax in the dtype itself


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@PROPERTY
@given(data=st.data())
def test_softmax_outputs_are_accepted_unchanged(dtype, data):
    p = data.draw(softmax_outputs(dtype))
    before = p.clone()
    assert validate_soft_targets(p) is p
    assert torch.equal(p, before)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@PROPERTY
@given(data=st.data(), kind=st.sampled_from(["nan", "+inf", "-inf", "negative", "above one"]))
def test_one_bad_entry_is_rejected_naming_its_row(dtype, data, kind):
    p = data.draw(softmax_outputs(dtype))
    rows = p.view(-1, p.shape[-1])  # a 3-D tensor's rows are named by their flattened index
    row = data.draw(st.integers(0, rows.shape[0] - 1))
    col = data.draw(st.integers(0, rows.shape[1] - 1))
    precise = dtype in (torch.float32, torch.float64)
    if kind == "negative":
        value = -(10 ** data.draw(st.floats(-6, 1)))
    elif kind == "above one":  # far enough above 1 to survive rounding to the dtype
        value = 1 + 10 ** data.draw(st.floats(-6 if precise else -2, 2))
    else:
        value = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}[kind]
    rows[row, col] = value
    reason = {"negative": "has negative entries", "above one": "has entries greater than 1"}.get(
        kind, "has NaN or inf entries")
    with pytest.raises(InfeasibleSoftTargetsError) as info:
        validate_soft_targets(p)
    assert f"row(s) {row} {reason}" in str(info.value)


def _shift_row_sum(row: torch.Tensor, offset: float) -> torch.Tensor:
    """A float64 probability row moved to sum to 1 + offset with every entry kept in [0, 1]."""
    if offset < 0:
        return row * (1 + offset)
    room = 1 - row  # Σ room = C − 1 >= 1, so no entry passes 1 while offset <= 1
    return row + offset * room / room.sum()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@PROPERTY
@given(data=st.data(), sign=st.sampled_from([-1.0, 1.0]), within=st.booleans())
def test_row_sum_tolerance_boundary(dtype, data, sign, within):
    n, classes = data.draw(st.integers(1, 64)), data.draw(st.integers(2, 50))
    p = torch.softmax(data.draw(logits_of((n, classes))), -1)
    row = data.draw(st.integers(0, n - 1))
    tolerance = _tolerance(dtype)
    # Well inside (half the tolerance) or well outside (twice it, beyond the rounding of the cast).
    offset = sign * (data.draw(st.floats(0.0, 0.5 * SUM_TOLERANCE)) if within
                     else data.draw(st.floats(2 * tolerance, 0.5)))
    p[row] = _shift_row_sum(p[row], offset)
    p = p.to(dtype)
    if within:
        assert validate_soft_targets(p) is p
    else:
        with pytest.raises(InfeasibleSoftTargetsError) as info:
            validate_soft_targets(p)
        assert f"row(s) {row} does not sum to 1" in str(info.value)


@PROPERTY
@given(shape=st.one_of(
    st.lists(st.integers(1, 5), min_size=0, max_size=1),  # a scalar or one row
    st.lists(st.integers(1, 4), min_size=4, max_size=5),  # 4-D or 5-D
    st.lists(st.integers(1, 6), min_size=1, max_size=2).map(lambda lead: lead + [1]),  # one class
))
def test_wrong_shapes_are_rejected(shape):
    probs = torch.full(tuple(shape), 1.0 / shape[-1] if shape else 1.0)
    with pytest.raises(ShapeMismatchError, match=r"\(N, C\) or \(B, L, C\)"):
        validate_soft_targets(probs)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@PROPERTY
@given(data=st.data(), temperature=TEMPERATURES)
def test_soften_gives_feasible_soft_targets(dtype, data, temperature):
    shape = (data.draw(st.integers(1, 32)), data.draw(st.integers(2, 50)))
    logits = data.draw(logits_of(shape)).to(dtype)
    p = soften(logits, temperature)
    assert p.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert validate_soft_targets(p) is p


# --------------------------------------------------------------------------------------------
# 2. Every loss: finite, bounded, finite gradients, on logits up to ±1e4
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@PROPERTY
@given(data=st.data())
def test_finite_non_negative_with_finite_gradients(loss, data):
    b = data.draw(batches(ndims=loss.ndims, min_classes=loss.min_classes))
    s = b.student.float().requires_grad_()
    value = loss.fn(s, b.teacher.float(), b.labels, b.temperature, b.beta)
    value.backward()
    value = float(value.detach())
    assert math.isfinite(value) and torch.isfinite(s.grad).all()
    assert value >= _lower_bound(b.temperature)
    if loss.upper is not None:
        assert value <= loss.upper(b.temperature) * (1 + 1e-6)


# --------------------------------------------------------------------------------------------
# 3. Zero when the student is the teacher
# --------------------------------------------------------------------------------------------

# The distillation part of each loss, at student = teacher.
DISTILLATION_TERMS = [
    ("soft_target_kl", lambda t, y, T: [soft_target_kl(t.clone(), t, temperature=T)], 2),
    ("kd_objective kd", lambda t, y, T: [kd_objective(t.clone(), y, t, temperature=T)["kd"]], 2),
    ("kd_objective kd, standardized", lambda t, y, T: [
        kd_objective(t.clone(), y, t, temperature=T, standardize=True)["kd"]], 2),
    ("dkd_terms", lambda t, y, T: list(dkd_terms(t.clone(), t, dkd_target(y, t), temperature=T)), 3),
    ("mutual_objective kl", lambda t, y, T: [mutual_objective([t.clone(), t], y, temperature=T)["kl"]], 2),
    ("hint_loss", lambda t, y, T: [hint_loss(t.clone(), t)], 2),
    ("attention_loss", lambda t, y, T: [attention_loss(_as_maps(t.clone()), _as_maps(t))], 2),
]


@pytest.mark.parametrize("name, terms, min_classes", DISTILLATION_TERMS, ids=[d[0] for d in DISTILLATION_TERMS])
@PROPERTY
@given(data=st.data())
def test_exactly_zero_when_student_equals_teacher(name, terms, min_classes, data):
    # Both sides go through the same operations on the same values: the difference is exactly 0.
    b = data.draw(batches(ndims=(2,), min_classes=min_classes))
    for value in terms(b.teacher.float(), b.labels, b.temperature):
        assert float(value) == 0.0


@PROPERTY
@given(data=st.data())
def test_soft_targets_path_is_zero_up_to_rounding_when_student_equals_teacher(data):
    b = data.draw(batches())
    t = b.teacher.float()
    value = soft_target_kl(t, soft_targets=soften(t, b.temperature), temperature=b.temperature)
    # log(softmax(x)) and log_softmax(x) differ in the last float32 bit of each entry
    assert 0.0 <= float(value) <= 1e-5 * b.temperature**2


@PROPERTY
@given(data=st.data())
def test_dist_is_zero_when_student_equals_teacher_and_probabilities_vary(data):
    b = data.draw(batches(ndims=(2,), moderate=True))
    assume(b.teacher.shape[0] >= 2)
    t = b.teacher.float()
    p = torch.softmax(t.double() / b.temperature, -1)
    # The Pearson correlations carry eps = 1e-8 in the denominator: 0 holds where variances ≫ eps.
    spread = min(float(((p - p.mean(0)) ** 2).sum(0).min()), float(((p - p.mean(1, keepdim=True)) ** 2).sum(1).min()))
    assume(spread > 1e-3)
    inter, intra = dist_terms(t.clone(), t, temperature=b.temperature)
    assert abs(float(inter)) <= 1e-4 * b.temperature**2
    assert abs(float(intra)) <= 1e-4 * b.temperature**2


@PROPERTY
@given(data=st.data(), all_masked=st.booleans())
def test_dist_is_zero_when_student_equals_teacher_with_one_sample_or_none(data, all_masked):
    b = data.draw(batches(ndims=(2,), moderate=True))
    t = b.teacher.float() if all_masked else b.teacher[:1].float()
    mask = torch.zeros(t.shape[0], dtype=torch.bool) if all_masked else None
    _, intra = dist_terms(t.clone(), t, temperature=b.temperature, mask=mask)
    assert abs(float(intra)) <= 1e-4 * b.temperature**2


# --------------------------------------------------------------------------------------------
# 4. Softmax shift invariance (float64: the property is exact up to float64 rounding)
# --------------------------------------------------------------------------------------------


@st.composite
def row_shifts(draw, batch: Batch):
    g = torch.Generator().manual_seed(draw(SEEDS))
    return (torch.rand(batch.student.shape[:-1] + (1,), generator=g, dtype=torch.float64) - 0.5) * 2e3


SHIFT_INVARIANT = [
    ("soft_target_kl", lambda s, t, y, T: soft_target_kl(s, t, temperature=T), (2, 3), 2),
    ("dkd_terms", lambda s, t, y, T: torch.stack(dkd_terms(s, t, dkd_target(y, t), temperature=T)), (2,), 3),
    ("dist_terms", lambda s, t, y, T: torch.stack(dist_terms(s, t, temperature=T)), (2,), 2),
    ("soften", lambda s, t, y, T: soften(s, T), (2, 3), 2),
]


@pytest.mark.parametrize("name, fn, ndims, min_classes", SHIFT_INVARIANT, ids=[x[0] for x in SHIFT_INVARIANT])
@PROPERTY
@given(data=st.data())
def test_adding_a_constant_per_row_changes_nothing(name, fn, ndims, min_classes, data):
    b = data.draw(batches(ndims=ndims, min_classes=min_classes))
    shift_s, shift_t = data.draw(row_shifts(b)), data.draw(row_shifts(b))
    before = fn(b.student, b.teacher, b.labels, b.temperature)
    after = fn(b.student + shift_s, b.teacher + shift_t, b.labels, b.temperature)
    # 1e4 + 1e3 in float64 is exact to ~2e-12; that error, over T >= 0.5, bounds the change.
    assert torch.allclose(after, before, rtol=1e-8, atol=1e-7 * (1 + b.temperature**2))


@PROPERTY
@given(data=st.data(), log_scale=st.floats(-3, 3))
def test_standardized_kd_ignores_the_offset_and_scale_of_each_row(data, log_scale):
    b = data.draw(batches(moderate=True))
    g = torch.Generator().manual_seed(data.draw(SEEDS))
    scale = torch.exp(torch.rand(b.student.shape[:-1] + (1,), generator=g, dtype=torch.float64) * log_scale)
    kwargs = dict(temperature=b.temperature, beta=1.0, standardize=True)
    before = kd_objective(b.student, None, b.teacher, **kwargs)["kd"]
    after = kd_objective(b.student * scale + 7.0, None, b.teacher * scale - 3.0, **kwargs)["kd"]
    assert close(after, before, rel=1e-6, abs=1e-8 * b.temperature**2)


@PROPERTY
@given(data=st.data())
def test_standardized_logits_have_zero_mean_unit_std_and_bounded_entries(data):
    b = data.draw(batches(moderate=True))
    assume(float(b.student.var(-1).min()) > 1e-6)  # a near-constant row is all eps
    z = standardize_logits(b.student)
    classes = z.shape[-1]
    assert torch.allclose(z.mean(-1), torch.zeros(()).double(), atol=1e-9)
    assert torch.allclose(z.pow(2).mean(-1), torch.ones(()).double(), atol=1e-6)
    # a population z-score is at most √(C − 1) in magnitude
    assert float(z.abs().max()) <= math.sqrt(classes - 1) + 1e-9


# --------------------------------------------------------------------------------------------
# 5. Agreement with the independent float64 formulas
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data(), masked=st.booleans())
def test_soft_target_kl_matches_the_formula(data, masked):
    b = data.draw(batches())
    mask = b.mask if masked else None
    expected = ref_mean(ref_kl_rows(b.student, b.teacher, b.temperature), mask)
    value = soft_target_kl(b.student, b.teacher, temperature=b.temperature, mask=mask)
    assert close(value, expected, rel=1e-9, abs=1e-10 * b.temperature**2)
    probs = torch.softmax(b.teacher / b.temperature, -1)  # exact zeros where saturated: 0·log 0 = 0
    value = soft_target_kl(b.student, soft_targets=probs, temperature=b.temperature, mask=mask)
    assert close(value, expected, rel=1e-8, abs=1e-9 * b.temperature**2)


@PROPERTY
@given(data=st.data())
def test_float32_soft_target_kl_is_close_to_float64(data):
    b = data.draw(batches(moderate=True))
    s, t = b.student.float(), b.teacher.float()
    expected = ref_mean(ref_kl_rows(s, t, b.temperature))
    value = soft_target_kl(s, t, temperature=b.temperature)
    assert close(value, expected, rel=1e-4, abs=1e-5 * (1 + b.temperature**2))


@PROPERTY
@given(data=st.data(), masked=st.booleans())
def test_soft_target_kl_gradient_is_t_times_q_minus_p(data, masked):
    b = data.draw(batches())
    mask = b.mask if masked else torch.ones_like(b.mask)
    s = b.student.clone().requires_grad_()
    soft_target_kl(s, b.teacher, temperature=b.temperature, mask=mask if masked else None).backward()
    q, p = torch.softmax(b.student / b.temperature, -1), torch.softmax(b.teacher / b.temperature, -1)
    expected = b.temperature * (q - p) * mask[..., None] / max(int(mask.sum()), 1)
    assert torch.allclose(s.grad, expected, rtol=1e-7, atol=1e-12 * b.temperature)


@PROPERTY
@given(data=st.data(), kd_scale=st.floats(0.5, 4.0), standardize=st.booleans(), masked=st.booleans())
def test_kd_objective_matches_the_formula(data, kd_scale, standardize, masked):
    b = data.draw(batches())
    mask = b.mask if masked else None
    kd_s, kd_t = (ref_standardize(b.student), ref_standardize(b.teacher)) if standardize else (b.student, b.teacher)
    kd = ref_mean(ref_kl_rows(kd_s, kd_t, b.temperature), mask)
    ce = ref_ce(b.student, b.labels, mask)
    out = kd_objective(b.student, b.labels, b.teacher, temperature=b.temperature, beta=b.beta, kd_scale=kd_scale,
                       standardize=standardize, mask=mask)
    tolerance = dict(rel=1e-7, abs=1e-9 * (1 + b.temperature**2))
    assert close(out["ce"], ce, **tolerance)
    assert close(out["kd"], kd, **tolerance)
    assert close(out["loss"], (1 - b.beta) * ce + b.beta * kd_scale * kd, **tolerance)


def _ref_dkd_rows(student, teacher, target, temperature):
    """(TCKD, NCKD) per sample from the probabilities (not in log space): b = (p_g, Σ_{j≠g} p_j),
    p̂ = the non-target probabilities renormalised."""
    def parts(z):
        p = torch.softmax(z / temperature, -1)
        p_g = p.gather(1, target[:, None])
        others = p.scatter(1, target[:, None], 0.0)
        rest = others.sum(1, keepdim=True)
        return torch.cat([p_g, rest], 1), others / rest
    (bt, pt), (bs, ps) = parts(teacher), parts(student)
    kl = lambda a, c: (torch.xlogy(a, a) - torch.xlogy(a, c)).sum(1)  # noqa: E731
    return temperature**2 * kl(bt, bs), temperature**2 * kl(pt, ps)


@PROPERTY
@given(data=st.data())
def test_dkd_terms_match_the_formula(data):
    b = data.draw(batches(ndims=(2,), min_classes=3, moderate=True))
    target = dkd_target(b.labels, b.teacher)
    tckd, nckd = dkd_terms(b.student, b.teacher, target, temperature=b.temperature)
    ref_tckd, ref_nckd = _ref_dkd_rows(b.student, b.teacher, target, b.temperature)
    assert close(tckd, ref_tckd.mean(), rel=1e-7, abs=1e-9 * b.temperature**2)
    assert close(nckd, ref_nckd.mean(), rel=1e-7, abs=1e-9 * b.temperature**2)


@PROPERTY
@given(data=st.data())
def test_dkd_terms_decompose_the_kl(data):
    # Zhao et al. eq. 5, per sample: T²·KL(p_t ‖ p_s) = TCKD + (1 − p_g^t)·NCKD.
    b = data.draw(batches(ndims=(2,), min_classes=3))
    target = dkd_target(b.labels, b.teacher)
    for i in range(min(b.student.shape[0], 8)):
        s, t, g = b.student[i:i + 1], b.teacher[i:i + 1], int(target[i])
        tckd, nckd = dkd_terms(s, t, target[i:i + 1], temperature=b.temperature)
        z = t[0] / b.temperature
        not_target = torch.exp(torch.logsumexp(torch.cat([z[:g], z[g + 1:]]), 0) - torch.logsumexp(z, 0))
        kl = soft_target_kl(s, t, temperature=b.temperature)
        assert close(tckd + not_target * nckd, kl, rel=1e-8, abs=1e-8 * b.temperature**2)


@PROPERTY
@given(data=st.data())
def test_dist_terms_match_the_formula(data):
    b = data.draw(batches(ndims=(2,), moderate=True))
    p_s = torch.softmax(b.student / b.temperature, -1)
    p_t = torch.softmax(b.teacher / b.temperature, -1)
    inter, intra = dist_terms(b.student, b.teacher, temperature=b.temperature)
    scale = b.temperature**2
    assert close(inter, scale * (1 - ref_pearson(p_s, p_t, 1)).mean(), rel=1e-6, abs=1e-6 * scale)
    relation = (1 - ref_pearson(p_s, p_t, 0)).mean() if len(p_s) >= 2 else 0.0  # none across one sample
    assert close(intra, scale * relation, rel=1e-6, abs=1e-6 * scale)


@PROPERTY
@given(data=st.data(), peers=st.integers(2, 3))
def test_mutual_objective_matches_the_formula(data, peers):
    b = data.draw(batches())
    logits = [b.student, b.teacher, b.student.flip(-1)][:peers]
    out = mutual_objective(logits, b.labels, temperature=b.temperature)
    expected = 0.0
    for i, own in enumerate(logits):
        kl = sum(ref_mean(ref_kl_rows(own, other, b.temperature)) for j, other in enumerate(logits) if j != i)
        expected = expected + ref_ce(own, b.labels) + kl / (peers - 1)
    assert close(out["loss"], expected, rel=1e-8, abs=1e-9 * (1 + b.temperature**2))


@PROPERTY
@given(data=st.data(), use_mask=st.booleans())
def test_cross_entropy_and_supervised_objective_match_the_formula(data, use_mask):
    b = data.draw(batches())
    mask = b.mask if use_mask else None
    assert close(cross_entropy(b.student, b.labels, mask=mask), ref_ce(b.student, b.labels, mask), rel=1e-9, abs=1e-12)
    assert close(supervised_objective(b.student, b.labels)["loss"], ref_ce(b.student, b.labels), rel=1e-9, abs=1e-12)


@st.composite
def feature_maps(draw, *, moderate=True):
    shape = (draw(st.integers(1, 8)), draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    return draw(logits_of(shape, moderate=moderate)), draw(logits_of(shape, moderate=moderate))


@PROPERTY
@given(maps=feature_maps(moderate=False))
def test_hint_and_attention_losses_match_the_formula(maps):
    student, teacher = maps
    assert close(hint_loss(student, teacher), ((student - teacher) ** 2).flatten(1).mean(1).mean(), rel=1e-9, abs=0)

    def attention(f):
        q = (f**2).mean(1).flatten(1)
        return q / q.norm(dim=1, keepdim=True).clamp(min=1e-12)
    expected = ((attention(student) - attention(teacher)) ** 2).mean(1).mean()
    assert close(attention_loss(student, teacher), expected, rel=1e-9, abs=1e-15)


@PROPERTY
@given(maps=feature_maps(), log_scale=st.floats(-3, 3))
def test_attention_loss_ignores_the_scale_of_each_sample(maps, log_scale):
    student, teacher = maps
    factors = torch.exp(torch.linspace(-1, 1, student.shape[0], dtype=torch.float64) * log_scale)
    scaled = student * factors[:, None, None, None] * -1  # the sign goes too: the map squares
    assert close(attention_loss(scaled, teacher), attention_loss(student, teacher), rel=1e-9, abs=1e-15)


@PROPERTY
@given(data=st.data(), temperature=TEMPERATURES, combine=st.sampled_from(["probs", "logits"]))
def test_ensemble_targets_are_a_weighted_mixture(data, temperature, combine):
    n, m, classes = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 4)), data.draw(st.integers(2, 20))
    teachers = data.draw(logits_of((n, m, classes))).float()
    raw = torch.tensor(data.draw(st.lists(st.floats(0.01, 1.0), min_size=m, max_size=m)))
    weights = raw / raw.sum()
    logits, probs = ensemble_targets(teachers, weights, temperature=temperature, combine=combine)
    if combine == "logits":
        assert probs is None
        expected = (teachers.double() * weights.double()[None, :, None]).sum(1)
        assert torch.allclose(logits.double(), expected, rtol=1e-5, atol=1e-6 * LIMIT)
        return
    assert logits is None and validate_soft_targets(probs) is probs
    each = torch.softmax(teachers.double() / temperature, -1)  # (N, M, C)
    # a convex mixture lies between the smallest and the largest teacher probability
    assert (probs >= each.min(1).values - 1e-6).all() and (probs <= each.max(1).values + 1e-6).all()


# --------------------------------------------------------------------------------------------
# 6. Masked and unlabeled rows
# --------------------------------------------------------------------------------------------

MASKED = [
    ("soft_target_kl", lambda s, t, y, m, T, b: soft_target_kl(s, t, temperature=T, mask=m), (2, 3), 2),
    ("soft_target_kl, soft targets", lambda s, t, y, m, T, b: soft_target_kl(
        s, soft_targets=torch.softmax(t / T, -1), temperature=T, mask=m), (2, 3), 2),
    ("kd_objective", lambda s, t, y, m, T, b: kd_objective(s, y, t, temperature=T, beta=b, mask=m)["loss"],
     (2, 3), 2),
    ("dkd_terms", lambda s, t, y, m, T, b: torch.stack(dkd_terms(s, t, y.clamp(min=0), temperature=T, mask=m)),
     (2,), 3),
    ("dist_terms", lambda s, t, y, m, T, b: torch.stack(dist_terms(s, t, temperature=T, mask=m)), (2,), 2),
    ("cross_entropy", lambda s, t, y, m, T, b: cross_entropy(s, y, mask=m), (2, 3), 2),
]


@pytest.mark.parametrize("name, fn, ndims, min_classes", MASKED, ids=[x[0] for x in MASKED])
@PROPERTY
@given(data=st.data(), garbage=st.sampled_from([math.nan, math.inf, -LIMIT]))
def test_masked_rows_are_left_out_even_when_not_finite(name, fn, ndims, min_classes, data, garbage):
    b = data.draw(batches(ndims=ndims, min_classes=min_classes, kept=(0.5, 1.0)))
    assume(b.mask.any())
    s_bad, t_bad = b.student.clone(), b.teacher.clone()
    s_bad[~b.mask], t_bad[~b.mask] = garbage, -garbage
    s_bad.requires_grad_()
    value = fn(s_bad, t_bad, b.labels, b.mask, b.temperature, b.beta)
    value.sum().backward()
    kept_only = fn(b.student[b.mask], b.teacher[b.mask], b.labels[b.mask], None, b.temperature, b.beta)
    assert torch.allclose(value.detach(), kept_only, rtol=1e-9, atol=1e-9 * (1 + b.temperature**2))
    assert torch.isfinite(s_bad.grad).all() and (s_bad.grad[~b.mask] == 0).all()


@PROPERTY
@given(data=st.data())
def test_every_row_masked_gives_zero_and_zero_gradients(data):
    b = data.draw(batches(kept=(0.0,)))
    s = b.student.float().masked_fill(torch.ones_like(b.student, dtype=torch.bool), math.nan).requires_grad_()
    mask, T = b.mask, b.temperature
    values = [soft_target_kl(s, b.teacher.float(), temperature=T, mask=mask),
              kd_objective(s, b.labels, b.teacher.float(), temperature=T, beta=b.beta, mask=mask)["loss"],
              cross_entropy(s, b.labels, mask=mask)]
    if s.ndim == 2 and s.shape[-1] >= 3:
        values += list(dkd_terms(s, b.teacher.float(), b.labels.clamp(min=0), temperature=T, mask=mask))
    for value in values:
        assert float(value.detach()) == 0.0
    sum(values).backward()
    assert (s.grad == 0).all()


OBJECTIVES_WITH_CE = [
    ("kd_objective", lambda s, y, t, T, b: kd_objective(s, y, t, temperature=T, beta=b), 2),
    ("dkd_objective", lambda s, y, t, T, b: dkd_objective(s, y, t, temperature=T), 3),
    ("dist_objective", lambda s, y, t, T, b: dist_objective(s, y, t, temperature=T), 2),
    ("mutual_objective", lambda s, y, t, T, b: mutual_objective([s, t], y, temperature=T), 2),
    ("supervised_objective", lambda s, y, t, T, b: supervised_objective(s, y), 2),
]


def _ce_of(out, name):
    # mutual_objective's "ce" averages both peers; the student's own term is ce_peer0
    return out["ce_peer0"] if name == "mutual_objective" else out["ce"]


@pytest.mark.parametrize("name, objective, min_classes", OBJECTIVES_WITH_CE, ids=[x[0] for x in OBJECTIVES_WITH_CE])
@PROPERTY
@given(data=st.data())
def test_unlabeled_rows_do_not_change_the_cross_entropy(name, objective, min_classes, data):
    b = data.draw(batches(ndims=(2,), min_classes=min_classes, unlabeled=(0.3, 0.7)))
    unlabeled = b.labels == UNLABELED
    out = objective(b.student, b.labels, b.teacher, b.temperature, b.beta)
    assert close(_ce_of(out, name), ref_ce(b.student, b.labels), rel=1e-9, abs=1e-12)
    other = b.student.clone()
    other[unlabeled] = data.draw(logits_of(tuple(other[unlabeled].shape)))
    moved = objective(other, b.labels, b.teacher, b.temperature, b.beta)
    assert close(_ce_of(moved, name), _ce_of(out, name), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name, objective, min_classes", OBJECTIVES_WITH_CE, ids=[x[0] for x in OBJECTIVES_WITH_CE])
@PROPERTY
@given(data=st.data())
def test_a_batch_without_labels_has_no_cross_entropy_and_stays_finite(name, objective, min_classes, data):
    b = data.draw(batches(ndims=(2,), min_classes=min_classes, unlabeled=(1.0,)))
    s = b.student.float().requires_grad_()
    out = objective(s, b.labels, b.teacher.float(), b.temperature, b.beta)
    assert float(out["ce"]) == 0.0
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(s.grad).all()
    if name == "kd_objective":
        assert close(out["loss"], b.beta * out["kd"], rel=1e-6, abs=0)


# --------------------------------------------------------------------------------------------
# 7. fp16 and bf16 inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@settings(PROPERTY, max_examples=15)
@given(data=st.data())
def test_low_precision_inputs_are_computed_in_float32(loss, dtype, data):
    b = data.draw(batches(ndims=loss.ndims, min_classes=loss.min_classes))
    s, t = b.student.to(dtype), b.teacher.to(dtype)
    value = loss.fn(s, t, b.labels, b.temperature, b.beta)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    upcast = loss.fn(s.float(), t.float(), b.labels, b.temperature, b.beta)
    assert close(value, upcast, rel=1e-5, abs=1e-6 * (1 + b.temperature**2))


def _divides_by_the_spread(loss) -> bool:
    """Standardised logits and DIST's correlations divide by a row's spread (plus a small eps)."""
    return "standardized" in loss.name or loss.name.startswith("dist")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@PROPERTY
@given(data=st.data())
def test_low_precision_gradients_are_finite(loss, dtype, data):
    b = data.draw(batches(ndims=loss.ndims, min_classes=loss.min_classes))
    if dtype == torch.float16 and _divides_by_the_spread(loss):  # near-tied rows: the test below
        assume(float(b.student.double().std(-1).min()) > 1e-2)
    s = b.student.to(dtype).requires_grad_()
    loss.fn(s, b.teacher.to(dtype), b.labels, b.temperature, b.beta).backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


@pytest.mark.parametrize("loss", [loss for loss in LOSSES if _divides_by_the_spread(loss)], ids=lambda l: l.name)
def test_a_tied_student_row_gets_a_large_finite_gradient_in_float32_and_bf16(loss):
    """A row of equal logits (a zero-initialised head) under logit standardisation or DIST: the
    gradient is of order 1/eps (eps 1e-7 / 1e-8, as in the methods' papers), finite in float32 and
    bf16; cast back to fp16 it overflows — docs/methods/soft-targets.md says so."""
    teacher = 3 * torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.zeros(8, 10, dtype=dtype, requires_grad=True)
        loss.fn(s, teacher.to(dtype), labels, 4.0, 0.9).backward()
        assert torch.isfinite(s.grad.float()).all(), dtype
        grads[dtype] = float(s.grad.float().abs().max())
    assert grads[torch.float32] > 1e3  # the 1/eps amplification the docs describe, not a silent change


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@PROPERTY
@given(data=st.data())
def test_low_precision_kd_is_close_to_float32(dtype, data):
    b = data.draw(batches(moderate=True))
    s32, t32 = b.student.float(), b.teacher.float()
    s, t = s32.to(dtype), t32.to(dtype)
    T, beta = b.temperature, b.beta
    # First-order bound of the change the rounding of the inputs makes, per sample: ∂(T²·KL)/∂s =
    # T·(q − p) (L1 norm <= 2T); ∂(T²·KL)/∂t has L1 norm T·Σ_c p_c·|log(p_c/q_c) − KL| <= 4·max|t − s|
    # (each |log(p_c/q_c)| <= 2·max|t − s| / T); ∂CE/∂s has L1 norm <= 2. Doubled for the
    # second-order terms, plus float32 rounding.
    err_s = float((s.double() - s32.double()).abs().max())
    err_t = float((t.double() - t32.double()).abs().max())
    spread = float((t32 - s32).abs().max())
    kl_bound = 2 * (2 * T * err_s + 4 * spread * err_t)
    reference = soft_target_kl(s32, t32, temperature=T)
    assert close(soft_target_kl(s, t, temperature=T), reference, rel=1e-5, abs=kl_bound + 1e-5 * T**2)
    out, out32 = (kd_objective(x, b.labels, y, temperature=T, beta=beta) for x, y in ((s, t), (s32, t32)))
    bound = beta * kl_bound + (1 - beta) * 2 * 2 * err_s
    assert close(out["loss"], out32["loss"], rel=1e-5, abs=bound + 1e-5 * (1 + T**2))


# --------------------------------------------------------------------------------------------
# 8. Invalid arguments
# --------------------------------------------------------------------------------------------

BAD_TEMPERATURES = st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf))
# every form a hyperparameter may take; float64 tensors, so that no value rounds across a bound
AS_NUMBER = st.sampled_from([float, np.float64, lambda x: torch.tensor(x, dtype=torch.float64)])
_S, _T, _Y = torch.zeros(4, 5), torch.ones(4, 5), torch.tensor([0, 1, -1, 4])

WITH_TEMPERATURE = [
    pytest.param(lambda T: soft_target_kl(_S, _T, temperature=T), id="soft_target_kl"),
    pytest.param(lambda T: soft_target_kl(_S, soft_targets=torch.full((4, 5), 0.2), temperature=T),
                 id="soft_target_kl, soft targets"),
    pytest.param(lambda T: soften(_T, T), id="soften"),
    pytest.param(lambda T: kd_objective(_S, _Y, _T, temperature=T), id="kd_objective"),
    pytest.param(lambda T: dkd_terms(_S, _T, _Y.clamp(min=0), temperature=T), id="dkd_terms"),
    pytest.param(lambda T: dkd_objective(_S, _Y, _T, temperature=T), id="dkd_objective"),
    pytest.param(lambda T: dist_terms(_S, _T, temperature=T), id="dist_terms"),
    pytest.param(lambda T: dist_objective(_S, _Y, _T, temperature=T), id="dist_objective"),
    pytest.param(lambda T: mutual_objective([_S, _T], _Y, temperature=T), id="mutual_objective"),
    pytest.param(lambda T: ensemble_targets(torch.stack([_S, _T], 1), torch.tensor([0.5, 0.5]), temperature=T),
                 id="ensemble_targets"),
]


@pytest.mark.parametrize("call", WITH_TEMPERATURE)
@PROPERTY
@given(temperature=BAD_TEMPERATURES, as_number=AS_NUMBER)
def test_invalid_temperatures_are_rejected(call, temperature, as_number):
    with pytest.raises(ConfigError, match="'temperature'"):
        call(as_number(temperature))


@PROPERTY
@given(beta=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(math.nan)),
       as_number=AS_NUMBER)
def test_betas_outside_zero_one_are_rejected(beta, as_number):
    with pytest.raises(ConfigError, match="'beta'"):
        kd_objective(_S, _Y, _T, temperature=2.0, beta=as_number(beta))


@PROPERTY
@given(beta=BETAS, temperature=st.floats(1e-2, 1e2), as_number=AS_NUMBER)
def test_valid_betas_and_temperatures_are_accepted(beta, temperature, as_number):
    out = kd_objective(_S, _Y, _T, temperature=as_number(temperature), beta=as_number(beta))
    assert torch.isfinite(out["loss"])
    assert close(out["loss"], (1 - beta) * out["ce"] + beta * out["kd"], rel=1e-6, abs=1e-7)


MISMATCHED = [
    ("soft_target_kl", lambda s, t: soft_target_kl(s, t)),
    ("dkd_terms", lambda s, t: dkd_terms(s, t, torch.zeros(s.shape[0], dtype=torch.long))),
    ("dist_terms", lambda s, t: dist_terms(s, t)),
    ("hint_loss", lambda s, t: hint_loss(s, t)),
]


@pytest.mark.parametrize("name, call", MISMATCHED, ids=[x[0] for x in MISMATCHED])
@PROPERTY
@given(n=st.integers(1, 8), classes=st.integers(3, 10), extra_rows=st.integers(0, 3),
       extra_classes=st.integers(0, 3))
def test_student_and_teacher_of_different_shapes_are_rejected(name, call, n, classes, extra_rows, extra_classes):
    assume(extra_rows + extra_classes > 0)
    with pytest.raises(ShapeMismatchError):
        call(torch.zeros(n, classes), torch.zeros(n + extra_rows, classes + extra_classes))


@pytest.mark.parametrize("standardize", [
    False,
    True,
])
@PROPERTY
@given(data=st.data())
def test_kd_objective_without_a_teacher_target_is_rejected(standardize, data):
    b = data.draw(batches())
    with pytest.raises(ConfigError, match="exactly one"):
        kd_objective(b.student, b.labels, None, temperature=b.temperature, beta=b.beta, standardize=standardize)
