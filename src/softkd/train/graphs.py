"""CUDA graphs: a training step recorded once and replayed, one launch instead of every kernel.

A small student's step on a GPU is bound by the host: each of its many small kernels (forward,
loss, backward, optimizer) costs the host more time to launch than the device to run. Replaying the
step from a CUDA graph launches them all at once; the loss inside it is compiled into a few
fused kernels (:mod:`softkd.losses.fused`), so distilling costs little more than the student's
own cross-entropy.

A captured step reads its inputs from fixed tensors and writes the gradients, the weights, the
optimizer's state and the step's loss terms in place, exactly as the eager step does. Steps
that cannot replay run eagerly: a batch of another size (an epoch's last), and everything where
:func:`graph_inputs` says no.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch

from softkd.data.loader import IndexBatches
from softkd.errors import ConfigError, SoftKDError, first_line

WARMUP_STEPS = 3
"""Eager steps on a side stream before the capture: CUDA graphs need libraries initialised, the
optimizer's state created and the compiled loss built before they record."""


def graph_inputs(objective, model: torch.nn.Module, *, mode: bool | str, device: torch.device, processes: int,
                 accumulate: int, precision: str, optimizer: torch.optim.Optimizer) -> tuple[str, ...] | None:
    """The batch entries a captured step reads, or None where every step must run eagerly.

    ``mode`` "auto" records steps where it is known to be safe: on CUDA, one process, one
    micro-batch per step (gradients summed between processes or micro-batches are scheduled by
    the host), fp32 or bf16 (fp16's loss scaler reads overflow flags on the host), an optimizer
    with a fused CUDA kernel, a :class:`softkd.methods.base.GraphSafe` objective, and a student
    (and teacher) built only from ``torch.nn`` layers and softkd's zoo blocks (:func:`known_safe`).
    ``True`` also records other models: their forward must not read values on the host nor
    change Python state between steps (a replay repeats what was recorded). ``False``: never.
    """
    if mode not in ("auto", True, False):
        raise ConfigError(f"The 'cuda_graphs' of train must be \"auto\", true or false; got {mode!r}.")
    if mode is False:
        return None
    if device.type != "cuda" or processes > 1 or accumulate > 1 or precision == "fp16":
        return None
    if not getattr(objective, "graph_inputs", None):
        return None
    if not all(group.get("fused") for group in optimizer.param_groups):
        return None
    if mode == "auto" and not (known_safe(model) and known_safe(objective)):
        return None
    return tuple(objective.graph_inputs)


def known_safe(module: torch.nn.Module) -> bool:
    """Every submodule is one of ``torch.nn``'s own layers or of a class that declares
    ``graph_safe = True`` in its own body: a subclass may change what its parent's forward did."""
    return all(type(m).__module__.startswith("torch.nn.") or vars(type(m)).get("graph_safe", False)
               for m in module.modules())


def graphed_step(objective, model, micro_batches, one_step: Callable[[dict], torch.Tensor], optimizer, prepare, *,
                 augmented: bool, mode: bool | str, device: torch.device, processes: int, accumulate: int,
                 precision: str):
    """A :class:`GraphedStep` running ``one_step`` for a run, and ``feed(batch, epoch)`` that makes
    its inputs from a loader's batch; (None, None) where :func:`graph_inputs` says no.

    Data resident on the device and not ``augmented`` is gathered inside the graph: the loader
    then yields positions only (``lazy``), and the host's whole work per step is one copy and one
    replay. Other batches are prepared as for an eager step (``prepare``: moved to the device,
    augmented) and their ``graph_inputs`` copied in.
    """
    keys = graph_inputs(objective, model, mode=mode, device=device, processes=processes, accumulate=accumulate,
                        precision=precision, optimizer=optimizer)
    if keys is None:
        return None, None
    if (not augmented and isinstance(micro_batches, IndexBatches)
            and all(values.device == device for values in micro_batches.columns().values())):
        micro_batches.lazy = True
        graphed = GraphedStep(lambda inputs: one_step(micro_batches.gather(inputs["index"], keys)), optimizer,
                              fusing=objective.fusing)
        return graphed, lambda batch, epoch: {"index": batch["index"]}

    def feed(batch: dict, epoch: int) -> dict:
        batch = prepare(batch, epoch)
        return {key: batch[key] for key in keys if key in batch}

    return GraphedStep(one_step, optimizer, fusing=objective.fusing), feed


class GraphedStep:
    """``step(inputs)`` (zero the gradients, forward, backward, optimizer step; returns the step's
    terms as one device tensor), replayed from a CUDA graph.

    The first :data:`WARMUP_STEPS` calls run ``step`` eagerly on a side stream; the next one
    records it, with ``inputs`` copied into the graph's own tensors, and every call after that
    copies its inputs there and replays. Inputs of other shapes or dtypes than the recorded ones
    are refused (None: the caller runs that step eagerly). The
    learning rate is read from device tensors that are refreshed from the optimizer's
    ``param_groups`` before each replay, so schedules keep working. ``fusing`` is entered around
    the eager and recorded calls (the objective's compiled loss).
    """

    def __init__(self, step: Callable[[dict], torch.Tensor], optimizer: torch.optim.Optimizer, *,
                 fusing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.step, self.optimizer, self.fusing = step, optimizer, fusing
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.output: torch.Tensor | None = None
        self.warm_steps = 0
        self.side: torch.cuda.Stream | None = None
        self.lr: list[torch.Tensor] = []  # one per param group: what the graph reads
        self.lr_values: list[float] = []  # what they hold
        self.kept: list = []  # tensors the graph writes (gradients): kept alive with it
        self.failed = False
        self.replays = 0
        self.signature: dict | None = None  # the recorded inputs' shapes and dtypes

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The step's terms; None when it cannot be replayed (the caller runs it eagerly)."""
        if self.failed or (self.graph is not None and _signature(inputs) != self.signature):
            return None
        if self.graph is None and self.warm_steps < WARMUP_STEPS:
            return self._eager(inputs)
        if self.graph is None and not self._capture(inputs):
            return None
        for name, value in inputs.items():
            self.inputs[name].copy_(value)
        for i, group in enumerate(self.optimizer.param_groups):
            if group["lr"] != self.lr_values[i]:  # a schedule moved it: one fill, no wait
                self.lr[i].fill_(group["lr"])
                self.lr_values[i] = group["lr"]
        self.graph.replay()
        self.replays += 1
        return self.output

    def _eager(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One real step on a side stream (as capturing requires), ordered after and before the
        main stream's work."""
        main = torch.cuda.current_stream()
        if self.side is None:
            self.side = torch.cuda.Stream(device=main.device)
        self.side.wait_stream(main)
        with self.fusing(), torch.cuda.stream(self.side):
            output = self.step(inputs)
        main.wait_stream(self.side)
        self.warm_steps += 1
        return output

    def _capture(self, inputs: dict[str, torch.Tensor]) -> bool:
        """Record ``step`` on copies of ``inputs``. Recording runs nothing: the weights, the
        optimizer's state and the batch-norm statistics are untouched until the first replay, so
        when recording fails (the forward read a value on the host) the step can still run eagerly,
        as every later one will, after a warning."""
        self.inputs = {name: value.clone() for name, value in inputs.items()}
        self.signature = _signature(inputs)
        groups = self.optimizer.param_groups
        device = next(iter(self.inputs.values())).device
        self.lr_values = [group["lr"] for group in groups]
        self.lr = [torch.tensor(float(value), dtype=torch.float32, device=device) for value in self.lr_values]
        saved = [(group["lr"], group.get("capturable")) for group in groups]
        graph, main = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            for group, lr in zip(groups, self.lr):
                group["lr"] = lr  # the fused kernels read a tensor learning rate on the device
                if "capturable" in group:
                    group["capturable"] = True  # Adam's step counters stay on the device
            with self.fusing(), torch.cuda.graph(graph):
                self.output = self.step(self.inputs)
        except SoftKDError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever the step did that a graph cannot hold
            self.failed = True
            self.inputs, self.output = {}, None
            warnings.warn(f"softkd could not record the training step in a CUDA graph ({type(error).__name__}: "
                          f"{first_line(error)}); every step runs eagerly. "
                          "Set train.cuda_graphs to false to skip the attempt.", RuntimeWarning, stacklevel=2)
            return False
        finally:
            torch.cuda.set_stream(main)  # a failed capture can leave its own stream current
            for group, (lr, capturable) in zip(groups, saved):
                group["lr"] = lr
                if capturable is not None:
                    group["capturable"] = capturable
        # The gradients were allocated while recording, from the graph's private memory; eager
        # steps may replace .grad later, so keep the graph's own alive with it.
        self.kept = [p.grad for group in groups for p in group["params"]]
        self.graph = graph
        return True


def _signature(inputs: dict[str, torch.Tensor]) -> dict:
    return {name: (value.shape, value.dtype, value.device) for name, value in inputs.items()}
