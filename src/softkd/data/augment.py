"""Seedable augmentations: the same (seed, sample id, view) always gives the same view.

A view is not drawn from a running random generator but computed from a hash of (seed, sample
id, view index), so it does not depend on batch composition, process count or how far a run got.
That is what lets a soft-label cache hold the teacher's logits for K views of every sample and a
student train later on exactly those views ("consistent teaching", Beyer et al. 2022; the FKD
cache of Shen & Xing 2022): each epoch picks one of the K views per sample, again by hash.

Without a cache (the teacher runs on every step) the view index is the epoch, so every epoch
sees fresh views and a resumed run replays the same ones.

:class:`Mixup` draws its views the same way: each view of a sample is its blend with a partner from
the dataset the run trains on, so a cache can hold the teacher's answers on the blends ("function
matching", Beyer et al. 2022), and the labels blend with the same weight.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from softkd.errors import ConfigError, DataError

AUGMENTATIONS = ("shift", "shift-flip", "mixup")
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


class SeededViews:
    """What every seeded augmentation shares: ``aug.pick(ids, epoch, views)`` says which of ``views``
    cached views each sample trains on in ``epoch`` (``views=None``: a fresh view every epoch)."""

    seed: int

    def pick(self, ids: torch.Tensor, epoch: int, views: int | None) -> torch.Tensor:
        if views is None:
            return torch.full((ids.shape[0],), epoch, dtype=torch.long)
        return torch.from_numpy((hash_ids(self.seed, ids, epoch, -1) % np.uint64(views)).astype(np.int64))


class ShiftFlip(SeededViews):
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


class Mixup(SeededViews):
    """Mixup (Zhang et al. 2018) as seeded views: view ``v`` of sample ``id`` is
    ``λ·x + (1 − λ)·x_p``, where the partner ``p`` (a position in ``pool``, the dataset the run
    trains on) and ``λ ~ Beta(alpha, alpha)`` come from a hash of (seed, id, v). Any input shape
    (images or features). :meth:`mix_labels` blends the labels with the same ``λ``: an unlabeled
    side adds no label mass, so with few labels most blends carry part of a label or none.

    ``aug.bind(dataset)`` gives the same augmentation drawing partners from ``dataset``; a cache
    and the students it teaches must use the same one (the transfer set).
    """

    name = "mixup"

    def __init__(self, *, alpha: float = 1.0, seed: int = 0, pool=None):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ConfigError(f"The mixup 'alpha' (λ ~ Beta(alpha, alpha)) must be a number > 0; got {alpha!r}.")
        self.alpha, self.seed, self.pool = float(alpha), seed, pool

    def bind(self, pool) -> "Mixup":
        return Mixup(alpha=self.alpha, seed=self.seed, pool=pool)

    def describe(self) -> dict:
        """What determines the views (part of a cache's fingerprint, with the data it is built on)."""
        return {"name": self.name, "alpha": self.alpha, "seed": self.seed}

    def draw(self, ids: torch.Tensor, view) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's partner (a position in the pool) and its own weight λ (float64)."""
        if self.pool is None or len(self.pool) == 0:
            raise DataError("Mixup draws partners from the data it trains on, and has none: bind(dataset) first.")
        view = torch.as_tensor(view, dtype=torch.long).reshape(-1).expand(ids.shape[0])
        partner = hash_ids(self.seed, ids, view, 1) % np.uint64(len(self.pool))
        u = (hash_ids(self.seed, ids, view, 2) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
        if self.alpha != 1.0:  # the Beta(α, α) quantile of u; Beta(1, 1) is uniform
            from scipy.special import betaincinv

            u = betaincinv(self.alpha, self.alpha, u)
        return torch.from_numpy(partner.astype(np.int64)), torch.from_numpy(u)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, view) -> torch.Tensor:
        partner, lam = self.draw(ids, view)
        other = self.pool.x[partner.to(self.pool.x.device)].to(x.device)
        if not x.is_floating_point():
            raise DataError(f"Mixup blends inputs, and these are {x.dtype}; give floating-point inputs.")
        lam = lam.to(x.device, x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return lam * x + (1 - lam) * other

    def mix_labels(self, y: torch.Tensor, ids: torch.Tensor, view) -> torch.Tensor:
        """Label targets (B, C), float32: ``λ·onehot(y) + (1 − λ)·onehot(y_p)``, an unlabeled
        side (label < 0) contributing zeros."""
        partner, lam = self.draw(ids, view)
        other = self.pool.y[partner.to(self.pool.y.device)].to(y.device)
        lam = lam.to(y.device, torch.float32)[:, None]
        return lam * _one_hot(y, self.pool.num_classes) + (1 - lam) * _one_hot(other, self.pool.num_classes)


def _one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot rows, float32, all zeros where the label is negative (unlabeled)."""
    return F.one_hot(y.clamp(min=0), num_classes).float() * (y >= 0)[:, None]


def build_augment(name: str | None, *, shift: int = 2, seed: int = 0, alpha: float = 1.0,
                  pool=None) -> ShiftFlip | Mixup | None:
    """The augmentation ``data.augment`` names (None for none); ``mixup`` draws its partners from
    ``pool`` (the dataset it augments) and blends with ``λ ~ Beta(alpha, alpha)``."""
    if name is None:
        return None
    if name not in AUGMENTATIONS:
        raise ConfigError(f"Unknown augmentation '{name}'; use one of {', '.join(AUGMENTATIONS)} or null.")
    if name == "mixup":
        return Mixup(alpha=alpha, seed=seed, pool=pool)
    return ShiftFlip(shift=shift, flip=name == "shift-flip", seed=seed)


def augment_of(data, pool=None) -> ShiftFlip | Mixup | None:
    """The students' augmentation a run's ``data`` config names, mixup drawing from ``pool``."""
    return build_augment(data.augment, shift=data.shift, seed=data.seed, alpha=data.mixup_alpha, pool=pool)
