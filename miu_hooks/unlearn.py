"""``unlearn``: the plain-PyTorch entry point over the shared engine."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from miu_hooks.atomic import atomic_save_safetensors
from miu_hooks.checks import deferred
from miu_hooks.config import TrainConfig
from miu_hooks.data import indexed
from miu_hooks.engine import OriginalSpec, resolve_original
from miu_hooks.errors import CheckpointError, NonFiniteInputError, NonFiniteLossError
from miu_hooks.guard import GuardOutcome, build_guard
from miu_hooks.loader_options import loader_options
from miu_hooks.methods import RunContext
from miu_hooks.methods.base import SeededLoader, ShuffleSampler
from miu_hooks.precision import tf32_matmul
from miu_hooks.runtime import LocalRuntime, Runtime, resolve_device
from miu_hooks.sampling import GroupReweightSampler
from miu_hooks.seeding import epoch_seed
from miu_hooks.state import flatten_optimizer_state, load_flat_optimizer_state, unprefixed
from miu_hooks.validation import check_run, raise_first, split_problems

__all__ = ["STATE_FILE", "build_optimizer", "build_scheduler", "check_split", "unlearn"]

logger = logging.getLogger(__name__)

STATE_FILE = "unlearn_state.safetensors"
EpochCallback = Callable[[int, dict[str, float]], None]
GuardCallback = Callable[[GuardOutcome], None]


def check_split(
    retain_groups: Tensor, forget_groups: Tensor, num_groups: int | None = None
) -> tuple[Tensor, int]:
    """Validate a retain/forget split and return ``(train_groups, num_groups)``.

    Raises the first problem of :func:`~miu_hooks.validation.split_problems`,
    naming the others in its message.

    Raises:
        EmptyForgetSetError: The forget set is empty.
        DataError: The retain set is empty.
        ConfigError: ``num_groups < 1``.
        GroupRangeError: A group id lies outside ``[0, num_groups)``.
        EmptyGroupError: The forget set removes every sample of a group.

    Example:
        >>> g, n = check_split(torch.tensor([0, 1, 1]), torch.tensor([1]))
        >>> g.tolist(), n
        ([0, 1, 1, 1], 2)
    """
    problems, train_groups, num_groups = split_problems(retain_groups, forget_groups, num_groups)
    raise_first(problems)
    return train_groups, num_groups


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The model optimiser of the config (SGD with momentum, or AdamW)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine over ``epochs`` (stepped once per epoch, no warm-up) or constant."""
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


def _loaders(
    retain: Dataset,
    forget: Dataset,
    train: Dataset,
    retain_groups: Tensor,
    train_groups: Tensor,
    num_groups: int,
    cfg: TrainConfig,
    device: torch.device,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> tuple[SeededLoader, SeededLoader, SeededLoader]:
    if cfg.reweight:
        retain_sampler: Any = GroupReweightSampler(
            retain_groups, train_groups, num_groups=num_groups, seed=cfg.seed
        )
    else:
        retain_sampler = ShuffleSampler(len(retain_groups), seed=cfg.seed)
    bs = cfg.batch_size
    options = loader_options(retain, device, cfg.num_workers)  # pinned for CUDA, workers
    if collate_fn is not None:  # else tensor-backed data are read a batch at a time
        options["collate_fn"] = collate_fn
    n_forget, n_train = len(forget), len(train)  # type: ignore[arg-type]
    return (
        SeededLoader(indexed(retain), sampler=retain_sampler, batch_size=bs, **options),
        SeededLoader(forget, sampler=ShuffleSampler(n_forget, cfg.seed + 1), batch_size=bs,
                     **options),
        SeededLoader(indexed(train), sampler=ShuffleSampler(n_train, cfg.seed + 2), batch_size=bs,
                     **options),
    )  # fmt: skip


def _save_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    method_state: dict[str, Tensor],
    epoch: int,
    meta: dict[str, str],
) -> None:
    tensors = {
        f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()
    }
    tensors.update({k: v.cpu() for k, v in flatten_optimizer_state(optimizer, "opt.").items()})
    tensors.update(
        {f"method.{k}": v.detach().cpu().clone().contiguous() for k, v in method_state.items()}
    )
    schedule = json.dumps(scheduler.state_dict())
    atomic_save_safetensors(path, tensors, {**meta, "epoch": str(epoch), "scheduler": schedule})


def _load_state(path: Path, meta: dict[str, str]) -> tuple[int, dict[str, Tensor], dict[str, Any]]:
    """Read a resume state on the CPU.

    ``model.load_state_dict`` copies onto the model's device, and the optimiser
    moves its state next to each parameter, except AdamW's ``step`` counters,
    which must stay CPU tensors (a CUDA ``step`` costs host reads in every step).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            saved_meta = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"cannot read resume state {path}: {exc}") from exc
    for key in ("method", "config"):
        if saved_meta.get(key) != meta[key]:
            raise CheckpointError(
                f"resume state {path} was written with a different {key}; "
                "use a new state directory or the same settings"
            )
    try:
        schedule = json.loads(saved_meta["scheduler"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"resume state {path} has no readable scheduler state (written by an older "
            "version?); use a new state directory"
        ) from exc
    return int(saved_meta["epoch"]), tensors, schedule


def _restore_schedule(
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    """Load the scheduler's saved state and the learning rates it had set."""
    scheduler.load_state_dict(state)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def unlearn(
    model: nn.Module,
    retain: Dataset,
    forget: Dataset,
    *,
    config: TrainConfig | None = None,
    original: OriginalSpec = None,
    feature_module: str | nn.Module | None = None,
    num_groups: int | None = None,
    method: str | None = None,
    val: Dataset | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
    on_guard: GuardCallback | None = None,
    progress: Callable[[Iterable[Any], str], Iterable[Any]] | None = None,
    runtime: Runtime | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> nn.Module:
    """Unlearn ``forget`` from ``model`` in place and return the same model object.

    Items of ``retain``/``forget`` are ``(inputs, label, group)`` tuples or
    mappings (keys in ``config``). D = retain ∪ forget is used to tune MIU's
    critics and to compute REWEIGHT weights ``N_g(D) / N_g(D_r)``. Every random
    draw derives from ``config.seed`` and the epoch, so the same seed gives the
    same weights (CPU), and a run resumed from ``state_dir`` matches an
    uninterrupted one. The caller's global RNG state is restored afterwards.

    Every problem :func:`~miu_hooks.validation.validate` finds is checked
    before any work: the first is raised (its own type), the others are named
    in its message.

    Collapse guard (``config.guard``, on by default; docs/method.md §10): after
    each epoch the model's accuracy on a held-out slice (``val`` when given,
    else a seeded slice of ``retain`` kept out of training) is compared with
    the input model's. A drop of more than ``config.guard_threshold`` points
    restores the weights of the last epoch that passed (the input model before
    the first), stops the run and issues a
    :class:`~miu_hooks.errors.CollapseWarning` with the numbers; ``on_guard``
    receives the :class:`~miu_hooks.guard.GuardOutcome` at the end of every
    guarded run. A :class:`~miu_hooks.errors.NonFiniteLossError` in a guarded
    run also restores the last good epoch before it is raised. Retrain from
    re-initialised weights has no earlier state worth restoring: its final
    model is checked and a collapse is warned about and recorded. The guard
    costs one evaluation of the slice per epoch and one copy of the weights in
    CPU memory.

    Settings: each method takes its config class (``MIUConfig`` for ``miu``,
    ``SalUnConfig`` for ``salun``..., ``TrainConfig`` for ``finetune``,
    ``retrain``, ``neggrad`` and ``random_labels``). Without ``method=`` the
    method follows the config's class (``"miu"`` when ``config`` is ``None``).
    A config of another class is converted: the settings changed from its
    class's defaults carry over, the method's defaults fill the rest, and a
    changed setting the method does not have is a ``ConfigError``
    (:func:`~miu_hooks.methods.resolve_run`). ``X`` runs without REWEIGHT and
    ``X_reweight`` with it; MIU samples with REWEIGHT unless ``reweight=False``.

    Args:
        model: The trained classifier to unlearn (or, for ``retrain*``, a fresh one).
        retain: The retain set D_r.
        forget: The forget set D_f.
        config: Run settings, of the method's config class or converted to it
            (default: the method's defaults).
        original: The original model for MIU's calibration: ``None`` (``model`` as
            passed in), a safetensors path, or a module used as is.
        feature_module: Head override for the feature tap (dotted name or module).
        num_groups: |G|; default ``max group id + 1``.
        method: A registered method (``miu``, ``finetune``, ``retrain``, ... and
            their ``_reweight`` variants; see ``available_methods()``), or
            ``None``: the method of the config's class.
        val: Held-out data (items like ``retain``'s) for the collapse guard;
            ``None`` holds a slice of ``retain`` out of training instead.
        state_dir: Folder for a resumable per-epoch state file.
        resume: Continue from ``state_dir``'s state when it exists.
        on_epoch_end: Called as ``fn(epoch, logs)`` after each epoch (with the
            guard on, ``logs`` holds ``guard/accuracy`` and ``guard/original``).
        on_guard: Called once with the :class:`~miu_hooks.guard.GuardOutcome`
            when a guarded run ends (also when the guard fired).
        progress: Wraps iterables with a progress bar, ``fn(iterable, desc)``.
        runtime: Execution runtime (default: device and precision of the config).
        collate_fn: How every loader of the run batches items (training, critic
            tuning, the feature cache, the guard, the checks): e.g.
            ``DataCollatorWithPadding(tokenizer)`` for tokenized text of varying
            length (mapping items; their ``"__index__"`` key must pass through).
            ``None``: ``default_collate``.

    Returns:
        ``model``, unlearned.

    Raises:
        ConfigError: Unknown method, an invalid or foreign setting, or a
            ``reweight`` that contradicts the method name.
        EmptyForgetSetError: ``forget`` is empty.
        EmptyGroupError: The forget set removes every sample of a group.
        GroupRangeError: Group ids or labels are out of range.
        FeatureModuleNotFoundError: The classification head cannot be found.
        NoClassifierOutputError: The model output carries no logits.
        NonFiniteLossError: A loss or MI estimate became NaN/Inf (weights stay finite;
            with the guard on, the last good epoch's weights are restored).
        DataError: ``val`` is empty.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> torch.manual_seed(0) and None
        >>> x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
        >>> g = y * 2 + torch.randint(0, 2, (40,))
        >>> retain, forget = TensorDataset(x[8:], y[8:], g[8:]), TensorDataset(x[:8], y[:8], g[:8])
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> from miu_hooks.config import MIUConfig
        >>> cfg = MIUConfig(epochs=2, forget_epochs=1, batch_size=8, mine_hidden=16,
        ...                 mine_warmup_iters=5, mine_iters=2, device="cpu")
        >>> unlearn(net, retain, forget, config=cfg, num_groups=4) is net
        True
    """
    check = check_run(
        model,
        retain,
        forget,
        config,
        method=method,
        num_groups=num_groups,
        feature_module=feature_module,
        collate_fn=collate_fn,
    )
    raise_first(check.problems)
    assert check.run is not None  # no problem means the run resolved
    name, method_cls, cfg = check.run
    retain_groups, train_groups = check.retain_groups, check.train_groups
    num_groups = check.num_groups
    rt = runtime or LocalRuntime(resolve_device(cfg.device), cfg.precision)
    model.to(rt.device)
    was_training = model.training

    frozen: nn.Module | None = None
    if method_cls.needs_original:
        frozen = resolve_original(model, original).to(rt.device)

    # REWEIGHT keeps D's mixture: its weights count the whole D even when the guard
    # holds a slice of D_r out of training.
    full_train_groups, forget_groups = train_groups, train_groups[retain_groups.numel() :]
    guard, held = build_guard(
        retain, retain_groups, val, cfg, final_only=method_cls.starts_fresh(cfg),
        collate_fn=collate_fn,
    )  # fmt: skip
    if held.numel():  # the guard's slice of D_r is kept out of training
        keep = torch.ones(retain_groups.numel(), dtype=torch.bool)
        keep[held] = False
        kept = torch.nonzero(keep).reshape(-1)
        retain, retain_groups = Subset(retain, kept.tolist()), retain_groups[kept]
    if guard is not None:
        guard.start(model)
    train: ConcatDataset[Any] = ConcatDataset([retain, forget])
    train_groups = torch.cat([retain_groups, forget_groups])
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"method": name, "config": cfg.to_json()}
    fork_devices = [rt.device.index or 0] if rt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), tf32_matmul(rt.device):
        torch.manual_seed(cfg.seed)
        retain_loader, forget_loader, tune_loader = _loaders(
            retain, forget, train, retain_groups, full_train_groups, num_groups, cfg, rt.device,
            collate_fn,
        )  # fmt: skip
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg)
        ctx = RunContext(
            model=model,
            config=cfg,
            runtime=rt,
            retain=retain,
            forget=forget,
            train=train,
            num_groups=num_groups,
            train_groups=train_groups,
            optimizer=optimizer,
            retain_loader=retain_loader,
            forget_loader=forget_loader,
            tune_loader=tune_loader,
            feature_module=feature_module,
            original_factory=(lambda: frozen)
            if frozen is not None
            else (lambda: resolve_original(model, original).to(rt.device)),
            progress=progress or (lambda it, _desc: it),
            collate_fn=collate_fn,
        )
        runner = method_cls()
        runner.setup(ctx)
        try:
            start = 0
            if resume and state_path is not None and state_path.exists():
                done, tensors, schedule = _load_state(state_path, meta)
                model.load_state_dict(unprefixed(tensors, "model."))
                load_flat_optimizer_state(optimizer, tensors, prefix="opt.")
                runner.load_state_dict(unprefixed(tensors, "method."))
                _restore_schedule(scheduler, optimizer, schedule)
                start = done + 1
                if guard is not None:
                    guard.set_good(model, done)
                logger.info("resuming %s after epoch %d from %s", name, done, state_path)
            for epoch in range(start, cfg.epochs):
                ctx.epoch = epoch
                for loader in (retain_loader, forget_loader):
                    loader.set_epoch(epoch)
                torch.manual_seed(epoch_seed(cfg.seed, epoch))  # dropout etc., per epoch
                try:
                    # One scope per epoch: each optimiser step reads its checks once.
                    with deferred(ctx.reduce_max()):
                        runner.run_epoch(ctx, epoch)
                except (NonFiniteLossError, NonFiniteInputError) as exc:  # NaN data too
                    if guard is None or guard.outcome.final_only:
                        raise
                    restored = guard.restore(model)
                    what = "the input model" if restored == -1 else f"epoch {restored}'s weights"
                    raise type(exc)(f"{exc} ({what} restored by the guard)") from exc
                scheduler.step()
                passed = guard is None or guard.check(model, epoch, final=epoch == cfg.epochs - 1)
                if guard is not None and guard.outcome.accuracies:
                    ctx.logs["guard/accuracy"] = guard.outcome.accuracies[-1]
                    ctx.logs["guard/original"] = guard.outcome.original_accuracy
                stop = not passed and not guard.outcome.final_only  # type: ignore[union-attr]
                if state_path is not None and not stop:
                    _save_state(
                        state_path, model, optimizer, scheduler, runner.state_dict(), epoch, meta
                    )
                if on_epoch_end is not None:
                    on_epoch_end(epoch, dict(ctx.logs))
                logger.debug("epoch %d done: %s", epoch, json.dumps(ctx.logs))
                if stop:
                    break
        finally:
            runner.teardown(ctx)
            model.train(was_training)
            if guard is not None and on_guard is not None:
                on_guard(guard.outcome)
    return model
