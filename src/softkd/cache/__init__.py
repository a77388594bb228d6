"""Soft-label cache: raw teacher logits computed once and memory-mapped for offline distillation.

``fingerprint(...)`` names what a cache was computed from; ``SoftLabelCache.build`` writes one,
``SoftLabelCache.open(folder, fingerprint=...)`` refuses one built for another run.
"""

from softkd.cache.fingerprint import differences, fingerprint, ids_sha256
from softkd.cache.format import CacheError
from softkd.cache.soft_labels import SoftLabelCache

__all__ = ["CacheError", "SoftLabelCache", "differences", "fingerprint", "ids_sha256"]
