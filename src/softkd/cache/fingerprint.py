"""What a soft-label cache was computed from, as a flat dict of named fields.

Two caches hold the same logits exactly when their fingerprints are equal; a run opening a cache
compares the fingerprint it expects with the one recorded in ``manifest.json``. Temperature is not
part of it: the cache stores raw logits, so any temperature can be applied when training.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import nn


def fingerprint(*, teacher: nn.Module, data: dict, preprocessing: dict | None = None, views: int = 1,
                augment_seed: int | None = None, dtype: str = "fp16", top_k: int | None = None) -> dict:
    """The fields that determine a cache's contents.

    ``data`` describes the samples in build order, e.g. ``{"name": "digits", "split": "train",
    "n": 1437, "ids_sha256": ids_sha256(train.ids)}``. Every value must be JSON data (it is stored
    in the manifest and compared after a JSON round trip).
    """
    fields = {
        "teacher_sha256": teacher_sha256(teacher), "data": data, "preprocessing": preprocessing,
        "views": views, "augment_seed": augment_seed, "dtype": dtype, "top_k": top_k,
    }
    return _as_json_data(fields)


def differences(expected: dict, found: dict) -> list[str]:
    """``"field: found -> expected"`` for every field that differs; nested dicts as ``data.n``."""
    expected, found = _flatten(_as_json_data(expected)), _flatten(_as_json_data(found))
    return [
        f"{key}: {_show(found.get(key, _MISSING))} -> {_show(expected.get(key, _MISSING))}"
        for key in sorted(expected.keys() | found.keys())
        if expected.get(key, _MISSING) != found.get(key, _MISSING)
    ]


def teacher_sha256(teacher: nn.Module) -> str:
    """sha256 over the state dict's names, shapes, dtypes and bytes, in sorted key order.

    A :class:`~softkd.models.Teacher` wrapper or ``torch.compile`` hashes like the bare module.
    """
    from softkd.models.teacher import Teacher

    while isinstance(teacher, Teacher) or hasattr(teacher, "_orig_mod"):
        teacher = teacher.module if isinstance(teacher, Teacher) else teacher._orig_mod
    digest = hashlib.sha256()
    state = teacher.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        # uint8 view: bf16 and friends have no numpy dtype; the byte order is the machine's (little).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def ids_sha256(ids) -> str:
    """sha256 of the sample ids in order, as little-endian int64."""
    return hashlib.sha256(np.asarray(torch.as_tensor(ids).cpu(), dtype="<i8").tobytes()).hexdigest()


_MISSING = object()


def _as_json_data(value):
    from softkd.cache.format import CacheError

    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as error:
        raise CacheError(f"A cache fingerprint must hold JSON data only ({error}); describe "
                          "data and preprocessing with strings, numbers, lists and dicts.") from None


def _flatten(fields: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in fields.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value) -> str:
    if value is _MISSING:
        return "(missing)"
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:16] + "…" if len(text) > 24 else text  # sha256 digests differ in the first characters
