"""Datasets. Every item carries a stable sample id; labels are optional (-1 marks unlabeled).

A dataset that fits in memory is an :class:`ArrayDataset`: one tensor of inputs, one of labels,
batched by index with no per-item Python work (see :mod:`softkd.data.loader`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from softkd.errors import DataError
from softkd.losses.logits import UNLABELED
from softkd.registry import Registry


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory samples: ``x`` (N, ...) float, ``y`` (N,) int64 with -1 for unlabeled, ``ids`` (N,)."""

    def __init__(self, x, y=None, *, ids=None, num_classes: int | None = None, name: str = "arrays"):
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.float()
        n = x.shape[0] if x.ndim else 0
        if n == 0:
            raise DataError(f"The dataset '{name}' is empty; give it at least one sample.")
        y = torch.full((n,), UNLABELED, dtype=torch.long) if y is None else torch.as_tensor(y).long().reshape(-1)
        ids = torch.arange(n) if ids is None else torch.as_tensor(ids).long().reshape(-1)
        for what, t in (("labels", y), ("sample ids", ids)):
            if t.shape[0] != n:
                raise DataError(f"The dataset '{name}' has {n} inputs but {t.shape[0]} {what}; give one per input.")
        labeled = y[y != UNLABELED]
        if num_classes is None:
            num_classes = int(labeled.max()) + 1 if labeled.numel() else None
        if labeled.numel() and (labeled.min() < 0 or (num_classes is not None and labeled.max() >= num_classes)):
            bad = labeled[(labeled < 0) | (labeled >= (num_classes or 0))]
            raise DataError(
                f"The dataset '{name}' has label {int(bad[0])} outside [0, {num_classes}) "
                f"(use -1 for unlabeled samples)."
            )
        self.x, self.y, self.ids = x, y, ids
        self.num_classes = num_classes
        self.name = name

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index):
        return {"x": self.x[index], "y": self.y[index], "id": self.ids[index]}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_labeled(self) -> int:
        return int((self.y != UNLABELED).sum())

    def subset(self, indices, *, name: str | None = None) -> "ArrayDataset":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ArrayDataset(
            self.x[indices], self.y[indices], ids=self.ids[indices], num_classes=self.num_classes,
            name=name or self.name,
        )

    def to(self, device) -> "ArrayDataset":
        """The same samples on ``device``."""
        return ArrayDataset(self.x.to(device), self.y.to(device), ids=self.ids.to(device),
                            num_classes=self.num_classes, name=self.name)

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes + self.ids.nbytes

    def with_labels(self, y: torch.Tensor) -> "ArrayDataset":
        return ArrayDataset(self.x, y, ids=self.ids, num_classes=self.num_classes, name=self.name)


@dataclass
class Splits:
    """Train (the transfer set), validation (early stopping) and test (final reports only)."""

    train: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset


DATASETS: Registry = Registry("dataset")


def build_dataset(name: str, *, val_fraction: float = 0.1, seed: int = 0, **kwargs) -> Splits:
    factory, parsed = DATASETS.resolve(name)
    return factory(val_fraction=val_fraction, seed=seed, **parsed, **kwargs)


@DATASETS.register("digits")
def digits(*, val_fraction: float = 0.1, seed: int = 0, test_fraction: float = 0.2, data_dir=None) -> Splits:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes); no download.

    The test split is a fixed stratified 20 % (seed 0), so every run is scored on the same images;
    the validation split is drawn from the rest by ``seed``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy((bunch.data / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    full = ArrayDataset(x, y, num_classes=10, name="digits")
    rest, test = stratified_split(full.y, test_fraction, seed=0)
    train_val = full.subset(rest, name="digits/train")
    train, val = split_train_val(train_val, val_fraction, seed=seed)
    return Splits(train=train, val=val, test=full.subset(test, name="digits/test"))


MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_files(name: str, data_dir: str | None = None) -> dict[str, Path]:
    """The four IDX files of ``name``, looked up in ``data_dir``, ``$SOFTKD_DATA``, Debian's
    ``/usr/share/datasets/<name>`` and the user cache, in that order (gzipped or raw)."""
    if data_dir is not None:  # the folder the user named, and nowhere else: a report must not name one
        if not Path(data_dir).is_dir():  # folder and have read another
            raise DataError(f"data.dir '{data_dir}' is not a folder; point it at the folder holding {name}'s "
                            "four IDX files, or remove it to use the default locations.")
        folders = [Path(data_dir) / name, Path(data_dir)]
    else:
        env = os.environ.get("SOFTKD_DATA")
        folders = [Path(env) / name, Path(env)] if env else []
        folders += [Path("/usr/share/datasets") / name, user_cache_dir() / name]
    for folder in folders:
        found = {}
        for key, stem in MNIST_FILES.items():
            for candidate in (folder / f"{stem}.gz", folder / stem):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(MNIST_FILES):
            return found
    looked = ", ".join(str(f) for f in folders)
    hint = "apt-get install dataset-fashion-mnist, or " if name == "fashion-mnist" else ""
    if data_dir is not None:
        raise DataError(f"data.dir '{data_dir}' does not hold {name}'s four IDX files (looked in {looked}); get "
                        f"them with `softkd data fetch {name} --dest {data_dir}`, or remove data.dir.")
    raise DataError(f"{name} not found (looked in {looked}); get it with {hint}`softkd data fetch {name}`, "
                    "or set data.dir to the folder holding its four IDX files.")


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "softkd"


def _mnist_like(name: str, *, val_fraction: float, seed: int, data_dir: str | None = None) -> Splits:
    """28×28 grey images scaled to [0, 1]; train/validation split of the 60k by ``seed``, the
    official 10k test split untouched."""
    from softkd.data.idx import read_idx

    files = find_idx_files(name, data_dir)
    parts = {}
    for split in ("train", "test"):
        images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{name} {split} files disagree: images {images.shape}, labels {labels.shape}.")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        ids = torch.arange(len(labels)) + (0 if split == "train" else 60_000_000)
        parts[split] = ArrayDataset(x, torch.from_numpy(labels.astype(np.int64)), ids=ids, num_classes=10,
                                    name=f"{name}/{split}")
    train, val = split_train_val(parts["train"], val_fraction, seed=seed)
    return Splits(train=train, val=val, test=parts["test"])


@DATASETS.register("fashion-mnist")
def fashion_mnist(*, val_fraction: float = 0.1, seed: int = 0, data_dir: str | None = None) -> Splits:
    """Zalando's Fashion-MNIST: 70,000 28×28 grey images of clothing, 10 classes."""
    return _mnist_like("fashion-mnist", val_fraction=val_fraction, seed=seed, data_dir=data_dir)


@DATASETS.register("mnist")
def mnist(*, val_fraction: float = 0.1, seed: int = 0, data_dir: str | None = None) -> Splits:
    """LeCun's MNIST handwritten digits: 70,000 28×28 grey images, 10 classes."""
    return _mnist_like("mnist", val_fraction=val_fraction, seed=seed, data_dir=data_dir)


def run_splits(data) -> Splits:
    """The splits of a run config's ``data`` section (:class:`softkd.config.DataConfig`): what
    the run trained, validated and was tested on, for every command that reads a run again."""
    return load_splits(data.name, path=data.path, test_path=data.test_path, unlabeled_path=data.unlabeled_path,
                       label_column=data.label_column, data_dir=data.dir, val_fraction=data.val_fraction,
                       test_fraction=data.test_fraction, seed=data.seed)


def load_splits(
    name: str, *, path: str | None = None, test_path: str | None = None, unlabeled_path: str | None = None,
    label_column: str = "label", data_dir: str | None = None, val_fraction: float = 0.1,
    test_fraction: float = 0.2, seed: int = 0,
) -> Splits:
    """The splits a run config's ``data`` section describes.

    With ``path`` (``.npz``, ``.csv`` or an image folder) the data are the user's: the test split is
    ``test_path``, or a fixed stratified ``test_fraction`` of the labeled samples (seed 0, so every
    run is scored on the same samples); validation is a seeded fraction of the labeled rest, and
    unlabeled samples always stay in the transfer set. Otherwise ``name`` is a registered dataset.
    ``unlabeled_path`` adds an unlabeled dataset to the transfer set (its labels are dropped).
    """
    from softkd.data.readers import load_arrays

    def load(file):
        return load_arrays(file, label_column=label_column) if str(file).lower().endswith(".csv") else load_arrays(file)

    if path is None:
        splits = build_dataset(name, val_fraction=val_fraction, seed=seed, data_dir=data_dir)
    else:
        data = load(path)
        test = load(test_path) if test_path else None
        num_classes = max(d.num_classes or 0 for d in (data, test) if d is not None) or None
        data = ArrayDataset(data.x, data.y, ids=data.ids, num_classes=num_classes, name=name)
        labeled = (data.y != UNLABELED).nonzero().flatten()
        unlabeled = (data.y == UNLABELED).nonzero().flatten()
        if labeled.numel() == 0:
            raise DataError(f"'{path}' has no labeled samples; the test and validation splits need labels.")
        _check_classes(data.y[labeled], num_classes, path=path, test=test, test_path=test_path)
        if test is None:
            keep, held = stratified_split(data.y[labeled], test_fraction, seed=0)
            test, rest = data.subset(labeled[held], name=f"{name}/test"), labeled[keep]
        else:
            test, rest = ArrayDataset(test.x, test.y, num_classes=num_classes, name=f"{name}/test"), labeled
        keep, held = stratified_split(data.y[rest], val_fraction, seed=seed) if val_fraction > 0 else (None, None)
        train_idx = torch.cat([rest if keep is None else rest[keep], unlabeled]).sort().values
        val = data.subset(rest[held], name=f"{name}/val") if held is not None and held.numel() else None
        splits = Splits(train=data.subset(train_idx, name=f"{name}/train"), val=val, test=test)
        if test.input_shape != splits.train.input_shape:
            raise DataError(f"Test data '{test_path}' has inputs of shape {test.input_shape}, the training data "
                            f"{splits.train.input_shape}; they must match.")
    if unlabeled_path:
        splits.train = add_unlabeled(splits.train, load(unlabeled_path), source=unlabeled_path)
    return splits


def _check_classes(labels: torch.Tensor, num_classes: int, *, path, test, test_path) -> None:
    """User data must number its classes 0..C-1, at least two, each with labeled training samples
    (a class only the test file has, or a stray large label, would silently change the problem)."""
    present = set(labels.unique().tolist())
    if len(present) < 2:
        raise DataError(f"'{path}' has labeled samples of {len(present)} class only ({sorted(present)}); "
                        "distillation needs at least 2 classes.")
    if test is not None:
        only_test = sorted(set(test.y[test.y != UNLABELED].unique().tolist()) - present)
        if only_test:
            raise DataError(f"Test data '{test_path}' has label(s) {only_test[:5]} that the training data "
                            f"'{path}' never has; every test class needs training samples.")
    missing = sorted(set(range(num_classes)) - present)
    if missing:
        raise DataError(f"'{path}' labels classes up to {num_classes - 1}, but {len(missing)} of those have no "
                        f"labeled sample ({', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}); "
                        f"number the {len(present)} classes 0..{len(present) - 1}.")


def add_unlabeled(train: ArrayDataset, extra: ArrayDataset, *, source: str) -> ArrayDataset:
    """``train`` with ``extra``'s samples appended as unlabeled (ids after the largest in ``train``)."""
    if extra.input_shape != train.input_shape:
        raise DataError(f"Unlabeled data '{source}' has inputs of shape {extra.input_shape} but the transfer set "
                        f"has {train.input_shape}; they must match.")
    ids = extra.ids + int(train.ids.max()) + 1
    return ArrayDataset(torch.cat([train.x, extra.x.to(train.x.dtype)]),
                        torch.cat([train.y, torch.full_like(extra.y, UNLABELED)]),
                        ids=torch.cat([train.ids, ids]), num_classes=train.num_classes, name=train.name)


def split_train_val(data: ArrayDataset, val_fraction: float, *, seed: int):
    """Deterministic stratified split by seed; ``val_fraction == 0`` gives no validation set."""
    if val_fraction <= 0:
        return data, None
    keep, held = stratified_split(data.y, val_fraction, seed=seed)
    return data.subset(keep, name=f"{data.name}/train"), data.subset(held, name=f"{data.name}/val")


def stratified_split(labels: torch.Tensor, fraction: float, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out) with ``fraction`` of each class held out, deterministic in ``seed``."""
    if not 0 <= fraction < 1:
        raise DataError(f"A split fraction must be in [0, 1); got {fraction}.")
    g = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in torch.unique(labels):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_held = int(round(fraction * idx.numel()))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def keep_labels(data: ArrayDataset, fraction: float, *, seed: int) -> ArrayDataset:
    """The same samples with labels kept on a seeded, stratified ``fraction`` and dropped (-1) on the rest."""
    if not 0 < fraction <= 1:
        raise DataError(f"'labeled_fraction' must be in (0, 1]; got {fraction}.")
    if fraction == 1:
        return data
    _, kept = stratified_split(data.y, fraction, seed=seed)
    y = torch.full_like(data.y, UNLABELED)
    y[kept] = data.y[kept]
    return data.with_labels(y)


def as_dataset(data, *, name: str = "data") -> torch.utils.data.Dataset | torch.utils.data.DataLoader:
    """Accept an :class:`ArrayDataset`, a (x, y) tuple of arrays, any ``Dataset`` or a ``DataLoader``."""
    if isinstance(data, (ArrayDataset, torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        if isinstance(data, torch.utils.data.TensorDataset):
            return ArrayDataset(*data.tensors[:2], name=name)
        return data
    if isinstance(data, (tuple, list)) and len(data) in (1, 2):
        return ArrayDataset(*data, name=name)
    raise DataError(
        f"Cannot use {type(data).__name__} as {name}: give a torch Dataset, a DataLoader or an (x, y) tuple of arrays."
    )
