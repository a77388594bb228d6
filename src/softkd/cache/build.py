"""Building a soft-label cache: the teacher over the dataset, shard by shard, resumable."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from softkd.cache.format import (
    DTYPES,
    FP16_MAX,
    PROGRESS,
    SHARD_NAME,
    STAGING,
    CacheError,
    sample_dtype,
)
from softkd.utils import atomic_write_text, fsync_dir, sha256_file


class TeacherRun:
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
        top_k = self.top_k is not None and self.top_k < logits.shape[-1]  # (too large a k is refused later)
        stored = logits.topk(self.top_k, dim=-1).values if top_k else logits  # what `dtype` will hold
        if self.dtype == "fp16" and stored.abs().max() > FP16_MAX:
            raise CacheError(f"The teacher's logits reach {float(stored.abs().max()):.0f}, beyond fp16's "
                             f"±{FP16_MAX:.0f}; build the cache with dtype='fp32'.")
        return logits

    def encode(self, start: int, stop: int) -> bytes:
        logits = self.logits(start, stop)
        if self.top_k is None:
            return logits.numpy().astype(DTYPES[self.dtype]).tobytes()
        values, indices = logits.topk(self.top_k, dim=-1)  # (B, V, k), largest first
        log_tail = logits.scatter(-1, indices, float("-inf")).logsumexp(-1)  # (B, V); -inf if k == C
        records = np.empty(stop - start, sample_dtype(self.dtype, self.views, self.num_classes, self.top_k))
        records["values"], records["indices"] = values.numpy(), indices.numpy()
        records["log_tail"] = log_tail.numpy()
        return records.tobytes()


def write_shards(work: Path, run: TeacherRun, plan: dict, *, batch_size: int, progress, rank: int = 0,
                 world: int = 1) -> list[dict]:
    """The shards of ``plan`` that are this process's (every ``world``-th from ``rank``) in ``work``,
    keeping those an interrupted build of the same plan finished. A shard's bytes do not depend
    on which process wrote it: its batches always start at the shard's first sample."""
    work.mkdir(parents=True, exist_ok=True)
    n, size = plan["num_samples"], plan["shard_size"]
    sample_bytes = sample_dtype(plan["dtype"], plan["views"], plan["num_classes"], plan["top_k"]).itemsize
    finished = finished_shards(work, plan)
    shards = []
    record = PROGRESS if world == 1 else f"progress-{rank}.json"  # one writer per file
    for index, start in enumerate(range(0, n, size)):
        if index % world != rank:
            continue
        stop, name = min(start + size, n), f"shard-{index:05d}.bin"
        entry = finished.get(name)
        if entry is None or entry["bytes"] != (stop - start) * sample_bytes or not intact(work / name, entry):
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
            mine = [e for e in finished.values() if _shard_index(e["file"]) % world == rank]
            atomic_write_text(work / record, json.dumps({"plan": plan, "shards": mine}))
        shards.append(entry)
        if progress is not None:
            progress(stop, n)
    return shards


def _shard_index(name: str) -> int:
    return int(name.removeprefix("shard-").split(".")[0])


def finished_shards(work: Path, plan: dict) -> dict[str, dict]:
    """Shards an interrupted build of this same plan recorded, with any number of processes
    (checked again before being kept)."""
    found = {}
    for path in progress_records(work):
        try:
            record = json.loads(path.read_text())
            if record["plan"] == plan:
                found.update({entry["file"]: entry for entry in record["shards"]})
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def progress_records(folder: Path) -> list[Path]:
    """``progress.json`` of a one-process build, ``progress-<rank>.json`` of a multi-process one."""
    return sorted(folder.glob("progress*.json"))


def intact(path: Path, entry: dict) -> bool:
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


def remove_leftovers(folder: Path, *, keep: set[str]) -> None:
    """Shards of earlier or interrupted builds, the progress record and the staging folder."""
    for path in folder.iterdir():
        if SHARD_NAME.fullmatch(path.name) and path.name not in keep:
            path.unlink()
    for path in progress_records(folder):
        path.unlink()
    shutil.rmtree(folder / STAGING, ignore_errors=True)


@contextmanager
def teacher_inference(teacher: nn.Module):
    """Eval mode and no autograd for the build; every submodule gets its own training flag back."""
    modes = [(module, module.training) for module in teacher.modules()]
    teacher.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


