"""The training engine: accumulation normalisation, schedules, clipping, exact resume."""

import copy
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import softkd
from softkd.errors import ConfigError, TrainingError
from softkd.losses import UNLABELED
from softkd.methods import SoftTarget
from softkd.models import build_model
from softkd.train.optim import build_optimizer, build_scheduler


def _mixed_labels(splits, n=256):
    y = splits.train.y[:n].clone()
    y[torch.arange(n) % 3 == 1] = UNLABELED  # a third unlabeled, unevenly spread over micro-batches
    y[:40] = UNLABELED
    return softkd.ArrayDataset(splits.train.x[:n], y)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_four_accumulated_micro_batches_equal_one_large_batch(digit_splits, trained_teacher, with_teacher):
    data = _mixed_labels(digit_splits)
    torch.manual_seed(0)
    base = build_model("mlp-32", input_shape=(1, 8, 8), num_classes=10)
    weights = {}
    for accumulate in (1, 4):
        model = copy.deepcopy(base)
        objective = SoftTarget(teacher=trained_teacher, temperature=3.0, beta=0.6) if with_teacher else None
        softkd.fit(model, data, objective=objective, batch_size=256, accumulate=accumulate, max_steps=1,
                   optimizer="sgd", lr=0.5, momentum=0.0, weight_decay=0.0)
        weights[accumulate] = model.state_dict()
    moved = max(float((weights[1][k] - base.state_dict()[k]).abs().max()) for k in weights[1])
    assert moved > 1e-3
    for key in weights[1]:
        torch.testing.assert_close(weights[4][key], weights[1][key], rtol=1e-5, atol=1e-6)


def test_batch_size_must_split_into_micro_batches(digit_splits):
    with pytest.raises(ConfigError, match="multiple of 'accumulate'"):
        softkd.fit(build_model("mlp-8", input_shape=(1, 8, 8), num_classes=10), digit_splits.train,
                   batch_size=100, accumulate=3)


def test_schedules_shape_the_learning_rate():
    def lrs(name, total=100, **kw):
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], lr=1.0)
        scheduler = build_scheduler(opt, name, total, **kw)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        return out

    warm = lrs("cosine", warmup_steps=10)
    assert warm[0] == pytest.approx(0.1) and warm[9] == pytest.approx(1.0) and warm[10] == pytest.approx(1.0)
    assert warm[55] == pytest.approx(0.5, abs=0.02) and warm[-1] < 0.01
    step = lrs("step")
    assert step[49] == 1.0 and step[50] == pytest.approx(0.1) and step[75] == pytest.approx(0.01)
    cycle = lrs("onecycle")
    assert max(cycle) == pytest.approx(1.0, abs=1e-3) and cycle.index(max(cycle)) in range(28, 32)
    assert cycle[0] < 0.05 and cycle[-1] < 1e-3
    with pytest.raises(ConfigError, match="warmup_steps"):
        lrs("cosine", warmup_steps=100)


def test_gradient_clipping_bounds_the_update(digit_splits):
    torch.manual_seed(0)
    model = build_model("mlp-32", input_shape=(1, 8, 8), num_classes=10)
    before = copy.deepcopy(model.state_dict())
    softkd.fit(model, digit_splits.train, max_steps=1, batch_size=64, optimizer="sgd", lr=1.0, momentum=0.0,
               weight_decay=0.0, clip_grad_norm=0.01)
    update = torch.sqrt(sum(((model.state_dict()[k] - v) ** 2).sum() for k, v in before.items()))
    assert 0.0099 < float(update) <= 0.0100001  # SGD, lr 1: the update is the clipped gradient


SCRIPT = r"""
import sys, time, torch, softkd
from softkd.data.datasets import digits
from softkd.models import build_model
from softkd.models.weights import save_weights
torch.set_num_threads(1)
out, resume, slow, lr = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3]), float(sys.argv[4])
splits = digits()
torch.manual_seed(0)
model = build_model("hinton-mlp-64", input_shape=(1, 8, 8), num_classes=10)   # dropout: RNG matters
softkd.fit(model, splits.train, val_data=splits.val, epochs=4, batch_size=64, accumulate=2, lr=lr,
           lr_schedule="cosine", checkpoint_dir=out + "/ckpt", checkpoint_every=3, resume=resume,
           on_step=lambda step: time.sleep(slow), log=lambda r: open(out + "/log.jsonl", "a").write(str(r) + "\n"))
save_weights(model, out + "/final.safetensors")
"""


def _run(folder, *, resume=False, slow=0.0, lr=3e-3, wait=True):
    folder.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-c", SCRIPT, str(folder), "1" if resume else "0", str(slow), str(lr)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if wait:
        return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_kill_minus_9_and_resume_gives_the_same_weights_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    clean = _run(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    victim = _run(tmp_path / "killed", slow=0.01, wait=False)
    ckpt = tmp_path / "killed" / "ckpt"
    deadline = time.time() + 120
    while not list(ckpt.glob("ckpt-*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.0))  # a random step after the first checkpoint
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "final.safetensors").exists(), "killed too late: the run had finished"
    resumed = _run(tmp_path / "killed", resume=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "clean" / "final.safetensors")
    b = load_file(tmp_path / "killed" / "final.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert len(list(ckpt.glob("ckpt-*.pt"))) <= 2 and (ckpt / "best.safetensors").is_file()


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, digit_splits):
    model = build_model("mlp-8", input_shape=(1, 8, 8), num_classes=10)
    common = dict(epochs=1, batch_size=64, checkpoint_dir=tmp_path, resume=True)
    softkd.fit(copy.deepcopy(model), digit_splits.train, run_key={"lr": 0.1}, **common)
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.1 -> 0.2\)"):
        softkd.fit(copy.deepcopy(model), digit_splits.train, run_key={"lr": 0.2}, **common)
    with pytest.raises(ConfigError, match=r"batch_size: 64 -> 128"):
        softkd.fit(copy.deepcopy(model), digit_splits.train, run_key={"lr": 0.1}, **dict(common, batch_size=128))


def test_a_resumed_run_counts_the_seconds_it_trained_before_it_stopped(tmp_path, digit_splits):
    # Each step sleeps 50 ms: the 12 steps before the first sitting's last checkpoint took at least
    # 0.6 s. A resumed run reports them (a stage adds them to its train_s); a fresh one reports none.
    class Stop(Exception):
        pass

    def step(stop_at):
        def on_step(n):
            time.sleep(0.05)
            if n == stop_at:
                raise Stop
        return on_step

    model = build_model("mlp-8", input_shape=(1, 8, 8), num_classes=10)
    common = dict(epochs=1, batch_size=64, checkpoint_dir=tmp_path, checkpoint_every=4)
    with pytest.raises(Stop):
        softkd.fit(copy.deepcopy(model), digit_splits.train, resume=True, on_step=step(14), **common)
    saved = torch.load(sorted(tmp_path.glob("ckpt-*.pt"))[-1], weights_only=True)
    assert saved["step"] == 12 and saved["train_s"] >= 12 * 0.05
    resumed = softkd.fit(copy.deepcopy(model), digit_splits.train, resume=True, on_step=step(None), **common)
    assert resumed.resumed_s == saved["train_s"]
    again = softkd.fit(copy.deepcopy(model), digit_splits.train, resume=False, on_step=step(None), **common)
    assert again.resumed_s == 0.0


_FIRST_SITTING = """
import sys, torch, softkd
from softkd.data.datasets import digits
from softkd.models import build_model

def stop(n):
    if n == 6:
        raise SystemExit(3)

torch.manual_seed(0)
model = build_model("mlp-8", input_shape=(1, 8, 8), num_classes=10)
softkd.fit(model, digits(val_fraction=0.1, seed=0).train, epochs=1, batch_size=64, checkpoint_dir=sys.argv[1],
           checkpoint_every=4, resume=True, on_step=stop)
"""


def test_a_run_resumed_on_other_cpu_kernels_records_every_kernel_set_it_trained_on(tmp_path, digit_splits):
    # The first sitting runs torch's portable kernels (ATEN_CPU_CAPABILITY=default, another
    # process), the second this machine's: CPU figures differ in their last bits between kernel
    # sets, so the run says it trained on both. A checkpoint from before they were kept: "not recorded".
    here = torch.backends.cpu.get_cpu_capability()
    if here == "DEFAULT":
        pytest.skip("this machine's CPU has only the portable kernels")
    first = subprocess.run([sys.executable, "-c", _FIRST_SITTING, str(tmp_path)], capture_output=True, text=True,
                           env=dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1"))
    assert first.returncode == 3, first.stderr
    (path,) = sorted(tmp_path.glob("ckpt-*.pt"))
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 4 and saved["cpu_kernels"] == ["DEFAULT"]
    torch.manual_seed(0)
    model = build_model("mlp-8", input_shape=(1, 8, 8), num_classes=10)
    common = dict(epochs=1, batch_size=64, checkpoint_every=4, resume=True)
    resumed = softkd.fit(copy.deepcopy(model), digit_splits.train, checkpoint_dir=tmp_path, **common)
    assert resumed.steps > saved["step"] and resumed.cpu_kernels == sorted(["DEFAULT", here])
    assert softkd.fit(copy.deepcopy(model), digit_splits.train, **common).cpu_kernels == [here]  # no checkpoint

    del saved["cpu_kernels"]  # as written before checkpoints kept them
    (tmp_path / "old").mkdir()
    torch.save(saved, tmp_path / "old" / path.name)
    old = softkd.fit(copy.deepcopy(model), digit_splits.train, checkpoint_dir=tmp_path / "old", **common)
    assert old.cpu_kernels == sorted([here, "not recorded"])


def test_a_gpu_run_records_the_gpu_not_the_host_cpu_kernel_set(monkeypatch):
    # A GPU student's figures do not depend on the host CPU's kernels: stamps and reports name the GPU.
    from softkd.train.runtime import kernel_set

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert kernel_set(torch.device("cuda", 0)) == "CUDA NVIDIA H200"
    assert kernel_set(torch.device("cpu")) == torch.backends.cpu.get_cpu_capability()
    assert kernel_set(torch.device("mps")) == "MPS"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_without_nan_and_matches_fp32(digit_splits, trained_teacher, precision):
    results = {}
    for p in ("fp32", precision):
        torch.manual_seed(0)
        student = build_model("tinycnn-8", input_shape=(1, 8, 8), num_classes=10)
        fit = softkd.distill(student, trained_teacher, digit_splits.train, val_data=digit_splits.val, epochs=6,
                             batch_size=64, lr=3e-3, precision=p)
        assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in fit.history)
        assert all(param.dtype == torch.float32 for param in student.parameters())  # autocast, not .half()
        results[p] = fit.history[-1]["val_accuracy"]
    assert results[precision] > 0.8
    assert abs(results[precision] - results["fp32"]) < 0.05


def test_unknown_precision_is_refused(digit_splits):
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        softkd.fit(build_model("mlp-8", input_shape=(1, 8, 8), num_classes=10), digit_splits.train,
                   precision="fp8")


def test_device_selection(monkeypatch):
    from softkd.train.runtime import select_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)  # a lone process takes the first GPU
    assert select_device("cpu") == torch.device("cpu")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("mps" if mps else "cpu")
    assert select_device("auto") == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda' is not available"):
            select_device("cuda")
    with pytest.raises(ConfigError, match="Unknown device 'tpu'"):
        select_device("tpu")


@pytest.mark.parametrize("deferred", [False, True], ids=["checked-every-step", "deferred-as-on-gpus"])
def test_nan_loss_names_its_step_and_never_reaches_a_checkpoint(tmp_path, digit_splits, monkeypatch, deferred,
                                                                 poisoned_at_step5):
    # Accelerators record the first bad step on the device and raise at the next log record,
    # checkpoint or epoch end; forced here on the CPU to test that path.
    monkeypatch.setattr("softkd.train.loss_guard.defer_checks", lambda device: deferred)
    with pytest.raises(TrainingError, match=r"non-finite at step 5 \(term\(s\): ce\).*last good checkpoint"):
        softkd.fit(poisoned_at_step5(), digit_splits.train, epochs=2, batch_size=64, checkpoint_dir=tmp_path,
                   checkpoint_every=3, log=lambda record: None, log_every=4)
    saved = sorted(p.name for p in tmp_path.glob("ckpt-*.pt"))
    assert saved == ["ckpt-00000003.pt"]
    state = torch.load(tmp_path / saved[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_step_terms_folded_in_chunks_give_the_same_history_and_guard(tmp_path, digit_splits, monkeypatch,
                                                                      poisoned_at_step5):
    # The loop keeps each step's terms on the device and folds them into the epoch's sums every
    # CHUNK steps; the fold must change neither the logged figures nor which step the guard names.
    def run(**kwargs):
        torch.manual_seed(0)
        model = build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10)
        steps = []
        fit = softkd.fit(model, digit_splits.train, epochs=2, batch_size=64, log=steps.append, log_every=3,
                         **kwargs)
        return fit.history, steps

    history, steps = run()
    monkeypatch.setattr("softkd.train.loss_guard.StepTerms.CHUNK", 2)
    monkeypatch.setattr("softkd.train.loss_guard.defer_checks", lambda device: True)
    folded_history, folded_steps = run()
    for a, b in zip(history + steps, folded_history + folded_steps, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
        assert a.get("train_ce") == pytest.approx(b.get("train_ce"), rel=1e-12)
    with pytest.raises(TrainingError, match=r"non-finite at step 5 \(term\(s\): ce\)"):
        softkd.fit(poisoned_at_step5(), digit_splits.train, epochs=2, batch_size=64, checkpoint_dir=tmp_path,
                   checkpoint_every=3)


def test_resident_leaves_cpu_runs_alone(digit_splits):
    from softkd.train.runtime import resident

    logits = torch.randn(len(digit_splits.train), 10)
    assert resident(torch.device("cpu"), digit_splits.train, logits, None) == (digit_splits.train, logits, None)
