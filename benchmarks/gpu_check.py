"""Throughput and peak memory of bf16 fine-tuning vs bf16 MIU retain steps on one GPU.

Builds a ViT-B/16-size classifier from ``ViTConfig()`` (224 px, 12 layers,
hidden 768, ``num_labels=2``) with random weights, feeds synthetic batches and
times, in one run:

* ``plain``: Accelerate bf16 fine-tuning steps (forward, CE, backward, AdamW step);
* ``miu``:   the same steps with ``miu.retain_loss`` (CE + λ·calibration: an extra
  no-grad forward of the frozen original plus the two critics on the tap).

It prints a small table (images/s, ms/step, peak GPU memory) and the ratio, then
runs a few fp16 MIU steps (Accelerate's scaler) as a finiteness check. ``--smoke``
runs a tiny ViT on CPU or GPU to validate the code path in seconds.

Usage::

    bash benchmarks/gpu_check.sh            # installs what is missing, then runs this
    python benchmarks/gpu_check.py --smoke  # tiny, CPU is fine
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def _import_integration() -> Any:
    """``miu_hooks.integrations.accelerate``, also from an uninstalled checkout."""
    try:
        import miu_hooks.integrations.accelerate as mod

        return mod
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    import miu_hooks

    pkg_spec = importlib.util.spec_from_file_location(
        "miu_hooks.integrations",
        ROOT / "integrations" / "__init__.py",
        submodule_search_locations=[str(ROOT / "integrations")],
    )
    assert pkg_spec is not None and pkg_spec.loader is not None
    pkg = importlib.util.module_from_spec(pkg_spec)
    sys.modules["miu_hooks.integrations"] = pkg
    pkg_spec.loader.exec_module(pkg)
    miu_hooks.integrations = pkg  # type: ignore[attr-defined]
    import miu_hooks.integrations.accelerate as mod

    return mod


def build_model(smoke: bool) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    if smoke:
        cfg = ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
            num_labels=2,
        )
    else:
        cfg = ViTConfig(num_labels=2)  # ViT-B/16 defaults: 224 px, 12 x 768, dropout 0
    torch.manual_seed(0)
    return ViTForImageClassification(cfg)


def synthetic(n: int, size: int, seed: int) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    g = y * 2 + torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 3, size, size, generator=gen)
    return torch.utils.data.TensorDataset(x, y, g)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**30


def fresh_accelerator(precision: str, cpu: bool) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=cpu)


def run_phase(args: argparse.Namespace, kind: str, precision: str = "bf16") -> dict[str, Any]:
    """Time ``args.steps`` steps of ``kind`` (``plain`` or ``miu``) after ``args.warmup``."""
    mod = _import_integration()
    from miu_hooks.config import MIUConfig

    acc = fresh_accelerator(precision, cpu=args.cpu)
    device = acc.device
    reset_peak(device)
    model = build_model(args.smoke)
    size = int(model.config.image_size)
    original = copy.deepcopy(model) if kind == "miu" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bs = args.batch_size
    data = synthetic(2 * bs, size, seed=1)
    forget = synthetic(bs, size, seed=2)
    cfg = MIUConfig(
        mine_hidden=512, mine_warmup_iters=2, mine_iters=1, forget_epochs=1, reweight=False
    )
    loader = torch.utils.data.DataLoader(data, batch_size=bs, shuffle=False)
    forget_loader = torch.utils.data.DataLoader(forget, batch_size=bs)
    model, optimizer, loader, forget_loader = acc.prepare(model, optimizer, loader, forget_loader)
    miu = None
    if kind == "miu":
        miu = mod.prepare_miu(
            acc, model, optimizer, loader, forget_loader, config=cfg, original=original,
            register_for_checkpointing=False,
        )  # fmt: skip
        t0 = time.perf_counter()
        miu.epoch_start(0)  # critic warm-up + one forget pass: validates the whole schedule
        sync(device)
        epoch_start_s = time.perf_counter() - t0
    batches = [tuple(t.to(device) for t in b) for b in loader]
    model.train()
    losses: list[torch.Tensor] = []

    def step(i: int) -> None:
        x, y, g = batches[i % len(batches)]
        out = model(pixel_values=x)
        loss = (
            miu.retain_loss(out, (x, y, g)) if miu is not None else F.cross_entropy(out.logits, y)
        )
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for i in range(args.warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync(device)
    elapsed = time.perf_counter() - t0
    result = {
        "phase": kind,
        "precision": precision,
        "ms_per_step": 1000 * elapsed / args.steps,
        "images_per_s": args.steps * bs / elapsed,
        "peak_gib": peak_gib(device),
        "finite": all(math.isfinite(float(v)) for v in losses),
        "last_loss": float(losses[-1]),
    }
    if miu is not None:
        result["epoch_start_s"] = epoch_start_s
        result["mi_terms"] = {k: round(v, 5) for k, v in miu.pop_logs().items()}
        miu.remove()
    acc.free_memory()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny ViT, few steps (CPU is fine)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64 (smoke: 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; smoke 1)")
    ap.add_argument("--no-fp16", action="store_true", help="skip the fp16 MIU finiteness check")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    args.batch_size = args.batch_size or (8 if args.smoke else 64)
    args.steps = args.steps or (3 if args.smoke else 30)
    args.warmup = args.warmup or (1 if args.smoke else 5)
    args.cpu = not torch.cuda.is_available()
    if args.cpu and not args.smoke:
        print("no CUDA device: run with --smoke on CPU, or on a machine with a GPU", flush=True)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    print(f"device: {device}; torch {torch.__version__}; smoke={args.smoke}", flush=True)
    t_start = time.perf_counter()
    plain = run_phase(args, "plain")
    miu = run_phase(args, "miu")
    rows = [plain, miu]
    fp16: dict[str, Any] | None = None
    if not args.no_fp16:
        fp16_args = copy.copy(args)
        fp16_args.steps, fp16_args.warmup = max(3, args.steps // 5), 1
        try:
            fp16 = run_phase(fp16_args, "miu", precision="fp16")
        except Exception as exc:  # report, keep the bf16 table
            fp16 = {"phase": "miu", "precision": "fp16", "error": repr(exc)}

    print(f"\nViT {'tiny (smoke)' if args.smoke else 'B/16 @224'}, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up", flush=True)  # fmt: skip
    print(f"{'phase':<12}{'images/s':>12}{'ms/step':>12}{'peak GiB':>12}{'finite':>9}")
    for r in rows:
        print(
            f"{r['phase'] + ' ' + r['precision']:<12}{r['images_per_s']:>12.1f}"
            f"{r['ms_per_step']:>12.1f}{r['peak_gib']:>12.2f}{r['finite']!s:>9}"
        )
    ratio = miu["ms_per_step"] / plain["ms_per_step"]
    print(f"MIU / plain step time: {ratio:.2f}x  (throughput {1 / ratio:.2f}x); "
          f"peak memory +{miu['peak_gib'] - plain['peak_gib']:.2f} GiB")  # fmt: skip
    print(f"MIU epoch_start (critic warm-up + forget pass): {miu['epoch_start_s']:.2f} s")
    print(f"MIU terms: {miu['mi_terms']}")
    if fp16 is not None:
        if "error" in fp16:
            print(f"fp16 MIU check FAILED: {fp16['error']}")
        else:
            print(f"fp16 MIU check: finite={fp16['finite']}, last loss {fp16['last_loss']:.4f}")
    print(f"total {time.perf_counter() - t_start:.1f} s", flush=True)
    if args.json:
        payload = {"device": device, "smoke": args.smoke, "batch_size": args.batch_size,
                   "rows": rows, "fp16": fp16, "ratio": ratio}  # fmt: skip
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    ok = plain["finite"] and miu["finite"] and (fp16 is None or fp16.get("finite", False))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
