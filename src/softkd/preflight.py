"""What a run checks before it writes anything, besides the config's own validation: an output
folder that can be one, and settings that run but probably do not do what was meant (warned about
once, in one line each)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from softkd.config import RunConfig
from softkd.data.datasets import Splits
from softkd.errors import ConfigError, SoftKDWarning


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse an output folder that cannot be a run directory, before any data is read or model built."""
    out = Path(out_dir)
    found = next(p for p in (out, *out.parents) if p.exists())  # ends at "." or "/", which exist
    fix = "give --out (or output.dir) another folder"
    if found == out and not out.is_dir():
        raise ConfigError(f"The output folder '{out}' is an existing file, not a folder; {fix}, or move the file.")
    if not found.is_dir():
        raise ConfigError(f"Cannot create the output folder '{out}': '{found}' is a file, not a folder; {fix}.")
    if not os.access(found, os.W_OK | os.X_OK):
        raise ConfigError(f"Cannot write the output folder '{out}': '{found}' is not writable; {fix}.")


FEW_STEPS = 5  # optimizer steps per epoch below which a run barely trains
SCALE_RATIO = 100  # table columns whose largest |values| differ by more than this are warned about


def warn_about_settings(config: RunConfig, splits: Splits) -> None:
    """Settings that run but probably do not do what was meant, said once before training."""
    n = len(splits.train)
    budgets = [("train.batch_size", config.train.batch_size)]
    if config.teacher is not None and not config.teacher.checkpoint:
        budgets.append(("teacher.batch_size", config.teacher.batch_size))
    for key, batch in budgets:
        steps = -(-n // batch)
        if steps < FEW_STEPS:
            warnings.warn(f"{key} {batch} gives {steps} optimizer step(s) per epoch on the {n:,} training samples, "
                          f"so the model barely trains; lower {key} (e.g. to {max(1, n // 8)}) or raise the epochs.",
                          SoftKDWarning, stacklevel=3)
    d = config.data
    if d.path is not None and d.test_path is None and any(t.checkpoint for t in config.teacher_list):
        warnings.warn(f"the teacher comes from a checkpoint and data.test_path is not set, so the test split is "
                      f"a fixed {d.test_fraction:.0%} of {d.path}, which that teacher may have trained on (its "
                      "score would be flattered); set data.test_path to data it never saw.", SoftKDWarning,
                      stacklevel=3)
    shape = splits.train.input_shape
    if len(shape) == 1 and n > 1:  # a table: columns on very different scales train badly, and softkd
        scale = splits.train.x.float().abs().amax(dim=0)  # does not rescale them (largest |value| per column)
        used = scale[scale > 0]
        if used.numel() > 1 and float(used.max() / used.min()) > SCALE_RATIO:
            big, small = int(scale.argmax()), int(torch.where(scale > 0, scale, scale.max()).argmin())
            warnings.warn(f"the feature columns of {d.path or d.name} are on very different scales (column "
                          f"{big} reaches {float(scale[big]):.3g}, column {small} {float(scale[small]):.3g}); "
                          "softkd feeds them as they are, so standardise them (e.g. to mean 0, std 1, with "
                          "statistics from the training rows only) before training.", SoftKDWarning, stacklevel=3)
    side = min(shape[1:]) if len(shape) == 3 else None  # images are (C, H, W); tables have no side
    augments = [("data.augment", config.data.augment)]
    if config.teacher is not None and not config.teacher.checkpoint:
        augments.append(("teacher.augment", config.teacher.augment))
    for key, augment in augments:
        if augment not in (None, "mixup") and side is not None and config.data.shift * 8 > side:
            warnings.warn(f"{key} '{augment}' shifts images by up to data.shift = {config.data.shift} pixels, more "
                          f"than an eighth of these {side}-pixel images; set data.shift to about "
                          f"{max(1, side // 14)} (2 suits 28×28).", SoftKDWarning, stacklevel=3)
