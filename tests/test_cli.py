"""The softkd command end to end on tiny settings: outputs, exit codes, one-line errors."""

import json
import warnings
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pickles import save_code_running_pickle
from softkd.cli import app

runner = CliRunner()
TINY = ["--set", "teacher.epochs=2", "--set", "train.epochs=2", "--set", "train.seeds=[0,1]"]


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_demo_writes_a_complete_run_directory(tmp_path):
    result = _invoke("demo", "--out", tmp_path / "demo", *TINY)
    assert result.exit_code == 0, result.output
    assert "scratch" in result.output and "distilled" in result.output and "10% labels:" in result.output
    table = result.output.split("10% labels:")[0]
    assert max(len(line) for line in table.splitlines()) <= 80  # readable in a plain terminal
    out = tmp_path / "demo"
    assert {p.name for p in out.iterdir()} == {"config.yaml", "metrics.jsonl", "report.json", "report.md",
                                               "report.html", "teacher.safetensors", "teacher.json", "students",
                                               "cache", ".lock"}  # .lock: held while a run writes
    assert f"Open the report: {(out / 'report.html').resolve().as_uri()}\n" in result.output
    students = sorted(p.name for p in (out / "students").iterdir())
    assert len(students) == 2 * 2 * 2 * 2  # regimes × seeds × kinds × (weights, stamp)
    assert "distilled-labels0.1-seed1.safetensors" in students and "scratch-labels1-seed0.json" in students
    report = json.loads((out / "report.json").read_text())
    regime = report["students"]["mlp-16"]["regimes"]["10% labels"]
    for kind in ("teacher", "scratch", "distilled"):
        assert set(regime[kind]["accuracy"]) == {"mean", "std", "runs"}
    assert len(regime["scratch"]["accuracy"]["runs"]) == 2
    assert {"gap_recovered", "agreement", "ece", "params", "verdict"} <= set(regime)
    assert report["config"]["method"]["temperature"] == 4.0 and report["versions"]["torch"]
    expected_device = "cuda:0" if torch.cuda.is_available() else "cpu ("
    assert report["hardware"]["device"].startswith(expected_device)
    assert report["hardware"]["processes"] == 1 and report["hardware"]["precision"] == "fp32"
    kernels = (torch.backends.cpu.get_cpu_capability() if expected_device == "cpu ("
               else f"CUDA {torch.cuda.get_device_name(0)}")  # a GPU run's figures: not the host CPU's set
    assert report["hardware"]["cpu_kernels"] == kernels  # CPU figures differ between kernel sets
    on = report["hardware"]["device"] + (f" ({kernels} kernels)" if expected_device == "cpu (" else "")
    assert f"Ran on {on}, fp32, 1 process " in (out / "report.md").read_text()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {line["stage"] for line in lines} == {"teacher", "scratch", "distilled"}
    epochs = [line for line in lines if line.get("kind") != "step"]
    assert len(epochs) == 2 + 2 * 2 * 2 * 2  # teacher epochs + regimes × seeds × kinds × epochs
    assert all(line["images_per_s"] > 0 and line["epoch_s"] > 0 for line in epochs)
    again = _invoke("demo", "--out", out, *TINY)  # a second run never overwrites the first
    assert again.exit_code == 0 and (tmp_path / "demo-2" / "report.json").is_file()


def test_run_and_validate_a_config(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("data: {labeled_fraction: 0.5}\nteacher: {model: mlp-32, epochs: 2}\n"
                      "train: {epochs: 2}\noutput: {dir: " + str(tmp_path / "out") + "}\n")
    assert _invoke("validate", config).exit_code == 0
    result = _invoke("run", config)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["students"]["mlp-16"]["regimes"]) == ["50% labels"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("method: {temprature: 2}\n", "did you mean 'temperature'"),
        ("method: {temperature: 0}\n", "method.temperature"),
        ("method: {beta: 1.5}\n", "method.beta"),
        ("train: {weight_decay: -1}\n", "train.weight_decay"),
        ("student: {model: mlp16}\n", "Unknown model 'mlp16'"),
        ("method: {name: distil}\n", "Unknown method 'distil'"),
    ],
)
def test_bad_configs_exit_2_with_one_line_and_write_nothing(tmp_path, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(content + f"output: {{dir: {tmp_path / 'out'}}}\n")
    for verb in ("validate", "run"):
        result = _invoke(verb, config)
        assert result.exit_code == 2
        assert message in result.output and result.output.startswith("error: ")
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "rows, message",
    [
        ([[0.5, 0.5], [float("nan"), 1.0]], "row(s) 1 has NaN or inf"),
        ([[0.5, 0.5], [float("inf"), 0.0]], "NaN or inf"),
        ([[1.2, -0.2], [0.5, 0.5]], "row(s) 0 has negative"),
        ([[0.5, 0.5], [1.5, 0.5]], "row(s) 1 has entries greater than 1"),
        ([[0.5, 0.5], [0.7, 0.7]], "row(s) 1 does not sum to 1"),
    ],
)
def test_validate_soft_label_files(tmp_path, rows, message):
    path = tmp_path / "soft.npy"
    np.save(path, np.array(rows, dtype=np.float32))
    result = _invoke("validate", path)
    assert result.exit_code == 2 and message in result.output
    good = tmp_path / "good.npz"
    np.savez(good, soft_targets=np.full((4, 5), 0.2, dtype=np.float32))
    result = _invoke("validate", good)
    assert result.exit_code == 0 and "4 feasible soft-label rows over 5 classes" in result.output


def test_an_output_folder_that_cannot_be_one_exits_2_before_anything_runs(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("teacher: {model: mlp-16, epochs: 1}\nstudent: {model: mlp-8}\ntrain: {epochs: 1}\n")
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for verb in (("run",), ("teacher",), ("cache", "build")):
        for out, message in ((taken, f"The output folder '{taken}' is an existing file, not a folder"),
                             (taken / "sub",
                              f"Cannot create the output folder '{taken / 'sub'}': '{taken}' is a file")):
            result = _invoke(*verb, config, "--out", out)
            assert result.exit_code == 2 and result.output.strip().startswith(f"error: {message}"), result.output
            assert len(result.output.strip().splitlines()) == 1
    assert taken.read_text() == "keep me"


HOLDER = """
import sys, time
from pathlib import Path
from softkd.utils import hold_folder
with hold_folder(Path(sys.argv[1]), "the run folder"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_into_a_folder_another_process_writes_exits_2_and_changes_nothing(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("teacher: {model: mlp-16, epochs: 1}\nstudent: {model: mlp-8}\ntrain: {epochs: 1}\n")
    out = tmp_path / "out"
    (out / "students").mkdir(parents=True)
    (out / "config.yaml").write_text("the first run's config")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for verb in (("run",), ("teacher",), ("cache", "build")):
            result = _invoke(*verb, config, "--out", out)
            assert result.exit_code == 2, result.output
            assert result.output.strip() == (f"error: Another process is writing the run folder '{out}' (it holds "
                                              f"{out / '.lock'}); wait for it to finish, or give --out another "
                                              "folder."), result.output
            assert (out / "config.yaml").read_text() == "the first run's config"
            assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml", "students"]
    finally:
        holder.kill()
        holder.wait()
    result = _invoke("run", config, "--out", out)  # the lock went with the process that held it
    assert result.exit_code == 0, result.output
    assert (out / "report.json").is_file()


def test_softkd_teacher_on_a_trained_teacher_says_there_is_nothing_to_train(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("teacher: {model: mlp-16, checkpoint: trained.safetensors}\n")
    result = _invoke("teacher", config, "--out", tmp_path / "t")
    assert result.exit_code == 2 and "teacher.checkpoint is set ('trained.safetensors')" in result.output
    assert "nothing to do" in result.output and not (tmp_path / "t").exists()


def test_a_pickle_that_would_run_code_is_refused_in_softkds_words(tmp_path):
    evil = tmp_path / "evil.pt"
    save_code_running_pickle(evil, tmp_path / "ran")
    config = tmp_path / "c.yaml"
    config.write_text(f"teacher: {{model: mlp-16, checkpoint: {evil}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    for args in (("validate", evil), ("run", config)):
        result = _invoke(*args)
        assert result.exit_code == 2, result.output
        assert f"'{evil}' holds pickled Python objects, not only tensors; softkd never unpickles" in result.output
        assert "weights_only=False" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_validate_makes_the_checks_run_makes_and_writes_nothing(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b,label\n1,x,0\n2,3,1\n")
    config, out = tmp_path / "c.yaml", tmp_path / "out"
    for content, message in [
        (f"teacher: {{model: mlp-16, checkpoint: {tmp_path / 'none.safetensors'}}}\n", "none.safetensors' not found"),
        ("teacher: {model: 'nosuchpkg.nets:make'}\n", "Cannot import module 'nosuchpkg.nets'"),
        (f"data: {{path: {tmp_path / 'bad.csv'}}}\n", "bad.csv"),
        ("method: {name: feature, student_layers: ['9'], teacher_layers: ['0']}\n", "has no module '9'"),
    ]:
        config.write_text(content + f"output: {{dir: {out}}}\n")
        checked, ran = _invoke("validate", config), _invoke("run", config)
        assert checked.exit_code == 2 and message in checked.output, checked.output  # once, where run says it
        assert checked.output.strip().splitlines() == ran.output.strip().splitlines()
    assert not out.exists()
    config.write_text("teacher: {model: mlp-16}\n")
    good = _invoke("validate", config)
    assert good.exit_code == 0 and "checked as `softkd run` checks it before writing anything" in good.output
    assert "1,295 train / 143 validation / 359 test samples of 1×8×8, 10 classes" in good.output
    other = tmp_path / "c.txt"
    other.write_text("teacher: {model: mlp-16}\n")
    refused = _invoke("validate", other)
    assert refused.exit_code == 2 and "is neither a run config (.yaml) nor soft labels" in refused.output


def test_missing_files_exit_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"teacher: {{checkpoint: {tmp_path / 'nope.safetensors'}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    for args in (("run", tmp_path / "nope.yaml"), ("validate", tmp_path / "nope.yaml"),
                 ("validate", tmp_path / "nope.npy"), ("run", config)):
        result = _invoke(*args)
        assert result.exit_code == 2 and "not found" in result.output
    assert not (tmp_path / "out").exists()


def test_run_loads_a_trained_teacher_and_refuses_one_that_does_not_fit(tmp_path):
    first = _invoke("demo", "--out", tmp_path / "first", *TINY, "--set", "data.labeled_fraction=1.0")
    assert first.exit_code == 0, first.output
    weights = tmp_path / "first" / "teacher.safetensors"
    loaded = _invoke("demo", "--out", tmp_path / "second", *TINY, "--set", "data.labeled_fraction=1.0",
                     "--set", f"teacher.checkpoint={weights}")
    assert loaded.exit_code == 0, loaded.output
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("first", "second")]
    assert reports[0]["teacher"]["accuracy"] == reports[1]["teacher"]["accuracy"]
    assert not (tmp_path / "second" / "teacher.safetensors").exists()  # loaded, not retrained
    record = json.loads((tmp_path / "second" / "teacher.json").read_text())["result"]  # but recorded, as trained
    assert record["checkpoint"] == str(weights) and record["params"] == reports[1]["teacher"]["params"]
    assert record["test"]["accuracy"] == reports[1]["teacher"]["accuracy"] == reports[0]["teacher"]["accuracy"]
    wrong = _invoke("demo", "--out", tmp_path / "third", "--set", "teacher.model=tinycnn-8",
                    "--set", f"teacher.checkpoint={weights}")
    assert wrong.exit_code == 2 and "does not fit the model (shape mismatch: " in wrong.output
    assert not (tmp_path / "third").exists()


def test_ls_lists_registered_names():
    result = _invoke("ls", "methods")
    assert result.exit_code == 0 and "soft-target  (alias: soft-td)" in result.output
    models = _invoke("ls", "models").output
    assert "mlp-<h>" in models and "resnet-64 1,226,442" in models and "wrn-40-2         params: wrn-40-2 2,243,258" in models


def test_teacher_augment_trains_on_views_and_leaves_earlier_teachers_up_to_date(tmp_path):
    from softkd.config import load_config
    from softkd.pipeline import teacher_key

    plain, shifted = tmp_path / "plain.yaml", tmp_path / "shifted.yaml"
    plain.write_text("data: {shift: 1}\nteacher: {model: mlp-32, epochs: 2, lr: 1.0e-2}\n")
    shifted.write_text("data: {shift: 1}\nteacher: {model: mlp-32, epochs: 2, lr: 1.0e-2, augment: shift-flip}\n")
    for config in (plain, shifted):
        assert _invoke("teacher", config, "--out", tmp_path / config.stem).exit_code == 0
    stamps = [json.loads((tmp_path / name / "teacher.json").read_text()) for name in ("plain", "shifted")]
    assert stamps[0]["key"] != stamps[1]["key"]  # an augmented teacher is another teacher
    weights = [(tmp_path / name / "teacher.safetensors").read_bytes() for name in ("plain", "shifted")]
    assert weights[0] != weights[1]  # same seed, same data: only the views differ
    root = Path(__file__).parents[1]  # a teacher stamped before teacher.augment (or mixup_alpha) existed keeps its key
    committed = load_config(root / "configs" / "teacher-resnet32-fashion-mnist.yaml")
    assert teacher_key(committed) == json.loads((root / "teachers" / "resnet32-fashion-mnist" / "teacher.json").read_text())["key"]


def test_version_is_the_package_version():
    import re

    import softkd

    result = _invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"softkd {softkd.__version__}"
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.+)"$', pyproject, re.M).group(1) == softkd.__version__
    changelog = (Path(__file__).parents[1] / "CHANGELOG.md").read_text()
    assert f"\n## {softkd.__version__}\n" in changelog  # the current version has its entry


def test_console_script_prints_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epocs: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "softkd.cli", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: Unknown key 'train.epocs' in {bad}: did you mean 'epochs'?"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_teacher_verb_trains_and_saves_only_the_teacher(tmp_path):
    config = tmp_path / "t.yaml"
    config.write_text("teacher: {model: mlp-32, epochs: 8, lr: 1.0e-2, lr_schedule: cosine}\n")
    result = _invoke("teacher", config, "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "t").iterdir()} == {"config.yaml", "metrics.jsonl", "teacher.json",
                                                           "teacher.safetensors", ".lock"}  # no students/
    summary = json.loads((tmp_path / "t" / "teacher.json").read_text())["result"]
    assert summary["model"] == "mlp-32" and 0.5 < summary["test"]["accuracy"] <= 1
    weights = (tmp_path / "t" / "teacher.safetensors").read_bytes()
    assert _invoke("teacher", config, "--out", tmp_path / "t").exit_code == 0  # up to date: kept as it is
    assert (tmp_path / "t" / "teacher.safetensors").read_bytes() == weights
    records = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r.get("kind") != "step"]) == 8  # one per epoch, none added by the rerun
    steps = [r for r in records if r.get("kind") == "step"]
    assert [r["step"] for r in steps] == [50] and steps[0]["images_per_s"] > 0 and 0 < steps[0]["lr"] < 1e-2


def test_run_skips_stages_that_match_and_reruns_what_a_change_affects(tmp_path):
    config = tmp_path / "r.yaml"
    config.write_text("teacher: {model: mlp-32, epochs: 3}\ntrain: {epochs: 2, seeds: [0, 1]}\n"
                      f"output: {{dir: {tmp_path / 'run'}}}\n")
    metrics = tmp_path / "run" / "metrics.jsonl"

    def stages():
        lines = [json.loads(line) for line in metrics.read_text().splitlines()]
        return [(line["stage"], line.get("seed")) for line in lines if line["epoch"] == 1 and "kind" not in line]

    assert _invoke("run", config).exit_code == 0
    first = json.loads((tmp_path / "run" / "report.json").read_text())
    assert stages() == [("teacher", None), ("scratch", 0), ("distilled", 0), ("scratch", 1), ("distilled", 1)]
    assert _invoke("run", config).exit_code == 0  # nothing changed: nothing trains again
    assert len(stages()) == 5
    again = json.loads((tmp_path / "run" / "report.json").read_text())
    assert again["students"] == first["students"]
    assert _invoke("run", config, "--set", "method.temperature=2").exit_code == 0  # only distillation reruns
    assert stages()[5:] == [("distilled", 0), ("distilled", 1)]
    t2 = ("--set", "method.temperature=2")
    assert _invoke("run", config, *t2, "--set", "train.seeds=[0,1,2]").exit_code == 0  # only the new seed runs
    assert stages()[7:] == [("scratch", 2), ("distilled", 2)]
    assert _invoke("run", config, *t2, "--set", "teacher.epochs=4").exit_code == 0  # new teacher: all rerun
    assert [s for s, _ in stages()[9:]] == ["teacher"] + ["scratch", "distilled"] * 2


def test_run_takes_user_models_by_import_string(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "def wide_mlp(hidden, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n"
        "def eleven(hidden):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 11))\n"
        "def raises(hidden):\n"
        "    raise ValueError('no such width')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "user.yaml"
    config.write_text("teacher: {model: 'mynets:wide_mlp', kwargs: {hidden: 64}, epochs: 2}\n"
                      "student: {model: 'mynets:wide_mlp', kwargs: {hidden: 8}}\ntrain: {epochs: 1}\n")
    result = _invoke("run", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "report.json").read_text())["teacher"]["params"] == 64 * 64 + 64 + 650
    wrong = _invoke("run", config, "--out", tmp_path / "wrong", "--set", "student.model=mynets:eleven")
    assert wrong.exit_code == 2 and "The student (Sequential) outputs 11 classes but 10 are expected" in wrong.output
    assert not (tmp_path / "wrong").exists()
    missing = _invoke("run", config, "--out", tmp_path / "wrong", "--set", "teacher.model=mynets:widemlp")
    assert missing.exit_code == 2 and "wide_mlp" in missing.output
    raised = _invoke("run", config, "--out", tmp_path / "wrong", "--set", "student.model=mynets:raises")
    assert raised.exit_code == 2 and raised.output.strip().startswith("error: The model factory 'mynets:raises' raised "
                                                              "ValueError when called with kwargs"), raised.output
    assert "no such width" in raised.output and len(raised.output.strip().splitlines()) == 1
    assert not (tmp_path / "wrong").exists()


def test_run_on_a_user_csv(tmp_path):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    lines = ["label," + ",".join(f"f{i}" for i in range(64))]
    for i, (xi, yi) in enumerate(zip(bunch.data / 16.0, bunch.target)):
        lines.append(("" if i % 2 else str(yi)) + "," + ",".join(f"{v:g}" for v in xi))  # half unlabeled
    (tmp_path / "digits.csv").write_text("\n".join(lines) + "\n")
    config = tmp_path / "csv.yaml"
    config.write_text(f"data: {{name: my-digits, path: {tmp_path / 'digits.csv'}}}\n"
                      "teacher: {model: mlp-64, epochs: 3}\ntrain: {epochs: 2}\n")
    result = _invoke("run", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    labeled = bunch.target[::2]
    expected_test = sum(round(0.2 * int((labeled == c).sum())) for c in range(10))  # stratified 20 %
    assert report["data"]["name"] == "my-digits" and report["data"]["test"] == expected_test
    (tmp_path / "bad.csv").write_text("label,a,b\n1,0.5,abc\n")
    bad = _invoke("run", config, "--out", tmp_path / "bad", "--set", f"data.path={tmp_path / 'bad.csv'}")
    assert bad.exit_code == 2 and "abc" in bad.output and not (tmp_path / "bad").exists()


def test_nan_keeps_the_last_good_checkpoint_and_resume_checks_settings(tmp_path):
    config = tmp_path / "nan.yaml"
    config.write_text("teacher: {model: mlp-32, epochs: 2}\n"
                      "train: {epochs: 2, lr: 1.0e+9, checkpoint_every: 1, batch_size: 64}\n"
                      "data: {labeled_fraction: 1.0}\n")
    first = _invoke("run", config, "--out", tmp_path / "run")
    assert first.exit_code == 2 and "non-finite at step" in first.output and "last good checkpoint" in first.output
    ckpt = tmp_path / "run" / "students" / "scratch-labels1-seed0.ckpt"
    assert list(ckpt.glob("ckpt-*.pt"))
    other = _invoke("run", config, "--out", tmp_path / "run", "--resume", "--set", "train.lr=2.0e-3")
    assert other.exit_code == 2
    assert "written with other settings (train.lr: 1000000000.0 -> 0.002)" in other.output
    assert list(ckpt.glob("ckpt-*.pt"))  # refused, and nothing was overwritten


@pytest.mark.parametrize(
    "arrays, message",
    [
        (lambda: {"x": np.zeros((6, 4), dtype=np.float32), "y": np.array([0, 1, -5, 1, 0, 1])}, "-5"),
        (lambda: {"x": np.zeros((6, 4), dtype=np.float32), "y": np.array([0, 1, 1])}, "6"),
    ],
)
def test_bad_user_data_exits_2_and_writes_nothing(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays())
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{name: mine, path: {tmp_path / 'd.npz'}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    result = _invoke("run", config)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cache_build_info_verify_and_reuse_by_run(tmp_path):
    config = tmp_path / "c.yaml"
    shared = tmp_path / "shared-cache"
    config.write_text("teacher: {model: mlp-32, epochs: 2}\ntrain: {epochs: 1}\n"
                      f"cache: {{dir: {shared}, dtype: fp32}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    built = _invoke("cache", "build", config)
    assert built.exit_code == 0, built.output
    assert (shared / "manifest.json").is_file() and "samples: 1295" in built.output.replace("  ", " ")
    assert _invoke("cache", "info", shared).exit_code == 0
    assert "OK" in _invoke("cache", "verify", shared).output
    manifest = (shared / "manifest.json").read_bytes()
    ran = _invoke("run", config)  # the same teacher and data: the run reads the cache, does not rebuild it
    assert ran.exit_code == 0, ran.output
    assert (shared / "manifest.json").read_bytes() == manifest
    other = _invoke("run", config, "--set", "teacher.epochs=3", "--out", tmp_path / "run2")  # another teacher
    assert other.exit_code == 2 and "teacher_sha256" in other.output and "softkd cache build" in other.output
    shard = next(shared.glob("shard-*.bin"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    broken = _invoke("cache", "verify", shared)
    assert broken.exit_code == 2 and shard.name in broken.output
    assert _invoke("cache", "info", tmp_path / "nowhere").exit_code == 2


def test_run_with_its_own_cache_matches_the_uncached_run(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("teacher: {model: mlp-32, epochs: 2}\ntrain: {epochs: 2}\ncache: {dtype: fp32}\n")
    for name, extra in (("cached", []), ("live", ["--set", "cache.enabled=false"])):
        result = _invoke("run", config, "--out", tmp_path / name, *extra)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "cached" / "cache" / "manifest.json").is_file() and not (tmp_path / "live" / "cache").exists()
    reports = [json.loads((tmp_path / n / "report.json").read_text())["students"] for n in ("cached", "live")]
    assert reports[0] == reports[1]  # fp32 cache: the very same logits as running the teacher


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_an_error_every_process_shares_is_printed_once(tmp_path, monkeypatch, rank, printed):
    # Under torchrun every process raises a shared error (Distributed.together); only the main
    # process prints it, and every process exits with 2.
    from softkd.cache.format import CacheError

    def fail(*args, **kwargs):
        error = CacheError("The teacher gave non-finite logits for samples 256..511.")
        error.shared = True
        raise error

    monkeypatch.setattr("softkd.pipeline.run_experiment", fail)
    monkeypatch.setenv("RANK", rank)
    (tmp_path / "run.yaml").write_text("data: {name: digits}\n")
    result = _invoke("run", tmp_path / "run.yaml", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert ("non-finite logits" in result.output) is printed


def test_settings_that_barely_train_or_distort_small_images_are_warned_about_in_one_line(tmp_path, capsys):
    from softkd.cli import _show_warning
    from softkd.config import load_config
    from softkd.errors import SoftKDWarning
    from softkd.pipeline import check_run

    config = load_config(None, ["teacher.model=mlp-16", "teacher.batch_size=4096", "data.augment=shift",
                                "cache.views=2"])
    with pytest.warns(SoftKDWarning) as caught:
        check_run(config)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "teacher.batch_size 4096 gives 1 optimizer step(s) per epoch on the 1,295 training samples, so the model "
        "barely trains; lower teacher.batch_size (e.g. to 161) or raise the epochs.",
        "data.augment 'shift' shifts images by up to data.shift = 2 pixels, more than an eighth of these 8-pixel "
        "images; set data.shift to about 1 (2 suits 28×28)."]
    with warnings.catch_warnings(record=True) as quiet:  # the defaults (batch 256, no augmentation): nothing
        warnings.simplefilter("always")
        check_run(load_config(None, ["teacher.model=mlp-16"]))
    assert not [w for w in quiet if issubclass(w.category, SoftKDWarning)]
    _show_warning(messages[0], SoftKDWarning, "x.py", 1)
    assert capsys.readouterr().err.strip() == f"warning: {messages[0]}"


def test_a_model_module_beside_the_config_is_found_without_pythonpath(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # whatever the command adds is undone
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "beside_the_config.py").write_text(
        "from torch import nn\n"
        "def mine(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    config = tmp_path / "exp" / "c.yaml"
    config.write_text("teacher: {model: 'beside_the_config:mine', epochs: 1}\nstudent: {model: mlp-8}\n")
    result = _invoke("validate", config)
    assert result.exit_code == 0 and "teacher beside_the_config:mine (650 parameters" in result.output, result.output


def test_a_folder_where_a_file_is_expected_and_a_missing_cache_folder_are_named_as_such(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(f"teacher: {{model: mlp-16, checkpoint: {folder}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    for args, message in [(("run", folder), f"'{folder}' is a folder, not a config file"),
                          (("run", config), f"Checkpoint '{folder}' is a folder; give the weights file in it"),
                          (("cache", "info", tmp_path / "nope"),
                           f"There is no soft-label cache folder '{tmp_path / 'nope'}'")]:
        result = _invoke(*args)
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_a_loaded_teacher_without_a_test_file_is_warned_about_the_split_it_may_have_trained_on(tmp_path):
    from softkd.config import load_config
    from softkd.errors import SoftKDWarning
    from softkd.models import build_model
    from softkd.models.weights import save_weights
    from softkd.pipeline import check_run

    x = np.random.default_rng(0).normal(size=(90, 4)).astype("float32")
    np.savez(tmp_path / "d.npz", x=x, y=np.tile([0, 1, 2], 30))
    np.savez(tmp_path / "t.npz", x=x[:30], y=np.tile([0, 1, 2], 10))
    save_weights(build_model("mlp-16", input_shape=(4,), num_classes=3), tmp_path / "w.safetensors")
    overrides = [f"data.path={tmp_path / 'd.npz'}", "teacher.model=mlp-16",
                 f"teacher.checkpoint={tmp_path / 'w.safetensors'}", "train.batch_size=8", "teacher.batch_size=8"]
    with pytest.warns(SoftKDWarning, match=r"the test split is a fixed 20% of .*d.npz, which that teacher may have "
                                           r"trained on .*set data.test_path to data it never saw"):
        check_run(load_config(None, overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SoftKDWarning)  # with a test file: nothing to say
        check_run(load_config(None, overrides + [f"data.test_path={tmp_path / 't.npz'}"]))


def test_a_command_group_alone_prints_its_help_and_one_error_line():
    for group, commands in (("cache", "build, info or verify"), ("data", "fetch")):
        result = _invoke(group)
        assert result.exit_code == 2 and "Commands" in result.output
        assert result.output.strip().splitlines()[-1] == f"error: `softkd {group}` needs a command: {commands}."
    teacher_help = _invoke("teacher", "--help").output
    assert "teacher.epochs=10" in teacher_help and "method.temperature" not in teacher_help


def test_table_columns_on_very_different_scales_are_warned_about(tmp_path):
    from softkd.config import load_config
    from softkd.errors import SoftKDWarning
    from softkd.pipeline import check_run

    x = np.random.default_rng(0).normal(size=(90, 3)).astype("float32")
    np.savez(tmp_path / "even.npz", x=x, y=np.tile([0, 1, 2], 30))
    x[:, 2] *= 1000  # one column around 1,000
    np.savez(tmp_path / "uneven.npz", x=x, y=np.tile([0, 1, 2], 30))
    base = ["teacher.model=mlp-16", "train.batch_size=8", "teacher.batch_size=8"]
    with pytest.warns(SoftKDWarning, match=r"feature columns of .*uneven.npz are on very different scales \(column "
                                           r"2 reaches 2.\d+e\+03, column \d [\d.]+\); .* standardise them"):
        check_run(load_config(None, base + [f"data.path={tmp_path / 'uneven.npz'}"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SoftKDWarning)
        check_run(load_config(None, base + [f"data.path={tmp_path / 'even.npz'}"]))


def test_on_off_flags_are_shown_without_a_value():
    for command, flag in (("run", "--resume"), ("teacher", "--resume"), ("report", "--figures"),
                          ("export", "--list"), ("cascade", "--export")):
        line = next(line for line in _invoke(command, "--help").output.splitlines() if f"{flag} " in line)
        assert "<bool>" not in line, line
    # --help itself, on softkd, on every command and on every group's commands
    commands = [[]] + [[c] for c in ("demo", "run", "teacher", "validate", "ls", "report", "export", "evaluate",
                                     "cascade", "data", "cache")] + [["data", "fetch"], ["cache", "build"],
                                                                     ["cache", "verify"], ["cache", "info"]]
    for command in commands:
        output = _invoke(*command, "--help").output
        (line,) = [line for line in output.splitlines() if "--help " in line]
        assert "Show this message and exit." in line and "<" not in line, (command, line)
    (line,) = [line for line in _invoke("--help").output.splitlines() if "--version " in line]
    assert "<" not in line, line


def test_a_code_running_pickle_is_refused_as_a_training_checkpoint_and_by_evaluate(tmp_path):
    evil = tmp_path / "evil.pt"
    save_code_running_pickle(evil, tmp_path / "ran")
    config = tmp_path / "c.yaml"
    config.write_text("teacher: {model: mlp-16, epochs: 1}\ntrain: {checkpoint_every: 5}\n")
    planted = tmp_path / "out" / "teacher.ckpt" / "ckpt-00000005.pt"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(evil.read_bytes())  # where a resumed run looks for its last checkpoint
    for args in (("teacher", config, "--out", tmp_path / "out", "--resume"),
                 ("evaluate", evil, "--data", "digits", "--model", "mlp-16")):
        result = _invoke(*args)
        assert result.exit_code == 2, result.output
        assert "holds pickled Python objects, not only tensors; softkd never unpickles them" in result.output
        assert "weights_only=False" not in result.output
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out" / "teacher.safetensors").exists()


def test_a_full_disk_mid_run_is_one_line_and_the_last_good_checkpoint_survives(tmp_path, monkeypatch):
    import errno
    import tempfile

    real_mkstemp, written = tempfile.mkstemp, []

    def disk_fills_after_the_first_checkpoint(*args, prefix="", **kwargs):
        if prefix.startswith(".ckpt-"):
            written.append(prefix)
            if len(written) > 1:
                raise OSError(errno.ENOSPC, "No space left on device", kwargs.get("dir"))
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", disk_fills_after_the_first_checkpoint)
    config = tmp_path / "c.yaml"
    config.write_text("teacher: {model: mlp-16, epochs: 2}\ntrain: {checkpoint_every: 5}\n")
    result = _invoke("teacher", config, "--out", tmp_path / "t")
    assert result.exit_code == 2, result.output
    ckpt = tmp_path / "t" / "teacher.ckpt"
    assert result.output.strip() == (f"error: Cannot write '{ckpt}': No space left on device; free some space or "
                                     "choose another folder (--out), then run the command again: what was finished "
                                     "and written is kept.")
    kept = sorted(p.name for p in ckpt.iterdir())
    assert kept == ["ckpt-00000005.pt"]  # the good one, and no temporary file left beside it
    assert torch.load(ckpt / kept[0], weights_only=True)["step"] == 5


def test_usage_lines_name_every_argument_in_capitals():
    import re

    for command in (("run",), ("teacher",), ("cache", "build"), ("cache", "info"), ("cache", "verify"), ("report",),
                    ("export",), ("evaluate",), ("cascade",), ("validate",), ("ls",), ("data", "fetch")):
        usage = next(line for line in _invoke(*command, "--help").output.splitlines() if "Usage:" in line)
        arguments = usage.split("[OPTIONS]", 1)[1].split()
        assert arguments and all(re.fullmatch(r"[{\[][A-Z_]+[}\]](\.\.\.)?", a) for a in arguments), usage
