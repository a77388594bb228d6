"""Full-state training checkpoints, written atomically, loaded without unpickling objects.

A checkpoint holds what resuming needs to continue exactly where a run stopped: model,
the method's trainable parts (adapters; never a teacher), optimizer, scheduler, step, epoch and position in it, the data order's
generator state at the epoch's start, every RNG state, early-stopping state and the run's
settings (``run_key``). Files are ``ckpt-<step>.pt`` (the last ``keep_last`` are kept) and
``best.safetensors`` (the best validation epoch's weights).
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import numpy as np
import torch

from softkd.errors import ConfigError, DataError, first_line
from softkd.utils import atomic_write_bytes

_NAME = re.compile(r"ckpt-(\d+)\.pt")
CHECKPOINT_FORMAT = 2
"""2 (softkd 0.2): the method's settings in the run key, its trainable parts apart from the
student, no teacher weights. 1 (softkd 0.1, no "format" key): the whole objective, teacher included."""


def rng_states() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss}}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(_as_tuple(states["python"]))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(folder: Path, state: dict, *, keep_last: int = 2) -> Path:
    """Write ``ckpt-<step>.pt`` atomically, then drop all but the newest ``keep_last``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(folder) / f"ckpt-{state['step']:08d}.pt"
    atomic_write_bytes(path, buffer.getvalue())
    for old in checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    folder = Path(folder)
    found = [p for p in folder.glob("ckpt-*.pt") if _NAME.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def load_latest(folder: Path, *, run_key: dict) -> dict | None:
    """The newest checkpoint's state, or None when there is none. A checkpoint written for other
    settings is refused with the keys that differ."""
    found = checkpoints(folder)
    if not found:
        return None
    try:
        state = torch.load(found[-1], weights_only=True)
    except Exception as exc:  # truncated by a crash outside the atomic rename, or not ours
        raise DataError(f"Cannot read checkpoint '{found[-1]}': {first_line(exc)}; "
                        "delete it to resume from the one before.") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"Checkpoint '{found[-1]}' was written by softkd 0.1 with the old method settings and "
                          "cannot be resumed; delete its folder to start that run again.")
    differing = diff_keys(state.get("run_key", {}), run_key)
    if differing:
        raise ConfigError(f"Checkpoint '{found[-1]}' was written with other settings ({', '.join(differing)}); "
                          "resume with the same config or start a new run directory.")
    return state


def diff_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as 'key: saved -> current'."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_keys(a, b, prefix=f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
