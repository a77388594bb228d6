"""The model zoo: every name builds for several input shapes, with the documented sizes."""

import pytest
import torch

from softkd.errors import UnknownNameError
from softkd.models import build_model, count_params, list_models

NAMES = ["mlp-128", "hinton-mlp-1200", "hinton-mlp-800", "lenet5", "tinycnn-16", "resnet-64", "resnet8x4",
         "resnet32x4", "wrn-16-2", "wrn-40-2"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_every_model_adapts_to_input_shape_and_classes(name, shape):
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, params",
    [("mlp-128", 101_770), ("hinton-mlp-1200", 2_395_210), ("lenet5", 61_706), ("tinycnn-16", 20_538),
     ("resnet-64", 1_226_442), ("resnet8x4", 1_209_834), ("wrn-16-2", 691_386)],
)
def test_parameter_counts_on_fashion_mnist_shapes(name, params):
    # hinton-mlp-1200: 784·1200 + 1200 + 1200·1200 + 1200 + 1200·10 + 10 = 2,395,210 (Hinton et al. 2015)
    assert count_params(build_model(name, input_shape=(1, 28, 28), num_classes=10)) == params


def test_listing_and_unknown_names():
    assert {"mlp-<h>", "resnet-<w>", "lenet5", "wrn-40-2"} <= set(list_models())
    assert list_models("wrn*") == ["wrn-16-2", "wrn-40-2"]
    with pytest.raises(UnknownNameError, match="did you mean 'resnet8x4'"):
        build_model("resnet8x5", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(UnknownNameError):
        build_model("mlp-0", input_shape=(1, 28, 28), num_classes=10)
