"""Seedable augmentations: the same (seed, sample id, view) always gives the same view.

A view is not drawn from a running random generator but computed from a hash of (seed, sample
id, view index), so it does not depend on batch composition, process count or how far a run got.
That is what lets a soft-label cache hold the teacher's logits for K views of every sample and a
student train later on exactly those views ("consistent teaching", Beyer et al. 2022; the FKD
cache of Shen & Xing 2022): each epoch picks one of the K views per sample, again by hash.

Without a cache (the teacher runs on every step) the view index is the epoch, so every epoch
sees fresh views and a resumed run replays the same ones.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from softkd.errors import ConfigError, DataError

AUGMENTATIONS = ("shift", "shift-flip")
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def hash_ids(seed: int, ids: torch.Tensor, *keys) -> np.ndarray:
    """64-bit hashes of (seed, id, *keys) for every id (vectorised splitmix64 chain).

    ``keys`` are ints, or tensors of one value per id."""
    with np.errstate(over="ignore"):
        z = _splitmix64(np.full(ids.shape[0], seed, dtype=np.uint64))
        for part in (ids, *keys):
            part = part.cpu().numpy() if isinstance(part, torch.Tensor) else np.full(ids.shape[0], part)
            z = _splitmix64(z ^ part.astype(np.int64).view(np.uint64))
    return z


class ShiftFlip:
    """Random translation by up to ``shift`` pixels (zero padding, like pad-and-crop) and, with
    ``flip``, a horizontal flip with probability 1/2, for image batches (B, C, H, W).

    ``aug(x, ids, view)`` gives the views ``view`` (an int, or one per sample) of samples ``ids``;
    ``aug.pick(ids, epoch, views)`` says which of ``views`` cached views each sample trains on in
    ``epoch`` (``views=None``: a fresh view every epoch).
    """

    def __init__(self, *, shift: int = 2, flip: bool = True, seed: int = 0):
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ConfigError(f"The 'shift' of the augmentation must be an integer >= 0 pixels; got {shift!r}.")
        self.shift, self.flip, self.seed = shift, flip, seed

    @property
    def name(self) -> str:
        return "shift-flip" if self.flip else "shift"

    def describe(self) -> dict:
        """What determines the views (part of a cache's fingerprint)."""
        return {"name": self.name, "shift": self.shift, "seed": self.seed}

    def pick(self, ids: torch.Tensor, epoch: int, views: int | None) -> torch.Tensor:
        if views is None:
            return torch.full((ids.shape[0],), epoch, dtype=torch.long)
        return torch.from_numpy((hash_ids(self.seed, ids, epoch, -1) % np.uint64(views)).astype(np.int64))

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, view) -> torch.Tensor:
        if x.ndim != 4:
            raise DataError(f"Augmentation '{self.name}' needs image batches (B, C, H, W); got shape "
                            f"{tuple(x.shape)}. Set data.augment: null for feature data.")
        b, _, h, w = x.shape
        view = torch.as_tensor(view, dtype=torch.long).reshape(-1).expand(b)
        code = hash_ids(self.seed, ids, view)
        span = np.uint64(2 * self.shift + 1)
        dy = torch.from_numpy((code % span).astype(np.int64))  # offsets into the padded image, 0..2·shift
        dx = torch.from_numpy(((code >> np.uint64(16)) % span).astype(np.int64))
        flip = torch.from_numpy(((code >> np.uint64(32)) & np.uint64(1)).astype(bool)) & self.flip
        padded = F.pad(x, (self.shift,) * 4) if self.shift else x
        rows = dy[:, None] + torch.arange(h)  # (B, H)
        cols = dx[:, None] + torch.arange(w)  # (B, W)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        batch = torch.arange(b)[:, None, None]
        index = [t.to(x.device) for t in (batch, rows[:, :, None], cols[:, None, :])]
        out = padded[index[0], :, index[1], index[2]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format)


def build_augment(name: str | None, *, shift: int = 2, seed: int = 0) -> ShiftFlip | None:
    """The augmentation ``data.augment`` names (None for none)."""
    if name is None:
        return None
    if name not in AUGMENTATIONS:
        raise ConfigError(f"Unknown augmentation '{name}'; use one of {', '.join(AUGMENTATIONS)} or null.")
    return ShiftFlip(shift=shift, flip=name == "shift-flip", seed=seed)
