"""The demo's claim, measured: with 10 % labels the distilled student beats scratch clearly."""

import json
import os
from importlib import resources

import pytest
import torch

from softkd.config import load_config
from softkd.pipeline import run_experiment
from softkd.report.summary import stats, verdict


def test_demo_recipe_distillation_beats_scratch_with_few_labels(tmp_path):
    with resources.as_file(resources.files("softkd") / "recipes" / "demo.yaml") as recipe:
        config = load_config(recipe)
    assert config.train.seeds == [0, 1, 2] and config.data.fractions == [1.0, 0.1]
    report = run_experiment(config, out_dir=tmp_path)
    few = report["students"]["mlp-16"]["regimes"]["10% labels"]
    scratch, distilled = few["scratch"]["accuracy"], few["distilled"]["accuracy"]
    assert distilled["mean"] - scratch["mean"] > 0.02, (scratch, distilled)
    assert few["verdict"].startswith("distillation helped")
    assert report["teacher"]["accuracy"] > 0.97
    assert few["num_labeled"] < 0.11 * few["transfer_size"]


@pytest.mark.parametrize(
    "scratch, distilled, expected",
    [
        ([0.90, 0.91, 0.92], [0.95, 0.96, 0.97], "distillation helped: +5.0 points"),
        ([0.95, 0.96, 0.97], [0.90, 0.91, 0.92], "distillation hurt: -5.0 points"),
        ([0.90, 0.95, 0.99], [0.91, 0.96, 0.99], "no clear difference"),
        ([0.90], [0.95], "one seed: no error estimate"),
    ],
)
def test_verdict_is_plain_about_the_outcome(scratch, distilled, expected):
    assert verdict(stats(scratch), stats(distilled)).startswith(expected) or expected in verdict(
        stats(scratch), stats(distilled))


TINY = {"data": {"name": "digits", "labeled_fraction": 1.0}, "teacher": {"model": "mlp-16", "epochs": 2},
        "student": {"model": "mlp-8"}, "train": {"epochs": 2, "seeds": [0], "batch_size": 128, "log_every": 5},
        "output": {"tensorboard": True}}


def test_tensorboard_event_files_hold_the_logged_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from softkd.config import RunConfig

    run_experiment(RunConfig.model_validate(TINY), out_dir=tmp_path)
    jobs = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    assert jobs == ["distilled-labeled1-seed0", "scratch-labeled1-seed0", "teacher"]
    events = EventAccumulator(str(tmp_path / "tensorboard" / "distilled-labeled1-seed0"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"epoch/val_accuracy", "epoch/train_kd", "step/train_loss", "step/lr"} <= set(tags)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in logged if r.get("stage") == "distilled" and r.get("kind") != "step"]
    board = events.Scalars("epoch/val_accuracy")
    assert [e.step for e in board] == [r["step"] for r in epochs]
    assert [e.value for e in board] == pytest.approx([r["val_accuracy"] for r in epochs])


def test_tensorboard_without_the_package_is_a_clear_error_before_any_file(tmp_path, monkeypatch):
    import sys

    from softkd.config import RunConfig
    from softkd.errors import ConfigError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"'tensorboard' package is not installed; pip install"):
        run_experiment(RunConfig.model_validate(TINY), out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_data_change_retrains_students_of_a_loaded_teacher(tmp_path):
    import torch

    from softkd.config import RunConfig
    from softkd.models import build_model
    from softkd.models.weights import save_weights

    torch.manual_seed(0)
    save_weights(build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10), tmp_path / "teacher.safetensors")
    raw = {**TINY, "teacher": {"model": "mlp-16", "checkpoint": str(tmp_path / "teacher.safetensors")},
           "output": {}}

    def stamps():
        return {p.name: json.loads(p.read_text())["key"] for p in (tmp_path / "run" / "students").glob("*.json")}

    run_experiment(RunConfig.model_validate(raw), out_dir=tmp_path / "run")
    first = stamps()
    run_experiment(RunConfig.model_validate(raw), out_dir=tmp_path / "run")
    assert stamps() == first  # unchanged: reused
    raw["data"] = {**raw["data"], "val_fraction": 0.2}
    run_experiment(RunConfig.model_validate(raw), out_dir=tmp_path / "run")
    changed = stamps()
    assert changed.keys() == first.keys() and all(changed[k] != first[k] for k in first)


def test_deterministic_algorithms_on_request_and_restored_after(tmp_path, monkeypatch):
    import softkd.pipeline as pipeline
    import softkd.stages as stages
    from softkd.config import RunConfig
    from softkd.train.runtime import deterministic_algorithms

    seen = []
    # every training job records the settings it ran under: the teacher's, the students'
    for module, name in ((pipeline, "fit"), (stages, "fit"), (stages, "distill")):
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                         torch.backends.cudnn.deterministic))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    raw = {**TINY, "train": {**TINY["train"], "deterministic": True}, "output": {}}
    run_experiment(RunConfig.model_validate(raw), out_dir=tmp_path / "on")
    assert len(seen) == 3 and all(s == (True, False, True) for s in seen), seen  # teacher, scratch, distilled
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    seen.clear()
    run_experiment(RunConfig.model_validate({**TINY, "output": {}}), out_dir=tmp_path / "off")
    assert len(seen) == 3 and not any(s[0] for s in seen)
    with deterministic_algorithms():
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] and torch.are_deterministic_algorithms_enabled()


def test_the_scratch_twin_starts_from_the_distilled_students_weights_with_the_same_data_and_budget(tmp_path,
                                                                                                   monkeypatch):
    import softkd.stages as stages
    from softkd.config import config_from_dict

    seen = {}

    def spy(kind, real):
        def call(model, *args, **kwargs):
            data = args[1] if kind == "distilled" else args[0]  # distill(student, teachers, data, ...)
            budget = {k: v for k, v in kwargs.items() if k not in ("objective", "method", "teacher_logits",
                                                                   "teacher_features", "log", "checkpoint_dir",
                                                                   "run_key", "augment", "views", "val_data")}
            seen.setdefault(kind, []).append(({k: v.clone() for k, v in model.state_dict().items()},
                                              data.ids.clone(), data.y.clone(), budget))
            result = real(model, *args, **kwargs)
            seen[kind][-1] += (result.steps,)
            return result
        return call

    monkeypatch.setattr(stages, "fit", spy("scratch", stages.fit))
    monkeypatch.setattr(stages, "distill", spy("distilled", stages.distill))
    config = config_from_dict({"teacher": {"model": "mlp-32", "epochs": 2}, "student": {"model": "mlp-16"},
                               "data": {"labeled_fraction": 0.1}, "output": {"latency": False},
                               "train": {"epochs": 2, "seeds": [0, 1], "threads": 1}})
    run_experiment(config, out_dir=tmp_path)
    assert len(seen["scratch"]) == len(seen["distilled"]) == 2
    for (w_s, ids_s, y_s, budget_s, steps_s), (w_d, ids_d, y_d, budget_d, steps_d) in zip(seen["scratch"],
                                                                                         seen["distilled"]):
        assert w_s.keys() == w_d.keys() and all(torch.equal(w_s[k], w_d[k]) for k in w_s)  # the same init
        assert torch.equal(ids_s, ids_d) and torch.equal(y_s, y_d)  # the same samples and labels
        assert budget_s == budget_d and steps_s == steps_d > 0  # the same optimizer, schedule, epochs, steps
    first, second = (w for w, *_ in seen["scratch"])
    assert not all(torch.equal(first[k], second[k]) for k in first)  # each seed its own init
