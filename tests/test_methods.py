"""The method seam: the configured method is what trains (CLI and Python), its settings are in
every stamp and resume key, teachers never reach a checkpoint, and a method's trainable parts
are optimised, checkpointed and restored with the student."""

import json
import warnings

import pytest
import torch
from pydantic import Field
from torch import nn
from typer.testing import CliRunner

import softkd
from softkd.cli import app
from softkd.config import config_from_dict
from softkd.errors import ConfigError
from softkd.methods import METHODS, Method, MethodParams, build_method, method_class
from softkd.methods.base import register_method
from softkd.models import build_model
from softkd.pipeline import run_experiment

runner = CliRunner()


@pytest.fixture(scope="module")
def teacher(digit_splits):
    torch.manual_seed(0)
    model = build_model("mlp-32", input_shape=(1, 8, 8), num_classes=10)
    softkd.fit(model, digit_splits.train, epochs=3, batch_size=64, lr=3e-3)
    return model


def _student(seed=1):
    torch.manual_seed(seed)
    return build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10)


@pytest.mark.parametrize("name, terms", [("soft-target", {"ce", "kd"}), ("dkd", {"ce", "tckd", "nckd"}),
                                         ("dist", {"ce", "inter", "intra"})])
def test_the_named_method_is_what_trains(digit_splits, teacher, name, terms):
    result = softkd.distill(_student(), teacher, digit_splits.train, method=name, epochs=1, batch_size=128)
    assert {k.removeprefix("train_") for k in result.history[-1] if k.startswith("train_")} == {"loss", *terms}


def test_methods_differ_in_what_they_teach(digit_splits, teacher):
    weights = {}
    for name in ("soft-target", "dkd"):
        weights[name] = softkd.distill(_student(), teacher, digit_splits.train, method=name, epochs=1,
                                       batch_size=128).model.state_dict()
    assert not torch.equal(weights["soft-target"]["1.weight"], weights["dkd"]["1.weight"])


def test_method_parameters_are_keywords_with_the_config_names(digit_splits, teacher):
    a = softkd.distill(_student(), teacher, digit_splits.train, method="dkd", beta=2.0, warmup=0, epochs=1,
                       batch_size=128)
    params = build_method("dkd", teachers=[teacher], beta=2.0, warmup=0).params
    b = softkd.distill(_student(), teacher, digit_splits.train, method=params, epochs=1, batch_size=128)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) gamma: method 'dkd' takes alpha, beta"):
        softkd.distill(_student(), teacher, digit_splits.train, method="dkd", gamma=1.0)
    with pytest.raises(ConfigError, match="'method.beta' of method 'soft-target'"):
        softkd.distill(_student(), teacher, digit_splits.train, beta=2.0)


def test_supervised_is_not_a_method():
    for name in ("supervised", "scratch"):
        with pytest.raises(ConfigError, match="not a distillation method: every run already trains the student"):
            config_from_dict({"method": {"name": name}})
    assert "supervised" not in METHODS.names()


def test_each_method_has_exactly_its_parameters():
    dkd = config_from_dict({"method": {"name": "dkd", "beta": 8.0, "alpha": 0.5}}).method
    assert (dkd.beta, dkd.alpha, dkd.warmup) == (8.0, 0.5, 1.0)
    with pytest.raises(ConfigError, match="'method.beta' of method 'soft-target' is invalid.*less than or equal to 1"):
        config_from_dict({"method": {"name": "soft-target", "beta": 8.0}})
    with pytest.raises(ConfigError, match=r"Unknown parameter 'method.alpha' for method 'soft-target': its parameters"
                                          r" are temperature, beta, kd_scale, standardize"):
        config_from_dict({"method": {"name": "soft-target", "alpha": 1.0}})
    assert config_from_dict({"method": {"name": "soft-td"}}).method.name == "soft-target"  # the alias


def test_resume_refuses_a_changed_method_setting(tmp_path, digit_splits, teacher):
    common = dict(epochs=1, batch_size=128, checkpoint_dir=tmp_path, checkpoint_every=2)
    softkd.distill(_student(), teacher, digit_splits.train, temperature=4.0, **common)
    with pytest.raises(ConfigError, match=r"method.temperature: 4.0 -> 1.0"):
        softkd.distill(_student(), teacher, digit_splits.train, temperature=1.0, resume=True, **common)
    with pytest.raises(ConfigError, match=r"method.name: 'soft-target' -> 'dkd'"):
        softkd.distill(_student(), teacher, digit_splits.train, method="dkd", resume=True, **common)


def test_no_teacher_weights_in_a_student_checkpoint(tmp_path, digit_splits, teacher):
    softkd.distill(_student(), teacher, digit_splits.train, epochs=1, batch_size=128, checkpoint_dir=tmp_path,
                   checkpoint_every=3)
    checkpoints = sorted(tmp_path.glob("ckpt-*.pt"))
    assert checkpoints
    for path in checkpoints:
        state = torch.load(path, weights_only=True)
        assert state["method_parts"] == {} and "objective" not in state
        shapes = {tuple(v.shape) for v in state["model"].values()}
        assert shapes == {tuple(p.shape) for p in _student().state_dict().values()}
        teacher_shapes = {tuple(p.shape) for p in teacher.state_dict().values()}
        flat = json.dumps(str(state))
        assert "teachers" not in flat and not teacher_shapes <= shapes


def test_a_checkpoint_from_softkd_01_is_refused_with_a_reason(tmp_path, digit_splits, teacher):
    softkd.distill(_student(), teacher, digit_splits.train, epochs=1, batch_size=128, checkpoint_dir=tmp_path,
                   checkpoint_every=3)
    newest = sorted(tmp_path.glob("ckpt-*.pt"))[-1]
    state = torch.load(newest, weights_only=True)
    del state["format"]
    torch.save(state, newest)
    with pytest.raises(ConfigError, match="written by softkd 0.1 with the old method settings"):
        softkd.distill(_student(), teacher, digit_splits.train, epochs=1, batch_size=128, checkpoint_dir=tmp_path,
                       checkpoint_every=3, resume=True)


class _BiasParams(MethodParams):
    beta: float = Field(0.5, gt=0, le=1)


class _LearnedBias(Method):
    """A test method with a trainable part: a learned bias on the student's logits, sized by a dry
    forward (the seam adapters will use)."""

    name = "test-learned-bias"
    Params = _BiasParams
    terms = ("loss", "ce")

    def setup(self, model, batch):
        with torch.no_grad():
            classes = model.eval()(batch["x"]).shape[-1]
        model.train()
        self.parts = nn.Linear(classes, classes)
        self.initial_weight = self.parts.weight.detach().clone()  # what training must move

    def forward(self, model, batch, *, labeled_count=None, sample_count=None):
        logits = self.run_parts(model(batch["x"]))
        ce = softkd.losses.cross_entropy(logits, batch["y"], count=labeled_count)
        return {"loss": ce, "ce": ce.detach()}


def test_trainable_parts_are_optimised_checkpointed_restored_and_kept_out_of_the_student(tmp_path, digit_splits):
    method = _LearnedBias()
    result = softkd.fit(_student(), digit_splits.train, objective=method, val_data=digit_splits.val, epochs=2,
                        batch_size=128, checkpoint_dir=tmp_path / "a", checkpoint_every=4)
    assert isinstance(method.parts, nn.Linear)
    assert not torch.equal(method.parts.weight, method.initial_weight)  # trained
    saved = torch.load(sorted((tmp_path / "a").glob("ckpt-*.pt"))[-1], weights_only=True)
    assert set(saved["method_parts"]) == {"weight", "bias"}
    assert set(result.model.state_dict()) == set(_student().state_dict())  # the student alone
    assert set(method.state_dict()) == {"parts.weight", "parts.bias"}  # registered once, under one name
    # resumed from the mid-run checkpoint, the parts come back exactly
    clean = _LearnedBias()
    softkd.fit(_student(), digit_splits.train, objective=clean, epochs=2, batch_size=128,
               checkpoint_dir=tmp_path / "b", checkpoint_every=4)
    for path in sorted((tmp_path / "b").glob("ckpt-*.pt"))[-1:]:
        path.unlink()  # back to the step-4 checkpoint... of a run that went on: resume from the newest left
    resumed = _LearnedBias()
    softkd.fit(_student(), digit_splits.train, objective=resumed, epochs=2, batch_size=128,
               checkpoint_dir=tmp_path / "b", checkpoint_every=4, resume=True)
    assert torch.equal(resumed.parts.weight, clean.parts.weight)


def test_the_best_epoch_restores_the_parts_with_the_student(digit_splits):
    method = _LearnedBias()
    seen = {}

    def keep(record):
        if record.get("kind") != "step":
            seen[record["epoch"]] = (method.parts.weight.detach().clone(), record["val_accuracy"])

    result = softkd.fit(_student(), digit_splits.train, objective=method, val_data=digit_splits.val, epochs=3,
                        batch_size=128, lr=0.5, log=keep)
    assert torch.equal(method.parts.weight, seen[result.best_epoch][0])


def test_dkd_warms_its_distillation_terms_up(digit_splits, teacher):
    method = build_method("dkd", teachers=[teacher], warmup=2.0)
    factors = []
    softkd.fit(_student(), digit_splits.train, objective=method, epochs=3, batch_size=256,
               on_step=lambda step: factors.append(float(method.warmup_factor)))
    per_epoch = len(factors) // 3
    assert factors[0] == 0.0 and factors[per_epoch] == pytest.approx(0.5) and factors[-1] == 1.0
    assert all(b >= a for a, b in zip(factors, factors[1:]))


def test_multi_teacher_from_python_live_and_precomputed(digit_splits, teacher):
    torch.manual_seed(5)
    other = build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10)
    softkd.fit(other, digit_splits.train, epochs=2, batch_size=64)
    live = softkd.distill(_student(), [teacher, other], digit_splits.train, method="multi-teacher", epochs=1,
                          batch_size=128)
    logits = torch.stack([softkd.Teacher(t).predict_logits(softkd.build_loader(digit_splits.train, batch_size=512))
                          for t in (teacher, other)], 1)
    cached = softkd.distill(_student(), None, digit_splits.train, method="multi-teacher", teacher_logits=logits,
                            epochs=1, batch_size=128)
    for key, value in live.model.state_dict().items():
        torch.testing.assert_close(value, cached.model.state_dict()[key])
    with pytest.raises(ConfigError, match="has 3 entries for 2 teachers"):
        build_method("multi-teacher", teachers=[teacher, other], weights=[1, 1, 1])
    with pytest.raises(ConfigError, match="learns from one teacher; got 2"):
        build_method("dkd", teachers=[teacher, other])


def test_build_objective_still_works_and_names_its_replacement(teacher):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objective = softkd.build_objective("soft-target", teacher=teacher, temperature=2.0)
    assert objective.params.temperature == 2.0 and objective.teacher is not None
    assert any("build_method" in str(w.message) for w in caught)


def test_ls_methods_shows_parameters_needs_and_aliases():
    result = runner.invoke(app, ["ls", "methods"])
    assert result.exit_code == 0, result.output
    for text in ("dkd  (alias: decoupled-kd)", "needs: teacher logits", "several teachers", "warmup",
                 "default 8.0", "kd_scale", "standardize"):
        assert text in result.output
    assert "supervised" not in result.output


TINY = {"data": {"name": "digits", "labeled_fraction": 1.0}, "teacher": {"model": "mlp-16", "epochs": 2},
        "student": {"model": "mlp-8"}, "train": {"epochs": 2, "seeds": [0], "batch_size": 128}}


def test_softkd_run_trains_the_configured_method_and_reports_its_formula(tmp_path):
    config = dict(TINY, method={"name": "dkd", "beta": 4.0})
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    result = runner.invoke(app, ["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    distilled = [r for r in records if r["stage"] == "distilled" and r.get("kind") != "step"]
    assert distilled and all("train_nckd" in r and "train_kd" not in r for r in distilled)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["schema_version"] == 4 and report["method"]["name"] == "dkd" and report["method"]["beta"] == 4.0
    assert "loss = 1·ce + 1·tckd + 4·nckd (T=4, warm-up 1 epoch)" in (tmp_path / "out" / "report.md").read_text()


def test_a_changed_method_retrains_only_the_distilled_students(tmp_path):
    out = tmp_path / "out"
    run_experiment(config_from_dict(TINY), out_dir=out)
    stamps = {p.name: p.read_text() for p in (out / "students").glob("*.json")}
    run_experiment(config_from_dict(dict(TINY, method={"name": "soft-target", "temperature": 2.0})), out_dir=out)
    again = {p.name: p.read_text() for p in (out / "students").glob("*.json")}
    assert again["scratch-labels1-seed0.json"] == stamps["scratch-labels1-seed0.json"]
    assert again["distilled-labels1-seed0.json"] != stamps["distilled-labels1-seed0.json"]


def test_a_stage_stamped_by_softkd_01_is_retrained_saying_why(tmp_path, capsys):
    out = tmp_path / "out"
    run_experiment(config_from_dict(TINY), out_dir=out)
    stamp = out / "students" / "distilled-labels1-seed0.json"
    old = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({"key": "written-by-0.1", "result": old["result"]}))
    run_experiment(config_from_dict(TINY), out_dir=out)
    assert "distilled-labels1-seed0: written by softkd 0.1 with the old method settings; training it again." in \
        capsys.readouterr().err
    assert json.loads(stamp.read_text())["format"] == 2


def test_a_run_with_several_teachers_reports_each_and_their_ensemble(tmp_path):
    from softkd.pipeline import train_teacher

    checkpoints = []
    for i, model in enumerate(("mlp-16", "mlp-32")):
        cfg = config_from_dict(dict(TINY, teacher={"model": model, "epochs": 16}))  # well above chance (0.1)
        train_teacher(cfg, out_dir=tmp_path / f"t{i}")
        checkpoints.append(str(tmp_path / f"t{i}" / "teacher.safetensors"))
    no_teacher = {k: v for k, v in TINY.items() if k != "teacher"}
    config = config_from_dict(dict(no_teacher, teachers=[{"model": "mlp-16", "checkpoint": checkpoints[0]},
                                                   {"model": "mlp-32", "checkpoint": checkpoints[1],
                                                    "cache_dir": str(tmp_path / "cache-t1")}],
                                   method={"name": "multi-teacher"}))
    report = run_experiment(config, out_dir=tmp_path / "out")
    assert [t["model"] for t in report["teachers"]] == ["mlp-16", "mlp-32"]
    assert report["teacher"]["model"] == "ensemble of 2 (mlp-16, mlp-32)"
    assert all(t["accuracy"] > 0.5 for t in report["teachers"]) and report["teacher"]["accuracy"] > 0.5
    assert (tmp_path / "out" / "cache" / "teacher0" / "manifest.json").is_file()
    assert (tmp_path / "cache-t1" / "manifest.json").is_file()
    assert "Teachers' own test accuracy: mlp-16" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ConfigError, match="teachers\\[0\\] has no checkpoint"):
        run_experiment(config_from_dict(dict(no_teacher, teachers=[{"model": "mlp-16"}, {"model": "mlp-32"}],
                                             method={"name": "multi-teacher"})), out_dir=tmp_path / "x")


def test_a_registered_method_is_found_by_name():
    try:
        register_method(_LearnedBias)
        assert method_class("test-learned-bias") is _LearnedBias
        assert config_from_dict({"method": {"name": "test-learned-bias", "beta": 0.2}}).method.beta == 0.2
    finally:
        METHODS._exact.pop("test-learned-bias", None)
