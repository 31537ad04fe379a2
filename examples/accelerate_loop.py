"""A plain Accelerate training loop turned into MIU unlearning (seven added lines).

Trains an "original" classifier on a Colored-MNIST analogue with an ordinary
Accelerate loop, forgets half of group 3 (y=1, green) with the *same* loop plus
the lines marked ``# MIU``, then checks that every process holds identical weights.

Run::

    python examples/accelerate_loop.py --cpu                      # one process
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \\
        examples/accelerate_loop.py --expect-world 2              # two CPU processes
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py \\
        --expect-world 2                                          # two GPUs

``--expect-world`` (default: ``$WORLD_SIZE`` when a launcher set it) makes a
silent fall-back to fewer processes fail loudly.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from miu_hooks.config import MIUConfig
from miu_hooks.demo import colored_digits
from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader  # MIU
from miu_hooks.splits import forget_split, subset


def make_model(size: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * size * size, 64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 2),
    )


@torch.no_grad()
def accuracy(accelerator: Accelerator, model: nn.Module, loader: DataLoader) -> dict[str, float]:
    model.eval()
    correct, groups = [], []
    for x, y, g in loader:
        pred = model(x).argmax(1)
        c, gg = accelerator.gather_for_metrics(((pred == y).float(), g))
        correct.append(c)
        groups.append(gg)
    model.train()
    c, g = torch.cat(correct), torch.cat(groups)
    out = {"all": float(c.mean())}
    out.update({f"g{k}": float(c[g == k].mean()) for k in range(4) if bool((g == k).any())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="force CPU (as ACCELERATE_USE_CPU=true)")
    ap.add_argument("--expect-world", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--train-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3, help="unlearning epochs")
    ap.add_argument("--size", type=int, default=8, help="image side in pixels")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    if accelerator.num_processes != args.expect_world:
        raise SystemExit(
            f"expected {args.expect_world} processes but this one sees "
            f"{accelerator.num_processes}: see the launch notes in the README"
        )
    splits = colored_digits(seed=0, size=args.size)
    retain_idx, forget_idx = forget_split(splits.train, forget_groups=(3,), ratio=0.5, seed=0)
    retain, forget = subset(splits.train, retain_idx), subset(splits.train, forget_idx)
    bs = args.batch_size

    # -- 1. the original model: a plain Accelerate training loop on D -----------------
    model = make_model(args.size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_loader = DataLoader(splits.train, batch_size=bs, shuffle=True)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    for _epoch in range(args.train_epochs):
        for x, y, _g in train_loader:
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    original = copy.deepcopy(accelerator.unwrap_model(model))

    # -- 2. unlearning: the same loop, plus the lines marked MIU ----------------------
    cfg = MIUConfig(epochs=args.epochs, forget_epochs=2, mine_hidden=64, mine_warmup_iters=20,
                    mine_iters=5, mi_weight=1.0, seed=0)
    model = make_model(args.size)
    model.load_state_dict(original.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    # MIU (was DataLoader); index=True: batches carry positions, the original's features are cached
    retain_loader = reweighted_loader(retain, forget, bs, config=cfg, index=True)
    forget_loader = DataLoader(forget, batch_size=bs, shuffle=True)  # MIU
    test_loader = DataLoader(splits.test, batch_size=256)
    model, optimizer, retain_loader, forget_loader, test_loader = accelerator.prepare(
        model, optimizer, retain_loader, forget_loader, test_loader
    )
    miu = prepare_miu(accelerator, model, optimizer, retain_loader, forget_loader,  # MIU
                      config=cfg, original=original)
    before = accuracy(accelerator, model, test_loader)
    for epoch in range(cfg.epochs):
        miu.epoch_start(epoch)  # MIU: critic tuning + forget pass
        for x, y, g, index in retain_loader:  # MIU: (x, y, g) + positions
            loss = miu.retain_loss(model(x), (x, y, g, index))  # MIU (was F.cross_entropy(...))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        logs = miu.pop_logs()  # MIU: the epoch's means (summed on the device, read once)
        if accelerator.is_main_process:
            terms = ", ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items()))
            print(f"epoch {epoch}: {terms}", flush=True)
        if not miu.epoch_end(epoch):  # MIU: collapse guard (last good epoch restored)
            break
    after = accuracy(accelerator, model, test_loader)

    # -- every process must hold the same unlearned model ------------------------------
    params = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    everyone = accelerator.gather(params[None])
    spread = float((everyone - everyone[0]).abs().max())
    if spread != 0.0:
        raise SystemExit(f"ranks disagree after unlearning: max |diff| = {spread}")
    if accelerator.is_main_process:
        print(f"test accuracy before: {before}", flush=True)
        print(f"test accuracy after:  {after}", flush=True)
        print(f"ranks agree: {accelerator.num_processes} process(es), max |diff| = {spread}")
    miu.remove()
    accelerator.wait_for_everyone()  # no rank tears the process group down under another
    time.sleep(0.5)  # gloo's workers finish freeing the last tensors (docs/integrations.md §7)
    accelerator.end_training()


if __name__ == "__main__":
    main()
