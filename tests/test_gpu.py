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
