"""Stage stamps: the hash of what a stage's output depends on, written beside it. A run into the
same folder skips every stage whose stamp matches and reruns only what a changed config affects
(see :func:`softkd.pipeline.run_experiment`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from softkd.config import RunConfig
from softkd.utils import atomic_write_text

STAMP_FORMAT = 2  # stage stamps written by softkd 0.2 (0.1's have no "format")


def data_key(config: RunConfig) -> dict:
    """The data a student trains and is validated on (a loaded teacher's key does not cover it)."""
    return config.data.model_dump(mode="json", exclude={"labeled_fraction", "augment", "shift"})


def augment_key(config: RunConfig) -> list:
    """Augmentation settings for a student's stamp (nothing without augmentation, so runs
    stamped before augmentation existed stay valid)."""
    if config.data.augment is None:
        return []
    views = config.cache.views if config.cache.enabled else None
    return [{"augment": config.data.augment, "shift": config.data.shift, "views": views}]


def train_key(config: RunConfig) -> dict:
    """Training settings that change what a student learns (not how often it is checkpointed, nor
    threads or deterministic algorithms, which only change how the arithmetic is scheduled)."""
    return config.train.model_dump(mode="json", exclude={"seeds", "threads", "checkpoint_every", "keep_last",
                                                         "log_every", "deterministic", "cuda_graphs"})


def stage_hash(*parts) -> str:
    def plain(part):
        return part.model_dump(mode="json") if hasattr(part, "model_dump") else part

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_stamp(path: Path, key: str):
    """The stage's result when ``path`` holds a stamp with ``key``; else None."""
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stamp.get("result") if stamp.get("key") == key else None


def write_stamp(path: Path, key: str, result: dict) -> None:
    atomic_write_text(path, json.dumps({"key": key, "format": STAMP_FORMAT, "result": result}, indent=2))


def note_stale(path: Path, logger) -> None:
    """Say so when a student is trained again because softkd 0.1 wrote its stamp (0.2 changed
    every distilled student's key: the method's own parameters are in it)."""
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if "format" not in stamp:
        logger.note(f"{path.stem}: written by softkd 0.1 with the old method settings; training it again.")
