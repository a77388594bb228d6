"""The training engine on a CUDA GPU: precisions, fused optimizer, no host–device waits per step,
the deferred NaN guard. Skipped where torch sees no GPU (CI); run on a GPU machine with
``pytest tests/test_gpu.py``."""

import math
import warnings

import pytest
import torch
from torch import nn

import softkd
from softkd.errors import TrainingError
from softkd.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _on_gpu(data: softkd.ArrayDataset) -> softkd.ArrayDataset:
    return softkd.ArrayDataset(data.x.cuda(), data.y.cuda(), ids=data.ids.cuda(), num_classes=data.num_classes,
                               name=data.name)


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp-32", input_shape=(1, 8, 8), num_classes=10).cuda()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trains_on_the_gpu_in_every_precision(digit_splits, precision, optimizer):
    model = _student()
    result = softkd.fit(model, _on_gpu(digit_splits.train), epochs=4, batch_size=64, precision=precision,
                        optimizer=optimizer, lr=3e-3 if optimizer == "adamw" else 0.05)
    losses = [r["train_loss"] for r in result.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0]
    assert softkd.evaluate(model, softkd.build_loader(digit_splits.test, batch_size=512))["accuracy"] > 0.85


def test_adamw_is_fused_on_the_gpu():
    from softkd.train.optim import build_optimizer

    assert build_optimizer(list(_student().parameters())).defaults["fused"] is True


def _waits(fn) -> list[str]:
    """What PyTorch's sync debug mode reports while ``fn`` runs: every point where the host waits
    for the GPU (a blocking copy, reading a value, indexing with a CPU index)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]


def test_training_steps_never_wait_for_the_gpu(digit_splits):
    # Setup and an epoch's end may wait; the steps must not: twice the steps, the same waits.
    one = _on_gpu(digit_splits.train)
    two = softkd.ArrayDataset(torch.cat([one.x, one.x]), torch.cat([one.y, one.y]), num_classes=10).to("cuda")
    run = dict(epochs=1, batch_size=32, temperature=4.0, beta=0.9)
    softkd.distill(_student(), None, one, teacher_logits=torch.randn(len(one), 10, device="cuda"), **run)  # warm-up
    waits = [_waits(lambda: softkd.distill(_student(), None, data, **run,
                                           teacher_logits=torch.randn(len(data), 10, device="cuda")))
             for data in (one, two)]
    assert len(waits[1]) == len(waits[0]), (len(one), len(two), waits)


def test_run_keeps_small_datasets_on_the_gpu(tmp_path):
    from softkd.config import RunConfig
    from softkd.pipeline import run_experiment
    from softkd.train.runtime import resident

    data = softkd.ArrayDataset(torch.randn(100, 4), torch.zeros(100, dtype=torch.long), num_classes=2)
    moved, logits, nothing = resident(torch.device("cuda", 0), data, torch.randn(100, 2), None)
    assert moved.x.is_cuda and moved.y.is_cuda and moved.ids.is_cuda and logits.is_cuda and nothing is None
    # The same run on the CPU and on the GPU learns the same: accuracies within 3 points (≈ 11 of
    # the 359 test digits; the two devices round differently, so they are not bit-identical).
    reports = {}
    for device in ("cpu", "cuda"):
        config = {"data": {"name": "digits", "labeled_fraction": 1.0}, "teacher": {"model": "mlp-64", "epochs": 15},
                  "student": {"model": "mlp-16"}, "train": {"epochs": 15, "seeds": [0], "batch_size": 64,
                                                             "device": device}}
        reports[device] = run_experiment(RunConfig.model_validate(config), out_dir=tmp_path / device)
    assert reports["cuda"]["hardware"]["device"].startswith("cuda:0 (")
    assert reports["cpu"]["hardware"]["device"].startswith("cpu (")
    for kind in ("scratch", "distilled"):
        accuracy = {d: r["students"]["mlp-16"]["regimes"]["100% labels"][kind]["accuracy"]["mean"]
                    for d, r in reports.items()}
        assert abs(accuracy["cuda"] - accuracy["cpu"]) <= 0.03 and accuracy["cuda"] > 0.85, (kind, accuracy)

def test_deferred_nan_guard_names_the_step_and_keeps_only_good_checkpoints(tmp_path, digit_splits, poisoned_at_step5):
    with pytest.raises(TrainingError, match=r"non-finite at step 5 \(term\(s\): ce\).*last good checkpoint"):
        softkd.fit(poisoned_at_step5().cuda(), _on_gpu(digit_splits.train), epochs=2, batch_size=64,
                   checkpoint_dir=tmp_path, checkpoint_every=3)
    saved = sorted(p.name for p in tmp_path.glob("ckpt-*.pt"))
    assert saved == ["ckpt-00000003.pt"]
    state = torch.load(tmp_path / saved[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# ----------------------------------------------------------------------------------------------
# Steps replayed from CUDA graphs (softkd.train.graphs)
# ----------------------------------------------------------------------------------------------

def _as_eager_runs_it(monkeypatch):
    """The loss uncompiled inside the graph too: a replay then runs exactly the eager step's kernels."""
    monkeypatch.setattr("softkd.methods.base.fused", lambda fn: fn)


def _assert_same_weights(a: nn.Module, b: nn.Module, **tolerance):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, msg=lambda m: f"{name}: {m}", **tolerance)


def _replayed(result, data, batch_size: int) -> int:
    """Steps a graph should have replayed: all but the warm-up and each epoch's short last batch."""
    from softkd.train.graphs import WARMUP_STEPS

    return result.steps - WARMUP_STEPS - result.epochs * (len(data) % batch_size != 0)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_graphed_steps_replay_what_eager_steps_do(digit_splits, monkeypatch, optimizer):
    # A cosine schedule (the learning rate changes every replay), clipping, validation between
    # epochs (eval mode between replays), and each epoch's short last batch run eagerly.
    _as_eager_runs_it(monkeypatch)
    data, val = _on_gpu(digit_splits.train), _on_gpu(digit_splits.val)
    run = dict(epochs=3, batch_size=64, optimizer=optimizer, lr=3e-3 if optimizer == "adamw" else 0.05,
               lr_schedule="cosine", clip_grad_norm=1.0, val_data=val)
    eager, graphed = _student(), _student()
    a = softkd.fit(eager, data, cuda_graphs=False, **run)
    b = softkd.fit(graphed, data, **run)
    assert a.graphed_steps == 0 and b.graphed_steps == _replayed(b, data, 64) > 0
    _assert_same_weights(eager, graphed, rtol=1e-4, atol=1e-5)
    for x, y in zip(a.history, b.history):
        assert x["val_accuracy"] == y["val_accuracy"] and math.isclose(x["train_loss"], y["train_loss"], rel_tol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_distillation_with_the_fused_loss_learns_what_eager_steps_learn(digit_splits, trained_teacher,
                                                                                 precision):
    data = _on_gpu(digit_splits.train)
    logits = trained_teacher(digit_splits.train.x).detach().cuda()
    run = dict(epochs=6, batch_size=64, precision=precision, temperature=4.0, beta=0.9)
    eager, graphed = _student(), _student()
    a = softkd.distill(eager, None, data, teacher_logits=logits, cuda_graphs=False, **run)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the loss compiled: no fallback
        b = softkd.distill(graphed, None, data, teacher_logits=logits, **run)
    assert b.graphed_steps == _replayed(b, data, 64)
    tolerance = 1e-3 if precision == "fp32" else 3e-2
    for x, y in zip(a.history, b.history):
        for key in ("train_loss", "train_ce", "train_kd"):
            assert math.isclose(x[key], y[key], rel_tol=tolerance), (key, x[key], y[key])
    test = softkd.build_loader(digit_splits.test, batch_size=512)
    accuracy = [softkd.evaluate(m, test)["accuracy"] for m in (eager, graphed)]
    assert abs(accuracy[0] - accuracy[1]) <= 0.02 and accuracy[1] > 0.8, accuracy  # the CPU: 0.847


def test_an_online_teacher_and_augmented_views_replay_too(digit_splits, trained_teacher, monkeypatch):
    # The teacher runs inside the graph; augmentation happens before it, its views copied in.
    from softkd.data.augment import ShiftFlip

    _as_eager_runs_it(monkeypatch)
    data, teacher = _on_gpu(digit_splits.train), trained_teacher.cuda()
    run = dict(epochs=2, batch_size=64, temperature=4.0, beta=0.9, augment=ShiftFlip(shift=1, seed=3))
    eager, graphed = _student(), _student()
    softkd.distill(eager, teacher, data, cuda_graphs=False, **run)
    result = softkd.distill(graphed, teacher, data, **run)
    assert result.graphed_steps == _replayed(result, data, 64)
    _assert_same_weights(eager, graphed, rtol=1e-4, atol=1e-5)


def test_a_graphed_run_resumes_from_its_checkpoint(tmp_path, digit_splits, monkeypatch):
    _as_eager_runs_it(monkeypatch)
    data = _on_gpu(digit_splits.train)
    run = dict(epochs=2, batch_size=64, lr_schedule="cosine", checkpoint_every=5)
    whole = _student()
    softkd.fit(whole, data, checkpoint_dir=tmp_path / "whole", **run)

    class Stop(Exception):
        pass

    def stop_at_13(step):
        if step == 13:
            raise Stop

    with pytest.raises(Stop):
        softkd.fit(_student(), data, checkpoint_dir=tmp_path / "cut", on_step=stop_at_13, **run)
    resumed = _student()
    result = softkd.fit(resumed, data, checkpoint_dir=tmp_path / "cut", resume=True, **run)
    assert result.graphed_steps > 0
    _assert_same_weights(whole, resumed, rtol=1e-4, atol=1e-5)


class _ReadsOnHost(nn.Module):
    """A user's model whose forward reads a value on the host: a CUDA graph cannot record it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        out = self.net(x)
        return out if out.abs().max().item() < 1e6 else out.clamp(-1e6, 1e6)


def test_a_step_that_cannot_be_recorded_runs_eagerly_after_one_warning(digit_splits, monkeypatch):
    _as_eager_runs_it(monkeypatch)
    data = _on_gpu(digit_splits.train)
    models = []
    for seed in (0, 0, 0):
        torch.manual_seed(seed)
        models.append(_ReadsOnHost().cuda())
    softkd.fit(models[0], data, epochs=2, batch_size=64, cuda_graphs=False)
    with pytest.warns(RuntimeWarning, match="could not record the training step in a CUDA graph"):
        forced = softkd.fit(models[1], data, epochs=2, batch_size=64, cuda_graphs=True)
    assert forced.graphed_steps == 0
    _assert_same_weights(models[0], models[1], rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "auto" does not try a model it does not know
        assert softkd.fit(models[2], data, epochs=1, batch_size=64).graphed_steps == 0


def test_the_nan_guard_stops_a_graphed_run_at_its_step(tmp_path, digit_splits):
    data = _on_gpu(digit_splits.train)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))  # the loader's first epoch
    x = data.x.clone()
    x[order[6 * 64:7 * 64].cuda()] = float("nan")  # step 7's batch: replayed (steps 1-3 warm up, 4 records)
    poisoned = softkd.ArrayDataset(x, data.y, ids=data.ids, num_classes=10)
    with pytest.raises(TrainingError, match=r"non-finite at step 7 .*last good checkpoint"):
        softkd.fit(_student(), poisoned, epochs=2, batch_size=64, checkpoint_dir=tmp_path, checkpoint_every=5)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-00000005.pt"]


def test_deterministic_graphed_runs_repeat_bit_for_bit(digit_splits):
    # train.deterministic on the GPU, with CUDA graphs and the compiled loss: a conv net with batch
    # norm, bf16, two epochs, twice.
    from softkd.train.runtime import deterministic_algorithms

    data, models, results = _on_gpu(digit_splits.train), [], []
    with deterministic_algorithms():
        for _ in range(2):
            torch.manual_seed(0)
            models.append(build_model("tinycnn-4", input_shape=(1, 8, 8), num_classes=10).cuda())
            results.append(softkd.fit(models[-1], data, epochs=2, batch_size=64, precision="bf16"))
    assert results[0].graphed_steps == _replayed(results[0], data, 64)
    assert results[0].history[-1]["graphed_steps"] == results[0].graphed_steps
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name


def test_a_graphed_step_refuses_inputs_of_other_shapes():
    # GraphedStep on its own: inputs unlike the recorded ones are not copied in (a copy could
    # broadcast them silently); the caller runs that step eagerly, and later replays go on.
    from softkd.train.graphs import WARMUP_STEPS, GraphedStep

    def run(graphed: bool) -> list:
        weight = torch.nn.Parameter(torch.ones(4, device="cuda"))
        optimizer = torch.optim.SGD([weight], lr=0.1, fused=True)

        def step(inputs):
            optimizer.zero_grad(set_to_none=True)
            loss = (weight[: inputs["x"].shape[0]] * inputs["x"]).square().sum()
            loss.backward()
            optimizer.step()
            return loss.detach()

        graph, losses = GraphedStep(step, optimizer), []
        for i in range(WARMUP_STEPS + 4):
            x = torch.full((4 if i != WARMUP_STEPS + 2 else 1,), 0.1 * (i + 1), device="cuda")
            out = graph({"x": x}) if graphed else None
            losses.append(float(out if out is not None else step({"x": x})))
        return losses + weight.tolist() + [graph.replays]

    eager, graphed = run(False), run(True)
    assert graphed[-1] == 3 and eager[-1] == 0  # recorded at step 4; step 6 (another shape) ran eagerly
    assert graphed[:-1] == pytest.approx(eager[:-1], rel=1e-6)
