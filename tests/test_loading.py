import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from softkd.errors import DataError, ShapeMismatchError, SoftKDError, UnknownNameError
from softkd.models.weights import load_weights, save_weights
from softkd.models.loading import ModelError, check_num_classes, resolve_model

SHAPE = (1, 8, 8)

USER_NETS_BROKEN = "import this_dependency_is_missing_xyz\n"  # a user module whose own import fails

USER_NETS = '''
import math
import torch
from torch import nn


def make_mlp(*, input_shape, num_classes, width=16):
    """Takes both defaults by name."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def fixed_head(width=4):
    """Takes neither: always 3 classes on 64 features."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 3))


def anything(**kwargs):
    """Takes both through **kwargs."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, kwargs["num_classes"]))
    model.seen = dict(kwargs)
    return model


class Net(nn.Module):
    def __init__(self, num_classes, hidden=8):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x)), self.body(x)  # (logits, features): check_num_classes takes the first


class Namespace:
    @staticmethod
    def build(num_classes):
        return nn.Linear(64, num_classes)


def not_a_model(num_classes):
    return {"num_classes": num_classes}


NOT_CALLABLE = 3


class Evil:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
'''


@pytest.fixture
def user_nets(tmp_path, monkeypatch):
    """A user's model module, ``user_nets``, importable from a temporary folder."""
    (tmp_path / "user_nets.py").write_text(USER_NETS)
    (tmp_path / "user_nets_broken.py").write_text(USER_NETS_BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("user_nets", "user_nets_broken"):
        sys.modules.pop(name, None)


def _out_width(model):
    out = model(torch.randn(2, *SHAPE))
    return (out[0] if isinstance(out, tuple) else out).shape[-1]


# --- import strings ------------------------------------------------------------------------------

def test_function_factory_gets_defaults_and_kwargs(user_nets):
    model = resolve_model("user_nets:make_mlp", input_shape=SHAPE, num_classes=7, kwargs={"width": 5})
    assert model[1].in_features == 64 and model[1].out_features == 5
    assert _out_width(model) == 7


def test_factory_without_num_classes_is_not_passed_it(user_nets):
    model = resolve_model("user_nets:fixed_head", input_shape=SHAPE, num_classes=10, kwargs={"width": 6})
    assert model[1].out_features == 6 and _out_width(model) == 3


def test_var_keyword_factory_gets_both(user_nets):
    model = resolve_model("user_nets:anything", input_shape=[1, 8, 8], num_classes=4, kwargs={"extra": 1})
    assert model.seen == {"num_classes": 4, "input_shape": (1, 8, 8), "extra": 1}


def test_kwargs_override_defaults(user_nets):
    model = resolve_model("user_nets:anything", input_shape=SHAPE, num_classes=4, kwargs={"num_classes": 2})
    assert model.seen["num_classes"] == 2


def test_class_factory(user_nets):
    model = resolve_model("user_nets:Net", input_shape=SHAPE, num_classes=5, kwargs={"hidden": 3})
    assert type(model).__name__ == "Net" and model.head.in_features == 3
    assert _out_width(model) == 5


def test_dotted_attribute(user_nets):
    model = resolve_model("user_nets:Namespace.build", input_shape=SHAPE, num_classes=6)
    assert model.out_features == 6


@pytest.mark.parametrize("spec, fragments", [
    ("no_such_pkg_xyz.nets:make", ["'no_such_pkg_xyz.nets'", "No module named 'no_such_pkg_xyz'"]),
    ("user_nets_broken:make", ["'user_nets_broken'", "No module named 'this_dependency_is_missing_xyz'"]),
    ("user_nets:make_mpl", ["'user_nets' has no attribute 'make_mpl'", "did you mean 'make_mlp'"]),
    ("user_nets:Namespace.biuld", ["'user_nets.Namespace' has no attribute 'biuld'", "'build'"]),
    ("user_nets:not_a_model", ["returned a dict, not a torch.nn.Module"]),
    ("user_nets:NOT_CALLABLE", ["is a int, not a function or class"]),
    ("user_nets:", ["malformed", "package.module:factory"]),
    (":make_mlp", ["malformed"]),
    ("a:b:c", ["malformed"]),
])
def test_import_string_errors(user_nets, spec, fragments):
    with pytest.raises(ModelError) as info:
        resolve_model(spec, input_shape=SHAPE, num_classes=3)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_bad_kwargs_name_factory_and_kwargs(user_nets):
    with pytest.raises(ModelError) as info:
        resolve_model("user_nets:make_mlp", input_shape=SHAPE, num_classes=3, kwargs={"widht": 5})
    message = str(info.value)
    assert "'user_nets:make_mlp'" in message and "'widht': 5" in message
    assert "unexpected keyword argument 'widht'" in message and "\n" not in message
    assert "make_mlp(*, input_shape, num_classes, width=16)" in message
    assert isinstance(info.value, SoftKDError)


# --- torchvision and timm ------------------------------------------------------------------------

@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_missing_vision_library_says_how_to_install(library):
    if importlib.util.find_spec(library) is not None:
        pytest.skip(f"{library} is installed here")
    with pytest.raises(ModelError, match=rf"needs {library}, which is not installed; pip install \"softkd\[vision\]\""):
        resolve_model(f"{library}:resnet18", input_shape=(3, 32, 32), num_classes=10)


# The fakes below stand in for torchvision/timm ONLY to test how calls are routed (which function,
# which arguments); they say nothing about whether the real libraries' models work.

def test_torchvision_routing_with_fake_module(monkeypatch):
    calls = []

    def get_model(name, **kwargs):
        calls.append((name, kwargs))
        if name != "resnet18":
            raise ValueError(f"Unknown model {name}")
        return nn.Linear(3, kwargs["num_classes"])

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(get_model=get_model)
    monkeypatch.setitem(sys.modules, "torchvision", fake)

    model = resolve_model("torchvision:resnet18", input_shape=(3, 32, 32), num_classes=10, kwargs={"dropout": 0.1})
    assert isinstance(model, nn.Linear) and model.out_features == 10
    assert calls == [("resnet18", {"num_classes": 10, "weights": None, "dropout": 0.1})]
    with pytest.raises(ModelError, match="torchvision cannot build 'resnet81'.*Unknown model resnet81"):
        resolve_model("torchvision:resnet81", input_shape=(3, 32, 32), num_classes=10)


def test_timm_routing_with_fake_module(monkeypatch):
    calls = []

    def create_model(name, **kwargs):
        calls.append((name, kwargs))
        if name != "resnet18":
            raise RuntimeError(f"Unknown model ({name})")
        return nn.Linear(3, kwargs["num_classes"])

    fake = types.ModuleType("timm")
    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)

    resolve_model("timm:resnet18", input_shape=(3, 32, 32), num_classes=10, kwargs={"drop_rate": 0.2})
    resolve_model("timm:resnet18", input_shape=(28, 28), num_classes=10)  # (H, W) inputs: one channel
    assert calls == [("resnet18", {"num_classes": 10, "in_chans": 3, "drop_rate": 0.2}),
                     ("resnet18", {"num_classes": 10, "in_chans": 1})]
    with pytest.raises(ModelError, match=r"timm cannot build 'resnt18'.*Unknown model \(resnt18\)"):
        resolve_model("timm:resnt18", input_shape=(3, 32, 32), num_classes=10)


# --- zoo -----------------------------------------------------------------------------------------

def test_zoo_names_fall_through():
    model = resolve_model("mlp-16", input_shape=SHAPE, num_classes=10)
    assert model[1].out_features == 16 and _out_width(model) == 10


def test_zoo_unknown_name_and_kwargs():
    with pytest.raises(UnknownNameError, match="did you mean 'lenet5'"):
        resolve_model("lenet6", input_shape=SHAPE, num_classes=10)
    with pytest.raises(ModelError, match=r"Zoo model 'mlp-16' takes no kwargs; got \['width'\]"):
        resolve_model("mlp-16", input_shape=SHAPE, num_classes=10, kwargs={"width": 3})


# --- check_num_classes ---------------------------------------------------------------------------

def test_check_num_classes_passes_and_restores_modes(user_nets):
    model = resolve_model("user_nets:Net", input_shape=SHAPE, num_classes=5)
    model.train()
    model.body.eval()  # mixed modes must survive the check
    check_num_classes(model, input_shape=SHAPE, num_classes=5, role="student")
    assert model.training and model.head.training and not model.body.training


def test_check_num_classes_mismatch_names_role_and_both_counts(user_nets):
    model = resolve_model("user_nets:fixed_head", input_shape=SHAPE, num_classes=10)
    model.train()
    with pytest.raises(ShapeMismatchError) as info:
        check_num_classes(model, input_shape=SHAPE, num_classes=10)
    message = str(info.value)
    assert message.startswith("The teacher (Sequential) outputs 3 classes but 10 are expected")
    assert "num_classes=10" in message and "\n" not in message
    assert model.training


def test_check_num_classes_bad_input_shape():
    model = resolve_model("mlp-16", input_shape=SHAPE, num_classes=10)
    with pytest.raises(ShapeMismatchError, match=r"The student \(Sequential\) cannot take inputs of shape \(3, 8, 8\)"):
        check_num_classes(model, input_shape=(3, 8, 8), num_classes=10, role="student")


def test_check_num_classes_rejects_non_logits():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0))  # (N,)
    with pytest.raises(ShapeMismatchError, match=r"must return \(N, C\) logits; got shape \(2,\)"):
        check_num_classes(model, input_shape=SHAPE, num_classes=1)


# --- checkpoints of user models ------------------------------------------------------------------

def _user_pair(seed):
    torch.manual_seed(seed)
    return resolve_model("user_nets:Net", input_shape=SHAPE, num_classes=4, kwargs={"hidden": 6})


def test_safetensors_checkpoint_of_user_model(user_nets):
    trained, fresh, x = _user_pair(0), _user_pair(1), torch.randn(3, *SHAPE)
    path = user_nets / "net.safetensors"
    save_weights(trained, path)
    load_weights(fresh, path)
    torch.testing.assert_close(fresh(x)[0], trained(x)[0])


def test_pt_state_dict_checkpoint_of_user_model(user_nets):
    trained, fresh, x = _user_pair(0), _user_pair(1), torch.randn(3, *SHAPE)
    path = user_nets / "net.pt"
    torch.save(trained.state_dict(), path)
    load_weights(fresh, path)
    torch.testing.assert_close(fresh(x)[0], trained(x)[0])


def test_pt_checkpoint_of_wrong_width_lists_keys(user_nets):
    path = user_nets / "net.pt"
    wider = resolve_model("user_nets:Net", input_shape=SHAPE, num_classes=7, kwargs={"hidden": 6})
    torch.save(wider.state_dict(), path)
    with pytest.raises(ShapeMismatchError, match="shape mismatch: head.bias, head.weight"):
        load_weights(_user_pair(0), path)


def test_pickled_objects_are_refused(user_nets):
    import user_nets as module

    marker = user_nets / "pwned"
    path = user_nets / "evil.pt"
    torch.save({"head.weight": module.Evil(str(marker))}, path)
    refusal = "holds pickled Python objects, not only tensors; softkd never unpickles them"
    with pytest.raises(DataError, match=refusal) as info:
        load_weights(_user_pair(0), path)
    assert not marker.exists() and "weights_only=False" not in str(info.value)

    whole = user_nets / "whole.pt"
    torch.save(_user_pair(0), whole)  # a pickled module, not a state dict
    with pytest.raises(DataError, match=refusal):
        load_weights(_user_pair(1), whole)


def test_wrapped_errors_keep_one_line_even_when_the_original_has_none(tmp_path):
    from softkd.errors import first_line

    assert first_line(RuntimeError("header\nstack of details")) == "header"
    assert first_line(RuntimeError("")) == "RuntimeError"  # str(exc).splitlines()[0] raised IndexError here
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="is not a readable safetensors file \\(damaged, truncated or another format"):
        load_weights(nn.Linear(2, 2), bad)
