"""CUDA-graph steps, the parts a CPU can check: where steps are recorded, the compiled (fused)
losses, the lazy loader a recorded step gathers from. The recorded steps themselves are tested in
test_gpu.py."""

import warnings

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import softkd
from softkd.config import RunConfig
from softkd.data.loader import IndexBatches
from softkd.errors import ConfigError
from softkd.losses import fused as fused_module
from softkd.losses.logits import kd_objective, supervised_objective
from softkd.methods import SoftTarget
from softkd.methods.supervised import Supervised
from softkd.models import build_model
from softkd.train.graphs import graph_inputs, known_safe

CUDA = torch.device("cuda", 0)  # only a device name here: nothing runs on it


def _fused_optimizer(model):
    return torch.optim.AdamW(model.parameters(), fused=True)  # fused kernels exist on the CPU too


class _UserNet(nn.Module):  # not softkd's: auto mode cannot know what its forward does
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("change, expected", [
    ({}, ("x", "y")),
    ({"device": torch.device("cpu")}, None),
    ({"processes": 2}, None),
    ({"accumulate": 2}, None),
    ({"precision": "fp16"}, None),
    ({"precision": "bf16"}, ("x", "y")),
    ({"mode": False}, None),
    ({"model": _UserNet()}, None),
    ({"model": _UserNet(), "mode": True}, ("x", "y")),
    ({"optimizer": "unfused"}, None),
    ({"objective": SoftTarget()}, ("x", "y", "teacher_logits", "soft_targets")),
    ({"objective": SoftTarget(teacher=_UserNet())}, None),
    ({"objective": SoftTarget(teacher=build_model("mlp-16", input_shape=(64,), num_classes=10))},
     ("x", "y", "teacher_logits", "soft_targets")),
])
def test_steps_are_recorded_only_where_it_is_known_to_be_safe(change, expected):
    model = change.pop("model", build_model("tinycnn-4", input_shape=(1, 8, 8), num_classes=10))
    optimizer = change.pop("optimizer", None)
    optimizer = torch.optim.AdamW(model.parameters()) if optimizer == "unfused" else _fused_optimizer(model)
    settings = dict(mode="auto", device=CUDA, processes=1, accumulate=1, precision="fp32", optimizer=optimizer)
    objective = change.pop("objective", Supervised())
    assert graph_inputs(objective, model, **{**settings, **change}) == expected


def test_an_unknown_cuda_graphs_setting_is_refused(digit_splits):
    with pytest.raises(ConfigError, match=r"The 'cuda_graphs' of train must be \"auto\", true or false; got 'yes'"):
        softkd.fit(build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10), digit_splits.train, epochs=1,
                   cuda_graphs="yes")


def test_zoo_models_and_torch_layers_are_known_safe():
    for name in ("mlp-16", "hinton-mlp-16", "tinycnn-4", "lenet5", "resnet-8", "resnet8x4", "wrn-16-2"):
        assert known_safe(build_model(name, input_shape=(1, 28, 28), num_classes=10)), name
    assert known_safe(Supervised()) and known_safe(SoftTarget())
    assert not known_safe(nn.Sequential(nn.Flatten(), _UserNet()))

    class MySoftTarget(SoftTarget):  # its forward may do anything: not assumed safe
        def forward(self, model, batch, **counts):
            return super().forward(model, batch, **counts)

    assert not known_safe(MySoftTarget())

    class Declared(_UserNet):
        graph_safe = True

    assert known_safe(Declared())


@pytest.mark.parametrize("objective", ["kd", "supervised"])
def test_fused_losses_equal_the_eager_ones(objective):
    torch.manual_seed(0)
    logits = torch.randn(64, 10, requires_grad=True)
    labels = torch.randint(-1, 10, (64,))  # some unlabeled
    if objective == "kd":
        fn, args, kwargs = kd_objective, (logits, labels, torch.randn(64, 10)), dict(temperature=4.0, beta=0.9)
    else:
        fn, args, kwargs = supervised_objective, (logits, labels), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's compiler's own
        compiled = fused_module.fused(fn)(*args, **kwargs)
    assert fused_module.fused(fn).compiled is not None, "it fell back to the uncompiled loss"
    eager = fn(*args, **kwargs)
    assert compiled.keys() == eager.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-6, atol=1e-7)
    grads = [torch.autograd.grad(out["loss"], logits)[0] for out in (compiled, eager)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_a_loss_that_cannot_compile_runs_uncompiled_after_one_warning(monkeypatch):
    def no_compiler(fn, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("Cannot find a working triton installation\nmore")
        return fail

    monkeypatch.setattr(fused_module.torch, "compile", no_compiler)

    def loss(x):
        return x * 2

    with pytest.warns(RuntimeWarning, match=r"could not compile loss \(RuntimeError: Cannot find a working triton"):
        assert fused_module.fused(loss)(torch.ones(2)).tolist() == [2.0, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert fused_module.fused(loss)(torch.ones(2)).tolist() == [2.0, 2.0]


def test_objectives_run_the_fused_loss_only_while_fusing(monkeypatch):
    calls = []
    monkeypatch.setattr("softkd.methods.base.fused", lambda fn: lambda *a, **k: calls.append(fn) or fn(*a, **k))
    objective, model = Supervised(), nn.Linear(4, 3)
    batch = {"x": torch.randn(8, 4), "y": torch.randint(0, 3, (8,))}
    objective(model, batch)
    assert calls == []
    with objective.fusing():
        objective(model, batch)
    assert calls == [supervised_objective] and not objective._fusing


def test_lazy_batches_gather_what_eager_batches_hold(digit_splits):
    extras = {"teacher_logits": torch.randn(len(digit_splits.train), 10)}
    eager = IndexBatches(digit_splits.train, batch_size=64, shuffle=True, seed=3, extras=extras)
    lazy = IndexBatches(digit_splits.train, batch_size=64, shuffle=True, seed=3, extras=extras)
    lazy.lazy = True
    for _ in range(2):  # two epochs: the generator advances alike
        for full, positions in zip(eager, lazy, strict=True):
            assert positions.keys() == {"index"}
            gathered = lazy.gather(positions["index"])
            assert gathered.keys() == full.keys()
            for key in full:
                assert torch.equal(gathered[key], full[key]), key
            assert lazy.gather(positions["index"], ("x", "teacher_logits", "soft_targets")).keys() == {
                "x", "teacher_logits", "index"}


def test_cuda_graphs_setting_is_validated():
    base = {"data": {"name": "digits"}, "student": {"model": "mlp-16"}}
    for value in ("auto", True, False):
        assert RunConfig.model_validate({**base, "train": {"cuda_graphs": value}}).train.cuda_graphs == value
    with pytest.raises(ValidationError, match="cuda_graphs"):
        RunConfig.model_validate({**base, "train": {"cuda_graphs": "sometimes"}})


def test_on_the_cpu_every_step_runs_eagerly(digit_splits):
    result = softkd.fit(build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10), digit_splits.train,
                        epochs=1, batch_size=64, cuda_graphs=True)
    assert result.graphed_steps == 0 and result.steps == -(-len(digit_splits.train) // 64)
