"""Model weights as safetensors (no pickle), written atomically; state-dict ``.pt`` files are read
with ``weights_only=True``."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from softkd.errors import DataError, ShapeMismatchError, first_line
from softkd.utils import atomic_write_bytes


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state))


def load_tensors(path: str | Path):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only. A file holding
    other pickled objects is refused in softkd's words, never with torch's advice to unpickle it."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"'{path}' holds pickled Python objects, not only tensors; softkd never unpickles "
                        "them (unpickling can run code). Save tensors (a state_dict) with torch.save, or use "
                        ".safetensors.") from None


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"Checkpoint '{path}' is a folder; give the weights file in it (.safetensors or a "
                        "state-dict .pt).")
    if not path.is_file():
        raise DataError(f"Checkpoint '{path}' not found; train a teacher first or fix 'teacher.checkpoint'.")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else load_tensors(path)
    except DataError:
        raise
    except SafetensorError as exc:  # the library's own words ("header too large") say little
        raise DataError(f"Checkpoint '{path}' is not a readable safetensors file (damaged, truncated or another "
                        f"format: {first_line(exc)}); write it again or give the right file.") from None
    except Exception as exc:  # corrupt files
        raise DataError(f"Cannot read checkpoint '{path}': {first_line(exc)}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(keys[:5])}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys]
        raise ShapeMismatchError(f"Checkpoint '{path}' does not fit the model ({'; '.join(parts)}).")
    model.load_state_dict(state)
    return model
