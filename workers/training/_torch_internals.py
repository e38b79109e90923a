"""The private torch surface the ZeRO stages rely on, wrapped in one place.

torch has no public way to ask which backward pass is running, to run a callback when a
backward ends, or to learn which rank a ZeroRedundancyOptimizer gave a parameter to; zero.py
needs all three (and two peeks into FSDP2's state). Each is reached only through a function
here, and tests/unit/test_torch_internals.py exercises each on the installed torch, so a
torch upgrade that moves one fails that test by name instead of a training job at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class TorchInternalsChanged(RuntimeError):
    """A private torch attribute zero.py relies on is gone or has changed shape."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"torch {torch.__version__} no longer provides {what}, which "
            "workers/training/zero.py relies on (see workers/training/_torch_internals.py)"
        )


def current_graph_task_id() -> int:
    """An id of the autograd graph task (one backward call) running on this thread; -1
    outside backward."""
    reader = getattr(torch._C, "_current_graph_task_id", None)
    if reader is None:
        raise TorchInternalsChanged("torch._C._current_graph_task_id")
    return int(reader())


def queue_end_of_backward_callback(callback: Callable[[], None]) -> None:
    """Runs `callback` once the running backward has finished every gradient (autograd drops
    it if that backward raises). Only valid inside backward (a hook)."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    queue = getattr(engine, "queue_callback", None)
    if queue is None:
        raise TorchInternalsChanged("torch.autograd.Variable._execution_engine.queue_callback")
    queue(callback)


def zero_parameter_owners(optimizer: Any) -> dict[nn.Parameter, int]:
    """The rank (in the optimizer's process group) whose shard holds each parameter of a
    torch.distributed.optim.ZeroRedundancyOptimizer."""
    partition = getattr(optimizer, "_partition_parameters", None)
    if partition is None:
        raise TorchInternalsChanged("ZeroRedundancyOptimizer._partition_parameters")
    return {p: rank for rank, groups in enumerate(partition())
            for group in groups for p in group["params"]}


def has_post_accumulate_grad_hook(parameter: torch.Tensor) -> bool:
    """Whether a hook from register_post_accumulate_grad_hook is registered on `parameter`
    (torch keeps them in an attribute that is None or empty when there are none)."""
    return bool(getattr(parameter, "_post_accumulate_grad_hooks", None))


def fsdp_has_all_reduce_hook(module: nn.Module) -> bool | None:
    """Whether an FSDP2 unit (a module fully_shard was applied to) has an all-reduce hook set
    (FSDPModule.set_all_reduce_hook); None when FSDP2's state no longer has the layout read
    here, so the caller can take its safe path."""
    get_state = getattr(module, "_get_fsdp_state", None)
    state = get_state() if get_state is not None else None
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        return None
    return any(getattr(group, "_all_reduce_hook", None) is not None for group in groups)
