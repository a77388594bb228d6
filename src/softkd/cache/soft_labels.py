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

import itertools
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from softkd.cache.fingerprint import (
    _as_json_data,
    differences,
    ids_sha256,
    teacher_sha256,
)
from softkd.data.datasets import ArrayDataset
from softkd.errors import SoftKDError
from softkd.utils import atomic_write_text, fsync_dir, sha256_file

FORMAT, FORMAT_VERSION = "softkd-soft-labels", 1
MANIFEST, PROGRESS, STAGING = "manifest.json", "progress.json", ".staging"
DTYPES = {"fp16": "<f2", "fp32": "<f4"}
_FP16_MAX = 65504.0
_SHARD_NAME = re.compile(r"shard-\d{5,}\.bin(\.tmp)?")
_BUILD = "`softkd cache build`"


class CacheError(SoftKDError):
    """A soft-label cache is missing, incomplete, corrupt, or was built for another run."""


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
        self._sample = _sample_dtype(self.dtype, self.views, self.num_classes, self.top_k)
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
        _check_options(dtype=dtype, top_k=top_k, views=views, view_fn=view_fn, shard_size=shard_size,
                       batch_size=batch_size)
        if not isinstance(teacher, nn.Module):
            raise CacheError(f"SoftLabelCache.build needs the teacher as an nn.Module; got {type(teacher).__name__}.")
        if not isinstance(dataset, ArrayDataset):
            raise CacheError(f"SoftLabelCache.build needs an ArrayDataset; got {type(dataset).__name__}.")
        _check_fingerprint(fingerprint, teacher=teacher, dataset=dataset, dtype=dtype, top_k=top_k, views=views)
        replacing = (folder / MANIFEST).exists()
        if replacing and not overwrite:
            raise CacheError(f"'{folder}' already holds a complete soft-label cache; open it with "
                             "SoftLabelCache.open, or pass overwrite=True to replace it.")
        with _inference(teacher):
            run = _TeacherRun(teacher, dataset, views=views, view_fn=view_fn, dtype=dtype, top_k=top_k)
            if top_k is not None and top_k > run.num_classes:
                raise CacheError(f"The 'top_k' of the soft-label cache must be <= the teacher's {run.num_classes} "
                                 f"classes; got {top_k} (use top_k=None to store all logits).")
            plan = {
                "format_version": FORMAT_VERSION, "fingerprint": _as_json_data(fingerprint),
                "num_samples": len(dataset), "num_classes": run.num_classes, "views": views, "dtype": dtype,
                "top_k": top_k, "shard_size": shard_size, "ids_sha256": ids_sha256(dataset.ids),
            }
            # A complete cache stays valid (and in use) until the new one is fully written.
            work = folder / STAGING if replacing else folder
            shards = _write_shards(work, run, plan, batch_size=batch_size, progress=progress)
        import softkd

        manifest = {"format": FORMAT, **plan, "layout": _describe_layout(plan), "shards": shards,
                    "softkd_version": softkd.__version__,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if replacing:
            (folder / MANIFEST).unlink()  # from here until the new manifest, nothing opens as complete
            os.replace(work / PROGRESS, folder / PROGRESS)  # first, so a crash mid-move still resumes
            for entry in shards:
                os.replace(work / entry["file"], folder / entry["file"])
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        _remove_leftovers(folder, keep={entry["file"] for entry in shards})
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
        manifest = _read_manifest(folder)
        for entry in manifest["shards"]:
            _check_size(folder / entry["file"], entry["bytes"])
        if fingerprint is not None:
            found = differences(fingerprint, manifest["fingerprint"])
            if found:
                raise CacheError(f"The soft-label cache in '{folder}' was built for another run "
                                 f"({'; '.join(found)}; cached -> this run); rebuild it with {_BUILD}.")
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

    def verify(self) -> None:
        """Re-hash every shard against the manifest; a changed or truncated shard is an error."""
        for entry in self.manifest["shards"]:
            path = self.folder / entry["file"]
            _check_size(path, entry["bytes"])
            if sha256_file(path) != entry["sha256"]:
                raise CacheError(f"Shard '{path}' is corrupt: its sha256 differs from the manifest's; "
                                 f"rebuild the cache with {_BUILD}.")

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


# ----------------------------------------------------------------------------------------------
# The build, shard by shard
# ----------------------------------------------------------------------------------------------

class _TeacherRun:
    """The teacher over slices of the dataset, every view, encoded as shard bytes."""

    def __init__(self, teacher, dataset, *, views, view_fn, dtype, top_k):
        self.teacher, self.dataset, self.views, self.view_fn = teacher, dataset, views, view_fn
        self.dtype, self.top_k = dtype, top_k
        first = next(itertools.chain(teacher.parameters(), teacher.buffers()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.num_classes = None
        self.num_classes = self.logits(0, 1).shape[-1]  # one-sample probe: validate before writing

    def logits(self, start: int, stop: int) -> torch.Tensor:
        """Float32 CPU logits (B, V, C) of samples [start, stop)."""
        x, ids = self.dataset.x[start:stop], self.dataset.ids[start:stop]
        per_view = []
        for view in range(self.views):
            out = self.teacher((x if self.view_fn is None else self.view_fn(x, ids, view)).to(self.device))
            if not (isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == stop - start
                    and out.shape[1] == (self.num_classes or out.shape[1])):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise CacheError(f"The teacher must return logits of shape ({stop - start}, "
                                 f"{self.num_classes or 'classes'}) for samples {start}..{stop - 1} "
                                 f"(view {view}); got {got}.")
            per_view.append(out.float().cpu())
        logits = torch.stack(per_view, 1)  # V × (B, C) -> (B, V, C)
        if not torch.isfinite(logits).all():
            raise CacheError(f"The teacher gave non-finite logits for samples {start}..{stop - 1}; "
                             "fix the teacher or its inputs before caching.")
        if self.dtype == "fp16" and logits.abs().max() > _FP16_MAX:
            raise CacheError(f"The teacher's logits reach {float(logits.abs().max()):.0f}, beyond fp16's "
                             f"±{_FP16_MAX:.0f}; build the cache with dtype='fp32'.")
        return logits

    def encode(self, start: int, stop: int) -> bytes:
        logits = self.logits(start, stop)
        if self.top_k is None:
            return logits.numpy().astype(DTYPES[self.dtype]).tobytes()
        values, indices = logits.topk(self.top_k, dim=-1)  # (B, V, k), largest first
        log_tail = logits.scatter(-1, indices, float("-inf")).logsumexp(-1)  # (B, V); -inf if k == C
        records = np.empty(stop - start, _sample_dtype(self.dtype, self.views, self.num_classes, self.top_k))
        records["values"], records["indices"] = values.numpy(), indices.numpy()
        records["log_tail"] = log_tail.numpy()
        return records.tobytes()


def _write_shards(work: Path, run: _TeacherRun, plan: dict, *, batch_size: int, progress) -> list[dict]:
    """Every shard of ``plan`` in ``work``, keeping those an interrupted build of the same plan finished."""
    work.mkdir(parents=True, exist_ok=True)
    n, size = plan["num_samples"], plan["shard_size"]
    sample_bytes = _sample_dtype(plan["dtype"], plan["views"], plan["num_classes"], plan["top_k"]).itemsize
    finished = _finished_shards(work, plan)
    shards = []
    for index, start in enumerate(range(0, n, size)):
        stop, name = min(start + size, n), f"shard-{index:05d}.bin"
        entry = finished.get(name)
        if entry is None or entry["bytes"] != (stop - start) * sample_bytes or not _intact(work / name, entry):
            tmp = work / f"{name}.tmp"
            try:
                with open(tmp, "wb") as f:
                    for lo in range(start, stop, batch_size):
                        f.write(run.encode(lo, min(lo + batch_size, stop)))
                        if lo + batch_size < stop and progress is not None:
                            progress(lo + batch_size, n)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, work / name)
            fsync_dir(work)
            entry = {"file": name, "samples": stop - start, "bytes": (stop - start) * sample_bytes,
                     "sha256": sha256_file(work / name)}
            finished[name] = entry
            atomic_write_text(work / PROGRESS, json.dumps({"plan": plan, "shards": list(finished.values())}))
        shards.append(entry)
        if progress is not None:
            progress(stop, n)
    return shards


def _finished_shards(work: Path, plan: dict) -> dict[str, dict]:
    """Shards an interrupted build of this same plan recorded (checked again before being kept)."""
    try:
        record = json.loads((work / PROGRESS).read_text())
        return {entry["file"]: entry for entry in record["shards"]} if record["plan"] == plan else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _intact(path: Path, entry: dict) -> bool:
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


def _remove_leftovers(folder: Path, *, keep: set[str]) -> None:
    """Shards of earlier or interrupted builds, the progress record and the staging folder."""
    for path in folder.iterdir():
        if _SHARD_NAME.fullmatch(path.name) and path.name not in keep:
            path.unlink()
    (folder / PROGRESS).unlink(missing_ok=True)
    shutil.rmtree(folder / STAGING, ignore_errors=True)


@contextmanager
def _inference(teacher: nn.Module):
    """Eval mode and no autograd for the build; every submodule gets its own training flag back."""
    modes = [(module, module.training) for module in teacher.modules()]
    teacher.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


# ----------------------------------------------------------------------------------------------
# Checks and small helpers
# ----------------------------------------------------------------------------------------------

def _sample_dtype(dtype: str, views: int, num_classes: int, top_k: int | None) -> np.dtype:
    """One sample's bytes in a shard (see the module docstring)."""
    if top_k is None:
        return np.dtype((DTYPES[dtype], (views, num_classes)))
    return np.dtype([("values", DTYPES[dtype], (views, top_k)), ("indices", "<i4", (views, top_k)),
                     ("log_tail", "<f4", (views,))])


def _describe_layout(plan: dict) -> str:
    v, c, k, value = plan["views"], plan["num_classes"], plan["top_k"], DTYPES[plan["dtype"]]
    if k is None:
        return f"dense: per sample {value} ({v}, {c}) logits; raw little-endian, C order, no header"
    return (f"top-k: per sample a packed record of values {value} ({v}, {k}), indices <i4 ({v}, {k}), "
            f"log_tail <f4 ({v},); raw little-endian, no header")


def _check_options(*, dtype, top_k, views, view_fn, shard_size, batch_size) -> None:
    if dtype not in DTYPES:
        raise CacheError(f"The 'dtype' of the soft-label cache must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    for name, value in (("views", views), ("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CacheError(f"The '{name}' of the soft-label cache must be an integer >= 1; got {value!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise CacheError(f"The 'top_k' of the soft-label cache must be an integer >= 1 (or None for all "
                         f"logits); got {top_k!r}.")
    if views > 1 and view_fn is None:
        raise CacheError(f"views={views} needs a view_fn(x, ids, view) that makes each view's inputs; "
                         "give one, or use views=1.")


def _check_fingerprint(fingerprint, *, teacher, dataset, dtype, top_k, views) -> None:
    """The fields ``fingerprint`` states about this build must be true of it."""
    if not isinstance(fingerprint, dict):
        raise CacheError("SoftLabelCache.build needs fingerprint=softkd.cache.fingerprint(...), a dict; "
                         f"got {type(fingerprint).__name__}.")
    actual = {"dtype": dtype, "top_k": top_k, "views": views}
    claimed = {key: fingerprint[key] for key in actual if key in fingerprint}
    actual = {key: actual[key] for key in claimed}
    if "teacher_sha256" in fingerprint:
        claimed["teacher_sha256"], actual["teacher_sha256"] = fingerprint["teacher_sha256"], teacher_sha256(teacher)
    data = fingerprint.get("data") if isinstance(fingerprint.get("data"), dict) else {}
    for key, value in (("n", lambda: len(dataset)), ("ids_sha256", lambda: ids_sha256(dataset.ids))):
        if key in data:
            claimed.setdefault("data", {})[key], actual.setdefault("data", {})[key] = data[key], value()
    wrong = differences(actual, claimed)
    if wrong:
        raise CacheError(f"The fingerprint given to SoftLabelCache.build does not describe this build "
                         f"({'; '.join(wrong)}; fingerprint -> build); compute it with "
                         "softkd.cache.fingerprint() from the same teacher, data and options.")


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        resumable = " (an interrupted build: building again resumes it)" if (folder / PROGRESS).exists() else ""
        raise CacheError(f"No complete soft-label cache in '{folder}': manifest.json is missing{resumable}; "
                         f"build it with {_BUILD}.")
    try:
        manifest = json.loads(path.read_text())
        _check_manifest(manifest)
    except (ValueError, KeyError, TypeError) as error:
        raise CacheError(f"'{path}' is not a valid soft-label cache manifest ({error}); rebuild the cache "
                         f"with {_BUILD}.") from None
    return manifest


def _check_manifest(m) -> None:
    """Raise ValueError (or KeyError/TypeError) unless ``m`` is a self-consistent manifest."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"its format is not {FORMAT!r}")
    if m["format_version"] != FORMAT_VERSION:
        raise ValueError(f"format version {m['format_version']!r}; this softkd reads {FORMAT_VERSION}")
    n, c, v, k, size = (m[key] for key in ("num_samples", "num_classes", "views", "top_k", "shard_size"))
    if not all(isinstance(x, int) and x >= 1 for x in (n, c, v, size)) or m["dtype"] not in DTYPES:
        raise ValueError("num_samples, num_classes, views, shard_size or dtype is invalid")
    if k is not None and not (isinstance(k, int) and 1 <= k <= c):
        raise ValueError(f"top_k {k!r} is not in 1..{c}")
    if not isinstance(m["fingerprint"], dict):
        raise TypeError("the fingerprint is not a dict")
    sample_bytes, shards = _sample_dtype(m["dtype"], v, c, k).itemsize, m["shards"]
    if len(shards) != -(-n // size):
        raise ValueError(f"{len(shards)} shards for {n} samples of {size} per shard")
    for i, entry in enumerate(shards):
        samples = min(size, n - i * size)
        if Path(entry["file"]).name != entry["file"] or not isinstance(entry["sha256"], str):
            raise ValueError(f"shard {i} has an invalid file name or sha256")
        if entry["samples"] != samples or entry["bytes"] != samples * sample_bytes:
            raise ValueError(f"{entry['file']} records {entry['samples']} samples in {entry['bytes']} bytes; "
                             f"expected {samples} samples of {sample_bytes} bytes")


def _check_size(path: Path, expected: int) -> None:
    if not path.is_file():
        raise CacheError(f"Shard '{path}' of the soft-label cache is missing; rebuild the cache with {_BUILD}.")
    size = path.stat().st_size
    if size != expected:
        raise CacheError(f"Shard '{path}' has {size} bytes but the manifest records {expected} (truncated or "
                         f"replaced); rebuild the cache with {_BUILD}.")


