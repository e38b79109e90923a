"""The private torch surface we rely on still behaves as workers/training/_torch_internals.py
(and objectives/_batch.py's vmap check) expect: a torch upgrade that moves one fails here."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from workers.objectives._batch import _is_transformed
from workers.training import _torch_internals as internals


def test_the_graph_task_id_is_minus_one_outside_backward_and_one_id_per_backward():
    weight = torch.ones(3, requires_grad=True)
    seen: list[int] = []
    weight.register_hook(lambda grad: seen.append(internals.current_graph_task_id()))

    assert internals.current_graph_task_id() == -1
    (weight * 2).sum().backward()
    (weight * 3).sum().backward()

    assert len(seen) == 2 and all(task != -1 for task in seen)
    assert seen[0] != seen[1]


def test_an_end_of_backward_callback_runs_after_every_gradient_is_accumulated():
    first, second = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    order: list[str] = []

    def queue_once(grad):
        if not order:
            internals.queue_end_of_backward_callback(
                lambda: order.append(f"end {first.grad is not None and second.grad is not None}"))
        order.append("hook")

    first.register_hook(queue_once)
    (first * second).sum().backward()

    assert order == ["hook", "end True"]


def test_an_end_of_backward_callback_is_dropped_when_backward_raises():
    weight = torch.ones(2, requires_grad=True)
    ran: list[bool] = []

    def queue_then_fail(grad):
        internals.queue_end_of_backward_callback(lambda: ran.append(True))
        raise ValueError("a failing backward")

    weight.register_hook(queue_then_fail)
    with pytest.raises(ValueError, match="a failing backward"):
        (weight * 2).sum().backward()
    (torch.ones(1, requires_grad=True) * 2).sum().backward()  # a later backward runs clean

    assert ran == []


def test_a_post_accumulate_grad_hook_is_seen():
    weight = nn.Parameter(torch.ones(2))
    assert not internals.has_post_accumulate_grad_hook(weight)
    handle = weight.register_post_accumulate_grad_hook(lambda p: None)
    assert internals.has_post_accumulate_grad_hook(weight)
    handle.remove()
    assert not internals.has_post_accumulate_grad_hook(weight)


def test_the_vmap_check_sees_vmap():
    assert not _is_transformed(torch.ones(3))
    seen = torch.func.vmap(lambda row: torch.tensor(_is_transformed(row)))(torch.ones(2, 3))
    assert seen.tolist() == [True, True]


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with tempfile.TemporaryDirectory(prefix="secant-internals-") as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                                timeout=timedelta(seconds=60))
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def test_zero_owners_cover_every_parameter(one_rank_group):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam,
                                        lr=1e-3)

    owners = internals.zero_parameter_owners(optimizer)

    assert set(owners) == set(model.parameters()) and set(owners.values()) == {0}


def test_fsdp_state_has_the_layout_read_for_all_reduce_hooks(one_rank_group):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    fully_shard(model, mesh=DeviceMesh.from_group(one_rank_group, device_type="cpu"))

    # None would mean FSDP2 moved its state: zero.py would then never defer a reduce-scatter
    assert internals.fsdp_has_all_reduce_hook(model) is False
    model.set_all_reduce_hook(lambda tensor: None)
    assert internals.fsdp_has_all_reduce_hook(model) is True


def test_a_missing_attribute_is_named_in_the_error(monkeypatch):
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    with pytest.raises(internals.TorchInternalsChanged,
                       match=r"torch\._C\._current_graph_task_id"):
        internals.current_graph_task_id()
