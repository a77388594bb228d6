"""Metrics against independent computations (scikit-learn, numpy, scipy); the latency report's
structure and wording. No test asserts a time."""

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.special import rel_entr, softmax
from sklearn import metrics as skm
from torch import nn

from softkd.errors import ConfigError, ShapeMismatchError
from softkd.evaluate.metrics import (classification_metrics, confusion_matrix, detailed_metrics,
                                     expected_calibration_error, per_class_accuracy, reliability_diagram,
                                     top_k_accuracy)
from softkd.evaluate.speed import OnnxModel, footprint, headline, time_models
from softkd.losses.logits import UNLABELED


def random_logits(n=300, classes=10, seed=0):
    """Continuous random logits: ties in argmax or top-k have probability zero, so they cannot
    make the reference and the code disagree."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, classes, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return logits, labels


def numpy_ece_bins(logits, labels, n_bins):
    probs = softmax(logits.double().numpy(), axis=1)
    confidence, correct = probs.max(1), probs.argmax(1) == labels.numpy()
    edges = np.linspace(0, 1, n_bins + 1)
    bins = [(confidence > lo) & (confidence <= hi) for lo, hi in zip(edges[:-1], edges[1:])]
    return confidence, correct, bins


# --- metrics -----------------------------------------------------------------------------------

def test_top_k_accuracy_matches_sklearn():
    logits, labels = random_logits(classes=12, seed=1)
    for k in (1, 3, 5):
        expected = skm.top_k_accuracy_score(labels.numpy(), logits.numpy(), k=k, labels=np.arange(12))
        assert top_k_accuracy(logits, labels, k=k) == pytest.approx(expected)
    assert top_k_accuracy(logits, labels, k=20) == 1.0


def test_confusion_matrix_matches_sklearn():
    logits, labels = random_logits(classes=7, seed=2)
    expected = skm.confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), labels=np.arange(7))
    assert confusion_matrix(logits, labels, 7) == expected.tolist()


def test_per_class_accuracy_matches_numpy_and_absent_class_is_none():
    logits, labels = random_logits(classes=6, seed=3)
    keep = labels != 4  # class 4 never occurs as a label (it may still be predicted)
    logits, labels = logits[keep], labels[keep]
    out = per_class_accuracy(logits, labels, 6)
    predictions, y = logits.argmax(1).numpy(), labels.numpy()
    assert out[4] is None
    for c in (0, 1, 2, 3, 5):
        assert out[c] == pytest.approx(np.mean(predictions[y == c] == c))


def test_ece_matches_numpy_bins():
    logits, labels = random_logits(seed=4)
    confidence, correct, bins = numpy_ece_bins(logits, labels, 10)
    expected = sum(b.mean() * abs(confidence[b].mean() - correct[b].mean()) for b in bins if b.any())
    assert expected_calibration_error(logits, labels, n_bins=10) == pytest.approx(expected, abs=1e-6)


def test_reliability_diagram_matches_numpy_and_adds_up_to_ece():
    logits, labels = random_logits(n=500, seed=5)
    out = reliability_diagram(logits, labels, n_bins=15)
    confidence, correct, bins = numpy_ece_bins(logits, labels, 15)
    assert out["edges"] == pytest.approx(np.linspace(0, 1, 16).tolist())
    assert out["count"] == [int(b.sum()) for b in bins]
    assert sum(out["count"]) == 500
    for b, conf, acc in zip(bins, out["confidence"], out["accuracy"]):
        if b.any():
            assert conf == pytest.approx(confidence[b].mean(), abs=1e-6)
            assert acc == pytest.approx(correct[b].mean())
        else:
            assert conf is None and acc is None
    assert None in out["confidence"]  # 10 classes: no confidence under 0.1, so the first bin is empty
    ece = sum(n / 500 * abs(c - a) for n, c, a in zip(out["count"], out["confidence"], out["accuracy"]) if n)
    assert ece == pytest.approx(expected_calibration_error(logits, labels, n_bins=15), abs=1e-6)


def test_detailed_metrics_match_sklearn_on_labeled_samples_only():
    logits, labels = random_logits(n=400, classes=8, seed=6)
    labels[::3] = UNLABELED
    out = detailed_metrics(logits, labels, n_bins=10)
    keep = labels != UNLABELED
    y, y_logits = labels[keep].numpy(), logits[keep]
    probs = softmax(y_logits.double().numpy(), axis=1)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, probs.argmax(1)))
    assert out["top5"] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=5, labels=np.arange(8)))
    assert out["nll"] == pytest.approx(skm.log_loss(y, probs, labels=np.arange(8)), rel=1e-5)
    assert out["ece"] == pytest.approx(expected_calibration_error(y_logits, labels[keep], n_bins=10))
    assert out["confusion"] == skm.confusion_matrix(y, probs.argmax(1), labels=np.arange(8)).tolist()
    assert sum(map(sum, out["confusion"])) == int(keep.sum())
    assert len(out["reliability"]["count"]) == 10
    assert "agreement" not in out
    assert json.loads(json.dumps(out)) == out  # plain Python throughout


def test_detailed_metrics_agree_with_classification_metrics():
    logits, labels = random_logits(seed=7)
    labels[:50] = UNLABELED
    out, base = detailed_metrics(logits, labels), classification_metrics(logits, labels)
    assert {k: out[k] for k in base} == pytest.approx(base)


def test_detailed_metrics_teacher_terms_use_all_samples():
    logits, labels = random_logits(n=200, seed=8)
    teacher_logits, _ = random_logits(n=200, seed=9)
    labels[:150] = UNLABELED
    out = detailed_metrics(logits, labels, teacher_logits=teacher_logits)
    p_teacher = softmax(teacher_logits.double().numpy(), axis=1)
    p_student = softmax(logits.double().numpy(), axis=1)
    assert out["agreement"] == pytest.approx(np.mean(p_teacher.argmax(1) == p_student.argmax(1)))
    assert out["kl_to_teacher"] == pytest.approx(rel_entr(p_teacher, p_student).sum(1).mean(), rel=1e-5)


def test_detailed_metrics_small_class_counts_and_limits():
    logits, labels = random_logits(classes=5, seed=10)
    assert detailed_metrics(logits, labels)["top5"] is None  # always 1 with 5 classes
    logits, labels = random_logits(classes=6, seed=10)
    assert detailed_metrics(logits, labels)["top5"] < 1
    assert detailed_metrics(logits, labels, max_confusion_classes=5)["confusion"] is None
    assert len(detailed_metrics(logits, labels, max_confusion_classes=6)["confusion"]) == 6


def test_detailed_metrics_all_unlabeled():
    logits, _ = random_logits(n=40, seed=11)
    labels = torch.full((40,), UNLABELED)
    out = detailed_metrics(logits, labels, teacher_logits=logits.flip(0))
    assert all(out[k] is None for k in ("accuracy", "top5", "nll", "ece", "per_class_accuracy",
                                        "confusion", "reliability"))
    assert 0 <= out["agreement"] < 1 and out["kl_to_teacher"] > 0


def test_detailed_metrics_rejects_mismatched_teacher():
    logits, labels = random_logits(n=20, seed=12)
    with pytest.raises(ShapeMismatchError, match="teacher_logits"):
        detailed_metrics(logits, labels, teacher_logits=logits[:10])


# --- speed -------------------------------------------------------------------------------------

def tiny_mlp(width=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(width, 3))


def test_footprint_counts_parameters_and_saved_bytes(tmp_path):
    model = tiny_mlp()
    out = footprint(model)
    assert out["params"] == sum(p.numel() for p in model.parameters()) == 16 * 8 + 8 + 2 * 8 + 8 * 3 + 3
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert out["size_bytes"] == (tmp_path / "w.safetensors").stat().st_size


class Recorder:
    """A callable model that logs who ran, on what input, and in which mode."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __call__(self, x):
        self.log.append((self.name, x.data_ptr(), tuple(x.shape), x.dtype, torch.is_inference_mode_enabled()))
        return x


def test_time_models_alternates_on_one_input_per_batch_size():
    log = []
    time_models({"a": Recorder("a", log), "b": Recorder("b", log)}, (2, 3), batch_sizes=(1, 4),
                warmup=2, repeats=6, budget_s=60)
    assert [entry[0] for entry in log] == ["a", "b"] * 16  # (2 warm-up + 6 timed) × 2 batch sizes
    first, second = log[:16], log[16:]
    assert {(e[1], e[2]) for e in first} == {(first[0][1], (1, 2, 3))}  # the same tensor every time
    assert {(e[1], e[2]) for e in second} == {(second[0][1], (4, 2, 3))}
    assert all(e[3] == torch.float32 and e[4] for e in log)


def test_time_models_structure_counts_and_ratios():
    teacher, student = tiny_mlp(width=64), tiny_mlp(width=4)
    teacher.train(), student.eval()
    out = time_models({"teacher": teacher, "student": student}, (4, 4), batch_sizes=(1, 8),
                      warmup=1, repeats=7, budget_s=60, reference="teacher")
    assert out["threads"] == torch.get_num_threads() and out["torch"] == torch.__version__
    threads = torch.get_num_threads()
    assert out["device"] == ("cpu (1 thread)" if threads == 1 else f"cpu ({threads} threads)")
    assert out["batch_sizes"] == [1, 8] and out["reference"] == "teacher"
    for name in ("teacher", "student"):
        for b in (1, 8):
            stats = out["models"][name][f"batch{b}"]
            assert stats["runs"] == 7
            assert 0 < stats["p50_ms"] <= stats["p95_ms"]
            assert stats["throughput_per_s"] == pytest.approx(b / (stats["p50_ms"] / 1000))
    assert list(out["ratios"]) == ["student"]
    for b in (1, 8):
        key = f"batch{b}"
        assert out["ratios"]["student"][key] == pytest.approx(
            out["models"]["teacher"][key]["p50_ms"] / out["models"]["student"][key]["p50_ms"])
    assert teacher.training and not student.training  # each module's mode comes back
    json.dumps(out)


def test_time_models_budget_stops_at_min_repeats():
    out = time_models({"a": tiny_mlp(), "b": tiny_mlp()}, (16,), batch_sizes=(2,), warmup=0,
                      repeats=50, budget_s=0, min_repeats=5)
    assert [out["models"][n]["batch2"]["runs"] for n in ("a", "b")] == [5, 5]
    assert out["ratios"] == {}


def test_time_models_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="'reference'.*got 'teacher'"):
        time_models({"student": tiny_mlp()}, (16,), reference="teacher")
    with pytest.raises(ConfigError, match="at least one model"):
        time_models({}, (16,))


def test_onnx_model_matches_eager_and_times(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny_mlp().eval()
    x = torch.randn(2, 16)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    onnx_model = OnnxModel(path)
    assert onnx_model.threads == torch.get_num_threads()
    assert onnx_model.session_.get_session_options().intra_op_num_threads == torch.get_num_threads()
    for batch in (1, 5):
        x = torch.randn(batch, 16)
        with torch.no_grad():
            np.testing.assert_allclose(onnx_model(x), model(x).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(onnx_model(x.numpy()), onnx_model(x))
    out = time_models({"eager": model, "onnx": onnx_model}, (16,), batch_sizes=(1, 3), warmup=1,
                      repeats=5, reference="eager")
    assert out["models"]["onnx"]["batch3"]["runs"] == 5 and set(out["ratios"]["onnx"]) == {"batch1", "batch3"}


def test_onnx_model_without_onnxruntime_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ConfigError, match=r"pip install 'softkd\[onnx\]'"):
        OnnxModel(tmp_path / "missing.onnx")


def test_headline_wording():
    teacher = {"params": 600_000, "size_bytes": 2_400_000, "batch1": {"p50_ms": 8.1}, "batch256": {"p50_ms": 400.0}}
    student = {"params": 10_000, "size_bytes": 40_000, "batch1": {"p50_ms": 1.0}, "batch256": {"p50_ms": 50.0}}
    assert headline(teacher, student, -1.6) == (
        "student: 60× fewer parameters, 8.1× lower latency at batch 1, \u22121.6 points")
    assert headline(teacher, student, 0.44) == (
        "student: 60× fewer parameters, 8.1× lower latency at batch 1, +0.4 points")
    assert headline({"params": 5}, {"params": 10}, None) == "student: 2.0× more parameters"
    assert headline({"batch256": {"p50_ms": 2.0}}, {"batch1": {"p50_ms": 1.0}, "batch256": {"p50_ms": 4.0}}, None) == (
        "student: 2.0× higher latency at batch 256")
    assert headline({}, {}, 0.0) == "student: 0.0 points"
    assert headline({}, {}, None) == "student: no figures to compare"


def test_headline_from_measured_stats():
    teacher, student = tiny_mlp(width=64), tiny_mlp(width=4)
    timing = time_models({"teacher": teacher, "student": student}, (16,), batch_sizes=(1,), warmup=1,
                         repeats=5, reference="teacher")
    line = headline({**footprint(teacher), **timing["models"]["teacher"]},
                    {**footprint(student), **timing["models"]["student"]}, 1.26)
    assert line.startswith("student: 16× fewer parameters, ")  # 1411 / 91 parameters
    assert " latency at batch 1, +1.3 points" in line
