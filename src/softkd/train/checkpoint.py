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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from softkd.errors import ConfigError, DataError, first_line
from softkd.models.weights import load_tensors
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
        state = load_tensors(found[-1])
    except DataError:
        raise
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


# What fit() keeps beyond FitResult, and how a checkpoint is made from it and put back.


@dataclass
class RunState:
    """Where a run is, beyond what FitResult reports: what resuming needs."""

    epoch: int = 1
    done: int = 0  # micro-batches of this epoch already trained on
    epoch_start: torch.Tensor | None = None  # the data-order generator's state when the epoch began (resuming)
    totals: dict = field(default_factory=dict)
    seen: int = 0
    stale: int = 0
    best_state: dict | None = None


def snapshot(model, objective, opt, scheduler, scaler, result, run: RunState, epoch, done, epoch_start, run_key,
             rngs, *, train_s: float) -> dict:
    """The full state of a run (a ``fit`` FitResult ``result`` and its RunState ``run``) for save_checkpoint;
    ``train_s``: the seconds it has trained so far, over every resume."""
    return {
        "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "method_parts": objective.parts_state(),
        "optimizer": opt.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": result.steps, "epoch": epoch,
        "done": done,
        "epoch_start": epoch_start, "totals": {k: float(v) for k, v in run.totals.items()}, "seen": run.seen,
        "stale": run.stale,
        "best_state": run.best_state, "best_score": result.best_score, "best_epoch": result.best_epoch,
        "history": result.history, "stopped_by": result.stopped_by, "rng": rngs, "run_key": run_key,
        "train_s": train_s, "cpu_kernels": result.cpu_kernels,
    }


def restore(saved: dict, model, objective, opt, scheduler, scaler, result, *, rank: int) -> RunState:
    """Put a :func:`snapshot` back: weights, method parts, optimizer, scheduler, scaler, this
    process's RNG states and ``result``'s progress; returns where the run was."""
    model.load_state_dict(saved["model"])
    scaler.load_state_dict(saved["scaler"])
    objective.load_parts_state(saved["method_parts"])
    opt.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_states(saved["rng"][rank])  # one per process, in rank order
    result.steps, result.history = saved["step"], list(saved["history"])
    result.best_score, result.best_epoch = saved["best_score"], saved["best_epoch"]
    result.stopped_by = saved["stopped_by"]
    result.epochs = saved["epoch"] - 1
    result.resumed_s = saved.get("train_s", 0.0)  # absent from checkpoints written before it was kept
    result.cpu_kernels = sorted({*saved.get("cpu_kernels", ["not recorded"]), *result.cpu_kernels})
    return RunState(epoch=saved["epoch"], done=saved["done"], epoch_start=saved["epoch_start"],
                    totals=dict(saved["totals"]), seen=saved["seen"], stale=saved["stale"],
                    best_state=saved["best_state"])


def trained_state(model: nn.Module, objective) -> dict:
    """What training changes: the student's state and the method's trainable parts'."""
    return {"model": model.state_dict(), "parts": objective.parts_state()}


def load_trained_state(state: dict, model: nn.Module, objective) -> None:
    model.load_state_dict(state["model"])
    objective.load_parts_state(state["parts"])
