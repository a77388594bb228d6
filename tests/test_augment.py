"""Seeded augmentation and augmentation-aware caching: every view is fixed by (seed, sample id,
view), the cache holds the teacher's logits for exactly those views, and the student trains on
the view whose logits it is taught with."""


import pytest
import torch
import torch.nn.functional as F

import softkd
from softkd.cache import SoftLabelCache, fingerprint, ids_sha256
from softkd.data.augment import Mixup, ShiftFlip, build_augment
from softkd.data.datasets import ArrayDataset
from softkd.errors import ConfigError, DataError
from softkd.methods import SoftTarget
from softkd.models import build_model


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    x = torch.rand(300, 1, 8, 8)
    return ArrayDataset(x, torch.randint(0, 10, (300,)), ids=torch.arange(1000, 1300))


def test_a_view_depends_only_on_seed_id_and_view(images):
    aug = ShiftFlip(shift=2, seed=3)
    x, ids = images.x[:64], images.ids[:64]
    order = torch.randperm(64)
    assert torch.equal(aug(x, ids, 1)[order], aug(x[order], ids[order], 1))  # batch composition and order
    assert torch.equal(aug(x[:10], ids[:10], 1), aug(x, ids, 1)[:10])
    per_sample = torch.arange(64) % 3
    assert torch.equal(aug(x, ids, per_sample)[5], aug(x[5:6], ids[5:6], int(per_sample[5]))[0])
    assert not torch.equal(aug(x, ids, 0), aug(x, ids, 1))
    assert not torch.equal(ShiftFlip(shift=2, seed=4)(x, ids, 1), aug(x, ids, 1))


def _matches(view, image, shift):
    """Every (dy, dx, flipped) for which ``view`` is ``image`` shifted (and flipped) within ``shift``."""
    padded = F.pad(image, (shift,) * 4)
    size = image.shape[-1]
    crops = {(dy, dx): padded[:, dy:dy + size, dx:dx + size] for dy in range(2 * shift + 1)
             for dx in range(2 * shift + 1)}
    return [(dy, dx, f) for (dy, dx), crop in crops.items() for f in (False, True)
            if torch.equal(view, crop.flip(-1) if f else crop)]


def test_views_are_shifted_and_flipped_copies_within_the_shift(images):
    x, ids = images.x, images.ids
    out = ShiftFlip(shift=2, seed=0)(x, ids, 0)
    found = [_matches(out[i], x[i], 2) for i in range(len(x))]
    assert all(found), "a view is not a shifted (flipped) copy of its image"
    assert 100 < sum(f[0][2] for f in found) < 200  # flipped about half the time
    assert len({f[0][:2] for f in found}) == 25  # every offset in [-2, 2]² occurs
    unflipped = ShiftFlip(shift=2, flip=False, seed=0)(x, ids, 0)
    assert all(any(not f for *_, f in _matches(unflipped[i], x[i], 2)) for i in range(len(x)))
    assert torch.equal(ShiftFlip(shift=0, flip=False)(x, ids, 5), x)


def test_each_epoch_picks_one_of_k_views_deterministically():
    aug, ids = ShiftFlip(seed=0), torch.arange(4000)
    picks = aug.pick(ids, 1, 4)
    assert torch.equal(picks, aug.pick(ids, 1, 4)) and picks.min() == 0 and picks.max() == 3
    assert torch.bincount(picks, minlength=4).min() > 900  # about uniform
    assert (aug.pick(ids, 2, 4) != picks).float().mean() > 0.6  # another epoch, other views
    assert torch.equal(aug.pick(ids, 7, None), torch.full((4000,), 7))  # no cache: a fresh view per epoch


def test_augmentation_needs_images_and_a_known_name():
    with pytest.raises(DataError, match=r"needs image batches \(B, C, H, W\); got shape \(4, 64\)"):
        ShiftFlip()(torch.zeros(4, 64), torch.arange(4), 0)
    with pytest.raises(ConfigError, match="Unknown augmentation 'rotate'"):
        build_augment("rotate")
    assert build_augment(None) is None


def _teacher():
    torch.manual_seed(0)
    return build_model("tinycnn-4", input_shape=(1, 8, 8), num_classes=10).eval()


def _cache(folder, teacher, data, aug, views):
    stated = fingerprint(teacher=teacher, data={"n": len(data), "ids_sha256": ids_sha256(data.ids)}, views=views,
                         augment_seed=aug.seed, preprocessing={"augment": aug.describe()}, dtype="fp32")
    return SoftLabelCache.build(folder, teacher, data, fingerprint=stated, dtype="fp32", views=views, view_fn=aug,
                                shard_size=128, batch_size=64)


def test_the_cache_holds_the_teacher_on_replayed_views(tmp_path, images):
    teacher, aug = _teacher(), ShiftFlip(shift=2, seed=5)
    cache = _cache(tmp_path, teacher, images, aug, views=3)
    positions = torch.tensor([0, 7, 127, 128, 299])
    with torch.no_grad():
        for view in range(3):
            replayed = teacher(aug(images.x[positions], images.ids[positions], view))
            torch.testing.assert_close(cache.logits(positions, view=view), replayed, rtol=1e-5, atol=1e-5)


class _Spy(SoftTarget):
    """Records each training batch's inputs, labels, ids and teacher logits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def forward(self, model, batch, **counts):
        self.seen.append({k: batch[k].clone() for k in ("x", "y", "id", "teacher_logits")})
        return super().forward(model, batch, **counts)


def _spied_distill(tmp_path, monkeypatch, teacher, data, aug, *, views, epochs, batch_size) -> list[dict]:
    """Distil an mlp-8 from a cache of ``views`` views of ``data``; every training batch it saw."""
    cache = _cache(tmp_path, teacher, data, aug, views=views)
    logits = torch.stack([cache.logits(torch.arange(len(data)), view=v) for v in range(views)], 1)  # (N, K, C)
    spy = {}
    monkeypatch.setattr("softkd.train.distill.build_method",
                        lambda params, teachers: spy.setdefault("objective", _Spy(params, teachers=teachers)))
    student = build_model("mlp-8", input_shape=(1, 8, 8), num_classes=10)
    softkd.distill(student, teacher, data, teacher_logits=logits, augment=aug, epochs=epochs, batch_size=batch_size)
    return spy["objective"].seen

def test_the_student_trains_on_exactly_the_cached_view_it_is_taught_with(tmp_path, images, monkeypatch):
    teacher, aug = _teacher(), ShiftFlip(shift=2, seed=5)
    seen = _spied_distill(tmp_path, monkeypatch, teacher, images, aug, views=4, epochs=3, batch_size=64)
    assert len(seen) == 3 * 5
    views_used = set()
    with torch.no_grad():
        for i, batch in enumerate(seen):
            x, taught, ids = batch["x"], batch["teacher_logits"], batch["id"]
            torch.testing.assert_close(taught, teacher(x), rtol=1e-5, atol=1e-5)  # consistent teaching
            raw = images.x[ids - 1000]
            assert not torch.equal(x, raw)  # augmented, not the raw images
            # (K, B): which views each recorded sample is; two views may draw the same shift and flip
            matches = torch.stack([(aug(raw, ids, v) == x).flatten(1).all(1) for v in range(4)])
            picked = aug.pick(ids, i // 5 + 1, 4)  # five batches an epoch, epochs counted from 1
            assert matches[picked, torch.arange(len(ids))].all()
            only_one = matches.sum(0) == 1  # samples that a single view could have made
            views_used |= set(matches[:, only_one].int().argmax(0).tolist())
    assert views_used == {0, 1, 2, 3}


def test_the_student_trains_on_the_cached_mixup_blends_with_blended_labels(tmp_path, monkeypatch):
    torch.manual_seed(0)
    data = ArrayDataset(torch.rand(200, 1, 8, 8), torch.randint(0, 10, (200,)), ids=torch.arange(200) * 7)
    teacher, aug = _teacher(), Mixup(alpha=1.0, seed=5).bind(data)
    seen = _spied_distill(tmp_path, monkeypatch, teacher, data, aug, views=3, epochs=2, batch_size=50)
    assert len(seen) == 2 * 4
    with torch.no_grad():
        for step, batch in enumerate(seen):
            view = aug.pick(batch["id"], step // 4 + 1, 3)  # four batches an epoch, epochs counted from 1
            positions = batch["id"] // 7
            torch.testing.assert_close(batch["x"], aug(data.x[positions], batch["id"], view))
            torch.testing.assert_close(batch["teacher_logits"], teacher(batch["x"]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batch["y"], aug.mix_labels(data.y[positions], batch["id"], view))
            assert torch.allclose(batch["y"].sum(1), torch.ones(50))  # every side labeled: whole labels


def test_static_soft_labels_with_augmentation_are_refused(images):
    teacher, student = _teacher(), build_model("mlp-8", input_shape=(1, 8, 8), num_classes=10)
    static = torch.zeros(len(images), 10)
    with pytest.raises(ConfigError, match="Random augmentation with static soft labels"):
        softkd.distill(student, teacher, images, teacher_logits=static, augment=ShiftFlip(), epochs=1)
    with pytest.raises(ConfigError, match=r"hold one row per view; pass the augment"):
        softkd.distill(student, teacher, images, teacher_logits=torch.zeros(len(images), 3, 10), epochs=1)


def test_online_teacher_runs_on_every_augmented_batch(images):
    teacher = _teacher()
    calls = []
    teacher.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    student = build_model("mlp-8", input_shape=(1, 8, 8), num_classes=10)
    softkd.distill(student, teacher, images, augment=ShiftFlip(seed=1), epochs=2, batch_size=100)
    assert sum(calls) >= 2 * len(images)  # the teacher saw every augmented sample of both epochs


@pytest.mark.parametrize("sets, message", [
    (["data.augment=shift"], r"static soft-label cache \(cache.views: 1\)"),
    (["cache.views=3"], r"cache.views: 3 needs data.augment"),
    (["cache.views=0", "data.augment=shift"], r"'cache.views' in .* is invalid: Input should be greater than or equal to 1"),
    (["data.augment=rotate"], r"'data.augment' in .* is invalid: Input should be 'shift', 'shift-flip' or 'mixup'"),
    (["data.augment=mixup"], r"static soft-label cache \(cache.views: 1\)"),
    (["data.augment=mixup", "cache.views=2", "method.name=dkd"], r"method 'dkd' splits each output at its sample's"),
    (["data.augment=mixup", "cache.views=2", "data.mixup_alpha=0"], r"'data.mixup_alpha' in .* is invalid: Input should be greater than 0"),
])
def test_bad_view_settings_exit_2_with_one_line(tmp_path, sets, message):
    import re

    from typer.testing import CliRunner

    from softkd.cli import app

    (tmp_path / "run.yaml").write_text("data: {name: digits}\n")
    args = ["run", "--out", str(tmp_path / "run"), str(tmp_path / "run.yaml")]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)  # in process: the console script's own path is tested in test_cli
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data, described, changed", [
    ({"augment": "shift-flip", "shift": 1}, {"name": "shift-flip", "shift": 1, "seed": 0}, ("shift", 2, "shift")),
    ({"augment": "mixup", "mixup_alpha": 0.4, "labeled_fraction": [1.0, 0.1]}, {"name": "mixup", "alpha": 0.4, "seed": 0},
     ("mixup_alpha", 1.0, "alpha")),
])
def test_run_caches_k_views_and_a_changed_augmentation_rebuilds_them(tmp_path, data, described, changed):
    from softkd.config import config_from_dict
    from softkd.pipeline import run_experiment

    raw = {"data": {"name": "digits", **data},
           "teacher": {"model": "tinycnn-4", "epochs": 1}, "student": {"model": "mlp-8"},
           "train": {"epochs": 1, "seeds": [0], "batch_size": 128}, "cache": {"views": 2, "dtype": "fp32"}}
    report = run_experiment(config_from_dict(raw), out_dir=tmp_path)
    for regime in report["students"]["mlp-8"]["regimes"].values():
        assert {"scratch", "distilled"} <= set(regime)
    cache = SoftLabelCache.open(tmp_path / "cache")
    assert cache.views == 2
    assert cache.fingerprint["preprocessing"] == {"augment": described}
    key, value, described_as = changed
    raw["data"][key] = value
    run_experiment(config_from_dict(raw), out_dir=tmp_path)
    assert SoftLabelCache.open(tmp_path / "cache").fingerprint["preprocessing"]["augment"][described_as] == value
