"""Tests of the distillation losses in ``softkd.losses.logits``.

Expectations never come from the function under test: they are hard-coded golden values, closed
forms, or an independent float64 numpy reference implemented below.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softkd.errors import ConfigError, InfeasibleSoftTargetsError, ShapeMismatchError
from softkd.losses.logits import (
    UNLABELED,
    cross_entropy,
    kd_objective,
    soft_target_kl,
    soften,
    validate_soft_targets,
)

TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 8.0]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threading only adds overhead (ms per op on small CPU boxes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Independent float64 numpy reference
# --------------------------------------------------------------------------------------------


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(x))


def np_kl_rows(student: np.ndarray, teacher: np.ndarray, temperature: float) -> np.ndarray:
    """Per-sample T² · Σ_c p (log p − log q), flattened to (num_samples,)."""
    log_p = np_log_softmax(np.asarray(teacher, np.float64) / temperature)
    log_q = np_log_softmax(np.asarray(student, np.float64) / temperature)
    rows = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return temperature**2 * rows.reshape(-1)


def np_soft_kl_rows(student: np.ndarray, probs: np.ndarray, temperature: float) -> np.ndarray:
    """Per-sample T² · Σ_c p (log p − log q) with 0 · log 0 = 0, for probabilities p."""
    probs = np.asarray(probs, np.float64)
    log_q = np_log_softmax(np.asarray(student, np.float64) / temperature)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_log_p = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
    rows = (p_log_p - probs * log_q).sum(axis=-1)
    return temperature**2 * rows.reshape(-1)


def np_masked_mean(rows: np.ndarray, mask: np.ndarray | None) -> float:
    if mask is None:
        return float(rows.mean())
    mask = np.asarray(mask, np.float64).reshape(-1)
    return float((rows * mask).sum() / max(mask.sum(), 1.0))


def np_ce(student: np.ndarray, labels: np.ndarray) -> float:
    logits = np.asarray(student, np.float64).reshape(-1, np.shape(student)[-1])
    labels = np.asarray(labels).reshape(-1)
    labeled = labels != -1
    if not labeled.any():
        return 0.0
    log_q = np_log_softmax(logits[labeled])
    return float(-log_q[np.arange(labeled.sum()), labels[labeled]].mean())


def np_softmax_t(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(x / T) in float64 via numpy (for analytic gradients)."""
    return torch.from_numpy(np_softmax(x.detach().double().numpy() / temperature))


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def as_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# --------------------------------------------------------------------------------------------
# 1. Worked example: identical teacher and student give a distillation term of 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", [(1, 2), (16, 10), (3, 5, 7)])
def test_identical_logits_give_exactly_zero(shape, temperature):
    s = randn(*shape, seed=1, scale=3.0)
    out = soft_target_kl(s, s.clone(), temperature=temperature)
    assert out.item() == 0.0
    res = kd_objective(s, None, s.clone(), temperature=temperature, beta=1.0)
    assert res["kd"].item() == 0.0
    assert res["loss"].item() == 0.0


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_identical_soft_targets_are_zero_up_to_float32_rounding(temperature):
    for seed in range(10):
        s = randn(16, 10, seed=seed, scale=3.0)
        out = soft_target_kl(s, soft_targets=soften(s, temperature), temperature=temperature)
        assert abs(out.item()) <= 1e-6 * max(1.0, temperature**2)


def test_identical_soft_targets_never_negative():
    values = []
    for temperature in (1.0, 4.0):
        for seed in range(5):
            s = randn(16, 10, seed=seed, scale=3.0)
            values.append(soft_target_kl(s, soft_targets=soften(s, temperature), temperature=temperature).item())
    assert min(values) >= 0.0


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_constant_shift_per_row_gives_zero(temperature):
    t = randn(8, 5, seed=3, scale=2.0)
    shift = randn(8, 1, seed=4, scale=10.0)
    out = soft_target_kl(t + shift, t, temperature=temperature)
    assert abs(out.item()) <= 1e-6 * max(1.0, temperature**2)
    # And gradients vanish too: softmax is shift-invariant, so q_T == p_T.
    s = (t + shift).requires_grad_(True)
    soft_target_kl(s, t, temperature=temperature).backward()
    assert s.grad.abs().max().item() < 1e-6


# --------------------------------------------------------------------------------------------
# 2. KL >= 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(1, 2), (32, 10), (4, 6, 3)])
@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0, 20.0])
def test_kl_is_nonnegative_on_random_inputs(seed, shape, temperature):
    s = randn(*shape, seed=seed, scale=4.0)
    t = randn(*shape, seed=seed + 100, scale=4.0)
    assert soft_target_kl(s, t, temperature=temperature).item() >= 0.0
    # The probabilities path clamps each row at 0, so a sign check could not fail there: its value
    # instead, to float32 round-off (T² times it) where the two distributions nearly agree.
    p = soften(t, temperature)
    expected = np_masked_mean(np_soft_kl_rows(as_np(s), as_np(p), temperature), None)
    assert soft_target_kl(s, soft_targets=p, temperature=temperature).item() == pytest.approx(
        expected, rel=1e-5, abs=1e-6 * max(1.0, temperature**2))


# --------------------------------------------------------------------------------------------
# 3. Agreement with the numpy float64 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("seed", range(3))
def test_matches_numpy_reference_2d(temperature, seed):
    s = randn(24, 7, seed=seed, scale=3.0)
    t = randn(24, 7, seed=seed + 50, scale=3.0)
    expected = np_masked_mean(np_kl_rows(as_np(s), as_np(t), temperature), None)
    assert soft_target_kl(s, t, temperature=temperature).item() == pytest.approx(expected, rel=1e-5)
    # The probabilities path with p = softmax(t/T) computes the same quantity.
    p = soften(t, temperature)
    assert soft_target_kl(s, soft_targets=p, temperature=temperature).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("seed", range(3))
def test_matches_numpy_reference_3d_with_mask(temperature, seed):
    s = randn(3, 5, 6, seed=seed, scale=3.0)
    t = randn(3, 5, 6, seed=seed + 50, scale=3.0)
    g = torch.Generator().manual_seed(seed + 7)
    mask = torch.rand(3, 5, generator=g) < 0.6
    mask[0, 0] = True
    expected = np_masked_mean(np_kl_rows(as_np(s), as_np(t), temperature), as_np(mask))
    assert soft_target_kl(s, t, temperature=temperature, mask=mask).item() == pytest.approx(expected, rel=1e-5)
    # float mask works the same as a bool mask
    fmask = mask.float()
    assert soft_target_kl(s, t, temperature=temperature, mask=fmask).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_objective_matches_numpy_reference(temperature):
    s = randn(10, 5, seed=11, scale=2.0)
    t = randn(10, 5, seed=12, scale=2.0)
    labels = torch.tensor([0, -1, 4, 2, -1, -1, 1, 3, -1, 0])
    beta = 0.7
    ce = np_ce(as_np(s), labels.numpy())
    kd = np_masked_mean(np_kl_rows(as_np(s), as_np(t), temperature), None)
    out = kd_objective(s, labels, t, temperature=temperature, beta=beta)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx((1 - beta) * ce + beta * kd, rel=1e-5)
    assert cross_entropy(s, labels).item() == pytest.approx(ce, rel=1e-5)


# --------------------------------------------------------------------------------------------
# 4. Golden values (computed once in float64 with numpy, hard-coded here)
# --------------------------------------------------------------------------------------------

GOLDEN_STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
GOLDEN_TEACHER = [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]
GOLDEN_LABELS = [2, -1]
# T=1 in closed form: (2(e²−1)/(e²+e+1) + (e−1)/(e+2)) / 2 = 0.757298046179...
GOLDEN_KL_T1 = (2 * (math.e**2 - 1) / (math.e**2 + math.e + 1) + (math.e - 1) / (math.e + 2)) / 2
# CE of the labeled row: −log softmax([1,2,3])[2] = log(1 + e⁻¹ + e⁻²) = 0.407605964444...
GOLDEN_CE = math.log(1 + math.exp(-1) + math.exp(-2))


@pytest.mark.parametrize("temperature, expected", [(1.0, GOLDEN_KL_T1), (4.0, 0.832788901555)])
def test_golden_soft_target_kl(temperature, expected):
    s = torch.tensor(GOLDEN_STUDENT)
    t = torch.tensor(GOLDEN_TEACHER)
    assert soft_target_kl(s, t, temperature=temperature).item() == pytest.approx(expected, rel=1e-6)


def test_golden_kd_objective():
    s = torch.tensor(GOLDEN_STUDENT)
    t = torch.tensor(GOLDEN_TEACHER)
    out = kd_objective(s, torch.tensor(GOLDEN_LABELS), t, temperature=4.0, beta=0.9)
    assert set(out) == {"loss", "ce", "kd"}
    assert out["ce"].item() == pytest.approx(GOLDEN_CE, rel=1e-6)
    assert out["kd"].item() == pytest.approx(0.832788901555, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.790270607844, rel=1e-6)


def test_golden_soft_targets_path():
    s = torch.tensor(GOLDEN_STUDENT)
    p = soften(torch.tensor(GOLDEN_TEACHER), 4.0)
    assert soft_target_kl(s, soft_targets=p, temperature=4.0).item() == pytest.approx(0.832788901555, rel=1e-6)


def test_soften_values():
    # softmax([3,2,1]) = (e², e, 1) / (e² + e + 1); softmax(x / T) at T = 2 halves the logits.
    e = math.e
    z = e**2 + e + 1
    out = soften(torch.tensor([[3.0, 2.0, 1.0]]), 1.0)
    assert out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx([e**2 / z, e / z, 1 / z], rel=1e-6)
    z2 = e + e**0.5 + 1
    out = soften(torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.bfloat16), 2.0)
    assert out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx([e / z2, e**0.5 / z2, 1 / z2], rel=1e-6)


# --------------------------------------------------------------------------------------------
# 5. Gradients: numerical gradcheck and the analytic gradient
# --------------------------------------------------------------------------------------------

# float64 inputs stay float64, so gradcheck runs at its default (tight) settings.
GRADCHECK = dict()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_gradcheck_soft_target_kl_logits(temperature):
    s = randn(4, 5, seed=21).double().requires_grad_(True)
    t = randn(4, 5, seed=22).double()
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.autograd.gradcheck(lambda x: soft_target_kl(x, t, temperature=temperature), (s,), **GRADCHECK)
    assert torch.autograd.gradcheck(
        lambda x: soft_target_kl(x, t, temperature=temperature, mask=mask), (s,), **GRADCHECK
    )


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_gradcheck_soft_target_kl_soft_targets(temperature):
    s = randn(4, 5, seed=23).double().requires_grad_(True)
    p = soften(randn(4, 5, seed=24), temperature).double()
    p[1] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # zero entries too
    assert torch.autograd.gradcheck(
        lambda x: soft_target_kl(x, soft_targets=p, temperature=temperature), (s,), **GRADCHECK
    )


def test_gradcheck_kd_objective():
    s = randn(5, 4, seed=25).double().requires_grad_(True)
    t = randn(5, 4, seed=26).double()
    labels = torch.tensor([1, -1, 3, -1, 0])
    assert torch.autograd.gradcheck(
        lambda x: kd_objective(x, labels, t, temperature=2.0, beta=0.6)["loss"], (s,), **GRADCHECK
    )


def central_differences(fn, x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """d fn / d x by central differences, in float64 arithmetic around a float32 function."""
    x = x.detach().clone()
    grad = torch.zeros_like(x, dtype=torch.float64)
    flat = x.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        plus = fn(x).double().item()
        flat[i] = old - eps
        minus = fn(x).double().item()
        flat[i] = old
        grad.view(-1)[i] = (plus - minus) / (2 * eps)
    return grad


def test_kd_objective_gradient_matches_central_differences():
    s = randn(2, 3, 4, seed=27)
    t = randn(2, 3, 4, seed=28)
    labels = torch.tensor([[1, -1, 3], [-1, 0, -1]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)

    def fn(x):
        return kd_objective(x, labels, t, temperature=2.0, beta=0.8, mask=mask)["loss"]

    x = s.clone().requires_grad_(True)
    fn(x).backward()
    numeric = central_differences(fn, s.double())
    assert torch.allclose(x.grad.double(), numeric, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_analytic_gradient_logits_path(temperature):
    # d/ds [T² · KL(p_T ‖ q_T)] = T · (q_T − p_T) / N
    n = 12
    s = randn(n, 6, seed=31, scale=2.0).requires_grad_(True)
    t = randn(n, 6, seed=32, scale=2.0)
    soft_target_kl(s, t, temperature=temperature).backward()
    expected = temperature * (np_softmax_t(s, temperature) - np_softmax_t(t, temperature)) / n
    assert torch.allclose(s.grad.double(), expected, atol=1e-6, rtol=1e-4)


def test_teacher_logits_are_detached():
    s = randn(4, 3, seed=33)
    t = randn(4, 3, seed=34).requires_grad_(True)
    out = soft_target_kl(s, t, temperature=2.0)
    assert not out.requires_grad
    p = soften(randn(4, 3, seed=35), 2.0).requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    soft_target_kl(s2, soft_targets=p, temperature=2.0).backward()
    assert p.grad is None and s2.grad is not None


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_analytic_gradient_soft_targets_path_with_mask(temperature):
    s = randn(2, 4, 5, seed=36, scale=2.0).requires_grad_(True)
    p = np_softmax_t(randn(2, 4, 5, seed=37, scale=2.0), temperature).float()
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    soft_target_kl(s, soft_targets=p, temperature=temperature, mask=mask).backward()
    count = int(mask.sum())
    expected = temperature * (np_softmax_t(s, temperature) - p.double()) / count
    expected = expected * mask.unsqueeze(-1)
    assert torch.allclose(s.grad.double(), expected, atol=1e-6, rtol=1e-4)


def test_analytic_gradient_kd_objective():
    # (1 − β)(softmax(s) − onehot(y)) / N_labeled on labeled rows + β T (q_T − p_T) / N everywhere
    n, c, temperature, beta = 6, 4, 3.0, 0.75
    s = randn(n, c, seed=38, scale=2.0).requires_grad_(True)
    t = randn(n, c, seed=39, scale=2.0)
    labels = torch.tensor([3, -1, 0, -1, 1, -1])
    kd_objective(s, labels, t, temperature=temperature, beta=beta)["loss"].backward()
    labeled = labels != -1
    onehot = torch.zeros(n, c, dtype=torch.float64)
    onehot[labeled, labels[labeled]] = 1.0
    ce_grad = (np_softmax_t(s, 1.0) - onehot) * labeled.unsqueeze(-1) / int(labeled.sum())
    kd_grad = temperature * (np_softmax_t(s, temperature) - np_softmax_t(t, temperature)) / n
    expected = (1 - beta) * ce_grad + beta * kd_grad
    assert torch.allclose(s.grad.double(), expected, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# 6. T² scaling (Hinton et al. 2015, §2)
# --------------------------------------------------------------------------------------------


def _grad_norm(s0: torch.Tensor, t: torch.Tensor, temperature: float) -> float:
    s = s0.clone().requires_grad_(True)
    soft_target_kl(s, t, temperature=temperature).backward()
    return s.grad.norm().item()


def test_t_squared_keeps_gradient_magnitude_comparable():
    s0 = randn(32, 10, seed=41)
    t = randn(32, 10, seed=42)
    temps = [1.0, 2.0, 4.0, 8.0, 16.0]
    scaled = [_grad_norm(s0, t, T) for T in temps]
    assert max(scaled) / min(scaled) < 1.5
    # At high T the scaled gradient converges: T=8 and T=16 within 2 %.
    assert scaled[-1] / scaled[-2] == pytest.approx(1.0, abs=0.02)
    # Without the T² factor the gradient shrinks ~1/T²: ratio between T=8 and T=16 ≈ 4.
    unscaled = [g / T**2 for g, T in zip(scaled, temps)]
    assert unscaled[-2] / unscaled[-1] == pytest.approx(4.0, rel=0.02)
    assert all(a > b for a, b in zip(unscaled, unscaled[1:]))


@pytest.mark.parametrize("temperature, rel", [(16.0, 1e-2), (100.0, 2e-3)])
def test_high_temperature_limit_is_centered_logit_matching(temperature, rel):
    # For T ≫ |logits|: T² · KL → mean_n (1 / (2C)) Σ_c (δ_nc − mean_c δ_n)², δ = s − t.
    n, c = 32, 10
    s = randn(n, c, seed=43)
    t = randn(n, c, seed=44)
    delta = as_np(s) - as_np(t)
    delta = delta - delta.mean(axis=-1, keepdims=True)
    limit = float((delta**2).sum() / (2 * n * c))
    assert soft_target_kl(s, t, temperature=temperature).item() == pytest.approx(limit, rel=rel)


def test_high_temperature_limit_error_shrinks():
    s = randn(32, 10, seed=43)
    t = randn(32, 10, seed=44)
    delta = as_np(s) - as_np(t)
    delta = delta - delta.mean(axis=-1, keepdims=True)
    limit = float((delta**2).sum() / (2 * delta.size))
    errors = [abs(soft_target_kl(s, t, temperature=T).item() / limit - 1) for T in (8.0, 16.0, 64.0)]
    assert errors[0] > errors[1] > errors[2]


def test_small_difference_limit_is_half_variance():
    # For s = t + ε d: T² · KL ≈ (1/2) mean_n Var_{p_T}(d) ε² (second-order expansion).
    temperature, eps = 2.0, 1e-2
    t = randn(16, 8, seed=45, scale=2.0)
    d = randn(16, 8, seed=46)
    s = t + eps * d
    p = np_softmax(as_np(t) / temperature)
    dd = as_np(d)
    var = (p * dd**2).sum(-1) - (p * dd).sum(-1) ** 2
    expected = 0.5 * eps**2 * var.mean()
    assert soft_target_kl(s, t, temperature=temperature).item() == pytest.approx(expected, rel=3e-2)


# --------------------------------------------------------------------------------------------
# 7. β = 1 without labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [None, "all_unlabeled"])
@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 4)])
def test_beta_one_without_labels_is_pure_distillation(labels, shape):
    s = randn(*shape, seed=51, scale=2.0).requires_grad_(True)
    t = randn(*shape, seed=52, scale=2.0)
    if labels == "all_unlabeled":
        labels = torch.full(shape[:-1], UNLABELED, dtype=torch.long)
    out = kd_objective(s, labels, t, temperature=4.0, beta=1.0)
    assert out["loss"].item() == out["kd"].item()
    assert out["ce"].item() == 0.0
    assert torch.isfinite(out["ce"]) and torch.isfinite(out["loss"])
    expected = np_masked_mean(np_kl_rows(as_np(s), as_np(t), 4.0), None)
    assert out["kd"].item() == pytest.approx(expected, rel=1e-5)
    out["loss"].backward()
    assert torch.isfinite(s.grad).all()
    expected_grad = 4.0 * (np_softmax_t(s, 4.0) - np_softmax_t(t, 4.0)) / (s.numel() // shape[-1])
    assert torch.allclose(s.grad.double(), expected_grad, atol=1e-6, rtol=1e-4)


def test_cross_entropy_without_labels_is_zero_and_keeps_graph():
    s = randn(3, 4, seed=53).requires_grad_(True)
    for labels in (None, torch.full((3,), -1)):
        ce = cross_entropy(s, labels)
        assert ce.item() == 0.0 and ce.requires_grad
        (grad,) = torch.autograd.grad(ce, s)
        assert torch.equal(grad, torch.zeros_like(s))


# --------------------------------------------------------------------------------------------
# 8. Masks and count overrides
# --------------------------------------------------------------------------------------------


def test_masked_samples_do_not_change_value_or_gradients():
    s = randn(6, 5, seed=61, scale=2.0)
    t = randn(6, 5, seed=62, scale=2.0)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = randn(2, 5, seed=63, scale=50.0)
    t2[~mask] = randn(2, 5, seed=64, scale=50.0)
    labels = torch.tensor([0, -1, 2, 4, -1, 1])  # masked rows unlabeled: CE ignores them too

    grads, values = [], []
    for student, teacher in ((s, t), (s2, t2)):
        x = student.clone().requires_grad_(True)
        v = soft_target_kl(x, teacher, temperature=2.0, mask=mask)
        o = kd_objective(x, labels, teacher, temperature=2.0, beta=0.5, mask=mask)
        (v + o["loss"]).backward()
        values.append((v.item(), o["loss"].item()))
        grads.append(x.grad)
    assert values[0] == values[1]
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(grads[1][~mask], torch.zeros(2, 5))
    expected = np_masked_mean(np_kl_rows(as_np(s), as_np(t), 2.0), as_np(mask))
    assert values[0][0] == pytest.approx(expected, rel=1e-5)


def test_non_finite_masked_rows_are_ignored():
    s = randn(4, 5, seed=65).requires_grad_(True)
    t = randn(4, 5, seed=66)
    t[3] = float("nan")  # e.g. padding filled with NaN in a cached teacher-logit file
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    out = soft_target_kl(s, t, temperature=2.0, mask=mask)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_all_zero_mask_gives_zero_not_nan():
    s = randn(2, 3, 4, seed=67).requires_grad_(True)
    t = randn(2, 3, 4, seed=68)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = soft_target_kl(s, t, temperature=2.0, mask=mask)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    labels = torch.full((2, 3), -1)
    res = kd_objective(s, labels, t, temperature=2.0, beta=0.5, mask=mask)
    assert res["loss"].item() == 0.0 and res["ce"].item() == 0.0 and res["kd"].item() == 0.0


def test_empty_batch_and_zero_count_give_zero_not_nan():
    empty = torch.zeros(0, 4)
    assert soft_target_kl(empty, empty, temperature=2.0).item() == 0.0
    assert cross_entropy(empty, torch.zeros(0, dtype=torch.long)).item() == 0.0
    s = randn(3, 4, seed=76)
    t = randn(3, 4, seed=77)
    for count in (0, 0.0, torch.tensor(0)):
        out = soft_target_kl(s, t, temperature=2.0, mask=torch.zeros(3), count=count)
        assert out.item() == 0.0


def test_3d_with_mask_equals_flattened_unmasked_rows():
    s = randn(3, 4, 5, seed=69, scale=2.0)
    t = randn(3, 4, 5, seed=70, scale=2.0)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    out = soft_target_kl(s, t, temperature=3.0, mask=mask).item()
    flat = soft_target_kl(s[mask], t[mask], temperature=3.0).item()
    expected = np_masked_mean(np_kl_rows(as_np(s[mask]), as_np(t[mask]), 3.0), None)
    assert out == pytest.approx(flat, rel=1e-6)
    assert out == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_count_override_gives_gradient_accumulation(as_tensor):
    n, temperature, beta = 8, 4.0, 0.9
    s = randn(n, 5, seed=71, scale=2.0)
    t = randn(n, 5, seed=72, scale=2.0)
    labels = torch.tensor([0, -1, 1, 2, -1, -1, 4, 3])
    n_labeled = int((labels != -1).sum())
    wrap = torch.tensor if as_tensor else float

    full = s.clone().requires_grad_(True)
    ref_kl = soft_target_kl(full, t, temperature=temperature)
    ref = kd_objective(full, labels, t, temperature=temperature, beta=beta)
    (ref_kl + ref["loss"]).backward()

    parts = s.clone().requires_grad_(True)
    kl_sum = ce_sum = kd_sum = loss_sum = 0.0
    for half in (slice(0, 3), slice(3, n)):  # uneven split on purpose
        kl = soft_target_kl(parts[half], t[half], temperature=temperature, count=wrap(n))
        out = kd_objective(
            parts[half], labels[half], t[half], temperature=temperature, beta=beta,
            labeled_count=wrap(n_labeled), sample_count=wrap(n),
        )
        (kl + out["loss"]).backward()
        kl_sum += kl.item()
        ce_sum += out["ce"].item()
        kd_sum += out["kd"].item()
        loss_sum += out["loss"].item()
    assert kl_sum == pytest.approx(ref_kl.item(), rel=1e-6)
    assert ce_sum == pytest.approx(ref["ce"].item(), rel=1e-6)
    assert kd_sum == pytest.approx(ref["kd"].item(), rel=1e-6)
    assert loss_sum == pytest.approx(ref["loss"].item(), rel=1e-6)
    assert torch.allclose(parts.grad, full.grad, atol=1e-7, rtol=1e-5)


def test_count_override_with_mask_divides_by_count():
    s = randn(6, 4, seed=73)
    t = randn(6, 4, seed=74)
    mask = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool)
    rows = np_kl_rows(as_np(s), as_np(t), 2.0)
    expected = float((rows * as_np(mask)).sum() / 10.0)
    assert soft_target_kl(s, t, temperature=2.0, mask=mask, count=10).item() == pytest.approx(expected, rel=1e-5)
    # count without a mask replaces N
    assert soft_target_kl(s, t, temperature=2.0, count=12).item() == pytest.approx(rows.sum() / 12, rel=1e-5)


# --------------------------------------------------------------------------------------------
# 9. Labeled / unlabeled mixing
# --------------------------------------------------------------------------------------------


def test_ce_averages_over_labeled_samples_only():
    s = randn(6, 4, seed=81, scale=2.0)
    t = randn(6, 4, seed=82, scale=2.0)
    labels = torch.tensor([3, -1, 0, -1, -1, 2])
    log_q = np_log_softmax(as_np(s))
    ce = float(-(log_q[0, 3] + log_q[2, 0] + log_q[5, 2]) / 3)
    kd = float(np_kl_rows(as_np(s), as_np(t), 4.0).mean())
    out = kd_objective(s, labels, t, temperature=4.0, beta=0.9)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-5)


def test_unlabeled_rows_receive_only_the_distillation_gradient():
    n, temperature, beta = 6, 2.0, 0.7
    s = randn(n, 4, seed=83, scale=2.0).requires_grad_(True)
    t = randn(n, 4, seed=84, scale=2.0)
    labels = torch.tensor([3, -1, 0, -1, -1, 2])
    kd_objective(s, labels, t, temperature=temperature, beta=beta)["loss"].backward()
    unlabeled = labels == -1
    kd_grad = beta * temperature * (np_softmax_t(s, temperature) - np_softmax_t(t, temperature)) / n
    assert torch.allclose(s.grad.double()[unlabeled], kd_grad[unlabeled], atol=1e-7, rtol=1e-5)
    # Changing an unlabeled row's "label" value is impossible; changing labeled ones changes CE only.
    other = kd_objective(s, torch.tensor([0, -1, 0, -1, -1, 2]), t, temperature=temperature, beta=beta)
    ref = kd_objective(s, labels, t, temperature=temperature, beta=beta)
    assert other["kd"].item() == ref["kd"].item()
    assert other["ce"].item() != ref["ce"].item()


def test_3d_labels_with_unlabeled_positions():
    s = randn(2, 3, 5, seed=85)
    labels = torch.tensor([[4, -1, 0], [-1, -1, 2]])
    expected = np_ce(as_np(s), labels.numpy())
    assert cross_entropy(s, labels).item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# 10. Soft targets with zero entries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_one_hot_soft_targets_equal_scaled_nll(temperature):
    s = randn(5, 4, seed=91, scale=3.0).requires_grad_(True)
    target = torch.tensor([0, 3, 1, 1, 2])
    onehot = torch.nn.functional.one_hot(target, 4).float()
    out = soft_target_kl(s, soft_targets=onehot, temperature=temperature)
    log_q = np_log_softmax(as_np(s) / temperature)
    expected = -(temperature**2) * float(log_q[np.arange(5), target.numpy()].mean())
    assert math.isfinite(out.item())
    assert out.item() == pytest.approx(expected, rel=1e-5)
    out.backward()
    assert torch.isfinite(s.grad).all()


def test_partially_zero_soft_targets_match_reference():
    s = randn(3, 4, seed=92, scale=2.0)
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.0, 0.0, 0.75], [0.1, 0.2, 0.3, 0.4]])
    expected = float(np_soft_kl_rows(as_np(s), as_np(p), 2.0).mean())
    out = soft_target_kl(s, soft_targets=p, temperature=2.0).item()
    assert math.isfinite(out)
    assert out == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# 11. validate_soft_targets
# --------------------------------------------------------------------------------------------


def feasible(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.softmax(randn(*shape, seed=seed, scale=2.0), dim=-1)


@pytest.mark.parametrize(
    "probs",
    [
        feasible(6, 4),
        feasible(2, 3, 5),
        feasible(5, 3).double(),
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]),
    ],
    ids=["2d", "3d", "float64", "one-hot"],
)
def test_validate_accepts_feasible_and_returns_unchanged(probs):
    before = probs.clone()
    out = validate_soft_targets(probs)
    assert out is probs
    assert torch.equal(out, before)


def test_validate_with_matching_counts_passes():
    p = feasible(7, 3)
    assert validate_soft_targets(p, num_classes=3, num_samples=7) is p


def test_validate_accepts_numpy_array():
    arr = feasible(4, 3).numpy()
    out = validate_soft_targets(arr)
    assert isinstance(out, torch.Tensor)
    assert np.array_equal(out.numpy(), arr)


def _with_bad_row(row: list[float], index: int = 3, n: int = 6) -> torch.Tensor:
    p = feasible(n, len(row))
    p[index] = torch.tensor(row)
    return p


@pytest.mark.parametrize(
    "row, reason",
    [
        ([float("nan"), 0.5, 0.5], "NaN or inf"),
        ([float("inf"), 0.0, 0.0], "NaN or inf"),
        ([-0.1, 0.6, 0.5], "negative"),
        ([1.2, 0.0, 0.0], "greater than 1"),
        ([0.5, 0.4, 0.0], "does not sum to 1"),
        ([0.5, 0.5, 0.5], "does not sum to 1"),
    ],
    ids=["nan", "inf", "negative", "above-one", "sum-0.9", "sum-1.5"],
)
def test_validate_rejects_infeasible_rows(row, reason):
    with pytest.raises(InfeasibleSoftTargetsError) as info:
        validate_soft_targets(_with_bad_row(row))
    message = str(info.value)
    assert "row(s) 3 " in message
    assert reason in message


def test_validate_sum_message_reports_the_sum():
    with pytest.raises(InfeasibleSoftTargetsError, match=r"row 3 sums to 0\.9\b"):
        validate_soft_targets(_with_bad_row([0.5, 0.4, 0.0]))


def test_validate_names_several_rows_and_truncates():
    p = feasible(10, 3)
    p[[1, 4]] = -0.5
    with pytest.raises(InfeasibleSoftTargetsError, match=r"row\(s\) 1, 4 has negative"):
        validate_soft_targets(p)
    p = feasible(10, 3)
    p[[0, 2, 3, 5, 6, 8, 9]] = 0.2
    with pytest.raises(InfeasibleSoftTargetsError, match=r"row\(s\) 0, 2, 3, 5, 6 and 2 more"):
        validate_soft_targets(p)


def test_validate_3d_names_flattened_row():
    p = feasible(2, 3, 4)
    p[1, 0] = torch.tensor([0.3, 0.3, 0.3, 0.3])  # flattened row 1 * 3 + 0 = 3
    with pytest.raises(InfeasibleSoftTargetsError, match=r"row\(s\) 3 does not sum to 1"):
        validate_soft_targets(p)


@pytest.mark.parametrize(
    "shape", [(4,), (2, 2, 2, 2), (5, 1), (2, 3, 1)], ids=["1d", "4d", "one-class", "3d-one-class"]
)
def test_validate_rejects_bad_shapes(shape):
    probs = torch.full(shape, 1.0 / shape[-1])
    with pytest.raises(ShapeMismatchError, match=r"\(N, C\) or \(B, L, C\)"):
        validate_soft_targets(probs)


def test_validate_rejects_integer_dtype():
    with pytest.raises(InfeasibleSoftTargetsError, match="floating-point"):
        validate_soft_targets(torch.tensor([[1, 0], [0, 1]]))


def test_validate_rejects_class_count_mismatch():
    with pytest.raises(ShapeMismatchError, match=r"4 classes but the student predicts 5"):
        validate_soft_targets(feasible(3, 4), num_classes=5)


def test_validate_rejects_sample_count_mismatch():
    with pytest.raises(ShapeMismatchError, match=r"3 rows but the transfer set has 4 samples"):
        validate_soft_targets(feasible(3, 4), num_samples=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("delta, ok", [(5e-5, True), (-5e-5, True), (5e-4, False), (-5e-4, False)])
def test_validate_sum_tolerance(dtype, delta, ok):
    p = torch.tensor([[0.25, 0.75], [0.5, 0.5 + delta], [0.1, 0.9]], dtype=dtype)
    if ok:
        assert validate_soft_targets(p) is p
    else:
        with pytest.raises(InfeasibleSoftTargetsError, match=r"row\(s\) 1 does not sum to 1"):
            validate_soft_targets(p)


@pytest.mark.parametrize("classes", [2, 10, 1000])
@pytest.mark.parametrize("where", ["cast-after", "softmax-in-half"])
def test_validate_accepts_fp16_softmax(classes, where):
    logits = randn(64, classes, seed=93, scale=3.0)
    if where == "cast-after":
        p = torch.softmax(logits, dim=-1).half()
    else:
        p = torch.softmax(logits.half(), dim=-1)
    assert validate_soft_targets(p) is p


def test_validate_rejects_clearly_unnormalised_fp16_row():
    p = torch.tensor([[0.5, 0.49], [0.5, 0.5]], dtype=torch.float16)
    with pytest.raises(InfeasibleSoftTargetsError, match=r"row\(s\) 0 does not sum to 1"):
        validate_soft_targets(p)


def test_validate_rejects_unnormalised_bf16_rows_with_many_classes():
    p = torch.full((2, 100), 0.003, dtype=torch.bfloat16)  # rows sum to ~0.3
    with pytest.raises(InfeasibleSoftTargetsError):
        validate_soft_targets(p)


# --------------------------------------------------------------------------------------------
# 12. bf16 inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_bf16_logits_give_finite_float32_close_to_float32(temperature):
    s = randn(32, 10, seed=101, scale=3.0)
    t = randn(32, 10, seed=102, scale=3.0)
    sb = s.bfloat16().requires_grad_(True)
    out = soft_target_kl(sb, t.bfloat16(), temperature=temperature)
    assert out.dtype == torch.float32
    assert torch.isfinite(out)
    ref = soft_target_kl(s, t, temperature=temperature).item()
    assert out.item() == pytest.approx(ref, rel=2e-2)
    # Exactly the float32 computation on the bf16-rounded inputs.
    exact = np_masked_mean(np_kl_rows(as_np(sb), as_np(t.bfloat16()), temperature), None)
    assert out.item() == pytest.approx(exact, rel=1e-5)
    out.backward()
    assert sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad.float()).all()
    res = kd_objective(sb, torch.arange(32) % 10, t.bfloat16(), temperature=temperature, beta=0.9)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in res.values())


def test_bf16_soft_targets_path():
    s = randn(16, 6, seed=103, scale=2.0)
    p = soften(randn(16, 6, seed=104, scale=2.0), 2.0)
    out = soft_target_kl(s.bfloat16(), soft_targets=p.bfloat16(), temperature=2.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    ref = soft_target_kl(s, soft_targets=p, temperature=2.0).item()
    assert out.item() == pytest.approx(ref, rel=5e-2, abs=5e-3)


# --------------------------------------------------------------------------------------------
# 13. Invalid hyperparameters and arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0, 0.0, -1, -1.0, float("nan"), float("inf"), "4"])
def test_invalid_temperature_raises(temperature):
    s = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="temperature"):
        soft_target_kl(s, s, temperature=temperature)
    with pytest.raises(ConfigError, match="temperature"):
        soften(s, temperature)
    with pytest.raises(ConfigError, match="temperature"):
        kd_objective(s, None, s, temperature=temperature, beta=0.5)


@pytest.mark.parametrize("beta", [0, 0.0, 1.5, -0.1, float("nan"), float("inf"), "0.5"])
def test_invalid_beta_raises(beta):
    s = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="beta"):
        kd_objective(s, None, s, temperature=2.0, beta=beta)


@pytest.mark.parametrize("beta", [1e-6, 0.5, 1, 1.0])
def test_valid_beta_boundaries(beta):
    s = torch.zeros(2, 3)
    out = kd_objective(s, torch.tensor([0, -1]), s, temperature=2.0, beta=beta)
    assert torch.isfinite(out["loss"])


def test_exactly_one_target_source_required():
    s = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="exactly one"):
        soft_target_kl(s)
    with pytest.raises(ConfigError, match="exactly one"):
        soft_target_kl(s, s, soft_targets=soften(s))


def test_shape_mismatches_raise():
    s = torch.zeros(2, 3)
    with pytest.raises(ShapeMismatchError, match="differ in shape"):
        soft_target_kl(s, torch.zeros(2, 4))
    with pytest.raises(ShapeMismatchError, match="differ in shape"):
        soft_target_kl(s, soft_targets=torch.full((3, 3), 1 / 3))
    with pytest.raises(ShapeMismatchError, match="Mask shape"):
        soft_target_kl(s, s, mask=torch.ones(3))
    with pytest.raises(ShapeMismatchError, match="Mask shape"):
        soft_target_kl(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), mask=torch.ones(6))


def test_mask_also_removes_labeled_rows_from_ce_and_any_negative_label_is_ignored():
    s = randn(4, 5, seed=80)
    labels = torch.tensor([0, 1, 2, 3])
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    full = kd_objective(s, labels, s.clone(), temperature=2.0, beta=0.5, mask=mask)
    half = kd_objective(s[:2], labels[:2], s[:2].clone(), temperature=2.0, beta=0.5)
    assert float(full["ce"]) == pytest.approx(float(half["ce"]), rel=1e-6)
    torch_ignore = torch.tensor([0, 1, -100, -100])
    assert float(cross_entropy(s, torch_ignore)) == pytest.approx(float(cross_entropy(s[:2], labels[:2])), rel=1e-6)
