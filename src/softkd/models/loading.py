"""Models from outside the zoo: your own code, torchvision or timm, named by one string.

``resolve_model("mypkg.nets:make_net", input_shape=(3, 32, 32), num_classes=10, kwargs={"depth": 4})``
imports ``mypkg.nets`` and calls ``make_net(depth=4, num_classes=10, input_shape=(3, 32, 32))``
(the last two only where its signature takes them). ``"torchvision:resnet18"`` and
``"timm:resnet18"`` go through those libraries (``pip install "softkd[vision]"``); any other
string is a zoo name such as ``resnet-64``. Weights load separately, with
``softkd.models.weights.load_weights``: a spec never unpickles anything.
"""

from __future__ import annotations

import difflib
import importlib
import inspect

import torch
from torch import nn

from softkd.errors import ShapeMismatchError, SoftKDError, first_line
from softkd.models.zoo import build_model

_VISION_HINT = 'pip install "softkd[vision]"'


class ModelError(SoftKDError):
    """A model spec cannot be imported, called, or does not give an ``nn.Module``."""


def resolve_model(spec: str, *, input_shape: tuple[int, ...], num_classes: int,
                  kwargs: dict | None = None) -> nn.Module:
    """The model that ``spec`` names, built for ``input_shape`` and ``num_classes``.

    ``"package.module:factory"`` (a function or class, ``Outer.inner`` allowed),
    ``"torchvision:<name>"``, ``"timm:<name>"``, or a zoo name. ``kwargs`` go to the factory;
    ``num_classes`` and ``input_shape`` are added where its signature takes them and ``kwargs``
    does not already set them.
    """
    input_shape, kwargs = tuple(input_shape), dict(kwargs or {})
    source, sep, name = spec.partition(":")
    if sep and source == "torchvision":
        model = _from_torchvision(spec, name, num_classes=num_classes, kwargs=kwargs)
    elif sep and source == "timm":
        model = _from_timm(spec, name, input_shape=input_shape, num_classes=num_classes, kwargs=kwargs)
    elif sep:
        model = _from_import_string(spec, input_shape=input_shape, num_classes=num_classes, kwargs=kwargs)
    else:
        if kwargs:
            raise ModelError(f"Zoo model '{spec}' takes no kwargs; got {sorted(kwargs)}. Encode the size in "
                             "the name (mlp-256) or use a 'package.module:factory' spec.")
        return build_model(spec, input_shape=input_shape, num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise ModelError(f"'{spec}' returned a {type(model).__name__}, not a torch.nn.Module; "
                         "make the factory return the model itself.")
    return model


@torch.no_grad()
def check_num_classes(model: nn.Module, *, input_shape: tuple[int, ...], num_classes: int,
                      role: str = "teacher") -> None:
    """One dummy forward pass (eval mode, no grad) must give ``num_classes`` logits per sample.

    Every submodule's training flag is restored afterwards, so mixed modes (a frozen backbone in
    eval mode inside a training model) survive the check.
    """
    modes = [(m, m.training) for m in model.modules()]
    first = next(iter(model.parameters()), None)
    first = first if first is not None else next(iter(model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.zeros(2, *input_shape, device=device, dtype=dtype)  # batch 2: some models squeeze a batch of 1
    model.eval()
    try:
        out = model(x)
    except RuntimeError as exc:
        raise ShapeMismatchError(
            f"The {role} ({type(model).__name__}) cannot take inputs of shape {tuple(input_shape)}: "
            f"{first_line(exc)}; check the data's input shape or the model's input layer."
        ) from None
    finally:
        for module, mode in modes:
            module.training = mode
    logits = _logits(out)
    if logits is None:
        raise ModelError(f"The {role} ({type(model).__name__}) returned a {type(out).__name__}; "
                         "its forward must return a logits tensor (or a tuple/dict/output with it first).")
    if logits.ndim < 2:
        raise ShapeMismatchError(f"The {role} ({type(model).__name__}) must return (N, C) logits; "
                                 f"got shape {tuple(logits.shape)}.")
    if logits.shape[-1] != num_classes:
        raise ShapeMismatchError(
            f"The {role} ({type(model).__name__}) outputs {logits.shape[-1]} classes but {num_classes} are "
            f"expected; build it with num_classes={num_classes} or use data with {logits.shape[-1]} classes."
        )


def _from_import_string(spec, *, input_shape, num_classes, kwargs):
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path or ":" in attr_path:
        raise ModelError(f"Model spec '{spec}' is malformed; write 'package.module:factory' "
                         "(or 'torchvision:<name>', 'timm:<name>', or a zoo name).")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"Cannot import module '{module_name}' for model '{spec}': {first_line(exc)}; "
                         "check the spelling and that it is on PYTHONPATH or installed.") from None
    factory, owner = module, module_name
    for part in attr_path.split("."):
        if not hasattr(factory, part):
            public = [n for n in dir(factory) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3)
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "check the name."
            raise ModelError(f"'{owner}' has no attribute '{part}' (model '{spec}'); {hint}")
        factory, owner = getattr(factory, part), f"{owner}.{part}"
    if not callable(factory):
        raise ModelError(f"'{spec}' is a {type(factory).__name__}, not a function or class; "
                         "point it at a factory that returns an nn.Module.")
    call_kwargs = {**_defaults_it_takes(factory, input_shape=input_shape, num_classes=num_classes), **kwargs}
    try:
        return factory(**call_kwargs)
    except TypeError as exc:  # also catches TypeErrors raised inside the factory, hence the quoted cause
        raise ModelError(f"Calling '{spec}' with kwargs {call_kwargs} failed: {first_line(exc)}; "
                         f"fix the kwargs to match its signature{_signature(factory)}.") from exc
    except SoftKDError:
        raise
    except Exception as exc:  # the user's own code failed: say where, keep the cause for SOFTKD_DEBUG=1
        raise ModelError(f"The model factory '{spec}' raised {type(exc).__name__} when called with kwargs "
                         f"{call_kwargs}: {first_line(exc)}; fix the factory or its kwargs.") from exc


def _defaults_it_takes(factory, *, input_shape, num_classes) -> dict:
    """``num_classes`` / ``input_shape`` for the factory's parameters of those names (or ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return {}
    by_name = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    offered = {"num_classes": num_classes, "input_shape": input_shape}
    return {k: v for k, v in offered.items() if takes_any or k in by_name}


def _signature(factory) -> str:
    try:
        return f" {getattr(factory, '__name__', 'factory')}{inspect.signature(factory)}"
    except (TypeError, ValueError):
        return ""


def _from_torchvision(spec, name, *, num_classes, kwargs):
    torchvision = _import_optional("torchvision", spec)
    call_kwargs = {"num_classes": num_classes, "weights": None, **kwargs}
    try:
        return torchvision.models.get_model(name, **call_kwargs)
    except (ValueError, TypeError) as exc:  # unknown name, or kwargs the builder does not take
        raise ModelError(f"torchvision cannot build '{name}' with kwargs {call_kwargs}: {first_line(exc)}; "
                         "see torchvision.models.list_models().") from exc


def _from_timm(spec, name, *, input_shape, num_classes, kwargs):
    timm = _import_optional("timm", spec)
    in_chans = input_shape[0] if len(input_shape) == 3 else 1  # (H, W) and flat inputs are one channel
    call_kwargs = {"num_classes": num_classes, "in_chans": in_chans, **kwargs}
    try:
        return timm.create_model(name, **call_kwargs)
    except (RuntimeError, TypeError) as exc:  # timm raises RuntimeError for an unknown name
        raise ModelError(f"timm cannot build '{name}' with kwargs {call_kwargs}: {first_line(exc)}; "
                         "see timm.list_models().") from exc


def _import_optional(name, spec):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == name:
            raise ModelError(f"Model '{spec}' needs {name}, which is not installed; {_VISION_HINT}.") from None
        raise ModelError(f"Model '{spec}' needs {name}, which is installed but fails to import: "
                         f"{first_line(exc)}; reinstall a {name} built for torch {torch.__version__}.") from None


def _logits(out):
    """The logits tensor of a forward's result: a tensor, HF-style ``.logits``, or the first of a tuple/dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, dict) and out:
        return _logits(out.get("logits", next(iter(out.values()))))
    if isinstance(out, (tuple, list)) and out:
        return _logits(out[0])
    return None
