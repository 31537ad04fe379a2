"""``miu_hooks.distributed`` in one process (no process group): it is a LocalRuntime.

The 2-rank behaviour is checked by ``tests/integration/scripts/dist_runtime_check.py``
(run by ``tests/integration/test_accelerate.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miu_hooks.distributed import (
    DistributedRuntime,
    all_gather_cat,
    all_reduce_mean_,
    average_gradients,
    is_distributed,
)
from miu_hooks.runtime import LocalRuntime

pytestmark = pytest.mark.unit


def test_without_process_group_acts_like_local_runtime() -> None:
    assert not is_distributed()
    rt = DistributedRuntime(torch.device("cpu"), "bf16")
    assert isinstance(rt, LocalRuntime)
    assert (rt.world_size, rt.rank, rt.is_main_process) == (1, 0, True)
    x = torch.randn(3, 2, requires_grad=True)
    assert rt.gather(x) is x  # no copy, autograd untouched
    t = torch.tensor([1.0, 2.0])
    assert rt.all_reduce_mean(t) is t and t.tolist() == [1.0, 2.0]
    with rt.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_sync_model_grads_is_a_no_op_alone() -> None:
    lin = nn.Linear(3, 2)
    lin(torch.ones(4, 3)).sum().backward()
    before = [p.grad.clone() for p in lin.parameters()]
    DistributedRuntime(torch.device("cpu")).sync_model_grads(lin)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, lin.parameters(), strict=True))
    assert average_gradients(lin.parameters()) == 0


def test_functions_return_inputs_alone() -> None:
    x = torch.arange(4.0)
    assert all_gather_cat(x) is x
    assert all_reduce_mean_(x) is x
