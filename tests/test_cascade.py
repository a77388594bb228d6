"""The cascade: hand-built student/teacher pairs whose deferrals are known, the curve against a
brute-force sweep, the teacher never called on confident samples, calibration blind to the test
split, and `softkd cascade` / its ONNX export on a tiny trained digits run."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from softkd.cascade import Cascade, calibrate_run, cascade_curve, combine, confidence, export_cascade, load_cascade
from softkd.cascade import calibrate as calibrate_module
from softkd.cascade.model import pick_point
from softkd.cli import app
from softkd.config import config_from_dict
from softkd.errors import ConfigError, DataError
from softkd.pipeline import run_experiment

# Sample i of a batch is the input x[i] = i; the models look its logits up.
STUDENT = torch.tensor([[4.0, 0.0, 0.0],    # confident, right
                        [0.2, 0.0, 0.0],    # unsure, right
                        [0.0, 0.3, 0.0],    # unsure, wrong
                        [100.0, 0.0, 0.0],  # softmax rounds to exactly 1 in fp32
                        [0.0, 0.0, 0.0]])   # a tie: margin 0
TEACHER = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.0]])
LABELS = torch.tensor([0, 0, 0, 2, 1])


class Lookup(nn.Module):
    """Returns preset logits for sample indices; counts the samples it was called on."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return self.table[x.long().flatten()]


def _pair():
    return Lookup(STUDENT), Lookup(TEACHER), torch.arange(5).float()[:, None]


def _max_prob(logits):  # written out independently of softkd
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).max(-1)


def test_the_deferred_samples_are_those_at_or_below_the_threshold_and_only_they_reach_the_teacher():
    student, teacher, x = _pair()
    expected = _max_prob(STUDENT.numpy()) <= 0.5  # samples 1, 2 (≈0.37) and 4 (1/3)
    assert expected.tolist() == [False, True, True, False, True]
    out = Cascade(student, teacher, threshold=0.5)(x)
    assert out.deferred.tolist() == expected.tolist()
    assert teacher.seen == 3
    want = torch.where(torch.from_numpy(expected)[:, None], TEACHER, STUDENT)
    assert torch.equal(out.logits, want)


def test_threshold_zero_is_the_student_and_one_the_teacher_exactly():
    student, teacher, x = _pair()
    assert float(torch.softmax(STUDENT[3], -1).max()) == 1.0  # the rounding case is real
    for kind in ("max-prob", "margin"):
        none = Cascade(student, teacher, threshold=0.0, confidence=kind)(x)
        assert torch.equal(none.logits, STUDENT) and not none.deferred.any()
        every = Cascade(student, teacher, threshold=1.0, confidence=kind)(x)
        assert torch.equal(every.logits, TEACHER) and every.deferred.all()
    assert teacher.seen == 10  # twice all five; never on the threshold-0 passes


def test_the_teacher_is_not_called_when_the_student_is_sure_of_everything():
    student, teacher, x = _pair()
    out = Cascade(student, teacher, threshold=0.3)(x[[0, 3]])
    assert not out.deferred.any() and teacher.seen == 0 and student.seen == 2


def test_margin_is_the_top_probability_minus_the_runner_up():
    p = torch.softmax(STUDENT, -1).sort(-1, descending=True).values
    assert torch.allclose(confidence(STUDENT, "margin"), p[:, 0] - p[:, 1])
    assert float(confidence(STUDENT, "margin")[4]) == 0.0


def test_the_curve_matches_a_brute_force_sweep_of_every_threshold():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(300, 4, generator=g) * 2, torch.randn(300, 4, generator=g) * 2
    student[:40] = student[:40].round()  # ties in confidence
    labels = torch.randint(0, 4, (300,), generator=g)
    curve = cascade_curve(student, teacher, labels)
    conf = confidence(student).numpy()  # the sweep below is independent; the softmax is checked here
    assert np.allclose(conf, _max_prob(student.double().numpy()), atol=1e-6)
    s_ok, t_ok = (student.argmax(-1) == labels).numpy(), (teacher.argmax(-1) == labels).numpy()
    assert curve["threshold"][0] == 0.0 and curve["deferred"][0] == 0 and curve["deferred"][-1] == 300
    assert len(curve["threshold"]) == 1 + len(np.unique(conf))
    for t, d, acc in zip(curve["threshold"], curve["deferred"], curve["accuracy"]):
        sent = (conf <= t) if t > 0 else np.zeros(300, bool)
        assert sent.sum() == d
        assert math.isclose(np.where(sent, t_ok, s_ok).mean(), acc, abs_tol=1e-12)
        assert math.isclose(float((combine(student, teacher, t).logits.argmax(-1) == labels).double().mean()), acc,
                            abs_tol=1e-12)


def test_pick_point_for_an_accuracy_or_a_deferral_budget():
    curve = {"n": 10, "deferred": [0, 2, 5, 10], "correct": [7, 8, 9, 9], "threshold": [0, .5, .7, 1],
             "fraction": [0, .2, .5, 1], "accuracy": [.7, .8, .9, .9]}
    assert pick_point(curve, target_accuracy=0.8) == 1
    assert pick_point(curve, target_accuracy=0.85) == 2  # fewest deferrals reaching it
    assert pick_point(curve, max_teacher_fraction=0.4) == 1
    assert pick_point(curve, max_teacher_fraction=1.0) == 2  # ties: fewer deferrals
    assert pick_point(curve, max_teacher_fraction=0.0) == 0
    with pytest.raises(ConfigError, match="No threshold reaches 95.00%.*best is 90.00% with 50.0% deferred"):
        pick_point(curve, target_accuracy=0.95)
    with pytest.raises(ConfigError, match=r"in \(0, 1\] \(a fraction: 0.93 for 93%\)"):
        pick_point(curve, target_accuracy=93)


def test_an_isolated_spike_of_the_curve_is_not_chosen():
    # 9 of 10 at 1 deferral is a spike: the curve drops to 8 at 3 deferrals and reaches 9 again to stay
    curve = {"n": 10, "deferred": [0, 1, 3, 5, 7, 10], "correct": [7, 9, 8, 9, 10, 9],
             "threshold": [0, .3, .5, .6, .8, 1], "fraction": [0, .1, .3, .5, .7, 1],
             "accuracy": [.7, .9, .8, .9, 1., .9]}
    assert pick_point(curve, target_accuracy=0.9) == 3  # 9, 10 from there up to the best: all reach it
    assert pick_point(curve, target_accuracy=0.8) == 1  # 9, 8, 9, 10: every point from 1 on reaches 8
    assert pick_point(curve, target_accuracy=1.0) == 4
    # the rule, written out: the first k whose every point up to the best reaches the target
    for target in (0.7, 0.8, 0.9, 1.0):
        best = curve["correct"].index(max(curve["correct"]))
        want = min(k for k in range(best + 1) if all(c >= target * 10 for c in curve["correct"][k:best + 1]))
        assert pick_point(curve, target_accuracy=target) == want


def test_bad_cascade_parameters_are_one_line_errors():
    student, teacher, _ = _pair()
    with pytest.raises(ConfigError, match=r"'threshold' of a cascade must be in \[0, 1\].*got 1.5"):
        Cascade(student, teacher, threshold=1.5)
    with pytest.raises(ConfigError, match="'confidence' of a cascade must be one of max-prob, margin"):
        Cascade(student, teacher, confidence="entropy")


# --- a run: digits, a teacher, a distilled student and its scratch twin --------------------------------

RUN = {"data": {"name": "digits"}, "teacher": {"model": "mlp-64", "epochs": 10, "batch_size": 64},
       "student": {"model": "mlp-16"}, "train": {"epochs": 8, "batch_size": 64, "threads": 1, "seeds": [0]},
       "output": {"latency": False}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade")
    run_experiment(config_from_dict(RUN), out_dir=out)
    return out


@pytest.fixture(scope="module")
def calibrated(run):
    result = CliRunner().invoke(app, ["cascade", str(run), "--threads", "1", "--budget", "1"])
    assert result.exit_code == 0, result.output
    return result.output, json.loads((run / "cascade" / "cascade.json").read_text())


def test_softkd_cascade_reports_both_students_against_the_teacher(run, calibrated):
    output, result = calibrated
    assert set(result["students"]) == {"distilled", "scratch"}
    assert result["target"]["default"] == "the teacher's validation accuracy"
    assert result["sentence"] in " ".join(output.split()) and result["sentence"].startswith("cascade: ")
    for role, s in result["students"].items():
        # the validation point reaches the target (and so does every point from it to the curve's best)
        assert s["val"]["accuracy"] >= result["target"]["accuracy"] - 1e-12
        assert 0 <= s["test"]["fraction"] <= 1 and s["test"]["ms_per_sample"] > 0
        assert s["curve"]["accuracy"][s["curve"]["chosen"]] == s["val"]["accuracy"]
    assert result["latency"]["threads"] == 1 and set(result["latency"]["models"]) == {
        "teacher", "student distilled", "student scratch", "cascade distilled", "cascade scratch"}
    report = json.loads((run / "report.json").read_text())
    assert report["cascade"]["sentence"] == result["sentence"]
    assert "## Cascade" in (run / "report.md").read_text()
    html = (run / "report.html").read_text()
    assert result["sentence"] in html.replace("&#x27;", "'") and "Cascade on the validation split" in html
    assert (run / "cascade" / "cascade.png").read_bytes()[:4] == b"\x89PNG"


def test_the_chosen_cascade_scores_on_test_as_the_module_does(run, calibrated):
    from softkd.cascade.calibrate import load_run_teacher
    from softkd.runs import load_run_student, run_dir_config

    _, result = calibrated
    s = result["students"]["distilled"]
    student, _, splits = load_run_student(run, s["name"])
    teacher, _ = load_run_teacher(run, run_dir_config(run), splits.train.input_shape, splits.train.num_classes)
    out = torch.cat([Cascade(student, teacher, threshold=s["threshold"])(splits.test.x[i:i + 100].float()).logits
                     for i in range(0, len(splits.test), 100)])
    assert math.isclose(float((out.argmax(-1) == splits.test.y).double().mean()), s["test"]["accuracy"])


def test_the_calibration_never_reads_the_test_split(run, monkeypatch):
    first = calibrate_run(run, budget_s=0.1)
    real = calibrate_module.load_run_student

    def scrambled(run_dir, name):  # the same run with its test split replaced by noise and random labels
        model, info, splits = real(run_dir, name)
        g = torch.Generator().manual_seed(1)
        splits.test.x = torch.rand(splits.test.x.shape, generator=g)
        splits.test.y = torch.randint(0, 10, splits.test.y.shape, generator=g)
        return model, info, splits

    monkeypatch.setattr(calibrate_module, "load_run_student", scrambled)
    second = calibrate_run(run, budget_s=0.1)
    for role in first["students"]:
        a, b = first["students"][role], second["students"][role]
        assert a["threshold"] == b["threshold"] and a["val"] == b["val"]
        assert a["curve"]["accuracy"] == b["curve"]["accuracy"]
        assert a["test"]["accuracy"] != b["test"]["accuracy"]  # the test split did change


def test_a_deferral_budget_is_kept_on_validation(run):
    result = calibrate_run(run, max_teacher_fraction=0.05, budget_s=0.1)
    assert result["target"] == {"max_teacher_fraction": 0.05}
    for s in result["students"].values():
        assert s["val"]["fraction"] <= 0.05
    assert result["comparison"].startswith("Deferring at most 5 % on validation")


def test_within_loosens_the_teachers_accuracy_as_the_target(run, calibrated):
    _, exact = calibrated
    result = calibrate_run(run, within=2.5, budget_s=0.1)
    assert result["target"]["accuracy"] == pytest.approx(result["teacher"]["val_accuracy"] - 0.025, abs=1e-12)
    assert result["target"]["default"] == "the teacher's validation accuracy less 2.5 points"
    for role, s in result["students"].items():
        assert s["val"]["accuracy"] >= result["teacher"]["val_accuracy"] - 0.025 - 1e-12
        assert s["val"]["fraction"] <= exact["students"][role]["val"]["fraction"]  # an easier target defers no more
    assert "less 2.5 points" in (run / "report.md").read_text()


def test_cascade_usage_errors_exit_2_with_one_line(run, tmp_path):
    runner = CliRunner()
    for args, message in (
            (["--target-accuracy", "93"], "--target-accuracy must be in (0, 1] (a fraction: 0.93 for 93%)"),
            (["--target-accuracy", "0.9", "--max-teacher-fraction", "0.1"], "not both"),
            (["--confidence", "entropy"], "must be one of max-prob, margin"),
            (["--threads", "0"], "--threads must be >= 1"),
            (["--within", "0.1", "--max-teacher-fraction", "0.1"], "give it alone"),
            (["--within", "-1"], "--within must be a number of accuracy points in [0, 100)")):
        result = runner.invoke(app, ["cascade", str(run), *args])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
    result = runner.invoke(app, ["cascade", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in result.output


def test_a_run_without_a_validation_split_is_refused(tmp_path):
    config = {**RUN, "data": {"name": "digits", "val_fraction": 0.0}, "teacher": {**RUN["teacher"], "epochs": 1},
              "train": {**RUN["train"], "epochs": 1}}
    run_experiment(config_from_dict(config), out_dir=tmp_path)
    with pytest.raises(DataError, match="no validation split.*never calibrated on the test split"):
        calibrate_run(tmp_path)
    assert not (tmp_path / "cascade").exists()


def test_the_onnx_cascade_matches_the_pytorch_one_and_a_failed_export_keeps_the_old(run, calibrated, monkeypatch):
    pytest.importorskip("onnxruntime")
    from softkd.cascade.calibrate import load_run_teacher
    from softkd.runs import load_run_student, run_dir_config

    made = export_cascade(run)
    folder = run / "export" / "cascade"
    assert sorted(p.name for p in folder.iterdir()) == ["cascade.json", "student.onnx", "teacher.onnx"]
    # the loaded files against the PyTorch cascade of what `softkd cascade` last calibrated (tests
    # above calibrate again), on the test split
    calibration = json.loads((run / "cascade" / "cascade.json").read_text())
    chosen = calibration["students"]["distilled"]
    assert made["student"] == chosen["name"]
    student, _, splits = load_run_student(run, chosen["name"])
    teacher, _ = load_run_teacher(run, run_dir_config(run), splits.train.input_shape, splits.train.num_classes)
    x = splits.test.x.float()
    eager = Cascade(student, teacher, threshold=chosen["threshold"], confidence=calibration["confidence"])(x)
    logits, deferred = load_cascade(folder)(x)
    assert logits.shape == (len(x), 10) and deferred.dtype == bool and 0 < deferred.mean() < 1
    assert (torch.from_numpy(deferred) == eager.deferred).double().mean() >= 0.999
    assert (torch.from_numpy(logits).argmax(-1) == eager.logits.argmax(-1)).double().mean() >= 0.999
    before = (folder / "student.onnx").read_bytes()

    def broken(exported, *args):
        raise calibrate_module.ConfigError("boom")

    import softkd.cascade.onnx as onnx_module

    monkeypatch.setattr(onnx_module, "_check", broken)
    with pytest.raises(ConfigError, match="boom"):
        export_cascade(run)
    assert (folder / "student.onnx").read_bytes() == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["cascade"]  # no temporary folder left
