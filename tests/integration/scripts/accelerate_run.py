"""A raw Accelerate loop turned into MIU; used by the 1- vs 2-process tests.

Run it as one process (``python accelerate_run.py --expect-world 1 ...``) or as two
(``torchrun --nproc_per_node 2 ... --expect-world 2``, or ``ACCELERATE_USE_CPU=true
accelerate launch --multi_gpu --num_processes 2 ...``). It asserts the world size,
checks that every rank ends with identical model and critic weights, and rank 0
writes the final state and the per-step global losses to ``--out`` (torch.save).
"""

from __future__ import annotations

import argparse
import math

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from miu_hooks.config import MIUConfig
from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader
from miu_hooks.methods.base import ShuffleSampler

from launch import finish_rank  # the scripts' folder is sys.path[0]

N_RETAIN, N_FORGET, DIM = 96, 32, 8


def make_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(seed)
    n = N_RETAIN + N_FORGET
    y = torch.randint(0, 2, (n,), generator=gen)
    s = torch.where(torch.rand(n, generator=gen) < 0.8, y, 1 - y)  # attribute correlated with y
    x = torch.randn(n, DIM, generator=gen) + 1.5 * y[:, None] * torch.linspace(-1, 1, DIM)
    x[:, 0] += 2.0 * s
    g = s + 2 * y
    # forget: 32 samples of group 3, retain: the rest (group 3 keeps members)
    order = torch.argsort((g != 3).float() + torch.rand(n, generator=gen) * 0.1)
    forget, retain = order[:N_FORGET], order[N_FORGET:]
    return (
        TensorDataset(x[retain], y[retain], g[retain]),
        TensorDataset(x[forget], y[forget], g[forget]),
    )


def make_model() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(
        nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 2)
    )


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in module.state_dict().values()])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect-world", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True, help="per-process batch size")
    ap.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--save-state", default=None, help="accelerator.save_state dir (then reload)")
    ap.add_argument(
        "--runtime-checks", action="store_true", help="also run dist_runtime_check.run_checks"
    )
    args = ap.parse_args()

    accelerator = Accelerator(
        cpu=True, mixed_precision=args.precision, gradient_accumulation_steps=args.grad_accum
    )
    assert accelerator.num_processes == args.expect_world, (
        f"expected {args.expect_world} processes, got {accelerator.num_processes} "
        "(a launcher silently fell back to fewer ranks?)"
    )
    if args.runtime_checks:
        from dist_runtime_check import run_checks  # the script folder is sys.path[0]

        run_checks()
    retain, forget = make_data()
    cfg = MIUConfig(
        epochs=args.epochs,
        forget_epochs=2,
        mine_hidden=32,
        mine_warmup_iters=6,
        mine_iters=3,
        mine_lr=0.05,
        mi_weight=2.0,
        max_grad_norm=5.0,
        seed=3,
    )
    model = make_model()
    original = make_model()  # the "trained" model we unlearn from: same weights, built first
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    retain_loader = reweighted_loader(retain, forget, args.batch, config=cfg)
    forget_loader = DataLoader(
        forget, batch_size=args.batch, sampler=ShuffleSampler(len(forget), seed=11)
    )
    model, optimizer, retain_loader, forget_loader = accelerator.prepare(
        model, optimizer, retain_loader, forget_loader
    )
    miu = prepare_miu(
        accelerator, model, optimizer, retain_loader, forget_loader, config=cfg, original=original
    )

    losses: list[float] = []
    logs: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        miu.epoch_start(epoch)
        model.train()
        for x, y, g in retain_loader:
            with accelerator.accumulate(model):
                loss = miu.retain_loss(model(x), (x, y, g))
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            glob = accelerator.reduce(loss.detach().float(), reduction="mean")
            assert math.isfinite(float(glob)), f"non-finite loss at epoch {epoch}"
            losses.append(float(glob))
        logs.append(miu.pop_logs())
        if args.save_state and epoch == 0:
            accelerator.save_state(args.save_state)
            saved_critic = flat(miu.handle.critic_model)

    # ranks must agree exactly: weights, critics, EMA state
    unwrapped = accelerator.unwrap_model(model)
    mine = torch.cat(
        [flat(unwrapped), flat(miu.handle.critic_model), flat(miu.handle.critic_original)]
    )
    everyone = accelerator.gather(mine[None])
    max_rank_diff = float((everyone - everyone[0]).abs().max())
    assert max_rank_diff == 0.0, f"ranks disagree: max |diff| = {max_rank_diff}"

    state = {
        "world": accelerator.num_processes,
        "model": {k: v.detach().cpu().float().clone() for k, v in unwrapped.state_dict().items()},
        "critic_model": {
            k: v.detach().cpu().clone() for k, v in miu.handle.critic_model.state_dict().items()
        },
        "losses": losses,
        "logs": logs,
        "max_rank_diff": max_rank_diff,
        "counters": dict(miu.handle.counters),
        "runtime_checks": bool(args.runtime_checks),
    }
    if args.save_state:
        # reload the epoch-0 checkpoint into the live objects: the critics must come back
        final_critic = flat(miu.handle.critic_model)
        accelerator.load_state(args.save_state)
        state["critic_restored"] = bool(torch.equal(flat(miu.handle.critic_model), saved_critic))
        state["critic_changed_after_save"] = not torch.equal(saved_critic, final_critic)
        state["epoch_after_load"] = miu.handle.epoch
    if accelerator.is_main_process and args.out:
        torch.save(state, args.out)
    accelerator.wait_for_everyone()
    finish_rank(accelerator.process_index)
    accelerator.end_training()


if __name__ == "__main__":
    main()
