"""The training loop and distill(): teacher frozen, stopping rules, λ on weights only, bad input."""

import copy

import pytest
import torch
from torch import nn

import softkd
from softkd.errors import ConfigError, DataError, InfeasibleSoftTargetsError, ShapeMismatchError, TrainingError
from softkd.models import Teacher, build_model
from softkd.train.optim import param_groups


def _student(name="mlp-16", classes=10):
    torch.manual_seed(0)
    return build_model(name, input_shape=(1, 8, 8), num_classes=classes)


def _small(splits, n=300):
    return softkd.ArrayDataset(splits.train.x[:n], splits.train.y[:n])


class _Spy(nn.Module):
    """A teacher that records the mode it ran in and whether grad was enabled."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.inner(x)


def test_teacher_is_frozen_in_eval_mode_and_gets_no_gradients(digit_splits, trained_teacher):
    spy = _Spy(trained_teacher)
    spy.train()
    before = copy.deepcopy(trained_teacher.state_dict())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(digit_splits.train.x[:256],
                                                                       digit_splits.train.y[:256]), batch_size=64)
    softkd.distill(_student(), spy, loader, epochs=2)  # a DataLoader: the teacher runs on every batch
    assert len(spy.calls) >= 8
    assert all(not training and not grad for training, grad in spy.calls)
    assert all(p.grad is None and not p.requires_grad for p in trained_teacher.parameters())
    for key, value in trained_teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_teacher_wrapper_ignores_train_mode():
    teacher = Teacher(nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)))
    teacher.train()
    assert not teacher.training and not teacher.module.training
    x = torch.randn(8, 4, requires_grad=True)
    out = teacher(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, teacher(x))  # dropout stays off


def test_distill_learns_and_accepts_plain_datasets(digit_splits, trained_teacher):
    tuples = torch.utils.data.TensorDataset(digit_splits.train.x, digit_splits.train.y)
    result = softkd.distill(_student(), trained_teacher, tuples, val_data=digit_splits.val, epochs=10,
                            batch_size=64, lr=3e-3)
    assert result.epochs == 10 and result.best_epoch is not None
    assert result.history[-1]["val_accuracy"] > 0.8
    assert set(result.history[0]) >= {"train_loss", "train_ce", "train_kd", "val_accuracy"}


def test_semi_supervised_beta_one_without_labels(digit_splits, trained_teacher):
    unlabeled = softkd.ArrayDataset(digit_splits.train.x)  # no labels at all
    result = softkd.distill(_student(), trained_teacher, unlabeled, val_data=digit_splits.val, beta=1.0,
                            epochs=8, batch_size=64, lr=3e-3)
    assert all(record["train_ce"] == 0.0 for record in result.history)
    assert result.best_score > 0.7  # learned digits from soft labels alone


def test_precomputed_soft_targets_replace_the_teacher(digit_splits, trained_teacher):
    data = _small(digit_splits)
    with torch.no_grad():
        soft = torch.softmax(trained_teacher(data.x) / 4.0, -1)
    a, b = _student(), _student()
    softkd.distill(a, None, data, soft_targets=soft, temperature=4.0, epochs=2, batch_size=64)
    softkd.distill(b, trained_teacher, data, temperature=4.0, epochs=2, batch_size=64)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_patience_stops_and_restores_best_weights(digit_splits):
    student = _student()
    snapshots = {}
    result = softkd.fit(student, _small(digit_splits), val_data=digit_splits.val, epochs=200, lr=0.5,
                        patience=2, log=lambda r: snapshots.setdefault(r["epoch"], copy.deepcopy(student.state_dict())))
    assert result.stopped_by == "patience" and result.epochs < 200
    assert result.epochs == result.best_epoch + 2
    for key, value in student.state_dict().items():
        assert torch.equal(value, snapshots[result.best_epoch][key])
    assert result.best_score == max(r["val_accuracy"] for r in result.history)


def test_max_steps_bounds_training(digit_splits):
    result = softkd.fit(_student(), _small(digit_splits), epochs=50, max_steps=7, batch_size=64)
    assert result.steps == 7 and result.stopped_by == "max_steps" and result.epochs == 2


def test_weight_decay_applies_to_weights_not_biases_or_norms():
    model = build_model("tinycnn-4", input_shape=(1, 8, 8), num_classes=10)
    decay, no_decay = param_groups(model.parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}


def test_lambda_shrinks_weights_only(digit_splits):
    # Two runs that differ only in λ: the larger λ ends with smaller weights.
    runs = {}
    for wd in (0.0, 0.5):
        student = _student("tinycnn-4")
        softkd.fit(student, _small(digit_splits), epochs=3, batch_size=64, lr=1e-2, weight_decay=wd)
        runs[wd] = dict(student.named_parameters())
    norm = lambda params, bias: sum(float(p.detach().norm()) for n, p in params.items() if (p.ndim == 1) == bias)
    assert norm(runs[0.5], bias=False) < 0.95 * norm(runs[0.0], bias=False)


def test_nan_loss_stops_with_step_and_term(digit_splits):
    class Broken(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 10), float("nan"))

    data = _small(digit_splits)
    soft = torch.full((len(data), 10), 0.1)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        student[1].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"step 1 \(term\(s\): ce, kd\)"):
        softkd.distill(student, None, data, soft_targets=soft, epochs=1)
    with pytest.raises(InfeasibleSoftTargetsError, match="NaN or inf"):
        softkd.distill(_student(), Broken(), data, epochs=1)


@pytest.mark.parametrize(
    "soft, error, match",
    [
        (lambda n: torch.full((n, 10), float("nan")), InfeasibleSoftTargetsError, "NaN or inf"),
        (lambda n: torch.full((n, 10), float("inf")), InfeasibleSoftTargetsError, "NaN or inf"),
        (lambda n: torch.full((n, 10), -0.1), InfeasibleSoftTargetsError, "negative"),
        (lambda n: torch.full((n, 10), 2.0), InfeasibleSoftTargetsError, "greater than 1"),
        (lambda n: torch.full((n, 10), 0.09), InfeasibleSoftTargetsError, "sum to 1"),
        (lambda n: torch.full((n, 9), 1 / 9), ShapeMismatchError, "student 10, soft labels 9"),
        (lambda n: torch.full((n - 1, 10), 0.1), ShapeMismatchError, "rows"),
        (lambda n: torch.full((n,), 0.1), ShapeMismatchError, "shape"),
    ],
)
def test_infeasible_soft_targets_are_rejected_before_training(digit_splits, soft, error, match):
    data = _small(digit_splits)
    student = _student()
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(error, match=match):
        softkd.distill(student, None, data, soft_targets=soft(len(data)), epochs=1)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_class_count_mismatch_names_both_sides(digit_splits, trained_teacher):
    with pytest.raises(ShapeMismatchError, match="student 7, teacher 10"):
        softkd.distill(_student(classes=7), trained_teacher, _small(digit_splits), epochs=1)


def test_labels_out_of_range_are_rejected(digit_splits):
    y = digit_splits.train.y[:100].clone()
    y[3] = 12
    with pytest.raises(DataError, match="label 12 outside \\[0, 10\\)"):
        softkd.ArrayDataset(digit_splits.train.x[:100], y, num_classes=10)
    ten_class = softkd.ArrayDataset(digit_splits.train.x[:100], digit_splits.train.y[:100])
    with pytest.raises(DataError, match="Label [5-9] in arrays is outside \\[0, 5\\)"):
        softkd.distill(_student(classes=5), None, ten_class, soft_targets=torch.full((100, 5), 0.2))
    with pytest.raises(DataError, match="outside \\[0, 5\\)"):
        softkd.fit(_student(classes=5), ten_class)


def test_empty_dataset_is_rejected():
    with pytest.raises(DataError, match="empty"):
        softkd.ArrayDataset(torch.zeros(0, 1, 8, 8))
    with pytest.raises(DataError, match="empty"):
        softkd.fit(_student(), torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0).long()))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"temperature": 0}, "temperature"), ({"temperature": -1}, "temperature"), ({"beta": 0}, "beta"),
     ({"beta": 1.5}, "beta"), ({"weight_decay": -0.1}, "weight_decay"), ({"epochs": 0}, "epochs")],
)
def test_bad_hyperparameters(digit_splits, trained_teacher, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        softkd.distill(_student(), trained_teacher, _small(digit_splits), **kwargs)


def test_cosine_schedule_decays_to_zero_over_the_budget(digit_splits):
    from softkd.train.optim import build_optimizer, build_scheduler

    model = _student()
    opt = build_optimizer(model.parameters(), lr=0.1)
    scheduler = build_scheduler(opt, "cosine", total_steps=10)
    lrs = []
    for _ in range(10):
        opt.step()
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[4] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ConfigError, match="lr_schedule"):
        build_scheduler(opt, "linear", 10)


@pytest.mark.parametrize("monitor, best", [("nll", min), ("ece", min), ("loss", min), ("accuracy", max)])
def test_monitor_chooses_the_validation_metric_that_picks_the_best_epoch(digit_splits, monitor, best):
    student = _student()
    snapshots = {}
    # 50 samples for 20 epochs overfit: every metric peaks mid-run, so the final weights are a restore
    result = softkd.fit(student, _small(digit_splits, n=50), val_data=digit_splits.val, epochs=20, lr=0.1,
                        monitor=monitor,
                        log=lambda r: snapshots.setdefault(r["epoch"], copy.deepcopy(student.state_dict())))
    values = [r[f"val_{monitor}"] for r in result.history]
    assert result.best_epoch == 1 + values.index(best(values)) and result.best_epoch < result.epochs == 20
    for key, value in student.state_dict().items():
        assert torch.equal(value, snapshots[result.best_epoch][key])


def test_unknown_monitor_is_refused(digit_splits):
    with pytest.raises(ConfigError, match=r"'monitor' of train must be one of accuracy, loss, nll, ece; got 'f1'"):
        softkd.fit(_student(), _small(digit_splits), val_data=digit_splits.val, epochs=1, monitor="f1")
