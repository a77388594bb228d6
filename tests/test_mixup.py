"""Mixup as seeded views ("function matching", Beyer et al. 2022): each view of a sample is its
blend with a partner from the data the run trains on, fixed by (seed, sample id, view), so a cache
holds the teacher's logits of exactly the blends the student trains on; the labels blend with the
same weight, and cross-entropy on blended labels is checked against its formula."""

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import softkd
from softkd.data.augment import Mixup, build_augment
from softkd.data.datasets import ArrayDataset
from softkd.errors import ConfigError, DataError
from softkd.losses import cross_entropy, kd_objective
from softkd.methods import Supervised
from softkd.models import build_model

N = 40


@pytest.fixture(scope="module")
def basis():
    """Sample j's input is the j-th unit vector (as a 1×5×8 image), so a blend shows its own weight
    and its partner without asking the augmentation; every third sample is unlabeled."""
    y = torch.arange(N) % 7
    y[::3] = -1
    return ArrayDataset(torch.eye(N).reshape(N, 1, 5, 8), y, ids=torch.arange(500, 500 + N), num_classes=7)


def _read_blend(out: torch.Tensor, i: int) -> tuple[float, int]:
    """(own weight, partner position) of blended row ``out[i]`` of the basis pool."""
    flat = out[i].flatten()
    own = float(flat[i])
    rest = flat.clone()
    rest[i] = 0
    if rest.abs().max() == 0:  # its own partner: λ·x + (1 − λ)·x = x
        return own, i
    return own, int(rest.argmax())


def test_a_view_is_a_blend_with_a_seeded_partner_from_the_pool(basis):
    aug = Mixup(seed=3).bind(basis)
    out = aug(basis.x, basis.ids, 1)
    for i in range(N):
        own, partner = _read_blend(out, i)
        flat = out[i].flatten()
        if partner != i:
            assert own + float(flat[partner]) == pytest.approx(1.0, abs=1e-6)  # weights λ and 1 − λ
            assert int((flat != 0).sum()) <= 2
    order = torch.randperm(N)
    assert torch.equal(aug(basis.x[order], basis.ids[order], 1), out[order])  # batch order plays no part
    assert torch.equal(aug(basis.x[:5], basis.ids[:5], 1), out[:5])
    assert not torch.equal(aug(basis.x, basis.ids, 2), out)
    assert not torch.equal(Mixup(seed=4).bind(basis)(basis.x, basis.ids, 1), out)


def test_partners_cover_the_pool_and_weights_follow_beta(basis):
    ids = torch.arange(20000)
    for alpha in (1.0, 0.2, 4.0):
        partner, lam = Mixup(alpha=alpha, seed=0).bind(basis).draw(ids, 0)
        counts = torch.bincount(partner, minlength=N)
        assert counts.min() > 350 and counts.max() < 650  # 500 each if uniform
        assert stats.kstest(lam.numpy(), stats.beta(alpha, alpha).cdf).statistic < 0.02
        assert 0 <= float(lam.min()) and float(lam.max()) <= 1


def test_labels_blend_with_the_inputs_weight_and_unlabeled_sides_carry_none(basis):
    aug = Mixup(alpha=0.5, seed=1).bind(basis)
    out, targets = aug(basis.x, basis.ids, 0), aug.mix_labels(basis.y, basis.ids, 0)
    assert targets.shape == (N, 7) and targets.dtype == torch.float32
    for i in range(N):
        own, partner = _read_blend(out, i)
        expected = torch.zeros(7)
        for label, weight in ((basis.y[i], own), (basis.y[partner], 1 - own if partner != i else 0.0)):
            if label >= 0:
                expected[label] += weight
        torch.testing.assert_close(targets[i], expected, rtol=0, atol=1e-6)


def test_mixup_needs_a_pool_float_inputs_and_a_positive_alpha(basis):
    with pytest.raises(DataError, match=r"bind\(dataset\) first"):
        Mixup()(basis.x, basis.ids, 0)
    with pytest.raises(DataError, match="floating-point inputs"):
        Mixup().bind(basis)(basis.x.to(torch.uint8), basis.ids, 0)
    with pytest.raises(ConfigError, match="must be a number > 0; got 0"):
        Mixup(alpha=0)
    assert isinstance(build_augment("mixup", alpha=0.3, pool=basis), Mixup)
    assert build_augment("mixup", alpha=0.3).describe() == {"name": "mixup", "alpha": 0.3, "seed": 0}


def test_cross_entropy_on_label_targets_is_their_mass_weighted_mean():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 3, -1, 2, 1, -1])
    one_hot = F.one_hot(labels.clamp(min=0), 4).double() * (labels >= 0)[:, None]
    assert float(cross_entropy(logits, one_hot)) == pytest.approx(float(cross_entropy(logits, labels)), rel=1e-12)
    targets = torch.tensor([[0.3, 0, 0, 0.7], [0, 0.25, 0, 0], [0, 0, 0, 0], [0.5, 0.5, 0, 0],
                            [0, 0, 0, 1.0], [0.1, 0, 0.2, 0]], dtype=torch.float64)
    log_q = logits - logits.exp().sum(1, keepdim=True).log()
    expected = -(targets * log_q).sum() / targets.sum()  # the formula, written out
    assert float(cross_entropy(logits, targets)) == pytest.approx(float(expected), rel=1e-12)
    assert float(cross_entropy(logits, targets, count=4)) == pytest.approx(float(-(targets * log_q).sum() / 4))
    mask = torch.tensor([1, 1, 0, 1, 0, 1])
    nan_rows = torch.where(mask[:, None].bool(), logits, torch.full_like(logits, float("nan")))
    kept = targets * mask[:, None]
    masked = cross_entropy(nan_rows, targets, mask=mask)
    assert float(masked) == pytest.approx(float(-(kept * log_q).sum() / kept.sum()), rel=1e-12)
    assert float(cross_entropy(logits, torch.zeros(6, 4, dtype=torch.float64))) == 0.0
    terms = kd_objective(logits, targets, logits.flip(0), temperature=2.0, beta=0.25)
    assert float(terms["ce"]) == pytest.approx(float(expected), rel=1e-12)


def test_accumulated_micro_batches_with_mixup_equal_one_large_batch():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (256,))
    y[torch.arange(256) % 3 == 1] = -1  # unlabeled sides make the label mass uneven across micro-batches
    data = ArrayDataset(torch.rand(256, 1, 8, 8), y)
    base = build_model("mlp-32", input_shape=(1, 8, 8), num_classes=10)
    for objective in (None, Supervised()):
        weights = {}
        for accumulate in (1, 4):
            model = build_model("mlp-32", input_shape=(1, 8, 8), num_classes=10)
            model.load_state_dict(base.state_dict())
            softkd.fit(model, data, objective=objective, augment=Mixup(seed=2), batch_size=256,  # bound by fit
                       accumulate=accumulate, max_steps=1, optimizer="sgd", lr=0.5, momentum=0.0, weight_decay=0.0)
            weights[accumulate] = model.state_dict()
        assert max(float((weights[1][k] - base.state_dict()[k]).abs().max()) for k in weights[1]) > 1e-3
        for key in weights[1]:
            torch.testing.assert_close(weights[4][key], weights[1][key], rtol=1e-5, atol=1e-6)


def test_mixup_alpha_is_in_the_data_key_only_with_mixup():
    from softkd.config import config_from_dict

    mixup = config_from_dict({"data": {"name": "digits", "augment": "mixup", "mixup_alpha": 0.4}, "cache": {"views": 2}})
    assert mixup.data.key()["mixup_alpha"] == 0.4
    assert "mixup_alpha" not in config_from_dict({"data": {"name": "digits"}}).data.key()  # older keys unchanged


def test_dkd_refuses_blended_labels():
    from softkd.losses import dkd_objective

    logits = torch.randn(4, 5)
    with pytest.raises(ConfigError, match="blended labels"):
        dkd_objective(logits, torch.full((4, 5), 0.2), logits)
