"""Twin Network Distillation as Deep Mutual Learning (Zhang et al., CVPR 2018): N peers trained
together from scratch, each taught by the others' predictions; no pretrained teacher."""

from __future__ import annotations

import copy

import torch
from pydantic import Field, model_validator
from torch import nn

from softkd.losses.mutual import mutual_objective
from softkd.methods.base import Method, MethodParams, dry_forward, register_method


class MutualParams(MethodParams):
    peers: int = Field(2, ge=2, le=16)
    """N: how many peers train together (the config's student is peer0)."""
    peer_models: list[str] | None = None
    """The architectures of peer1 … peer(N−1) (zoo names or import strings); default: the student's."""
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    """T of the peers' mutual KL terms (the paper's 1)."""

    @model_validator(mode="after")
    def _one_model_per_other_peer(self):
        if self.peer_models is not None and len(self.peer_models) != self.peers - 1:
            raise ValueError(f"peer_models lists the other {self.peers - 1} peer(s)' architectures (peer1 onwards); "
                             f"got {len(self.peer_models)}")
        return self


def peer_seed(seed: int, index: int) -> int:
    """Peer ``index``'s initialisation seed in a run of ``seed``: peer0 is the run's own student."""
    return seed + 1_000_003 * index


class Cohort(nn.Module):
    """The peers after the first, as one module (trained, checkpointed and DDP-wrapped as the
    method's parts); its forward returns every peer's logits."""

    def __init__(self, peers):
        super().__init__()
        self.peers = nn.ModuleList(peers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [peer(x) for peer in self.peers]


@register_method
class Mutual(Method):
    """Σ_i [CE(s_i, y) + mean_{j≠i} T²·KL(p_j ‖ p_i)] over N peers (:func:`softkd.losses.mutual.
    mutual_objective`), one forward of every peer per step. Peers of the student's architecture
    are copies re-initialised (every layer's ``reset_parameters``) under their own seed; others are
    built from ``peer_models``. Unlabeled samples teach through the KL terms only."""

    name = "mutual"
    aliases = ("tnd", "dml")
    summary = "deep mutual learning (Zhang et al. 2018): N peers, each CE + KL to the others; no teacher"
    Params = MutualParams
    needs = "none"
    teachers_needed = "none"
    graph_inputs = ("x", "y")

    def __init__(self, params=None, *, teachers=(), teacher=None, **values):
        super().__init__(params, teachers=teachers, teacher=teacher, **values)
        n = self.params.peers
        self.terms = ("loss", "ce", "kl", *(f"{t}_peer{i}" for i in range(n) for t in ("ce", "kl")))

    def student_specs(self, student: str) -> dict[str, str]:
        others = self.params.peer_models or [student] * (self.params.peers - 1)
        return {f"peer{i}": spec for i, spec in enumerate([student, *others])}

    def build_students(self, first: nn.Module, *, seed: int, input_shape, num_classes: int) -> dict[str, nn.Module]:
        from softkd.models.loading import resolve_model

        device = next(first.parameters()).device
        peers = [first]
        for i in range(1, self.params.peers):
            with torch.random.fork_rng(devices=[]):  # the run's own random stream is left as it was
                torch.manual_seed(peer_seed(seed, i))
                if self.params.peer_models is None:
                    peer = copy.deepcopy(first)
                    for module in peer.modules():
                        if hasattr(module, "reset_parameters"):
                            module.reset_parameters()
                else:
                    peer = resolve_model(self.params.peer_models[i - 1], input_shape=tuple(input_shape),
                                         num_classes=num_classes)
            peers.append(peer.to(device))
        return dict(zip(self.student_specs(""), peers))

    def setup(self, model: nn.Module, batch: dict, *, seed: int = 0) -> None:
        x = batch["x"]
        num_classes = dry_forward(model, x[:2]).shape[-1]
        built = self.build_students(model, seed=seed, input_shape=x.shape[1:], num_classes=num_classes)
        self.parts = Cohort(list(built.values())[1:])
        self.use_parts(self.parts)

    def students(self, model: nn.Module) -> dict[str, nn.Module]:
        others = list(self.parts.peers) if self.parts is not None else []
        return dict(zip(self.student_specs(""), [model, *others]))

    def forward(self, model: nn.Module, batch: dict, *, labeled_count=None, sample_count=None) -> dict[str, torch.Tensor]:
        if self.run_parts is None:
            raise RuntimeError("Mutual.setup(model, batch) builds the other peers before training.")
        logits = [model(batch["x"]), *self.run_parts(batch["x"])]
        return self.loss(mutual_objective, logits, batch["y"], temperature=self.params.temperature,
                         labeled_count=labeled_count, sample_count=sample_count)

    def describe(self) -> str:
        p = self.params
        return f"loss = Σ over {p.peers} peers of ce + mean over the others of T²·KL(T={p.temperature:g})"
