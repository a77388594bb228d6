"""The invariants every distillation loss must keep, run over each of them: finite values and
gradients on extreme logits, zero when student = teacher, never negative, the gradient matching
finite differences (float64 gradcheck), bf16 inputs, and masked or unlabeled rows."""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from softkd.losses.dist import dist_objective, dist_terms
from softkd.losses.dkd import dkd_objective, dkd_terms
from softkd.losses.features import attention_loss, hint_loss
from softkd.losses.logits import ensemble_targets, kd_objective, soft_target_kl
from softkd.losses.mutual import mutual_objective

LABELS = torch.tensor([0, 1, 2, 3, 4, -1, -1, 2])  # two unlabeled rows


@dataclass
class Loss:
    name: str
    fn: Callable  # (student, teacher, labels) -> scalar
    zero_at_equal: bool = True  # of the distillation part alone (CE aside)
    masked: Callable | None = None  # (student, teacher, labels, mask) -> scalar, when the loss takes a mask
    # False where the value depends on the student through a detached target (mutual learning: a
    # peer is the other's target), so finite differences see more than the gradient by design;
    # tests/test_families.py checks that gradient against each peer's own loss instead.
    gradient_of_value: bool = True
    # True where the value cannot go below 0 by construction (a clamp, a mean of squares): a sign
    # check could not fail there.
    nonnegative_by_construction: bool = False


def _multi(combine):
    def fn(s, t, y):
        teachers = torch.stack([t, t.roll(1, 0), 0.5 * t], 1)
        w = torch.tensor([0.5, 0.25, 0.25], dtype=s.dtype)
        logits, probs = ensemble_targets(teachers, w, temperature=2.0, combine=combine)
        return kd_objective(s, y, logits, soft_targets=probs, temperature=2.0, beta=1.0)["loss"]
    return fn


LOSSES = [
    Loss("soft_target_kl", lambda s, t, y: soft_target_kl(s, t, temperature=4.0),
         masked=lambda s, t, y, m: soft_target_kl(s, t, temperature=4.0, mask=m)),
    Loss("kd_objective (β = 1)", lambda s, t, y: kd_objective(s, y, t, beta=1.0)["loss"],
         masked=lambda s, t, y, m: kd_objective(s, y, t, beta=1.0, mask=m)["loss"]),
    Loss("kd_objective, standardized, kd_scale", lambda s, t, y: kd_objective(s, y, t, beta=1.0, kd_scale=3.0,
                                                                              standardize=True)["loss"]),
    Loss("dkd: tckd + nckd", lambda s, t, y: sum(dkd_terms(s, t, torch.where(y >= 0, y, 0), temperature=4.0)),
         masked=lambda s, t, y, m: sum(dkd_terms(s, t, torch.where(y >= 0, y, 0), temperature=4.0, mask=m))),
    Loss("dkd_objective (no CE)", lambda s, t, y: dkd_objective(s, y, t, ce_weight=0.0)["loss"]),
    Loss("dkd_objective, standardized", lambda s, t, y: dkd_objective(s, y, t, ce_weight=0.0,
                                                                      standardize=True)["loss"]),
    Loss("dist: inter + intra", lambda s, t, y: sum(dist_terms(s, t, temperature=2.0)),
         masked=lambda s, t, y, m: sum(dist_terms(s, t, temperature=2.0, mask=m))),
    Loss("dist_objective (no CE)", lambda s, t, y: dist_objective(s, y, t, ce_weight=0.0)["loss"]),
    Loss("multi-teacher, mean of probabilities", _multi("probs"), zero_at_equal=False,
         nonnegative_by_construction=True),  # the soft-targets path clamps each row at 0
    Loss("multi-teacher, mean of logits", _multi("logits"), zero_at_equal=False),
    # the second peer's logits as "teacher"; without labels the objective is its KL terms alone
    Loss("mutual: KL terms", lambda s, t, y: mutual_objective([s, t], torch.full_like(y, -1), temperature=2.0)["loss"],
         gradient_of_value=False),
    Loss("hint (features as (B, 5))", lambda s, t, y: hint_loss(s, t), nonnegative_by_construction=True),
    Loss("attention transfer (B, 1, 1, 5)", lambda s, t, y: attention_loss(s.reshape(8, 1, 1, 5), t.reshape(8, 1, 1, 5)),
         nonnegative_by_construction=True),
]
IDS = [loss.name for loss in LOSSES]


def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_finite_on_extreme_logits(loss, scale):
    s = (randn(8, 5, seed=1).sign() * scale).requires_grad_()
    t = randn(8, 5, seed=2).sign() * scale
    value = loss.fn(s, t, LABELS)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("loss", [x for x in LOSSES if x.zero_at_equal], ids=[x.name for x in LOSSES if x.zero_at_equal])
@pytest.mark.parametrize("seed", range(3))
def test_zero_when_the_student_is_the_teacher(loss, seed):
    t = randn(8, 5, seed=seed, scale=3)
    assert float(loss.fn(t.clone(), t, LABELS)) == pytest.approx(0.0, abs=1e-6)


def test_identical_teachers_ensemble_gives_zero():
    t = randn(8, 5, seed=3, scale=3)
    teachers = t[:, None].expand(8, 3, 5)
    for combine in ("probs", "logits"):
        logits, probs = ensemble_targets(teachers, torch.full((3,), 1 / 3), temperature=2.0, combine=combine)
        kd = kd_objective(t.clone(), LABELS, logits, soft_targets=probs, temperature=2.0, beta=1.0)["loss"]
        assert float(kd) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss", [x for x in LOSSES if not x.nonnegative_by_construction],
                         ids=[x.name for x in LOSSES if not x.nonnegative_by_construction])
@pytest.mark.parametrize("seed", range(5))
def test_never_negative(loss, seed):
    s, t = randn(8, 5, seed=seed, scale=4), randn(8, 5, seed=seed + 100, scale=4)
    assert float(loss.fn(s, t, LABELS)) >= 0.0


@pytest.mark.parametrize("loss", [x for x in LOSSES if x.gradient_of_value],
                         ids=[x.name for x in LOSSES if x.gradient_of_value])
def test_gradient_matches_finite_differences(loss):
    s = randn(8, 5, seed=4, dtype=torch.float64).requires_grad_()
    t = randn(8, 5, seed=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: loss.fn(x, t, LABELS), (s,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_bf16_inputs_are_computed_in_float32(loss):
    s, t = randn(8, 5, seed=6, scale=3), randn(8, 5, seed=7, scale=3)
    low = loss.fn(s.bfloat16(), t.bfloat16(), LABELS)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    reference = loss.fn(s.bfloat16().float(), t.bfloat16().float(), LABELS)
    assert float(low) == pytest.approx(float(reference), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss", [x for x in LOSSES if x.masked], ids=[x.name for x in LOSSES if x.masked])
def test_masked_rows_are_left_out_even_when_nan(loss):
    s, t = randn(8, 5, seed=8, scale=2), randn(8, 5, seed=9, scale=2)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~mask], t_bad[~mask] = float("nan"), float("inf")
    kept = loss.masked(s_bad.requires_grad_(), t_bad, LABELS, mask)
    kept.backward()
    rows = loss.fn(s[mask], t[mask], LABELS[mask])
    assert float(kept.detach()) == pytest.approx(float(rows), rel=1e-5)
    assert torch.isfinite(s_bad.grad).all() and (s_bad.grad[~mask] == 0).all()


@pytest.mark.parametrize("objective", [
    lambda s, y, t: kd_objective(s, y, t, beta=0.5),
    lambda s, y, t: dkd_objective(s, y, t),
    lambda s, y, t: dist_objective(s, y, t),
], ids=["kd_objective", "dkd_objective", "dist_objective"])
def test_unlabeled_rows_get_no_cross_entropy(objective):
    s, t = randn(8, 5, seed=10, scale=2), randn(8, 5, seed=11, scale=2)
    out = objective(s, LABELS, t)
    labeled = LABELS >= 0
    expected = torch.nn.functional.cross_entropy(s[labeled], LABELS[labeled])
    assert float(out["ce"]) == pytest.approx(float(expected), rel=1e-6)
    all_unlabeled = objective(s, torch.full((8,), -1), t)
    assert float(all_unlabeled["ce"]) == 0.0 and torch.isfinite(all_unlabeled["loss"])
