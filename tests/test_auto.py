"""method auto: every candidate trained with the scratch twin's budget, the choice by validation
accuracy with scratch among the choices (a tie to scratch), the test split no part of it, the
search's cost and every candidate's score in the report."""

import json
import shutil

import numpy as np
import pytest
import torch

import softkd
from softkd.config import config_from_dict
from softkd.data.datasets import digits, run_splits
from softkd.errors import ConfigError
from softkd.methods import build_method
from softkd.methods.auto import expand
from softkd.models import build_model
from softkd.models.weights import load_weights
from softkd.pipeline import run_experiment
from softkd.stages import best_on_validation

GRID = {"temperature": [1, 4], "beta": [0.5, 0.9]}
TAGS = ["soft-target-temperature1-beta0.5", "soft-target-temperature1-beta0.9",
        "soft-target-temperature4-beta0.5", "soft-target-temperature4-beta0.9"]


def _config(data, **method):
    return config_from_dict({
        "data": data, "teacher": {"model": "tinycnn-8", "epochs": 2, "batch_size": 128},
        "student": {"model": "mlp-16"}, "method": {"name": "auto", **method},
        "train": {"epochs": 2, "batch_size": 64, "seeds": [0, 1], "threads": 1},
        "output": {"latency": False}})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Digits as a user's files: training rows, and a test file given apart."""
    folder = tmp_path_factory.mktemp("digits")
    splits = digits()
    train_x = torch.cat([splits.train.x, splits.val.x]).reshape(-1, 64).numpy()
    train_y = torch.cat([splits.train.y, splits.val.y]).numpy()
    np.savez(folder / "train.npz", x=train_x, y=train_y)
    test_x, test_y = splits.test.x.reshape(-1, 64).numpy(), splits.test.y.numpy()
    np.savez(folder / "test.npz", x=test_x, y=test_y)
    np.savez(folder / "test-shuffled.npz", x=test_x, y=np.random.default_rng(0).permutation(test_y))
    return folder


@pytest.fixture(scope="module")
def searched(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto")
    data = {"name": "mine", "path": str(files / "train.npz"), "test_path": str(files / "test.npz"),
            "labeled_fraction": 0.1}
    return out, run_experiment(_config(data, grid=GRID), out_dir=out)


def _stamp(out, name):
    return json.loads((out / "students" / f"{name}.json").read_text())["result"]


def test_the_grid_expands_into_every_combination_each_validated():
    assert [tag for tag, _ in expand(_config({"name": "digits"}, grid=GRID).method)] == TAGS
    default = build_method("auto")
    assert [p.temperature for _, p in default.candidates()] == [2.0, 2.0, 4.0, 4.0, 8.0, 8.0]
    assert [p.beta for _, p in default.candidates()] == [0.5, 0.9] * 3
    listed = build_method("auto", candidates=[{"name": "dkd", "temperature": 4}, {"name": "soft-target"}])
    assert [(tag, p.name) for tag, p in listed.candidates()] == [("dkd-temperature4", "dkd"),
                                                                 ("soft-target", "soft-target")]


@pytest.mark.parametrize("method, message", [
    ({"grid": {"temprature": [2]}}, "Unknown parameter 'method.temprature' for method 'soft-target': did you mean "
                                    "'temperature'?"),
    ({"grid": {"beta": [0.5, 1.5]}}, "'method.beta' of method 'soft-target' is invalid"),
    ({"grid": {"beta": []}}, "grid.beta must be a list of values"),
    ({"method": "mutual"}, "method 'mutual' cannot be searched by auto"),
    ({"candidates": [{"name": "feature"}]}, "method 'feature' cannot be searched by auto"),
    ({"candidates": [{"temperature": 2}]}, "each candidate needs its method's 'name'"),
    ({"candidates": [{"name": "dkd"}, {"name": "dkd"}]}, "lists the same setting more than once: dkd"),
    ({"grid": {"temperature": list(range(1, 11)), "beta": [0.1 * i for i in range(1, 8)]}}, "gives 70 candidates"),
])
def test_bad_search_settings_are_one_line_naming_the_setting(method, message):
    with pytest.raises(ConfigError, match="^[^\n]*$") as error:
        _config({"name": "digits"}, **method)
    assert message in str(error.value)


def test_a_search_needs_a_validation_split():
    with pytest.raises(ConfigError, match="chooses by validation accuracy, and data.val_fraction is 0"):
        _config({"name": "digits", "val_fraction": 0})


def test_the_choice_is_the_best_on_validation_and_a_tie_goes_to_scratch():
    scratch, a, b = ({"val_accuracy": v} for v in (0.5, 0.5, 0.4))
    assert best_on_validation([("scratch", scratch), ("a", a), ("b", b)])[0] == "scratch"
    assert best_on_validation([("scratch", scratch), ("b", b), ("a", {"val_accuracy": 0.51})])[0] == "a"


def test_each_seed_keeps_the_best_on_validation_of_scratch_and_every_candidate(searched):
    out, report = searched
    tags = TAGS
    for seed in (0, 1):
        scratch = _stamp(out, f"scratch-labels0.1-seed{seed}")
        candidates = {tag: _stamp(out, f"candidate-{tag}-labels0.1-seed{seed}") for tag in tags}
        distilled = _stamp(out, f"distilled-labels0.1-seed{seed}")
        scores = {"scratch": scratch["val_accuracy"], **{t: c["val_accuracy"] for t, c in candidates.items()}}
        best = max(scores.values())
        assert distilled["chosen"] == next(t for t, v in scores.items() if v == best)  # the first of equals
        assert distilled["val_accuracy"] == best >= scratch["val_accuracy"]  # never worse than not distilling
        source = "scratch-labels0.1-seed" if distilled["chosen"] == "scratch" else f"candidate-{distilled['chosen']}-labels0.1-seed"
        assert (out / "students" / "distilled-labels0.1-seed{}.safetensors".format(seed)).read_bytes() == \
            (out / "students" / f"{source}{seed}.safetensors").read_bytes()
        chosen = scratch if distilled["chosen"] == "scratch" else candidates[distilled["chosen"]]
        assert distilled["accuracy"] == chosen["accuracy"]
        assert "key" not in distilled  # the chosen run's own stamp key stays in its own stamp
        # every candidate had the scratch twin's budget: the same number of optimizer steps
        steps = {r["setting"] if "setting" in r else r["stage"]: r["step"] for r in _records(out, seed)}
        assert len(set(steps.values())) == 1 and len(steps) == 1 + len(tags), steps
        # the validation score is what the saved weights give on the validation split, computed here
        student = build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10)
        load_weights(student, out / "students" / f"distilled-labels0.1-seed{seed}.safetensors")
        val = run_splits(config_from_dict(report["config"]).data).val
        with torch.no_grad():
            accuracy = float((student.eval()(val.x).argmax(1) == val.y).float().mean())
        assert accuracy == pytest.approx(distilled["val_accuracy"], abs=1e-6)
    assert report["method"]["name"] == "auto"


def _records(out, seed):
    """The last epoch record of each student run of ``seed`` in metrics.jsonl."""
    last = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("seed") == seed and r.get("stage") in ("scratch", "candidate") and "val_accuracy" in r:
            last[(r["stage"], r.get("setting"))] = r
    return list(last.values())


def test_the_test_split_plays_no_part_in_the_choice(files, searched, tmp_path):
    out, report = searched
    data = {"name": "mine", "path": str(files / "train.npz"), "test_path": str(files / "test-shuffled.npz"),
            "labeled_fraction": 0.1}
    shuffled = run_experiment(_config(data, grid=GRID), out_dir=tmp_path)
    regime = report["students"]["mlp-16"]["regimes"]["10% labels"]
    other = shuffled["students"]["mlp-16"]["regimes"]["10% labels"]
    assert other["search"]["chosen"] == regime["search"]["chosen"]
    assert other["search"]["settings"] == regime["search"]["settings"]
    assert other["distilled"]["accuracy"]["mean"] != regime["distilled"]["accuracy"]["mean"]  # test labels differ


def test_the_report_lists_every_candidate_and_the_cost_of_the_search(searched):
    out, report = searched
    search = report["students"]["mlp-16"]["regimes"]["10% labels"]["search"]
    assert [s["setting"] for s in search["settings"]] == TAGS
    assert set(search["chosen"]) == {"0", "1"} and search["candidate_runs"] == 8
    assert search["candidate_train_s"] > search["scratch_train_s"] > 0
    assert search["cost_vs_scratch"] == pytest.approx(search["candidate_train_s"] / search["scratch_train_s"])
    text = (out / "report.md").read_text()
    assert "by validation accuracy; the test split played no part. The 8 candidate runs took" in text
    assert "| scratch (no distillation) |" in text and "| soft-target-temperature4-beta0.9 |" in text
    html = (out / "report.html").read_text()
    assert "Search, mlp-16, 10% labels: chose" in html and "<td>soft-target-temperature4-beta0.9</td>" in html


def test_a_second_run_into_the_folder_trains_nothing_and_writes_no_student(searched):
    out, report = searched
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "students").iterdir()}
    again = run_experiment(config_from_dict(json.loads(json.dumps(report["config"]))), out_dir=out)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "students").iterdir()} == before
    assert again["students"] == report["students"]


def test_distill_refuses_auto_in_one_line(digit_splits, trained_teacher):
    with pytest.raises(ConfigError, match=r"^Method 'auto' is a search over whole training runs, not a loss"):
        softkd.distill(build_model("mlp-8", input_shape=(1, 8, 8), num_classes=10), trained_teacher,
                       digit_splits.train, method="auto", max_steps=1)


def test_a_distilled_run_of_a_setting_the_search_tried_reuses_that_candidate(searched, tmp_path):
    """Pinning a setting the search tried trains nothing: its candidate was that training (a fresh
    folder trains the same weights, bit for bit). A setting it did not try trains as always."""
    out, report = searched
    config = json.loads(json.dumps(report["config"]))
    config["method"] = {"name": "soft-target", "temperature": 4, "beta": 0.9}
    reused, fresh = tmp_path / "reused", tmp_path / "fresh"
    shutil.copytree(out, reused)
    lines = len((reused / "metrics.jsonl").read_text().splitlines())
    stopped = reused / "students" / "distilled-labels0.1-seed0.ckpt"  # a stopped run of the same student
    stopped.mkdir()
    (stopped / "ckpt-00000010.pt").write_bytes(b"")
    run_experiment(config_from_dict(config), out_dir=reused)
    assert not stopped.exists()  # done now: its checkpoints go, as a finished run's do
    run_experiment(config_from_dict(config), out_dir=fresh)
    records = [json.loads(line) for line in (reused / "metrics.jsonl").read_text().splitlines()[lines:]]
    assert not [r for r in records if r.get("stage") == "distilled"]  # nothing trained
    for seed in (0, 1):
        file, candidate = f"distilled-labels0.1-seed{seed}", f"candidate-{TAGS[3]}-labels0.1-seed{seed}"
        weights = [folder / "students" / f"{name}.safetensors"
                   for folder, name in ((reused, file), (fresh, file), (out, candidate))]
        assert weights[0].read_bytes() == weights[1].read_bytes() == weights[2].read_bytes()
        assert _stamp(reused, file)["trained_as"] == candidate and "trained_as" not in _stamp(fresh, file)
        assert _stamp(reused, file)["accuracy"] == _stamp(fresh, file)["accuracy"]

    config["method"]["temperature"] = 2  # not in the grid
    run_experiment(config_from_dict(config), out_dir=reused)
    assert "trained_as" not in _stamp(reused, "distilled-labels0.1-seed0")
    candidate = out / "students" / f"candidate-{TAGS[3]}-labels0.1-seed0.safetensors"
    assert (reused / "students" / "distilled-labels0.1-seed0.safetensors").read_bytes() != candidate.read_bytes()
