"""The loss terms of every training step, kept where the step ran, and the NaN/inf guard."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from softkd.errors import TrainingError


class StepTerms:
    """Every step's loss terms, and the guard that stops a run whose loss turns NaN or inf.

    The terms stay on the training device, one row per step, and are read only at log records,
    checkpoints, epoch ends and every ``CHUNK`` steps: reading a loss on an accelerator makes the
    host wait for the device. On the CPU each micro-batch's loss is checked before its backward
    pass; on accelerators the first bad step is found in the rows when they are read, and raised
    with its step and terms, always before a checkpoint could be written from the damaged weights.
    """

    CHUNK = 1024  # rows kept before they are checked and folded into the sums

    def __init__(self, keys, device: torch.device, *, folder: Path | None, processes: int = 1):
        self.keys = tuple(keys) if keys else None  # None: the first batch's terms, loss first
        self.device, self.folder, self.deferred = device, folder, defer_checks(device)
        self.processes = processes
        self.rows: torch.Tensor | None = None
        self.steps: list[int] = []  # the step of each row in use
        self.samples: list[int] = []  # the samples of each row's step: its weight in the sums
        self.totals: dict[str, float] = {}  # folded rows: sample-weighted sum of each term

    def check(self, terms: dict, step: int) -> None:
        if not self.deferred and not torch.isfinite(terms["loss"]):
            raise self._error({k: float(v.detach()) for k, v in terms.items()}, step)

    def check_sums(self, values: torch.Tensor, step: int) -> None:
        """Check a step's terms summed over processes (the same on every process, so all stop at
        the same step); on the CPU only, like :meth:`check`."""
        if not self.deferred and not torch.isfinite(values[self.keys.index("loss")]):
            raise self._error(dict(zip(self.keys, values.tolist())), step)

    def stack(self, terms: dict) -> torch.Tensor:
        """One micro-batch's terms as one device tensor (one kernel, whatever the number of terms)."""
        if self.keys is None:
            self.keys = ("loss", *(k for k in terms if k != "loss"))
        return torch.stack([terms[k].detach() for k in self.keys])

    def add(self, values: torch.Tensor, *, step: int, samples: int) -> None:
        if self.rows is None:
            self.rows = torch.empty((self.CHUNK, len(self.keys)), dtype=torch.float64, device=self.device)
        if len(self.steps) == self.CHUNK:
            self._fold()
        self.rows[len(self.steps)].copy_(values)
        self.steps.append(step)
        self.samples.append(samples)

    def last(self) -> dict[str, float]:
        """The last step's terms (checked first)."""
        self._raise_if_bad()
        return dict(zip(self.keys, self.rows[len(self.steps) - 1].tolist()))

    def sums(self) -> dict[str, float]:
        """Sample-weighted sums of each term since the last reset (checked first)."""
        self._fold()
        return dict(self.totals)

    def reset(self, totals: dict[str, float] | None = None) -> None:
        self._fold()
        self.totals = dict(totals or {})

    def _fold(self) -> None:
        if not self.steps:
            return
        self._raise_if_bad()
        n = len(self.steps)
        weights = torch.tensor(self.samples, dtype=torch.float64).to(self.device)
        for key, value in zip(self.keys, (self.rows[:n] * weights[:, None]).sum(0).tolist()):
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.steps, self.samples = [], []

    def _raise_if_bad(self) -> None:
        if not self.deferred or not self.steps:
            return  # on the CPU every micro-batch was checked before its backward pass
        rows = self.rows[:len(self.steps)]
        bad = torch.nonzero(~torch.isfinite(rows[:, self.keys.index("loss")])).flatten().tolist()
        if bad:
            raise self._error(dict(zip(self.keys, rows[bad[0]].tolist())), self.steps[bad[0]])

    def _error(self, terms: dict[str, float], step: int) -> TrainingError:
        bad = [k for k, v in terms.items() if k != "loss" and not math.isfinite(v)] or ["loss"]
        kept = f" The last good checkpoint is kept in {self.folder}." if self.folder is not None else ""
        error = TrainingError(f"The training loss became non-finite at step {step} (term(s): {', '.join(bad)}); "
                              f"lower the learning rate or check the inputs and teacher for NaN/inf.{kept}")
        # With several processes the rows hold the terms summed over all of them: every process
        # raises this at the same step, and the command line prints it once.
        error.shared = self.processes > 1
        return error


def defer_checks(device: torch.device) -> bool:
    return device.type != "cpu"
