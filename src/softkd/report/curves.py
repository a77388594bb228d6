"""A run's metrics.jsonl read back: each student's epochs, its best validation epoch and its
training time, per (kind, labeled fraction, peer name or "", seed)."""

from __future__ import annotations

import json
from pathlib import Path

Stage = tuple[str, float, str, int]
"""(kind: "scratch" | "distilled", labeled fraction, peer name or "", seed)."""


def epoch_records(metrics: Path) -> dict[Stage, dict[int, dict]]:
    """Every student stage's end-of-epoch records by epoch. A stage trained again (a run stopped
    midway, then rerun) keeps its last try's epochs. The teacher's own stage is left out."""
    stages: dict[Stage, dict[int, dict]] = {}
    for line in Path(metrics).read_text().splitlines():
        r = json.loads(line)
        if "epoch" in r and "kind" not in r and r.get("stage") in ("scratch", "distilled"):
            key = r["stage"], r["labeled_fraction"], r.get("student", ""), r["seed"]
            stages.setdefault(key, {})[r["epoch"]] = r
    return stages


def best_validation(metrics: Path) -> dict[Stage, float]:
    """Each student's validation accuracy at its best epoch (the epoch whose ``val_accuracy`` is
    highest: a cohort's mean picks the epoch for all its peers, whose own scores are
    ``val_<peer>_accuracy``). Stages without validation are absent."""
    best = {}
    for (kind, fraction, twin, seed), epochs in epoch_records(metrics).items():
        scored = [r for r in epochs.values() if r.get("val_accuracy") is not None]
        if not scored:
            continue
        top = max(scored, key=lambda r: r["val_accuracy"])
        peers = sorted({k[4:-9] for k in top if k.startswith("val_peer") and k.endswith("_accuracy")})
        for name in peers or [twin]:
            best[kind, fraction, name, seed] = top[f"val_{name}_accuracy"] if peers else top["val_accuracy"]
    return best


def training_seconds(metrics: Path) -> dict[Stage, float]:
    """Each stage's training time: the sum of its epochs' ``epoch_s`` (a mutual-learning cohort
    trains as one "distilled" stage, under the name "")."""
    return {key: sum(r.get("epoch_s", 0.0) for r in epochs.values()) for key, epochs in epoch_records(metrics).items()}
