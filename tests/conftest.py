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


def pytest_configure(config):
    # Tests use tiny models: one thread is as fast and does not spin against a busy second core.
    torch.set_num_threads(1)
