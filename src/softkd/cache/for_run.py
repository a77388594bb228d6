"""The caches a run config asks for: each teacher's soft-label cache of the transfer set, and a
feature method's feature caches, opened when they match the run and built when they do not
(``softkd run``, ``softkd cache build``; :mod:`softkd.pipeline`)."""

from __future__ import annotations

from pathlib import Path

import torch

from softkd.cache.features import FeatureTap, feature_shape
from softkd.cache.fingerprint import fingerprint, ids_sha256
from softkd.cache.format import CacheError
from softkd.cache.soft_labels import SoftLabelCache
from softkd.config import RunConfig
from softkd.data.augment import augment_of
from softkd.data.datasets import Splits
from softkd.data.loader import build_loader
from softkd.models.teacher import Teacher
from softkd.train.runtime import inference_batch_size


def transfer_logits(config: RunConfig, teachers: list[Teacher], splits: Splits, out: Path,
                     logger) -> torch.Tensor | None:
    """The teachers' raw logits on the transfer set, in its order: (N, C) for one teacher, (N, M, C)
    for M, with a view axis after N for augmented views; from the soft-label caches, or computed
    here when the cache is off; None when the teachers must run on every augmented batch."""
    if not config.cache.enabled:
        if config.data.augment is not None:
            return None
        loader = build_loader(splits.train, batch_size=inference_batch_size(teachers[0]))
        each = [t.predict_logits(loader) for t in teachers]
    else:
        each = []
        positions = torch.arange(len(splits.train))
        for i, teacher in enumerate(teachers):
            cache = open_or_build(config, i, teacher, splits, out, logger)
            each.append(cache.logits(positions) if cache.views == 1 else
                        torch.stack([cache.logits(positions, view=v) for v in range(cache.views)], 1))  # (N, K, C)
    return each[0] if config.teachers is None else torch.stack(each, -2)


def open_or_build(config: RunConfig, index: int, teacher: Teacher, splits: Splits, out: Path,
                         logger, *, tap: str | None = None) -> SoftLabelCache:
    """Teacher ``index``'s soft-label cache of the transfer set, opened or built; with ``tap``, its
    feature cache at that module path instead (:mod:`softkd.cache.features`: one shard, no views)."""
    d = config.data
    augment = None if tap is not None else augment_of(d, pool=splits.train)
    views = 1 if tap is not None else config.cache.views
    preprocessing = {"augment": augment.describe()} if augment is not None else None
    if tap is not None:
        preprocessing = {"features_of": tap, "shape": list(feature_shape(teacher, tap, splits.train.x[:1]))}
        teacher = FeatureTap(teacher, tap)
    top_k = None if tap is not None else config.cache.top_k
    expected = fingerprint(
        teacher=teacher, dtype=config.cache.dtype, top_k=top_k, views=views,
        augment_seed=augment.seed if augment is not None else None, preprocessing=preprocessing,
        data={"name": d.name, "path": d.path, "unlabeled_path": d.unlabeled_path, "split": "train",
              "val_fraction": d.val_fraction, "seed": d.seed, "n": len(splits.train),
              "ids_sha256": ids_sha256(splits.train.ids)},
    )
    folder, shared = cache_folder(config, index, out)
    if tap is not None:
        folder = folder / "features" / tap
    if (folder / "manifest.json").exists():
        try:
            return SoftLabelCache.open(folder, fingerprint=expected)
        except CacheError:
            if shared:  # someone else's cache: never replace it behind their back
                raise
    logger.skip(0, f"teacher → {'feature cache (' + tap + ')' if tap else 'soft-label cache'}")
    return SoftLabelCache.build(folder, teacher, splits.train, fingerprint=expected, dtype=config.cache.dtype,
                                top_k=top_k, views=views, view_fn=augment if views > 1 else None,
                                shard_size=len(splits.train) if tap is not None else config.cache.shard_size,
                                overwrite=not shared, batch_size=inference_batch_size(teacher))


def cache_folder(config: RunConfig, index: int, out: Path) -> tuple[Path, bool]:
    """Teacher ``index``'s cache folder, and whether it is shared (named in the config: never
    replaced). One teacher: ``cache.dir`` or ``<run>/cache``; several: each one's ``cache_dir``,
    else ``teacher<i>`` inside those."""
    own = config.teacher_list[index].cache_dir if config.teachers is not None else None
    if own is not None:
        return Path(own), True
    base = Path(config.cache.dir) if config.cache.dir is not None else out / "cache"
    return (base / f"teacher{index}" if config.teachers is not None else base), config.cache.dir is not None


def features_cached(config: RunConfig) -> bool:
    """Whether a feature method reads cached teacher features (else the teacher runs on every batch)."""
    return config.cache.enabled and config.cache.features and config.data.augment is None


def feature_caches(config: RunConfig, teacher: Teacher, splits: Splits, out: Path, logger) -> list[SoftLabelCache]:
    """The feature cache of each of the method's ``teacher_layers``, opened or built."""
    return [open_or_build(config, 0, teacher, splits, out, logger, tap=path) for path in config.method.teacher_layers]
