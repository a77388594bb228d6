"""Processes of a data-parallel run (torchrun / accelerate launch): who this process is, the
collectives softkd uses, and the process group's shutdown.

Why shutdown is done here, and in this order. Gloo runs every collective on a worker thread of
its own (``pt_gloo_runloop``), which drops its reference to the finished work *after* ``wait()``
has returned in Python. Destroying the work destroys its tensors, and a tensor Python has seen
needs the GIL to release its Python object. If the interpreter has begun finalizing by then,
taking the GIL ends the thread (``pthread_exit``), the forced unwind meets the work's
``noexcept`` destructor, and C++ calls ``std::terminate``: "terminate called without an active
exception", SIGABRT, after a run that had finished and written everything. The cure is to
destroy the process group while Python is fully alive: its destructor waits for gloo's work
queue and joins the worker threads with the GIL released. ``destroy_process_group()`` only
drops ``torch.distributed``'s own references, though, and
``torch.distributed.nn.functional`` — imported by ``torch._dynamo``, which every torch optimizer
imports when the first one is built, i.e. in every ``fit`` — binds ``group.WORLD`` as the
default argument of ten functions when it is imported. Imported after the group exists, it
keeps the group (and gloo's threads) alive past ``destroy_process_group()`` into interpreter
finalization, and the race above is back. So softkd imports that module when it is imported,
before it creates a group (the defaults are then ``None``, which means "the default group" at
call time), and destroys the group it created at exit: explicitly at the end of every
``softkd`` command, and from an ``atexit`` hook for a user's own script.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import inspect
import os

import torch
from torch import nn

from softkd.errors import SoftKDError

# Before any process group exists (see above): imported later, this module would bind the group
# as a default argument and keep it alive past destroy_process_group(). 5 ms. (ZeRO's optimizer
# and FSDP's ShardedGradScaler bind it the same way; softkd imports neither.)
if torch.distributed.is_available():
    importlib.import_module("torch.distributed.nn.functional")

_owned = False  # whether softkd created this process's group (and so tears it down)


class Distributed:
    """This process's place in a data-parallel run started by ``torchrun`` or ``accelerate
    launch`` (rank 0 of 1 otherwise). Accelerate sets up torch.distributed when no process
    group exists yet: gloo on CPU, nccl on GPUs. A group the caller created stays the caller's:
    softkd uses it and never destroys it."""

    def __init__(self):
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _join_process_group()
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world = state.process_index, state.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

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

    def wrap(self, module: nn.Module | None) -> nn.Module | None:
        """``module`` in torch's DistributedDataParallel when several processes train it (its
        parameters and buffers start as rank 0's; its gradients are summed over the processes
        in the backward pass, overlapping it), else ``module`` itself. None and modules without
        trainable parameters pass through."""
        if self.world == 1 or module is None or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (batch-norm statistics) are synced after each step instead (sync_buffers_); the
        # keyword's name changed in torch 2.13.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        wrapped = DistributedDataParallel(module, **no_buffer_sync)
        # Every process normalised its loss by the whole batch's counts, so the batch's gradient
        # is the sum of the processes' gradients, not DDP's default mean.
        wrapped.register_comm_hook(None, _sum_gradients)
        return wrapped

    def share(self, group: list[dict], accumulate: int) -> list[tuple[dict, bool, float]]:
        """This process's micro-batches of one step's ``group``, as (batch, sync, weight): its
        ``accumulate`` consecutive ones, the last with ``sync`` (DDP all-reduces the gradients
        in that backward pass). A process left without samples (an epoch's short last step)
        still runs one backward pass, on the group's first micro-batch with weight 0: DDP
        needs every process in each all-reduce, and the zero gradient changes no sum. (DDP's
        ``join`` would shadow the all-reduce instead, but leave that process without the
        summed gradient, so its optimizer state would part from the others'.)"""
        mine = group[self.rank * accumulate:(self.rank + 1) * accumulate]
        if not mine:
            return [(group[0], True, 0.0)] if self.world > 1 else []
        return [(batch, i == len(mine) - 1, 1.0) for i, batch in enumerate(mine)]

    @staticmethod
    def no_sync(wrapped: list[nn.Module], sync: bool):
        """DDP's ``no_sync`` on every wrapped module for a backward pass that only accumulates."""
        stack = contextlib.ExitStack()
        if not sync:
            for module in wrapped:
                if hasattr(module, "no_sync"):
                    stack.enter_context(module.no_sync())
        return stack

    def sync_buffers_(self, *modules: nn.Module) -> None:
        """Give every process rank 0's buffers (batch-norm statistics), so that every process
        validates, and picks the best epoch, from the same model."""
        if self.world > 1:
            for module in modules:
                for tensor in module.buffers():
                    torch.distributed.broadcast(tensor.data, src=0)


def _sum_gradients(state, bucket):
    """DDP communication hook: the bucket's gradients summed over processes (no division)."""
    return torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def _join_process_group() -> None:
    """Remember whether softkd creates this process's group (and so must destroy it)."""
    global _owned
    if not torch.distributed.is_initialized() and not _owned:
        atexit.register(shutdown)
        _owned = True


def shutdown() -> None:
    """Destroy the process group softkd created, if it still exists; a group created by the
    caller is left alone. Called at the end of every ``softkd`` command and at interpreter exit
    (whichever comes first; the second call does nothing)."""
    global _owned
    if _owned and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        from accelerate import PartialState

        PartialState._reset_state()  # a later Distributed() starts a new group instead of using the old one
    _owned = False
