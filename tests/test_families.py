"""The write-up's other two families on the method seam: feature transfer (taps, adapters, hint and
attention-transfer losses) and twin networks (deep mutual learning), from Python and the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import softkd
from softkd.config import config_from_dict
from softkd.data.datasets import digits
from softkd.errors import ConfigError
from softkd.losses.features import Adapter, attention_loss, attention_map, hint_loss
from softkd.losses.mutual import mutual_objective
from softkd.methods import build_method
from softkd.models import build_model
from softkd.models.taps import find_module, layer_table, tapped
from softkd.models.weights import save_weights
from softkd.cli import app
from softkd.pipeline import run_experiment, train_teacher

SHAPE = (1, 8, 8)


@pytest.fixture
def cli():
    from typer.testing import CliRunner

    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# --- taps ------------------------------------------------------------------------------------------


def test_a_tap_captures_a_named_module_and_leaves_no_hook_behind():
    model = build_model("resnet-16", input_shape=SHAPE, num_classes=10)
    x = randn(3, *SHAPE, seed=0, dtype=torch.float32)
    with tapped(model, ["stages.1", "stem"]) as features:
        model(x)
    assert features[0].shape == (3, 32, 4, 4) and features[1].shape == (3, 16, 8, 8)
    assert all(not m._forward_hooks for m in model.modules())


def test_a_wrong_module_path_names_the_closest_ones():
    model = build_model("resnet-16", input_shape=SHAPE, num_classes=10)
    with pytest.raises(ConfigError, match=r"no module 'stage.1'; closest: .*stages\.1") as info:
        find_module(model, "stage.1", role="teacher")
    assert "\n" not in str(info.value)


def test_layer_table_lists_every_path_with_its_output_shape():
    rows = {path: shape for path, _, shape in layer_table(build_model("tinycnn-16", input_shape=(1, 28, 28),
                                                                      num_classes=10), torch.zeros(2, 1, 28, 28))}
    assert rows["4"] == (16, 14, 14) and rows["8"] == (32, 7, 7) and rows["10"] == (10,)


def test_softkd_ls_layers_prints_paths_and_shapes(cli):
    result = cli("ls", "layers", "resnet-64")
    assert result.exit_code == 0
    assert any(line.split()[:3] == ["stages.1", "BasicBlock", "128×14×14"] for line in result.output.splitlines())
    bad = cli("ls", "layers", "resnet-64", "--input-shape", "a,b")
    assert bad.exit_code == 2 and "--input-shape" in bad.output


# --- adapters and feature losses --------------------------------------------------------------------


@pytest.mark.parametrize("student, teacher, first", [
    ((16, 14, 14), (128, 14, 14), nn.Conv2d),   # same size: 1×1 conv + batch norm
    ((16, 28, 28), (64, 7, 7), nn.Conv2d),      # 4× larger: strided conv
    ((8, 5, 5), (32, 7, 7), nn.Conv2d),         # other sizes: 1×1 conv, then interpolation
    ((32, 7, 7), (256,), nn.Flatten),           # flat teacher feature: linear
])
def test_an_adapter_maps_the_student_feature_to_the_teachers_shape(student, teacher, first):
    adapter = Adapter(student, teacher)
    assert isinstance(adapter[0], first)
    assert adapter(torch.randn(2, *student)).shape == (2, *teacher)


def test_an_adapter_refuses_a_map_for_a_flat_student():
    with pytest.raises(ConfigError, match="No adapter"):
        Adapter((64,), (32, 7, 7))


def test_hint_loss_is_the_mean_squared_difference_per_sample():
    s, t = randn(4, 3, 5, 5, seed=1), randn(4, 3, 5, 5, seed=2)
    expected = np.mean([np.mean((s[i].numpy() - t[i].numpy()) ** 2) for i in range(4)])
    assert float(hint_loss(s, t)) == pytest.approx(expected, rel=1e-12)
    assert float(hint_loss(s, t, count=8)) == pytest.approx(expected / 2, rel=1e-12)  # the true sample count


def test_attention_loss_against_the_authors_formula_written_out():
    s, t = randn(4, 3, 6, 6, seed=3), randn(4, 7, 6, 6, seed=4)

    def at(f):  # Zagoruyko & Komodakis's code: F.normalize(x.pow(2).mean(1).view(B, -1))
        q = (f.numpy() ** 2).mean(1).reshape(f.shape[0], -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    assert float(attention_loss(s, t)) == pytest.approx(((at(s) - at(t)) ** 2).mean(), rel=1e-10)


def test_attention_maps_ignore_the_scale_of_a_feature_and_resize_to_the_teacher():
    f = randn(2, 4, 8, 8, seed=5)
    torch.testing.assert_close(attention_map(3.0 * f), attention_map(f))
    assert float(attention_loss(2.5 * f, f)) == pytest.approx(0.0, abs=1e-12)
    assert attention_map(f, size=(4, 4)).shape == (2, 16)
    assert float(attention_loss(randn(2, 4, 8, 8, seed=6), randn(2, 4, 4, 4, seed=7))) > 0


# --- mutual learning's loss -------------------------------------------------------------------------


def test_mutual_objective_against_the_formula_written_out():
    peers = [randn(6, 5, seed=i) for i in range(3)]
    y = torch.tensor([0, 1, 2, -1, 4, -1])
    T = 2.0
    out = mutual_objective(peers, y, temperature=T)

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    total = 0.0
    for i, own in enumerate(peers):
        lp = log_softmax(own.numpy())
        labeled = (y >= 0).numpy()
        ce = -lp[labeled, y.numpy()[labeled]].mean()
        kls = []
        for j, other in enumerate(peers):
            if j != i:
                lq, lpi = log_softmax(other.numpy() / T), log_softmax(own.numpy() / T)
                kls.append(T * T * (np.exp(lq) * (lq - lpi)).sum(1).mean())
        kl = np.mean(kls)
        assert float(out[f"ce_peer{i}"]) == pytest.approx(ce, rel=1e-10)
        assert float(out[f"kl_peer{i}"]) == pytest.approx(kl, rel=1e-10)
        total += ce + kl
    assert float(out["loss"]) == pytest.approx(total, rel=1e-10)


def test_each_peer_gets_only_its_own_losss_gradient():
    a, b = randn(6, 5, seed=8).requires_grad_(), randn(6, 5, seed=9).requires_grad_()
    y = torch.tensor([0, 1, 2, -1, 4, 3])
    mutual_objective([a, b], y, temperature=2.0)["loss"].backward()
    for own, other, grad in ((a, b, a.grad), (b, a, b.grad)):
        alone = own.detach().clone().requires_grad_()
        ce = torch.nn.functional.cross_entropy(alone[y >= 0], y[y >= 0])
        (ce + softkd.soft_target_kl(alone, other.detach(), temperature=2.0)).backward()
        torch.testing.assert_close(grad, alone.grad)


# --- the methods through fit and distill ------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return digits(val_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(0)
    model = build_model("tinycnn-16", input_shape=SHAPE, num_classes=10)
    softkd.fit(model, data.train, epochs=2, lr=5e-3)
    return model


def _student(seed=1, name="tinycnn-8"):
    torch.manual_seed(seed)
    return build_model(name, input_shape=SHAPE, num_classes=10)


def test_feature_transfer_trains_its_adapters_and_keeps_them_out_of_the_students_weights(data, teacher, tmp_path):
    student = _student()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = softkd.distill(student, teacher, data.train, method="feature", student_layers=["4"],
                            teacher_layers=["4"], hint=1.0, attention=100.0, val_data=data.val, epochs=3, batch_size=64, lr=5e-3,
                            checkpoint_dir=tmp_path / "ckpt")
    last = result.history[-1]
    assert last["train_hint"] > 0 and last["train_attention"] > 0 and last["val_accuracy"] > 0.3
    # the adapters are in the checkpoint, the teacher is not; the student's weights file holds the student only
    saved = torch.load(sorted((tmp_path / "ckpt").glob("*.pt"))[-1], weights_only=True)
    assert {k.split(".")[0] for k in saved["method_parts"]} == {"0"} and saved["method_parts"]["0.0.weight"].shape == (
        16, 8, 1, 1)
    assert not any("teacher" in k for k in saved["model"])
    save_weights(result.model, tmp_path / "student.safetensors")
    assert set(load_file(tmp_path / "student.safetensors")) == set(student.state_dict())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # frozen
    assert all(not m._forward_hooks for m in [*student.modules(), *teacher.modules()])


def test_feature_adapters_are_trained(data, teacher):
    method = build_method("feature", teachers=[softkd.Teacher(teacher)], student_layers=["4"],
                          teacher_layers=["4"])
    student = _student()
    softkd.fit(student, data.train, objective=method, max_steps=1, epochs=1)  # builds the adapters
    initial = {k: v.clone() for k, v in method.parts.state_dict().items()}
    softkd.fit(student, data.train, objective=method, max_steps=5, epochs=1)
    assert not torch.equal(initial["0.0.weight"], method.parts.state_dict()["0.0.weight"])


def test_a_bad_layer_path_fails_before_anything_is_written(tmp_path, teacher):
    save_weights(teacher, tmp_path / "teacher.safetensors")
    config = config_from_dict({
        "data": {"name": "digits"}, "student": {"model": "tinycnn-8"},
        "teacher": {"model": "tinycnn-16", "checkpoint": str(tmp_path / "teacher.safetensors")},
        "method": {"name": "afw-tt", "student_layers": ["4"], "teacher_layers": ["stage.1"]},
        "train": {"epochs": 1}})
    with pytest.raises(ConfigError, match="The teacher has no module 'stage.1'"):
        run_experiment(config, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_feature_parameters_are_checked():
    with pytest.raises(ConfigError, match="pair up one to one"):
        build_method("feature", student_layers=["4"], teacher_layers=["4", "8"])
    with pytest.raises(ConfigError, match="both 0"):
        build_method("feature", student_layers=["4"], teacher_layers=["4"], hint=0.0)


def test_mutual_learning_trains_every_peer_and_reports_each(data):
    result = softkd.distill(_student(), None, data.train, method="mutual", peer_models=["mlp-32"],
                            val_data=data.val, epochs=3, lr=5e-3, batch_size=64)
    assert list(result.students) == ["peer0", "peer1"] and result.students["peer0"] is result.model
    assert isinstance(result.students["peer1"][-1], nn.Linear)  # mlp-32
    last = result.history[-1]
    assert last["val_peer0_accuracy"] > 0.3 and last["val_peer1_accuracy"] > 0.3
    assert last["val_accuracy"] == pytest.approx((last["val_peer0_accuracy"] + last["val_peer1_accuracy"]) / 2)
    assert {"train_ce_peer1", "train_kl_peer0"} <= set(last)


def test_a_peers_scratch_twin_starts_from_the_peers_own_weights():
    method = build_method("mutual", peers=3)
    twins = method.build_students(_student(seed=4), seed=4, input_shape=SHAPE, num_classes=10)
    first = _student(seed=4)
    method.setup(first, {"x": torch.zeros(2, *SHAPE)}, seed=4)
    cohort = method.students(first)
    assert list(cohort) == ["peer0", "peer1", "peer2"]
    for name in cohort:
        for key, value in twins[name].state_dict().items():
            assert torch.equal(value, cohort[name].state_dict()[key]), (name, key)
    assert not torch.equal(cohort["peer0"][1].weight, cohort["peer1"][1].weight)  # peers start apart


def test_a_mutual_cohort_resumes_exactly(data, tmp_path):
    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 9:  # one step after the checkpoint at step 8
            raise Killed

    def run(folder, resume=False, on_step=None):
        return softkd.distill(_student(), None, data.train, method="mutual", val_data=data.val, epochs=2, lr=5e-3,
                              batch_size=128, checkpoint_dir=folder, checkpoint_every=4, resume=resume,
                              on_step=on_step)

    whole = run(tmp_path / "whole")
    with pytest.raises(Killed):
        run(tmp_path / "cut", on_step=kill_at)
    resumed = run(tmp_path / "cut", resume=True)
    for name in whole.students:
        for key, value in whole.students[name].state_dict().items():
            assert torch.equal(value, resumed.students[name].state_dict()[key]), (name, key)


def test_mutual_gradient_accumulation_equals_the_whole_batch(data):
    results = []
    for accumulate in (1, 4):
        torch.manual_seed(0)
        student = build_model("mlp-32", input_shape=SHAPE, num_classes=10)  # no batch norm: exact
        y = data.train.y.clone()
        y[::3] = -1  # unlabeled samples are taught by the peers only
        result = softkd.distill(student, None, softkd.ArrayDataset(data.train.x, y), method="mutual", max_steps=4,
                                batch_size=128, accumulate=accumulate, optimizer="sgd", lr=0.1, momentum=0.0)
        results.append(result.students)
    for name in results[0]:
        for key, value in results[0][name].state_dict().items():
            torch.testing.assert_close(results[1][name].state_dict()[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["mutual", "feature"])
def test_the_families_train_in_bf16(data, teacher, method):
    kwargs = {"student_layers": ["4"], "teacher_layers": ["4"]} if method == "feature" else {}
    result = softkd.distill(_student(), teacher if method == "feature" else None, data.train, method=method,
                            precision="bf16", max_steps=3, epochs=1, **kwargs)
    assert all(math.isfinite(v) for k, v in result.history[-1].items() if k.startswith("train_"))


# --- mutual learning through the config and the CLI -------------------------------------------------


def test_a_mutual_config_has_no_teacher_and_refuses_one():
    config = config_from_dict({"method": {"name": "tnd"}})
    assert config.teacher is None and config.teacher_list == []
    assert config_from_dict({"method": {"name": "mutual"}, "teacher": None}).teacher is None
    with pytest.raises(ConfigError, match="trains without a teacher"):
        config_from_dict({"method": {"name": "mutual"}, "teacher": {"model": "mlp-64"}})
    with pytest.raises(ConfigError, match="needs a teacher"):
        config_from_dict({"method": {"name": "soft-target"}, "teacher": None})
    with pytest.raises(ConfigError, match="peer_models lists the other 2"):
        config_from_dict({"method": {"name": "mutual", "peers": 3, "peer_models": ["mlp-8"]}})


def test_softkd_teacher_on_a_config_without_one_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no teacher to train"):
        train_teacher(config_from_dict({"method": {"name": "mutual"}}), out_dir=tmp_path / "run")


def test_softkd_run_mutual_without_a_teacher_reports_every_peer_against_its_scratch_twin(cli, tmp_path):
    (tmp_path / "mutual.yaml").write_text(
        "data: {name: digits, labeled_fraction: [1.0, 0.2]}\nteacher: null\nstudent: {model: mlp-16}\n"
        "method: {name: mutual, peer_models: [tinycnn-8]}\ntrain: {epochs: 2, seeds: [0, 1], lr: 5.0e-3}\n")
    result = cli("run", str(tmp_path / "mutual.yaml"), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "teacher" not in report and list(report["students"]) == ["peer0", "peer1"]
    assert report["students"]["peer1"]["model"] == "tinycnn-8"
    for entry in report["students"].values():
        for regime in entry["regimes"].values():
            assert "gap_recovered" not in regime and "teacher" not in regime and "agreement" not in regime
            assert len(regime["scratch"]["accuracy"]["runs"]) == len(regime["distilled"]["accuracy"]["runs"]) == 2
    names = {p.stem for p in (tmp_path / "run" / "students").glob("*.safetensors")}
    for kind in ("scratch", "distilled"):
        for peer in ("peer0", "peer1"):
            assert {f"{kind}-{peer}-labels1-seed0", f"{kind}-{peer}-labels0.2-seed1"} <= names
    assert len(names) == 16
    assert "No teacher, method `mutual`" in (tmp_path / "run" / "report.md").read_text()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().count("\n")
    again = cli("run", str(tmp_path / "mutual.yaml"), "--out", str(tmp_path / "run"))  # every stage is up to date
    assert again.exit_code == 0 and (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == lines
    stamps = json.loads((tmp_path / "run" / "students" / "distilled-peer1-labels1-seed0.json").read_text())
    assert stamps["result"]["student"] == "peer1" and stamps["result"]["model"] == "tinycnn-8"


def test_softkd_ls_methods_lists_the_two_families(cli):
    out = cli("ls", "methods").output
    for name in ("feature  (alias: afw-tt", "mutual  (alias: tnd", "student_layers", "peer_models"):
        assert name in out


@pytest.mark.parametrize("recipe, overrides", [
    ("feature-tinycnn8_from_tinycnn32-digits.yaml", []),
    ("feature-tinycnn8_from_tinycnn32-digits.yaml", ["method.hint=0", "method.attention=1000"]),
    ("mutual-tinycnn8+mlp16-digits.yaml", []),
])
def test_the_digits_recipes_of_both_families_run_end_to_end(tmp_path, recipe, overrides):
    from pathlib import Path

    from softkd.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / recipe
    config = load_config(path, ["teacher.epochs=3" if "feature" in recipe else "train.epochs=2", "train.epochs=2",
                                "train.seeds=[0]", *overrides])
    report = run_experiment(config, out_dir=tmp_path / "run")
    assert report["students"]
    for entry in report["students"].values():
        assert entry["regimes"]
        for regime in entry["regimes"].values():
            assert regime["distilled"]["accuracy"]["mean"] > 0.3, regime["distilled"]["accuracy"]  # chance is 0.1
    assert ("teacher" in report) == ("feature" in recipe)


# --- the feature cache ---------------------------------------------------------------------------


def test_cached_features_teach_like_the_live_teacher_and_the_teacher_does_not_run(data, teacher):
    from softkd.cache.features import FeatureTap

    with torch.no_grad():
        teacher.eval()
        logits, features = teacher(data.train.x), FeatureTap(teacher, "4")(data.train.x)
    calls = []
    handle = teacher.register_forward_hook(lambda module, inputs, out: calls.append(len(inputs[0])))
    common = dict(method="feature", student_layers=["4"], teacher_layers=["4"], attention=10.0, max_steps=6,
                  epochs=1, batch_size=64)
    try:
        cached = softkd.distill(_student(), teacher, data.train, teacher_logits=logits, teacher_features=[features],
                                **common).model
        assert calls and max(calls) <= 2  # probes of shapes and classes only, never a training batch of 64
        live = softkd.distill(_student(), teacher, data.train, **common).model
    finally:
        handle.remove()
    for key, value in live.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_cached_features_are_refused_where_they_would_teach_the_wrong_thing(data, teacher):
    features = torch.zeros(len(data.train), 128)
    with pytest.raises(ConfigError, match="teacher_features"):
        softkd.distill(_student(), teacher, data.train, method="soft-target", teacher_features=[features])
    with pytest.raises(ConfigError, match=r"teacher_features\[0\] must have shape"):
        softkd.distill(_student(), teacher, data.train, method="feature", student_layers=["4"],
                       teacher_layers=["4"], teacher_logits=torch.zeros(len(data.train), 10),
                       teacher_features=[features[:10]])


def test_softkd_run_builds_a_feature_cache_once_and_reuses_it(tmp_path):
    from pathlib import Path

    from softkd.cache import SoftLabelCache
    from softkd.config import load_config

    recipe = Path(__file__).resolve().parents[1] / "configs" / "feature-tinycnn8_from_tinycnn32-digits.yaml"
    config = load_config(recipe, ["teacher.epochs=2", "train.epochs=1", "train.seeds=[0]",
                                  "data.labeled_fraction=1.0"])
    run_experiment(config, out_dir=tmp_path / "run")
    folder = tmp_path / "run" / "cache" / "features" / "4"
    cache = SoftLabelCache.open(folder)
    cache.verify()
    assert cache.fingerprint["preprocessing"] == {"features_of": "4", "shape": [32, 4, 4]}
    assert cache.rows().shape == (cache.num_samples, 512) and cache.rows().dtype == torch.float16
    built = (folder / "manifest.json").stat().st_mtime_ns
    config = load_config(recipe, ["teacher.epochs=2", "train.epochs=1", "train.seeds=[1]",
                                  "data.labeled_fraction=1.0"])
    run_experiment(config, out_dir=tmp_path / "run")  # another seed: the same cache
    assert (folder / "manifest.json").stat().st_mtime_ns == built


def test_softkd_cache_build_also_builds_a_feature_methods_feature_cache(cli, tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "configs" / "feature-tinycnn8_from_tinycnn32-digits.yaml"
    result = cli("cache", "build", recipe, "--set", "teacher.epochs=1", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "cache" / "manifest.json").is_file()
    assert (tmp_path / "run" / "cache" / "features" / "4" / "manifest.json").is_file()
    mutual = Path(__file__).resolve().parents[1] / "configs" / "mutual-tinycnn8+mlp16-digits.yaml"
    refused = cli("cache", "build", mutual, "--out", tmp_path / "mutual")
    assert refused.exit_code == 2 and "without a teacher" in refused.output and not (tmp_path / "mutual").exists()
