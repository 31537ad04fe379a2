"""2-rank checks of ``miu_hooks.distributed`` (gloo).

Standalone: ``torchrun --standalone --nproc_per_node 2 dist_runtime_check.py`` (exits
non-zero on a failed check; rank 0 prints ``DIST_RUNTIME_OK``). ``accelerate_run.py
--runtime-checks`` calls :func:`run_checks` inside its Accelerate process group, so
the test suite pays for one launch instead of two.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from miu_hooks.distributed import DistributedRuntime, average_gradients, is_distributed
from miu_hooks.estimators import MIEstimator

from launch import finish_rank  # the scripts' folder is sys.path[0]


def run_checks() -> None:
    """Run every check on the initialised 2-rank process group (raises on failure)."""
    assert dist.get_world_size() == 2, dist.get_world_size()
    assert is_distributed()
    rank = dist.get_rank()
    rt = DistributedRuntime(torch.device("cpu"))
    assert rt.world_size == 2 and rt.is_main_process == (rank == 0)

    # gather: order, values, autograd
    x = torch.full((3, 2), float(rank), requires_grad=True)
    g = rt.gather(x)
    assert (
        g.shape == (6, 2)
        and torch.equal(g[:3], torch.zeros(3, 2))
        and torch.equal(g[3:], torch.ones(3, 2))
    )
    (g * torch.arange(6.0).reshape(6, 1)).sum().backward()
    # each rank's loss sees rows 3r..3r+2 with weights 3r..3r+2; the backward sums over 2 ranks
    want = 2 * torch.arange(3 * rank, 3 * rank + 3, dtype=torch.float32).reshape(3, 1).expand(3, 2)
    assert torch.equal(x.grad, want), x.grad

    # unequal batches fail loudly on every rank
    try:
        rt.gather(torch.zeros(2 + rank, 1))
    except ValueError as exc:
        assert "same batch size on every rank" in str(exc)
    else:
        raise AssertionError("unequal batch sizes were accepted")

    # all_reduce_mean
    m = rt.all_reduce_mean(torch.tensor([float(rank), 10.0]))
    assert torch.allclose(m, torch.tensor([0.5, 10.0]))

    # all_reduce_max and the detached gather (no autograd, no size check)
    assert rt.all_reduce_max(torch.tensor([float(rank), -float(rank)])).tolist() == [1.0, 0.0]
    meta = rt.gather_detached(torch.full((2, 3), float(rank), requires_grad=True))
    assert meta.shape == (4, 3) and not meta.requires_grad and meta[2:].eq(1).all()

    # average_gradients: bucketed, params without grad skipped
    lin = nn.Linear(4, 3)
    unused = nn.Parameter(torch.zeros(2))
    for p in lin.parameters():
        p.grad = torch.full_like(p, float(rank + 1))
    n = average_gradients([*lin.parameters(), unused], bucket_mb=1e-5)
    assert n == 2 and unused.grad is None
    assert all(torch.allclose(p.grad, torch.full_like(p, 1.5)) for p in lin.parameters())

    # global-batch MI: 2 ranks x B == 1 process x 2B (loss and averaged model gradient)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
    est = MIEstimator(6, 4, hidden=8)
    xs = torch.randn(8, 5)
    gs = torch.randint(0, 4, (8,))
    marg = torch.randint(0, 4, (8,))
    ref_net = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
    ref_net.load_state_dict(net.state_dict())
    ref_est = MIEstimator(6, 4, hidden=8)
    ref_est.load_state_dict(est.state_dict())
    ref = ref_est(ref_net(xs), gs, marg)
    ref.backward()
    local = slice(4 * rank, 4 * rank + 4)
    mi = est(rt.gather(net(xs[local])), rt.gather(gs[local]), marg)
    mi.backward()
    rt.sync_model_grads(net)
    assert torch.allclose(mi, ref, rtol=1e-6, atol=1e-7), (mi, ref)
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), (p.grad, q.grad)
    dist.barrier()


def main() -> None:
    dist.init_process_group("gloo")
    expected = int(os.environ.get("MIU_EXPECT_WORLD", "2"))
    assert dist.get_world_size() == expected, (dist.get_world_size(), expected)
    run_checks()
    if dist.get_rank() == 0:
        print("DIST_RUNTIME_OK", flush=True)
    finish_rank(dist.get_rank())  # run_checks ended with a barrier
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
