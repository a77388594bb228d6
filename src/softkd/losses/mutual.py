"""Deep Mutual Learning's objective (Zhang et al., CVPR 2018): a pure function of the peers' logits."""

from __future__ import annotations

import torch

from softkd.errors import ConfigError
from softkd.losses.logits import cross_entropy, soft_target_kl


def mutual_objective(
    logits: list[torch.Tensor] | tuple[torch.Tensor, ...],
    labels: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    labeled_count: float | torch.Tensor | None = None,
    sample_count: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Σ_i [CE(s_i, y) + 1/(N−1) · Σ_{j≠i} T² · KL(softmax(s_j/T) ‖ softmax(s_i/T))], the targets
    s_j detached: each peer's gradient is its own loss's. CE averages over the labeled samples,
    the KL terms over all (an unlabeled sample teaches through the peers' predictions only).
    Returns ``loss`` and, per peer i, ``ce_peer{i}`` and ``kl_peer{i}``; ``ce`` and ``kl`` are their
    means over the peers."""
    n = len(logits)
    if n < 2:
        raise ConfigError(f"Mutual learning needs at least 2 peers; got {n}.")
    terms, total = {}, 0.0
    for i, own in enumerate(logits):
        ce = cross_entropy(own, labels, count=labeled_count)
        kl = sum(soft_target_kl(own, other.detach(), temperature=temperature, count=sample_count)
                 for j, other in enumerate(logits) if j != i) / (n - 1)
        total = total + ce + kl
        terms[f"ce_peer{i}"], terms[f"kl_peer{i}"] = ce.detach(), kl.detach()
    return {"loss": total,
            "ce": sum(terms[f"ce_peer{i}"] for i in range(n)) / n,
            "kl": sum(terms[f"kl_peer{i}"] for i in range(n)) / n, **terms}
