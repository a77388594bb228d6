"""The device a run uses, and the numeric precision of a training step: autocast for bf16/fp16
and loss scaling for fp16.

Weights and optimizer state stay float32; only the forward pass runs in low precision, and the
losses upcast to float32 before their reductions (softkd.losses)."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch

from softkd.errors import ConfigError

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
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'' if threads == 1 else 's'})"
    return str(device)


def cpu_kernels() -> str:
    """The CPU kernel set torch runs here ('AVX2', 'AVX512'...): CPU results differ in their last
    bits between kernel sets (README: Reproducibility), so reports and stamps record it."""
    return torch.backends.cpu.get_cpu_capability()


def kernel_set(device: torch.device) -> str:
    """The kernels that train on ``device``: the CPU's set (:func:`cpu_kernels`), or the GPU's name
    ('CUDA NVIDIA H200'), not the host CPU's set, which a GPU run's figures do not depend on."""
    if device.type == "cpu":
        return cpu_kernels()
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    return device.type.upper()


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
