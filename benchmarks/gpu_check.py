"""Plain vs MIU throughput, peak memory and syncs per step on one GPU, on every path.

Builds a ViT-B/16-size classifier from ``ViTConfig()`` (224 px, 12 layers, hidden
768, 2 labels) with random weights and synthetic images kept on the GPU (so the
numbers measure the library, not data loading), then times, at the precision
``precision="auto"`` picks (bf16 on GPUs with native bf16):

* ``unlearn``:    :func:`miu_hooks.unlearn`, ``finetune_reweight`` vs ``miu`` (the
  original model's features cached); retain-only epochs are timed;
* ``accelerate``: a raw Accelerate bf16 loop, plain vs ``prepare_miu`` with
  ``reweighted_loader(index=True)`` (cached features);
* ``trainer``:    a ``transformers.Trainer`` with ``bf16=True``, plain vs
  ``prepare_trainer`` (cached features).

Each row has ms/step, images/s, peak GPU memory, host syncs per step counted by
``torch.cuda.set_sync_debug_mode`` (every sync of the step, the framework's
included) and host reads per step from ``miu_hooks`` code
(``benchmarks/host_syncs.py``). A short fp16 MIU run with adaptive clipping
checks the loss-scaled path. Results go to ``--json`` after every phase, so a
run cut short by its time limit keeps what it measured.

``--smoke`` runs a tiny ViT on the CPU in seconds (what CI runs); use
``benchmarks/gpu_check.sh`` on a GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _load_by_path(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _import_integrations() -> None:
    """Make ``miu_hooks.integrations`` importable from an uninstalled checkout too."""
    try:
        import miu_hooks.integrations.accelerate

        return
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    import miu_hooks

    pkg = _load_by_path("miu_hooks.integrations", ROOT / "integrations" / "__init__.py")
    pkg.__path__ = [str(ROOT / "integrations")]
    miu_hooks.integrations = pkg  # type: ignore[attr-defined]


HostReadCounter = _load_by_path(
    "miu_host_syncs", Path(__file__).with_name("host_syncs.py")
).HostReadCounter


# -- model and data --------------------------------------------------------------------------
def build_model(smoke: bool) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = (
        ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, image_size=32, patch_size=8, num_labels=2)
        if smoke
        else ViTConfig(num_labels=2)  # ViT-B/16: 224 px, 12 x 768, 86 M parameters
    )  # fmt: skip
    torch.manual_seed(0)
    return ViTForImageClassification(cfg)


def synthetic(n: int, size: int, device: torch.device, seed: int) -> Any:
    from miu_hooks.data import GroupTensorDataset

    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    g = y * 2 + torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 3, size, size, generator=gen)
    return GroupTensorDataset(x.to(device), y.to(device), g.to(device))


# -- measuring ---------------------------------------------------------------------------------
class Meter:
    """Syncs (CUDA sync debug mode), library reads and wall time between marks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reads = HostReadCounter()
        self.caught: list[Any] = []
        self.marks: list[tuple[float, int, int]] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[Meter]:
        cuda = self.device.type == "cuda"
        with warnings.catch_warnings(record=True) as caught, self.reads:
            warnings.simplefilter("always")
            self.caught = caught
            if cuda:
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield self
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(previous)

    def syncs(self) -> int:
        return sum("synchroniz" in str(w.message) for w in self.caught)

    def mark(self) -> None:
        """Record counts, then wait for the GPU and record the time."""
        syncs, reads = self.syncs(), self.reads.count
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append((time.perf_counter(), syncs, reads))
        self.post = (self.syncs(), self.reads.count)  # the synchronize itself is not a step's

    def window(self, start: tuple[float, int, int], post: tuple[int, int], steps: int) -> dict:
        end = self.marks[-1]
        seconds = end[0] - start[0]
        return {
            "steps": steps,
            "ms_per_step": 1000 * seconds / steps,
            "syncs_per_step": (end[1] - post[0]) / steps if self.device.type == "cuda" else None,
            "library_reads_per_step": (end[2] - post[1]) / steps,
        }


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def finite(model: torch.nn.Module) -> bool:
    return bool(all(torch.isfinite(p).all() for p in model.parameters()))


# -- the three paths ------------------------------------------------------------------------------
def run_unlearn(args: argparse.Namespace, method: str) -> dict[str, Any]:
    import miu_hooks as mh

    device, bs = args.device, args.batch_size
    model = build_model(args.smoke)
    size = int(model.config.image_size)
    retain, forget = synthetic(bs * args.steps, size, device, 1), synthetic(bs, size, device, 2)
    common = {"epochs": args.epochs, "batch_size": bs, "lr": 0.01, "seed": 0}
    if method == "miu":
        cfg: Any = mh.MIUConfig(**common, forget_epochs=1, mine_warmup_iters=args.warmup_iters,
                                mine_iters=0)  # fmt: skip
        name = "miu"
    else:
        cfg, name = mh.TrainConfig(**common), "finetune_reweight"
    meter = Meter(device)
    posts: list[tuple[int, int]] = []

    def epoch_end(epoch: int, logs: dict[str, float]) -> None:
        meter.mark()
        posts.append(meter.post)

    with meter.active():
        mh.unlearn(model, retain, forget, config=cfg, method=name, num_groups=4,
                   on_epoch_end=epoch_end)  # fmt: skip
    steps = (args.epochs - 1) * args.steps  # epochs after the first: retain steps only
    row = meter.window(meter.marks[0], posts[0], steps)
    return {**row, "finite": finite(model)}


def run_accelerate(args: argparse.Namespace, method: str) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    import miu_hooks as mh
    from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    device, bs = args.device, args.batch_size
    acc = Accelerator(mixed_precision=args.mixed, cpu=device.type == "cpu")
    model = build_model(args.smoke)
    size = int(model.config.image_size)
    retain, forget = synthetic(bs * args.steps, size, device, 1), synthetic(bs, size, device, 2)
    cfg = mh.MIUConfig(batch_size=bs, mine_warmup_iters=args.warmup_iters, mine_iters=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = reweighted_loader(retain, forget, bs, config=cfg, index=method == "miu")
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    miu = None
    if method == "miu":
        forget_loader = torch.utils.data.DataLoader(forget, batch_size=bs)
        miu = prepare_miu(acc, model, optimizer, loader, forget_loader, config=cfg,
                          register_for_checkpointing=False)  # fmt: skip
        miu.epoch_start(0)
    meter = Meter(device)
    done = 0
    with meter.active():
        for epoch in range(args.epochs):
            if epoch == 1:  # the first epoch warms up
                meter.mark()
                start, post, done = meter.marks[-1], meter.post, 0
            for batch in loader:
                out = model(pixel_values=batch[0])
                loss = miu.retain_loss(out, batch) if miu else F.cross_entropy(out.logits, batch[1])
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done += 1
            if miu is not None:
                miu.pop_logs()
        meter.mark()
    row = meter.window(start, post, done)
    if miu is not None:
        miu.remove()
    acc.free_memory()
    return {**row, "finite": finite(acc.unwrap_model(model))}


def run_trainer(args: argparse.Namespace, method: str) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import miu_hooks as mh
    from miu_hooks.integrations.hf import as_trainer_dataset, prepare_trainer

    device, bs = args.device, args.batch_size
    model = build_model(args.smoke)
    size = int(model.config.image_size)
    retain = as_trainer_dataset(synthetic(bs * args.steps, size, device, 1))
    forget = as_trainer_dataset(synthetic(bs, size, device, 2))
    train = retain if method == "miu" else _Without(retain, "group")
    meter = Meter(device)
    marks: dict[str, Any] = {}

    class Probe(TrainerCallback):
        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step in (args.steps, args.epochs * args.steps):
                meter.mark()
                marks.setdefault("start", (meter.marks[-1], meter.post))

    targs = TrainingArguments(
        str(args.work / f"trainer-{method}"), num_train_epochs=args.epochs,
        per_device_train_batch_size=bs, bf16=args.mixed == "bf16", fp16=args.mixed == "fp16",
        use_cpu=device.type == "cpu", report_to="none", save_strategy="no", logging_steps=10**6,
        disable_tqdm=True, remove_unused_columns=False, dataloader_pin_memory=False,
        optim="adamw_torch", learning_rate=1e-4,
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=train, callbacks=[Probe()])
    callback = None
    if method == "miu":
        cfg = mh.MIUConfig(mine_warmup_iters=args.warmup_iters, mine_iters=0, forget_epochs=1)
        callback = prepare_trainer(trainer, forget, config=cfg)
    with meter.active():
        trainer.train()
    start, post = marks["start"]
    row = meter.window(start, post, (args.epochs - 1) * args.steps)
    if callback is not None:
        callback.remove()
    return {**row, "finite": finite(model)}


class _Without(torch.utils.data.Dataset):
    """Dict items without one column (the plain Trainer's model must not see ``group``)."""

    def __init__(self, dataset: Any, key: str) -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v for k, v in self.dataset[i].items() if k != self.key}


def fp16_check(args: argparse.Namespace) -> dict[str, Any]:
    """A few fp16 MIU steps with adaptive clipping (the loss-scaled path)."""
    import miu_hooks as mh

    device, bs = args.device, max(2, args.batch_size // 4)
    model = build_model(args.smoke)
    size = int(model.config.image_size)
    retain, forget = synthetic(bs * 4, size, device, 1), synthetic(bs, size, device, 2)
    cfg = mh.MIUConfig(epochs=1, forget_epochs=1, batch_size=bs, mine_warmup_iters=2,
                       precision="fp16", clip="adaptive", max_grad_norm=1.0)  # fmt: skip
    mh.unlearn(model, retain, forget, config=cfg, num_groups=4)
    return {"finite": finite(model)}


# -- main ---------------------------------------------------------------------------------------
PATHS: dict[str, Callable[[argparse.Namespace, str], dict[str, Any]]] = {
    "unlearn": run_unlearn,
    "accelerate": run_accelerate,
    "trainer": run_trainer,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny ViT, few steps (CPU is fine)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64 (smoke: 8)")
    ap.add_argument("--steps", type=int, default=None, help="steps/epoch (default 12; smoke 2)")
    ap.add_argument("--epochs", type=int, default=None, help="default 3 (smoke 2); first untimed")
    ap.add_argument("--warmup-iters", type=int, default=None, help="critic warm-up (default 10)")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; later phases skipped")
    ap.add_argument("--json", default=None, help="write the results here (after every phase)")
    args = ap.parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.smoke else 64)
    args.steps = args.steps or (2 if args.smoke else 12)
    args.epochs = max(2, args.epochs or (2 if args.smoke else 3))
    args.warmup_iters = args.warmup_iters if args.warmup_iters is not None else (
        2 if args.smoke else 10
    )
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device: run with --smoke on CPU, or on a machine with a GPU", flush=True)
        return 2
    _import_integrations()
    from miu_hooks.precision import resolve_precision

    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    precision = resolve_precision("auto", args.device)
    args.mixed = {"fp32": "no"}.get(precision, precision)
    args.work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/miu_gpu_check"))
    name = torch.cuda.get_device_name(0) if args.device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; precision {precision}; "
          f"smoke={args.smoke}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    payload: dict[str, Any] = {
        "device": name, "torch": torch.__version__, "precision": precision, "smoke": args.smoke,
        "batch_size": args.batch_size, "steps_per_epoch": args.steps, "epochs": args.epochs,
        "rows": [], "ratios": {},
    }  # fmt: skip

    def save() -> None:
        payload["elapsed_s"] = round(time.perf_counter() - t0, 1)
        if args.json:
            Path(args.json).write_text(json.dumps(payload, indent=2))

    ok = True
    for path in args.paths:
        for method in ("plain", "miu"):
            if time.perf_counter() - t0 > args.budget:
                payload["rows"].append({"path": path, "method": method, "skipped": "time budget"})
                continue
            reset_peak(args.device)
            try:
                row = PATHS[path](args, method)
            except Exception as exc:  # report and go on: the other rows still count
                row = {"error": f"{type(exc).__name__}: {exc}", "finite": False}
            row = {"path": path, "method": method, **row, "peak_gib": peak_gib(args.device)}
            row["images_per_s"] = (1000 * args.batch_size / row["ms_per_step"]
                                   if "ms_per_step" in row else None)  # fmt: skip
            ok &= bool(row.get("finite"))
            payload["rows"].append(row)
            save()
        done = {r["method"]: r for r in payload["rows"] if r["path"] == path and "ms_per_step" in r}
        if len(done) == 2:
            payload["ratios"][path] = done["plain"]["ms_per_step"] / done["miu"]["ms_per_step"]
    if time.perf_counter() - t0 < args.budget:
        try:
            payload["fp16"] = fp16_check(args)
        except Exception as exc:
            payload["fp16"] = {"error": f"{type(exc).__name__}: {exc}", "finite": False}
        ok &= bool(payload["fp16"].get("finite"))
    save()
    print_table(payload)
    return 0 if ok else 1


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(
        value, spec
    )


def print_table(payload: dict[str, Any]) -> None:
    print(f"\n{'path':<11}{'method':<7}{'ms/step':>9}{'img/s':>9}{'peak GiB':>10}"
          f"{'syncs/step':>12}{'lib reads':>11}  finite")  # fmt: skip
    for r in payload["rows"]:
        if "ms_per_step" not in r:
            print(f"{r['path']:<11}{r['method']:<7}  {r.get('skipped') or r.get('error')}")
            continue
        print(f"{r['path']:<11}{r['method']:<7}{r['ms_per_step']:>9.1f}"
              f"{_fmt(r['images_per_s'], '.1f'):>9}{_fmt(r['peak_gib'], '.2f'):>10}"
              f"{_fmt(r['syncs_per_step'], '.2f'):>12}{r['library_reads_per_step']:>11.2f}"
              f"  {r['finite']}")  # fmt: skip
    for path, ratio in payload["ratios"].items():
        print(f"{path}: MIU throughput = {ratio:.2f} x plain")
    if "fp16" in payload:
        print(f"fp16 MIU (adaptive clipping): {payload['fp16']}")
    print(f"total {payload.get('elapsed_s')} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
