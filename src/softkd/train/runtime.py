"""Numeric precision of a training step: autocast for bf16/fp16 and loss scaling for fp16.

Weights and optimizer state stay float32; only the forward pass runs in low precision, and the
losses upcast to float32 before their reductions (softkd.losses)."""

from __future__ import annotations

import atexit
import functools
import os
from contextlib import contextmanager, nullcontext

import torch

from softkd.errors import ConfigError, SoftKDError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if present, else Apple's MPS, else the CPU; a named device must exist.
    Under torchrun each process takes the GPU of its LOCAL_RANK."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": mps}
    if name == "auto":
        name = "cuda" if available["cuda"] else "mps" if available["mps"] else "cpu"
    if name not in available:
        raise ConfigError(f"Unknown device '{name}'; use one of {', '.join(DEVICES)}.")
    if not available[name]:
        raise ConfigError(f"The device '{name}' is not available on this machine; use 'auto' or 'cpu'.")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """What a report says the work ran on: 'cuda:0 (NVIDIA H200)', 'cpu (2 threads)', 'mps'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def resident(device: torch.device, *items):
    """``items`` (ArrayDatasets or tensors; None passes through) moved once to ``device`` when it is
    a CUDA GPU and they fill at most a quarter of its free memory: batches are then gathered on
    the GPU instead of copied from host memory at every step. Otherwise returned unchanged."""
    movable = all(item is None or isinstance(item, torch.Tensor) or hasattr(item, "nbytes") for item in items)
    if device.type != "cuda" or not movable:
        return items
    free, _ = torch.cuda.mem_get_info(device)
    if sum(item.nbytes for item in items if item is not None) > free // 4:
        return items
    return tuple(None if item is None else item.to(device) for item in items)


@contextmanager
def deterministic_algorithms(enabled: bool = True):
    """With ``enabled``, PyTorch's deterministic algorithms only (an op that has none raises,
    naming it) and no cuDNN autotuning; the previous settings come back afterwards. cuBLAS reads
    ``CUBLAS_WORKSPACE_CONFIG`` when it starts, so it is set here (if unset) before any GPU work."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    before = torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.deterministic
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        cudnn.benchmark, cudnn.deterministic = before[1], before[2]


def autocast(precision: str, device: torch.device, *, cache: bool = True):
    """The context a forward pass runs in for ``precision``. ``cache=False`` for steps captured in
    CUDA graphs, as PyTorch's notes on graphs and autocast ask."""
    if precision not in PRECISIONS:
        raise ConfigError(f"Unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype,
                                                              cache_enabled=cache)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (its narrow exponent underflows small gradients); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def inference_batch_size(module: torch.nn.Module) -> int:
    """Batch size for a teacher's forward passes over a dataset: small on CPUs, where a resnet-64
    pass over Fashion-MNIST took 0.75× the time at 128 as at 1024 (activations stay in cache),
    large on accelerators."""
    device = next(module.parameters(), torch.empty(0)).device
    return 128 if device.type == "cpu" else 1024


@functools.cache
def _destroy_at_exit() -> None:
    """Tear the process group down while Python still runs: left to interpreter shutdown, gloo's
    destructor sometimes met a live thread and aborted the process ("terminate called without an
    active exception", SIGABRT) after a run had finished and written everything."""

    def destroy() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


class Distributed:
    """This process's place in a data-parallel run started by ``torchrun`` or ``accelerate
    launch`` (rank 0 of 1 otherwise). Accelerate sets up torch.distributed: gloo on CPU, nccl
    on GPUs."""

    def __init__(self):
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world = state.process_index, state.num_processes
            _destroy_at_exit()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def sum_gradients_(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over processes in one flat all-reduce (a process with no samples in the
        step contributes zeros). Every process normalised its loss by the global counts, so the
        sum is the full batch's gradient."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.sum_(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def together(self, fn):
        """``fn()`` on this process; if it raises on any process, it raises on every process.

        Work that can fail on one process only (its shard of a cache build, the main process's
        writes) would otherwise send the others on to their next collective, to die there when the
        failing process exits (or wait for gloo's 30-minute timeout while it lives on). The failing
        process raises its own error; the others raise the same SoftKDError class with the same
        message (other exceptions: a SoftKDError naming them). All are marked ``shared``, so the
        command line prints the message once, on the main process."""
        if self.world == 1:
            return fn()
        failure, error, result = None, None, None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - relayed to every process, then re-raised
            error = exc
            kind = type(exc) if isinstance(exc, SoftKDError) else SoftKDError
            failure = (kind, str(exc) if isinstance(exc, SoftKDError) else f"{type(exc).__name__}: {exc}")
        for rank, found in enumerate(self.gather_object(failure)):
            if found is not None:
                shared = error if rank == self.rank else found[0](found[1])
                shared.shared = True
                raise shared
        return result

    def on_main(self, fn) -> None:
        """``fn()`` on the main process only (its writes); every process waits for it and raises
        if it failed (see :meth:`together`)."""
        self.together(lambda: fn() if self.is_main else None)

    def barrier(self) -> None:
        """Wait until every process gets here (e.g. until the main process has written a file)."""
        if self.world > 1:
            torch.distributed.barrier()

    def gather_object(self, obj) -> list:
        """Every process's ``obj``, in rank order (on every process)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """The main process's ``obj``, on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sync_module_(self, module: torch.nn.Module) -> None:
        """Give every process rank 0's parameters and buffers (batch-norm statistics)."""
        if self.world > 1:
            for tensor in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(tensor.data, src=0)
