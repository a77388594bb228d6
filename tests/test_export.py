"""softkd export and softkd evaluate on tiny trained digits runs: each export checked before it is
written, the student alone in the file, selection by name, peer or validation score, and a failed
check that leaves nothing behind."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from softkd.cli import app
from softkd.config import config_from_dict
from softkd.export import MIN_AGREEMENT, export_student, load_exported
from softkd.runs import list_students, load_student
from softkd.models.zoo import build_model, count_params
from softkd.pipeline import run_experiment
from softkd.report.curves import best_validation

TRAIN = {"epochs": 2, "batch_size": 128, "threads": 1}
# Feature transfer: the run trains an adapter beside the student, which no export may hold.
FEATURE = {"data": {"name": "digits"}, "teacher": {"model": "tinycnn-16", "epochs": 1, "batch_size": 128},
           "student": {"model": "tinycnn-8"}, "train": {**TRAIN, "seeds": [0, 1]},
           "method": {"name": "feature", "student_layers": ["4"], "teacher_layers": ["4"]}}
MUTUAL = {"data": {"name": "digits"}, "teacher": None, "student": {"model": "tinycnn-8"},
          "method": {"name": "mutual", "peers": 2, "peer_models": ["mlp-16"]}, "train": {**TRAIN, "seeds": [0]}}


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _stamp(run, name):
    return json.loads((run / "students" / f"{name}.json").read_text())["result"]


def _onnx_floats(path) -> int:
    """How many weights an ONNX file holds: the numel of its floating-point initializers."""
    onnx = pytest.importorskip("onnx")
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    total = 0
    for init in onnx.load(str(path)).graph.initializer:
        if init.data_type in floats:
            n = 1
            for d in init.dims:
                n *= d
            total += n
    return total


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("feature")
    run_experiment(config_from_dict(FEATURE), out_dir=out)
    return out


@pytest.fixture(scope="module")
def mutual_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mutual")
    run_experiment(config_from_dict(MUTUAL), out_dir=out)
    return out


@pytest.fixture(scope="module")
def onnx_export(feature_run):
    """`softkd export RUN` with every default: the best-validated distilled student to ONNX."""
    pytest.importorskip("onnxruntime")
    result = _cli("export", feature_run)
    assert result.exit_code == 0, result.output
    return result.output, json.loads(next((feature_run / "export").glob("*.onnx.json")).read_text())


def test_onnx_export_prints_its_check_and_holds_the_student_alone(feature_run, onnx_export):
    output, check = onnx_export
    best = best_validation(feature_run / "metrics.jsonl")
    distilled = {seed: best["distilled", 1.0, "", seed] for seed in (0, 1)}
    expected = f"distilled-labels1-seed{max(distilled, key=distilled.get)}"
    assert check["student"] == expected and check["exporter"] == "torch.onnx (dynamo)"
    path = feature_run / "export" / f"{expected}.onnx"
    assert check["path"] == str(path) and path.is_file() and check["size_bytes"] == path.stat().st_size
    assert check["test_samples"] == 359 and check["batch1_samples"] == 64 and check["max_abs_diff"] < 1e-4
    assert check["accuracy_eager"] == pytest.approx(_stamp(feature_run, expected)["accuracy"], abs=1e-6)
    for figure in ("top-1 agreement", "max |Δlogit|", "eager", "exported", f"Check written to {path}.json\n",
                   "onnxruntime against eager PyTorch, p50 on cpu", "batch 1 "):
        assert figure in output
    speed = check["speed"]  # the export against the eager student, timed taking turns
    assert set(speed["models"]) == {"eager", "onnxruntime"} and set(speed["ratios"]) == {"onnxruntime"}
    assert speed["ratios"]["onnxruntime"]["batch1"] == pytest.approx(
        speed["models"]["eager"]["batch1"]["p50_ms"] / speed["models"]["onnxruntime"]["batch1"]["p50_ms"])
    assert not list((feature_run / "export").glob(".*"))  # no temporary file left
    student, info = load_student(feature_run, expected)
    # a batch size the check did not use
    x = torch.rand(3, *info["input_shape"], generator=torch.Generator().manual_seed(0))
    exported, _ = load_exported(path)
    with torch.no_grad():
        assert torch.allclose(exported(x), student(x), atol=1e-4)
    state = sum(t.numel() for t in student.state_dict().values() if t.is_floating_point())
    norms = sum(p.numel() for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    # Batch norm is folded into the convolutions: the file holds the student's weights, no more
    # (the run's hint adapter alone, a 1x1 conv 8->16 with batch norm, has 160 parameters).
    assert count_params(student) - norms <= _onnx_floats(path) <= state < count_params(student) + 160


def test_evaluate_on_the_onnx_reproduces_the_run_accuracy(feature_run, onnx_export, tmp_path):
    _, check = onnx_export
    out = tmp_path / "eval.json"
    result = _cli("evaluate", check["path"], "--data", "digits", "--teacher", feature_run / "teacher.safetensors",
                  "--json", out)
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "top-5" in result.output and "KL to teacher" in result.output
    metrics = json.loads(out.read_text())["metrics"]
    stamp = _stamp(feature_run, check["student"])
    assert abs(metrics["accuracy"] - stamp["accuracy"]) <= 1 - MIN_AGREEMENT
    assert abs(metrics["agreement"] - stamp["agreement"]) <= 1 - MIN_AGREEMENT
    assert metrics["kl_to_teacher"] == pytest.approx(stamp["kl_to_teacher"], rel=1e-3)
    assert len(metrics["per_class_accuracy"]) == 10 and 0 < metrics["nll"] and 0 <= metrics["ece"] <= 1


def test_pt2_and_safetensors_exports_pass_their_checks_and_run_alone(feature_run, tmp_path):
    student, info = load_student(feature_run, "distilled-labels1-seed1")
    x = torch.rand(3, *info["input_shape"])  # a batch size the check did not use
    with torch.no_grad():
        eager = student(x)
    for fmt in ("pt2", "safetensors"):
        check = export_student(feature_run, format=fmt, student="distilled-labels1-seed1", out=tmp_path)
        path = tmp_path / f"distilled-labels1-seed1.{fmt}"
        assert check["path"] == str(path) and path.is_file()
        assert json.loads((tmp_path / f"{path.name}.json").read_text()) == check
        moved = tmp_path / "elsewhere" / path.name  # no run directory needed to run it
        moved.parent.mkdir(exist_ok=True)
        shutil.copy(path, moved)
        run, about = load_exported(moved)
        with torch.no_grad():
            assert torch.allclose(run(x), eager, atol=1e-5)
    assert about["model"] == "tinycnn-8" and about["input_shape"] == [1, 8, 8] and about["num_classes"] == 10


def test_list_marks_the_default_and_a_student_is_chosen_by_name(feature_run, tmp_path):
    result = _cli("export", feature_run, "--list")
    assert result.exit_code == 0, result.output
    students = list_students(feature_run)
    assert len(students) == 4 and sum(s["default"] for s in students) == 1
    default = next(s for s in students if s["default"])
    assert f"{default['name']} *" in result.output and all(s["name"] in result.output for s in students)
    named = _cli("export", feature_run, "--student", "scratch-labels1-seed1", "--format", "safetensors",
                 "--out", tmp_path / "scratch.safetensors")
    assert named.exit_code == 0, named.output
    assert json.loads((tmp_path / "scratch.safetensors.json").read_text())["student"] == "scratch-labels1-seed1"


def test_the_default_follows_validation_not_test_accuracy(feature_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(feature_run, run, ignore=shutil.ignore_patterns("export", "cache"))
    lower = min((0, 1), key=lambda seed: _stamp(run, f"distilled-labels1-seed{seed}")["accuracy"])
    with (run / "metrics.jsonl").open("a") as f:  # a later epoch that validates best for the lower-test seed
        f.write(json.dumps({"stage": "distilled", "labeled_fraction": 1.0, "seed": lower, "epoch": 99,
                            "step": 999, "val_accuracy": 0.999}) + "\n")
    _, info = load_student(run)
    assert info["name"] == f"distilled-labels1-seed{lower}" and "99.90%" in info["selected_by"]
    (run / "metrics.jsonl").unlink()  # no validation scores: most labels, then the lowest seed
    _, info = load_student(run)
    assert info["name"] == "distilled-labels1-seed0" and info["selected_by"].startswith("no validation")


def test_a_peer_name_exports_that_peer_alone(mutual_run, tmp_path):
    pytest.importorskip("onnxruntime")
    result = _cli("export", mutual_run, "--student", "peer1", "--out", tmp_path / "peer1.onnx")
    assert result.exit_code == 0, result.output
    check = json.loads((tmp_path / "peer1.onnx.json").read_text())
    assert check["student"] == "distilled-peer1-labels1-seed0" and check["model"] == "mlp-16"
    peer1 = count_params(build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10))
    assert _onnx_floats(tmp_path / "peer1.onnx") == peer1  # no other peer in it
    _, info = load_student(mutual_run, "peer0")
    assert info["name"] == "distilled-peer0-labels1-seed0" and info["model"] == "tinycnn-8"


def test_an_unknown_student_is_one_line_with_close_names(mutual_run):
    result = _cli("export", mutual_run, "--student", "peer3")
    assert result.exit_code == 2
    assert result.output.startswith("error: No student 'peer3'") and len(result.output.strip().splitlines()) == 1
    assert "did you mean 'peer1', 'peer0'?" in result.output and "distilled-peer0-labels1-seed0" in result.output
    assert not (mutual_run / "export").exists()


def test_a_failed_check_writes_nothing_and_keeps_the_good_file(feature_run, tmp_path, monkeypatch):
    import softkd.export

    good = tmp_path / "good" / "student.safetensors"
    assert _cli("export", feature_run, "--format", "safetensors", "--out", good).exit_code == 0
    before = good.read_bytes(), (tmp_path / "good" / "student.safetensors.json").read_bytes()
    real = softkd.export.load_exported

    def perturbed(path, **kwargs):  # the exported model predicts the next class over
        run, about = real(path, **kwargs)
        return (lambda x: run(x).roll(1, dims=-1)), about

    monkeypatch.setattr(softkd.export, "load_exported", perturbed)
    for out in (good, tmp_path / "fresh" / "student.safetensors"):
        result = _cli("export", feature_run, "--format", "safetensors", "--out", out)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
        assert "does not match the student: top-1 agreement" in result.output and "nothing was written" in result.output
    assert (good.read_bytes(), (tmp_path / "good" / "student.safetensors.json").read_bytes()) == before
    assert sorted(p.name for p in good.parent.iterdir()) == ["student.safetensors", "student.safetensors.json"]
    assert not (tmp_path / "fresh").exists()


def test_evaluate_finds_a_run_checkpoint_architecture_or_asks_for_it(feature_run, tmp_path):
    weights = feature_run / "students" / "distilled-labels1-seed0.safetensors"
    accuracy = _stamp(feature_run, "distilled-labels1-seed0")["accuracy"]
    loose = tmp_path / "weights.safetensors"
    shutil.copy(weights, loose)
    result = _cli("evaluate", loose, "--data", "digits")
    assert result.exit_code == 2 and "--model SPEC" in result.output
    for args in ((weights, "--json", tmp_path / "run.json"), (loose, "--model", "tinycnn-8")):
        result = _cli("evaluate", *args, "--data", "digits")
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run.json").read_text())["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    beside = json.loads((tmp_path / "weights.safetensors.eval.json").read_text())  # the default place
    assert beside["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6) and beside["architecture"].startswith(
        "tinycnn-8")


def test_onnx_without_its_packages_is_one_line_naming_the_extra(feature_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    result = _cli("export", feature_run, "--out", tmp_path / "x.onnx")
    assert result.exit_code == 2 and "pip install 'softkd[onnx]'" in result.output
    assert not list(tmp_path.iterdir())


def test_onnx_falls_back_to_the_torchscript_exporter_and_says_so(feature_run, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    real = torch.onnx.export

    def without_dynamo(*args, dynamo=False, dynamic_shapes=None, external_data=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo exporter unavailable\nsecond line")
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", without_dynamo)
    check = export_student(feature_run, student="distilled-labels1-seed0", out=tmp_path / "old.onnx")
    assert check["exporter"] == "torch.onnx (TorchScript; the dynamo exporter failed: dynamo exporter unavailable)"
    student, info = load_student(feature_run, "distilled-labels1-seed0")
    x = torch.rand(3, *info["input_shape"], generator=torch.Generator().manual_seed(0))
    exported, _ = load_exported(tmp_path / "old.onnx")
    with torch.no_grad():
        assert torch.allclose(exported(x), student(x), atol=1e-4)
