"""Batches as dicts: ``x``, ``y`` (-1 = unlabeled), ``id`` and, when known, ``index`` (position).

In-memory data is batched by indexing whole tensors (no per-item Python work, no worker
processes); any other ``Dataset`` goes through a ``DataLoader`` with the same batch format.
Per-sample extras (precomputed teacher logits) ride along and are indexed with the batch.
"""

from __future__ import annotations

import torch

from softkd.data.datasets import ArrayDataset
from softkd.errors import DataError
from softkd.losses.logits import UNLABELED


class IndexBatches:
    """Shuffled mini-batches of an :class:`ArrayDataset`; the order is drawn from a generator
    seeded once, so two loaders with the same seed yield the same batches.

    With ``lazy`` set, each batch is only ``{"index": positions}`` (on the data's device) and
    :meth:`gather` makes it whole: a training step replayed from a CUDA graph gathers inside the
    graph."""

    def __init__(self, data: ArrayDataset, *, batch_size: int, shuffle: bool, seed: int = 0,
                 extras: dict[str, torch.Tensor] | None = None):
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.extras = extras or {}
        self.generator = torch.Generator().manual_seed(seed)
        self.lazy = False

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def columns(self) -> dict[str, torch.Tensor]:
        return {"x": self.data.x, "y": self.data.y, "id": self.data.ids, **self.extras}

    def __iter__(self):
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        # The order is drawn on the CPU (one generator for every device, so runs replay exactly) and
        # copied once per epoch to each device the tensors live on: indexing a GPU tensor with a CPU
        # index would copy the index, and wait for the copy, at every batch.
        splits = {}
        for values in self.columns().values():
            if values.device not in splits:
                splits[values.device] = order.to(values.device).split(self.batch_size)
        for i in range(len(splits[self.data.x.device])):
            index = {device: split[i] for device, split in splits.items()}
            yield {"index": index[self.data.x.device]} if self.lazy else self.gather(index)

    def gather(self, index, keys=None) -> dict:
        """The batch at dataset positions ``index`` (a tensor, or one per device the columns are
        on): every column, or those of ``keys`` that exist."""
        columns = self.columns()
        if keys is not None:
            columns = {key: columns[key] for key in keys if key in columns}
        where = index if isinstance(index, dict) else {v.device: index.to(v.device) for v in columns.values()}
        batch = {key: values[where[values.device]] for key, values in columns.items()}
        batch["index"] = index[self.data.x.device] if isinstance(index, dict) else index
        return batch


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


class DatasetBatches:
    """Any map-style ``Dataset`` (items: dict, (x, y), (x,) or x) in the batch format above."""

    def __init__(self, dataset, *, batch_size: int, shuffle: bool, seed: int = 0,
                 extras: dict[str, torch.Tensor] | None = None):
        self.extras = extras or {}
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(
            _Indexed(dataset), batch_size=batch_size, shuffle=shuffle, generator=self.generator,
            collate_fn=_collate_indexed,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            for key, values in self.extras.items():
                batch[key] = values[batch["index"]]
            yield batch


def _collate_indexed(items):
    index = torch.tensor([i for i, _ in items])
    batch = normalize_batch(torch.utils.data.default_collate([item for _, item in items]))
    batch["index"] = index
    batch["id"] = batch.get("id", index)
    return batch


def normalize_batch(batch) -> dict:
    """A collated batch (dict, (x, y), (x,) or a bare tensor) as ``{"x", "y"}`` with -1 for no label."""
    if isinstance(batch, dict):
        if "x" not in batch:
            raise DataError(f"Dict batches need an 'x' entry; got keys {sorted(batch)}.")
        out = dict(batch)
    elif isinstance(batch, (tuple, list)):
        if not 1 <= len(batch) <= 2:
            raise DataError(f"Batches must be (x,) or (x, y); got a sequence of {len(batch)} items.")
        out = {"x": batch[0]}
        if len(batch) == 2:
            out["y"] = batch[1]
    elif isinstance(batch, torch.Tensor):
        out = {"x": batch}
    else:
        raise DataError(f"Cannot read a batch of type {type(batch).__name__}; use dicts, (x, y) tuples or tensors.")
    x = out["x"]
    if "y" not in out or out["y"] is None:
        out["y"] = torch.full((x.shape[0],), UNLABELED, dtype=torch.long)
    else:
        out["y"] = torch.as_tensor(out["y"]).long().reshape(-1)
    return out


class _NormalizedLoader:
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield normalize_batch(batch)


def build_loader(data, *, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
                 extras: dict[str, torch.Tensor] | None = None):
    """An iterable of dict batches over ``data`` (ArrayDataset, Dataset or DataLoader)."""
    if isinstance(data, torch.utils.data.DataLoader):
        if extras:
            raise DataError("Per-sample extras need a Dataset, not a DataLoader (whose order softkd cannot see).")
        return _NormalizedLoader(data)
    if batch_size < 1:
        raise DataError(f"'batch_size' must be >= 1; got {batch_size}.")
    if len(data) == 0:
        raise DataError("The dataset is empty; give it at least one sample.")
    if isinstance(data, ArrayDataset):
        return IndexBatches(data, batch_size=batch_size, shuffle=shuffle, seed=seed, extras=extras)
    return DatasetBatches(data, batch_size=batch_size, shuffle=shuffle, seed=seed, extras=extras)
