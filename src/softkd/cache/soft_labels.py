"""Soft-label cache: the teacher runs once, its raw logits are memory-mapped by every later run.

A cache folder holds::

    manifest.json      written last and atomically: a folder without one is not a (complete) cache
    shard-00000.bin    samples [0, shard_size), shard-00001.bin the next shard_size, ...
    progress.json      during a build only: the finished shards, so an interrupted build resumes

Shards are raw little-endian C-order data without a header. A dense cache stores each sample's
logits as ``<f2`` or ``<f4`` of shape (views, classes). A top-k cache stores one packed record per
sample, so that everything about a sample lies together::

    values    <f2 | <f4  (views, k)   the k largest raw logits, largest first
    indices   <i4        (views, k)   their classes
    log_tail  <f4        (views,)     logsumexp of the other C - k logits; -inf when k == C

Logits are stored before temperature, so one cache serves every temperature.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from softkd.cache.build import (
    TeacherRun,
    progress_records,
    remove_leftovers,
    teacher_inference,
    write_shards,
)
from softkd.cache.fingerprint import (
    _as_json_data,
    differences,
    ids_sha256,
)
from softkd.cache.format import (
    BUILD_HINT,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    STAGING,
    CacheError,
    check_fingerprint,
    check_options,
    check_size,
    describe_layout,
    read_manifest,
    sample_dtype,
)
from softkd.data.datasets import ArrayDataset
from softkd.train.distributed import Distributed
from softkd.utils import atomic_write_text, sha256_file


class SoftLabelCache:
    """Raw teacher logits for N samples × V views × C classes, memory-mapped from shards.

    Make one with :meth:`build`, open it with :meth:`open` (which checks the run's fingerprint) and
    read it with :meth:`logits`. Positions index the dataset in its order at build time.
    """

    def __init__(self, folder: str | Path, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        self.num_samples, self.num_classes = manifest["num_samples"], manifest["num_classes"]
        self.views, self.dtype, self.top_k = manifest["views"], manifest["dtype"], manifest["top_k"]
        self.shard_size, self.fingerprint = manifest["shard_size"], manifest["fingerprint"]
        self._sample = sample_dtype(self.dtype, self.views, self.num_classes, self.top_k)
        self._maps: dict[int, np.memmap] = {}

    # ------------------------------------------------------------------------------------------
    # Building
    # ------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, folder: str | Path, teacher: nn.Module, dataset: ArrayDataset, *, fingerprint: dict,
              dtype: str = "fp16", top_k: int | None = None, views: int = 1, view_fn=None,
              shard_size: int = 16384, batch_size: int = 1024, progress=None,
              overwrite: bool = False) -> SoftLabelCache:
        """Run ``teacher`` once over ``dataset`` and store its raw logits in ``folder``.

        ``view_fn(x, ids, view) -> x_view`` makes view ``view``'s inputs (its augmentation fully
        determined by seed, sample id and view); without one ``views`` must be 1. Logits stream
        batch by batch into the open shard, so memory does not grow with the dataset.
        ``progress(done, total)`` is called after every batch and every shard kept from an
        interrupted build: building again into that folder keeps the shards it finished. A complete
        cache is replaced only with ``overwrite=True``, and only once the new one is fully written.
        """
        folder = Path(folder)
        check_options(dtype=dtype, top_k=top_k, views=views, view_fn=view_fn, shard_size=shard_size,
                       batch_size=batch_size)
        if not isinstance(teacher, nn.Module):
            raise CacheError(f"SoftLabelCache.build needs the teacher as an nn.Module; got {type(teacher).__name__}.")
        if not isinstance(dataset, ArrayDataset):
            raise CacheError(f"SoftLabelCache.build needs an ArrayDataset; got {type(dataset).__name__}.")
        check_fingerprint(fingerprint, teacher=teacher, dataset=dataset, dtype=dtype, top_k=top_k, views=views)
        dist = Distributed()
        replacing = (folder / MANIFEST).exists()
        if replacing and not overwrite:
            raise CacheError(f"'{folder}' already holds a complete soft-label cache; open it with "
                             "SoftLabelCache.open, or pass overwrite=True to replace it.")
        # A complete cache stays valid (and in use) until the new one is fully written.
        work = folder / STAGING if replacing else folder

        def my_shards() -> tuple[dict, list[dict]]:
            with teacher_inference(teacher):
                run = TeacherRun(teacher, dataset, views=views, view_fn=view_fn, dtype=dtype, top_k=top_k)
                if top_k is not None and top_k > run.num_classes:
                    raise CacheError(f"The 'top_k' of the soft-label cache must be <= the teacher's "
                                     f"{run.num_classes} classes; got {top_k} (use top_k=None to store all logits).")
                plan = {
                    "format_version": FORMAT_VERSION, "fingerprint": _as_json_data(fingerprint),
                    "num_samples": len(dataset), "num_classes": run.num_classes, "views": views, "dtype": dtype,
                    "top_k": top_k, "shard_size": shard_size, "ids_sha256": ids_sha256(dataset.ids),
                }
                return plan, write_shards(work, run, plan, batch_size=batch_size, progress=progress, rank=dist.rank,
                                          world=dist.world)

        # Under torchrun / accelerate launch each process writes every world-th shard (a teacher
        # failing on one process's shard stops them all); the main process writes the manifest.
        plan, shards = dist.together(my_shards)
        shards = sorted((e for mine in dist.gather_object(shards) for e in mine), key=lambda e: e["file"])
        dist.on_main(lambda: _publish(folder, work, plan, shards, replacing=replacing))
        return cls.open(folder)

    # ------------------------------------------------------------------------------------------
    # Opening and reading
    # ------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path, *, fingerprint: dict | None = None) -> SoftLabelCache:
        """The complete cache in ``folder``; with ``fingerprint``, it must be the one this run expects.

        Checks that every shard exists with its recorded size; reads no shard (see :meth:`verify`).
        """
        folder = Path(folder)
        manifest = read_manifest(folder)
        for entry in manifest["shards"]:
            check_size(folder / entry["file"], entry["bytes"])
        if fingerprint is not None:
            found = differences(fingerprint, manifest["fingerprint"])
            if found:
                raise CacheError(f"The soft-label cache in '{folder}' was built for another run "
                                 f"({'; '.join(found)}; cached -> this run); rebuild it with {BUILD_HINT}.")
        return cls(folder, manifest)

    def __len__(self) -> int:
        return self.num_samples

    def logits(self, positions, view=0) -> torch.Tensor:
        """Float32 logits (B, C) of the samples at ``positions``, for one view or one per position.

        Top-k caches give the k stored logits exactly and ``log_tail - log(C - k)`` for every other
        class: softmax at T = 1 keeps the exact tail mass, and any T gives a valid distribution.
        """
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        view = torch.as_tensor(view, dtype=torch.long)
        view = view.expand_as(positions) if view.ndim == 0 else view.reshape(-1)
        if view.shape != positions.shape:
            raise CacheError(f"logits() got {positions.numel()} positions but {view.numel()} views; "
                             "give one view for all or one per position.")
        for name, index, size in (("positions", positions, self.num_samples), ("views", view, self.views)):
            if index.numel() and (index.min() < 0 or index.max() >= size):
                raise CacheError(f"The cache in '{self.folder}' has {name} 0..{size - 1}; "
                                 f"got {int(index.min())}..{int(index.max())}.")
        positions, view = positions.numpy(), view.numpy()
        shard, row = np.divmod(positions, self.shard_size)
        k = self.top_k or self.num_classes
        values = np.empty((len(positions), k), np.float32)
        indices, log_tail = np.empty((len(positions), k), np.int64), np.empty(len(positions), np.float32)
        for s in np.unique(shard):
            at = np.flatnonzero(shard == s)
            samples = self._shard(int(s))[row[at]]  # fancy indexing copies just these samples
            if self.top_k is None:
                values[at] = samples[np.arange(len(at)), view[at]]
            else:
                values[at] = samples["values"][np.arange(len(at)), view[at]]
                indices[at] = samples["indices"][np.arange(len(at)), view[at]]
                log_tail[at] = samples["log_tail"][np.arange(len(at)), view[at]]
        if self.top_k is None:
            return torch.from_numpy(values)
        n, c = len(positions), self.num_classes
        if k == c:
            logits = torch.empty(n, c)  # every class is overwritten below
        else:
            logits = torch.from_numpy(log_tail - np.float32(math.log(c - k)))[:, None].expand(n, c).clone()
        return logits.scatter_(1, torch.from_numpy(indices), torch.from_numpy(values))

    def rows(self, view: int = 0) -> torch.Tensor:
        """Every sample's stored row of one view, (N, C), in the stored dtype and without a copy
        when the cache is one shard (memory-mapped: pages are read as batches touch them). Dense
        caches only; this is how a feature cache (:mod:`softkd.cache.features`) is read."""
        if self.top_k is not None:
            raise CacheError(f"rows() reads dense caches; '{self.folder}' stores the top {self.top_k} only.")
        with warnings.catch_warnings():  # read-only mapping: nothing writes to these tensors
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            parts = [torch.from_numpy(np.asarray(self._shard(i))[:, view]) for i in range(len(self.manifest["shards"]))]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def verify(self) -> None:
        """Re-hash every shard against the manifest; a changed or truncated shard is an error."""
        for entry in self.manifest["shards"]:
            path = self.folder / entry["file"]
            check_size(path, entry["bytes"])
            if sha256_file(path) != entry["sha256"]:
                raise CacheError(f"Shard '{path}' is corrupt: its sha256 differs from the manifest's; "
                                 f"rebuild the cache with {BUILD_HINT}.")

    def info(self) -> dict:
        shards = self.manifest["shards"]
        return {
            "folder": str(self.folder), "samples": self.num_samples, "classes": self.num_classes,
            "views": self.views, "dtype": self.dtype, "top_k": self.top_k, "shards": len(shards),
            "bytes": sum(entry["bytes"] for entry in shards), "bytes_per_sample": self._sample.itemsize,
            "fingerprint": self.fingerprint, "version": self.manifest["softkd_version"],
            "created": self.manifest["created"],
        }

    def __repr__(self) -> str:
        kind = "dense" if self.top_k is None else f"top-{self.top_k}"
        return (f"SoftLabelCache('{self.folder}', samples={self.num_samples}, classes={self.num_classes}, "
                f"views={self.views}, {kind} {self.dtype})")

    def __getstate__(self):
        # DataLoader workers get the folder and manifest, not copies of mapped shards.
        return {**self.__dict__, "_maps": {}}

    def _shard(self, index: int) -> np.memmap:
        if index not in self._maps:
            entry = self.manifest["shards"][index]
            self._maps[index] = np.memmap(self.folder / entry["file"], dtype=self._sample, mode="r",
                                          shape=(entry["samples"],))
        return self._maps[index]


def _publish(folder: Path, work: Path, plan: dict, shards: list[dict], *, replacing: bool) -> None:
    """Make the shards in ``work`` the complete cache in ``folder``: the manifest goes last."""
    import softkd

    manifest = {"format": FORMAT, **plan, "layout": describe_layout(plan), "shards": shards,
                "softkd_version": softkd.__version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if replacing:
        (folder / MANIFEST).unlink()  # from here until the new manifest, nothing opens as complete
        for record in progress_records(work):  # first, so a crash mid-move still resumes
            os.replace(record, folder / record.name)
        for entry in shards:
            os.replace(work / entry["file"], folder / entry["file"])
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    remove_leftovers(folder, keep={entry["file"] for entry in shards})
