"""A ``transformers.Trainer`` run with ``MIUCallback``, on 1 or 2 CPU processes.

Launch with ``torchrun --standalone --nproc_per_node 2 hf_run.py --expect-world 2 ...``
(``TrainingArguments(use_cpu=True)`` gives two gloo ranks) or as one process. It
asserts the world size, checks that every rank ends with identical model weights,
and rank 0 writes the final weights and MIU counters to ``--out`` (torch.save).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from miu_hooks.config import MIUConfig
from miu_hooks.data import GroupTensorDataset
from miu_hooks.integrations.hf import MIUCallback, as_trainer_dataset

from launch import finish_rank  # the scripts' folder is sys.path[0]

N_RETAIN, N_FORGET, SIZE = 64, 16, 8


def make_data() -> tuple[GroupTensorDataset, GroupTensorDataset]:
    gen = torch.Generator().manual_seed(0)
    n = N_RETAIN + N_FORGET
    y = torch.randint(0, 2, (n,), generator=gen)
    s = torch.where(torch.rand(n, generator=gen) < 0.8, y, 1 - y)
    x = torch.randn(n, 3, SIZE, SIZE, generator=gen) * 0.5
    x[:, 0] += y[:, None, None] - 0.5
    x[:, 1] += s[:, None, None] - 0.5
    g = s + 2 * y
    order = torch.argsort((g != 3).float() + torch.rand(n, generator=gen) * 0.1)
    forget, retain = order[:N_FORGET], order[N_FORGET:]
    return (
        GroupTensorDataset(x[retain], y[retain], g[retain]),
        GroupTensorDataset(x[forget], y[forget], g[forget]),
    )


def make_model() -> ViTForImageClassification:
    torch.manual_seed(1234)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=SIZE,
        patch_size=4,
        num_labels=2,
    )
    return ViTForImageClassification(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect-world", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True, help="per-device batch size")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=".")
    args = ap.parse_args()

    retain, forget = make_data()
    targs = TrainingArguments(
        output_dir=os.path.join(args.workdir, "trainer_out"),
        per_device_train_batch_size=args.batch,
        num_train_epochs=3,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        use_cpu=True,
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    assert targs.world_size == args.expect_world, (
        f"expected {args.expect_world} processes, TrainingArguments sees {targs.world_size}"
    )
    cfg = MIUConfig(
        forget_epochs=2, mine_hidden=16, mine_warmup_iters=4, mine_iters=2, mi_weight=2.0, seed=3
    )
    callback = MIUCallback(as_trainer_dataset(forget), config=cfg)
    model = make_model()
    trainer = Trainer(
        model=model, args=targs, train_dataset=as_trainer_dataset(retain), callbacks=[callback]
    )
    trainer.train()
    assert callback.handle is not None
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    max_rank_diff = 0.0
    if dist.is_available() and dist.is_initialized():
        assert dist.get_world_size() == args.expect_world
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        max_rank_diff = max(float((p - parts[0]).abs().max()) for p in parts)
    assert max_rank_diff == 0.0, f"ranks disagree after MIUCallback training: {max_rank_diff}"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero() and args.out:
        torch.save(
            {
                "world": targs.world_size,
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "counters": dict(callback.handle.counters),
                "losses": losses,
                "max_rank_diff": max_rank_diff,
            },
            args.out,
        )
    callback.remove()
    if dist.is_available() and dist.is_initialized():
        # The Trainer leaves the gloo group alive; torn down at interpreter exit instead,
        # its worker threads can abort the process (SIGABRT) after a run that succeeded.
        dist.barrier()
        finish_rank(dist.get_rank())
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
