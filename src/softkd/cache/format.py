"""The on-disk format of a soft-label cache: names, record layouts, and the checks on build
options, fingerprints and manifests (the layout is described in softkd.cache.soft_labels)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from softkd.cache.fingerprint import (
    differences,
    ids_sha256,
    teacher_sha256,
)
from softkd.errors import SoftKDError

FORMAT, FORMAT_VERSION = "softkd-soft-labels", 1
MANIFEST, PROGRESS, STAGING = "manifest.json", "progress.json", ".staging"
DTYPES = {"fp16": "<f2", "fp32": "<f4"}
FP16_MAX = 65504.0
SHARD_NAME = re.compile(r"shard-\d{5,}\.bin(\.tmp)?")
BUILD_HINT = "`softkd cache build`"


class CacheError(SoftKDError):
    """A soft-label cache is missing, incomplete, corrupt, or was built for another run."""



def sample_dtype(dtype: str, views: int, num_classes: int, top_k: int | None) -> np.dtype:
    """One sample's bytes in a shard (see the module docstring)."""
    if top_k is None:
        return np.dtype((DTYPES[dtype], (views, num_classes)))
    return np.dtype([("values", DTYPES[dtype], (views, top_k)), ("indices", "<i4", (views, top_k)),
                     ("log_tail", "<f4", (views,))])


def describe_layout(plan: dict) -> str:
    v, c, k, value = plan["views"], plan["num_classes"], plan["top_k"], DTYPES[plan["dtype"]]
    if k is None:
        return f"dense: per sample {value} ({v}, {c}) logits; raw little-endian, C order, no header"
    return (f"top-k: per sample a packed record of values {value} ({v}, {k}), indices <i4 ({v}, {k}), "
            f"log_tail <f4 ({v},); raw little-endian, no header")


def check_options(*, dtype, top_k, views, view_fn, shard_size, batch_size) -> None:
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


def check_fingerprint(fingerprint, *, teacher, dataset, dtype, top_k, views) -> None:
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


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CacheError(f"There is no soft-label cache folder '{folder}'; build a cache there with {BUILD_HINT}, "
                         "or give the folder of one.")
    if not path.is_file():
        resumable = " (an interrupted build: building again resumes it)" if (folder / PROGRESS).exists() else ""
        raise CacheError(f"No complete soft-label cache in '{folder}': manifest.json is missing{resumable}; "
                         f"build it with {BUILD_HINT}.")
    try:
        manifest = json.loads(path.read_text())
        check_manifest(manifest)
    except (ValueError, KeyError, TypeError) as error:
        raise CacheError(f"'{path}' is not a valid soft-label cache manifest ({error}); rebuild the cache "
                         f"with {BUILD_HINT}.") from None
    return manifest


def check_manifest(m) -> None:
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
    sample_bytes, shards = sample_dtype(m["dtype"], v, c, k).itemsize, m["shards"]
    if len(shards) != -(-n // size):
        raise ValueError(f"{len(shards)} shards for {n} samples of {size} per shard")
    for i, entry in enumerate(shards):
        samples = min(size, n - i * size)
        if Path(entry["file"]).name != entry["file"] or not isinstance(entry["sha256"], str):
            raise ValueError(f"shard {i} has an invalid file name or sha256")
        if entry["samples"] != samples or entry["bytes"] != samples * sample_bytes:
            raise ValueError(f"{entry['file']} records {entry['samples']} samples in {entry['bytes']} bytes; "
                             f"expected {samples} samples of {sample_bytes} bytes")


def check_size(path: Path, expected: int) -> None:
    if not path.is_file():
        raise CacheError(f"Shard '{path}' of the soft-label cache is missing; rebuild the cache with {BUILD_HINT}.")
    size = path.stat().st_size
    if size != expected:
        raise CacheError(f"Shard '{path}' has {size} bytes but the manifest records {expected} (truncated or "
                         f"replaced); rebuild the cache with {BUILD_HINT}.")


