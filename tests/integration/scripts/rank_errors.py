"""Rank-local errors stop every rank at the same step (2 CPU ranks, gloo, under torchrun).

In each case rank 1's retain batch goes bad at step 2 (a label outside the model's
classes, or a NaN input); rank 0's stays healthy. Both ranks must raise at that
step, rank 1 with its own error and rank 0 with one naming rank 1 (the failing
check travels with the step's MI gather, or with an all-reduce when the step has
none), instead of rank 0 waiting in the next collective. A
barrier after each case proves that no rank is stuck. Rank ``r`` writes
``RANK_ERROR <case> <r> <ErrorType> <message>`` per case, then ``RANK_ERRORS_DONE``,
to ``<out>/rank<r>.txt`` (``out`` is the first argument): the two ranks share one
stdout, where their lines can interleave.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from miu_hooks.config import MIUConfig
from miu_hooks.errors import MIUError
from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader

from launch import finish_rank  # the scripts' folder is sys.path[0]

CASES = {  # name: (what goes bad, MI weight)
    "label": ("label", 1.0),
    "nan": ("nan", 1.0),
    "label_without_mi": ("label", 0.0),
}


def data() -> tuple[TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 6, generator=gen), torch.randint(0, 2, (80,), generator=gen)
    g = y * 2 + torch.randint(0, 2, (80,), generator=gen)
    return TensorDataset(x[16:], y[16:], g[16:]), TensorDataset(x[:16], y[:16], g[:16])


def run_case(accelerator: Accelerator, case: str) -> str:
    bad, weight = CASES[case]
    retain, forget = data()
    cfg = MIUConfig(mine_hidden=8, mine_warmup_iters=2, mine_iters=1, mi_weight=weight, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    loader = reweighted_loader(retain, forget, 8, config=cfg)
    model, optimizer, loader = accelerator.prepare(net, opt, loader)
    miu = prepare_miu(accelerator, model, optimizer, loader, DataLoader(forget, batch_size=8),
                      config=cfg, register_for_checkpointing=False)  # fmt: skip
    miu.epoch_start(0)
    rank = accelerator.process_index
    outcome = "no error"
    try:
        for step, (x, y, g) in enumerate(loader):
            if step == 2 and rank == 1:
                x, y = x.clone(), y.clone()
                if bad == "label":
                    y[0] = 5
                else:
                    x[0] = float("nan")
            loss = miu.retain_loss(model(x), (x, y, g))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    except MIUError as exc:
        outcome = f"{type(exc).__name__} {exc}"
    finally:
        miu.remove()
    dist.barrier()  # every rank got here: nobody is left waiting in a collective
    return outcome


def main() -> None:
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60))
    accelerator = Accelerator(cpu=True, kwargs_handlers=[timeout])
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    lines = []
    for case in CASES:
        outcome = run_case(accelerator, case)
        lines.append(f"RANK_ERROR {case} {rank} {outcome}")
    lines.append("RANK_ERRORS_DONE")
    (Path(sys.argv[1]) / f"rank{rank}.txt").write_text("\n".join(lines) + "\n")
    accelerator.wait_for_everyone()
    finish_rank(rank)
    accelerator.end_training()  # destroys the gloo group before interpreter exit


if __name__ == "__main__":
    main()
