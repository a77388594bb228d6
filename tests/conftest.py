import importlib.util
from pathlib import Path

import pytest
import torch

from softkd.data.datasets import digits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digit_splits():
    return digits(val_fraction=0.1, seed=0)


@pytest.fixture(scope="session")
def plain_example():
    """examples/kd_plain_torch.py imported as a module."""
    spec = importlib.util.spec_from_file_location("kd_plain_torch", ROOT / "examples" / "kd_plain_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def trained_teacher(digit_splits):
    """A small teacher trained for a few epochs on digits (a few seconds)."""
    import softkd
    from softkd.models import build_model

    torch.manual_seed(0)
    teacher = build_model("mlp-64", input_shape=(1, 8, 8), num_classes=10)
    softkd.fit(teacher, digit_splits.train, epochs=5, batch_size=64, lr=3e-3)
    return teacher


@pytest.fixture
def poisoned_at_step5():
    """Makes a linear model on 8×8 inputs whose training outputs turn NaN from its 5th training
    forward pass on."""
    from torch import nn

    class PoisonedAtStep5(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
            self.calls = 0

        def forward(self, x):
            out = self.net(x)
            if self.training:
                self.calls += 1
                out = out * float("nan") if self.calls >= 5 else out
            return out

    return PoisonedAtStep5


def pytest_configure(config):
    # Tests use tiny models: one thread is as fast and does not spin against a busy second core.
    torch.set_num_threads(1)
