"""The losses of DKD, DIST, logit standardisation and multi-teacher KD against independent float64
numpy implementations written here, fixed golden values, and their own properties."""

import numpy as np
import pytest
import torch

from softkd.errors import ConfigError, ShapeMismatchError
from softkd.losses.dist import dist_objective, dist_terms
from softkd.losses.dkd import dkd_objective, dkd_target, dkd_terms, non_target_index
from softkd.losses.logits import ensemble_targets, kd_objective, soft_target_kl, standardize_logits


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(-1)


def np_dkd(student: np.ndarray, teacher: np.ndarray, target: np.ndarray, temperature: float):
    """Zhao et al. 2022 as written: binary (target, rest) and renormalised non-target distributions."""
    ps, pt = np_softmax(student / temperature), np_softmax(teacher / temperature)
    rows = np.arange(len(target))
    gs, gt = ps[rows, target], pt[rows, target]
    tckd = np_kl(np.stack([gt, 1 - gt], -1), np.stack([gs, 1 - gs], -1))
    keep = np.ones_like(ps, dtype=bool)
    keep[rows, target] = False
    hat_s = ps[keep].reshape(len(target), -1) / (1 - gs)[:, None]
    hat_t = pt[keep].reshape(len(target), -1) / (1 - gt)[:, None]
    nckd = np_kl(hat_t, hat_s)
    return temperature**2 * tckd.mean(), temperature**2 * nckd.mean(), (tckd, nckd, gt)


def np_dist(student: np.ndarray, teacher: np.ndarray, temperature: float):
    ps, pt = np_softmax(student / temperature), np_softmax(teacher / temperature)
    inter = np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(ps, pt)])
    intra = np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(ps.T, pt.T)])
    return temperature**2 * inter, temperature**2 * intra


def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# --- DKD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("seed", range(3))
def test_dkd_matches_the_paper_written_out_in_float64(temperature, seed):
    s, t = randn(32, 10, seed=seed, scale=3, dtype=torch.float64), randn(32, 10, seed=seed + 10, scale=3,
                                                                       dtype=torch.float64)
    target = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(seed))
    tckd, nckd = dkd_terms(s, t, target, temperature=temperature)
    ref_tckd, ref_nckd, _ = np_dkd(s.numpy(), t.numpy(), target.numpy(), temperature)
    assert float(tckd) == pytest.approx(ref_tckd, rel=1e-10, abs=1e-12)
    assert float(nckd) == pytest.approx(ref_nckd, rel=1e-10, abs=1e-12)


def test_dkd_decomposes_plain_kd():
    # KL(p_t ‖ p_s) = TCKD + (1 − p_t,g) · NCKD, sample by sample (Zhao et al., eq. 5)
    s, t = randn(16, 7, seed=1, scale=2, dtype=torch.float64), randn(16, 7, seed=2, scale=2, dtype=torch.float64)
    target = torch.arange(16) % 7
    for i in range(16):
        tckd, nckd = dkd_terms(s[i:i + 1], t[i:i + 1], target[i:i + 1], temperature=2.0)
        kd = soft_target_kl(s[i:i + 1], t[i:i + 1], temperature=2.0)
        p_target = float(torch.softmax(t[i] / 2.0, -1)[target[i]])
        assert float(kd) == pytest.approx(float(tckd) + (1 - p_target) * float(nckd), rel=1e-10)


GOLDEN_STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
GOLDEN_TEACHER = [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]
GOLDEN_TARGET = [2, 0]


@pytest.mark.parametrize("temperature, tckd, nckd", [
    (1.0, 0.5215845481216554, 0.29111583210914366),
    (4.0, 0.6093583385789795, 0.3110439180943779),
])
def test_dkd_golden_values(temperature, tckd, nckd):
    s, t = torch.tensor(GOLDEN_STUDENT), torch.tensor(GOLDEN_TEACHER)
    got = dkd_terms(s, t, torch.tensor(GOLDEN_TARGET), temperature=temperature)
    assert float(got[0]) == pytest.approx(tckd, rel=1e-5)
    assert float(got[1]) == pytest.approx(nckd, rel=1e-5)


def test_dkd_objective_weights_its_terms():
    s, t = randn(8, 5, seed=3, scale=2), randn(8, 5, seed=4, scale=2)
    y = torch.tensor([0, 1, 2, 3, 4, -1, -1, 2])
    out = dkd_objective(s, y, t, temperature=3.0, alpha=0.5, beta=6.0, ce_weight=0.7, warmup_factor=0.25)
    target = dkd_target(y, t)
    tckd, nckd = dkd_terms(s, t, target, temperature=3.0)
    ce = torch.nn.functional.cross_entropy(s[y >= 0], y[y >= 0])
    expected = 0.7 * ce + 0.25 * (0.5 * tckd + 6.0 * nckd)
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(out["tckd"]) == pytest.approx(float(tckd)) and float(out["nckd"]) == pytest.approx(float(nckd))


def test_dkd_unlabeled_samples_take_the_teachers_top_class():
    t = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 9.0], [1.0, 0.0, 0.0]])
    assert dkd_target(torch.tensor([-1, -1, 2]), t).tolist() == [1, 2, 2]


def test_dkd_refuses_fewer_than_three_classes():
    with pytest.raises(ConfigError, match="at least 3 classes"):
        dkd_terms(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))


def test_non_target_index_lists_every_other_class_in_order():
    idx = non_target_index(torch.tensor([0, 2, 4]), 5)
    assert idx.tolist() == [[1, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 3]]


def test_dkd_where_the_reference_code_fails():
    # mdistiller takes log(p + 1e-7) of probabilities: a confident teacher (p_target → 1) makes
    # its NCKD target log(0 + 1e-7)-biased and NaN-prone; here it stays finite, and exactly 0 at s = t.
    t = torch.tensor([[60.0, 0.0, 0.0, 0.0]])
    tckd, nckd = dkd_terms(t.clone(), t, torch.tensor([0]), temperature=1.0)
    assert float(tckd) == 0.0 and float(nckd) == 0.0
    s = torch.tensor([[0.0, 60.0, 0.0, -60.0]], requires_grad=True)
    tckd, nckd = dkd_terms(s, t, torch.tensor([0]), temperature=1.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(s.grad).all()


# --- DIST --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("seed", range(3))
def test_dist_matches_numpy_correlations(temperature, seed):
    s, t = randn(24, 6, seed=seed, scale=2, dtype=torch.float64), randn(24, 6, seed=seed + 5, scale=2,
                                                                      dtype=torch.float64)
    inter, intra = dist_terms(s, t, temperature=temperature)
    ref_inter, ref_intra = np_dist(s.numpy(), t.numpy(), temperature)
    assert float(inter) == pytest.approx(ref_inter, rel=1e-7)
    assert float(intra) == pytest.approx(ref_intra, rel=1e-7)


def test_dist_golden_values():
    s = torch.tensor(GOLDEN_STUDENT + [[2.0, 0.0, 0.0]])
    t = torch.tensor(GOLDEN_TEACHER + [[0.0, 1.0, 0.0]])
    inter, intra = dist_terms(s, t, temperature=1.0)
    assert float(inter) == pytest.approx(1.6223642355273988, rel=1e-5)
    assert float(intra) == pytest.approx(1.858324655238109, rel=1e-5)


def test_dist_mask_leaves_rows_out_of_both_relations():
    s, t = randn(10, 5, seed=1), randn(10, 5, seed=2)
    s_bad = s.clone()
    s_bad[7:] = float("nan")
    mask = torch.arange(10) < 7
    inter, intra = dist_terms(s_bad, t, mask=mask)
    ref = dist_terms(s[:7], t[:7])
    assert float(inter) == pytest.approx(float(ref[0]), rel=1e-5)
    assert float(intra) == pytest.approx(float(ref[1]), rel=1e-5)


def test_dist_intra_term_of_micro_batches_adds_up_to_their_sample_weighted_mean():
    s, t = randn(12, 5, seed=3), randn(12, 5, seed=4)
    parts = [(s[:8], t[:8]), (s[8:], t[8:])]
    summed = sum(dist_terms(a, b, count=12)[1] for a, b in parts)
    weighted = sum(dist_terms(a, b)[1] * len(a) / 12 for a, b in parts)
    assert float(summed) == pytest.approx(float(weighted), rel=1e-6)


def test_dist_objective_weights_its_terms():
    s, t, y = randn(8, 5, seed=5), randn(8, 5, seed=6), torch.tensor([0, 1, -1, 3, 4, 0, -1, 2])
    out = dist_objective(s, y, t, temperature=2.0, beta=2.0, gamma=0.5, ce_weight=0.3)
    inter, intra = dist_terms(s, t, temperature=2.0)
    ce = torch.nn.functional.cross_entropy(s[y >= 0], y[y >= 0])
    assert float(out["loss"]) == pytest.approx(float(0.3 * ce + 2.0 * inter + 0.5 * intra), rel=1e-6)


# --- logit standardisation ---------------------------------------------------------------------


def test_standardized_logits_have_zero_mean_and_unit_std():
    z = standardize_logits(randn(6, 9, seed=1, scale=5) + 3)
    torch.testing.assert_close(z.mean(-1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.pow(2).mean(-1).sqrt(), torch.ones(6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift, scale", [(7.0, 1.0), (-3.0, 1.0), (0.0, 5.0), (2.0, 0.1)])
def test_standardization_ignores_each_samples_shift_and_scale(shift, scale):
    s, t, y = randn(16, 10, seed=1, scale=2), randn(16, 10, seed=2, scale=2), torch.arange(16) % 10
    kd = {k: kd_objective(s, y, t, temperature=2.0, beta=1.0, standardize=True)["kd"] for k in ("base",)}["base"]
    per_row = torch.linspace(0.5, 2.0, 16)[:, None]  # a different factor per sample
    moved_s = kd_objective(s * scale * per_row + shift, y, t, temperature=2.0, beta=1.0, standardize=True)["kd"]
    moved_t = kd_objective(s, y, t * scale / per_row - shift, temperature=2.0, beta=1.0, standardize=True)["kd"]
    assert float(moved_s) == pytest.approx(float(kd), rel=1e-4)
    assert float(moved_t) == pytest.approx(float(kd), rel=1e-4)
    dkd = dkd_objective(s, y, t, standardize=True, ce_weight=0.0)["loss"]
    moved = dkd_objective(s * scale + shift, y, t * 2 * scale - shift, standardize=True, ce_weight=0.0)["loss"]
    assert float(moved) == pytest.approx(float(dkd), rel=1e-4)


def test_without_standardization_scale_matters():
    s, t, y = randn(16, 10, seed=1, scale=2), randn(16, 10, seed=2, scale=2), torch.arange(16) % 10
    assert float(kd_objective(3 * s, y, t, beta=1.0)["kd"]) != pytest.approx(float(kd_objective(s, y, t, beta=1.0)["kd"]),
                                                                             rel=1e-2)


def test_standardization_needs_teacher_logits():
    with pytest.raises(ConfigError, match="standardize"):
        kd_objective(torch.zeros(2, 3), None, soft_targets=torch.full((2, 3), 1 / 3), standardize=True)


def test_kd_scale_multiplies_only_the_distillation_term():
    s, t, y = randn(8, 5, seed=1), randn(8, 5, seed=2), torch.arange(8) % 5
    base = kd_objective(s, y, t, beta=0.5)
    scaled = kd_objective(s, y, t, beta=0.5, kd_scale=8.0)
    assert float(scaled["loss"]) == pytest.approx(float(0.5 * base["ce"] + 0.5 * 8.0 * base["kd"]), rel=1e-6)
    assert float(scaled["kd"]) == pytest.approx(float(base["kd"]))


# --- multi-teacher -----------------------------------------------------------------------------


def test_ensemble_of_probabilities_matches_numpy():
    t = randn(6, 3, 4, seed=1, scale=2, dtype=torch.float64)  # (B, M, C)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    _, probs = ensemble_targets(t, w, temperature=2.0, combine="probs")
    ref = sum(w[m].item() * np_softmax(t[:, m].numpy() / 2.0) for m in range(3))
    np.testing.assert_allclose(probs.numpy(), ref, rtol=1e-12)
    logits, _ = ensemble_targets(t, w, temperature=2.0, combine="logits")
    np.testing.assert_allclose(logits.numpy(), sum(w[m].item() * t[:, m].numpy() for m in range(3)), rtol=1e-12)


def test_ensemble_of_identical_teachers_is_that_teacher():
    s, t = randn(8, 5, seed=1), randn(8, 5, seed=2)
    w = torch.full((3,), 1 / 3)
    _, probs = ensemble_targets(t[:, None].expand(8, 3, 5), w, temperature=4.0)
    kd_probs = soft_target_kl(s, soft_targets=probs, temperature=4.0)
    assert float(kd_probs) == pytest.approx(float(soft_target_kl(s, t, temperature=4.0)), rel=1e-5)


def test_ensemble_shape_is_checked():
    with pytest.raises(ShapeMismatchError, match=r"\(B, 2, C\)"):
        ensemble_targets(torch.zeros(4, 3, 5), torch.full((2,), 0.5), temperature=1.0)
