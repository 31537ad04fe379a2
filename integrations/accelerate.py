"""MIU in a raw Accelerate loop: :func:`prepare_miu` and :class:`AccelerateRuntime`.

The integration attaches the shared engine (:func:`miu_hooks.attach`) to an
existing loop and never wraps the model; the schedule (critic tuning, forget
pass, calibrated retain loss) is the engine's, exactly as in
:func:`miu_hooks.unlearn` and the Trainer callback.

Multi-process semantics (docs/integrations.md §7): the MI terms are computed
on the **global batch**. Features and groups are concatenated over ranks with an
autograd-aware all-gather and the marginal groups are drawn for the global batch
from a generator seeded identically on every rank, so every rank computes the
same Î, the critics receive identical gradients (no DDP wrapper needed, they
stay bit-identical), and after DDP's gradient averaging the model update equals
a single-process run at batch ``num_processes x per-process batch``.

The forget pass runs outside the user's prepared forward. Under DDP it forwards
the unwrapped model (the DDP wrapper would see the head's parameters unused by
Î and fail on the next forward) and averages the gradients by hand before
stepping; under FSDP/DeepSpeed it forwards the prepared model and lets the
engine synchronise (not exercised by the test suite).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from miu_hooks._imports import require
from miu_hooks.config import MIUConfig
from miu_hooks.data import IndexedDataset, dataset_groups, logits_of, split_keys
from miu_hooks.engine import MIUHandle, OriginalSpec, attach
from miu_hooks.errors import ConfigError
from miu_hooks.guard import CollapseGuard
from miu_hooks.loader_options import loader_options
from miu_hooks.methods.base import SeededLoader, ShuffleSampler
from miu_hooks.sampling import GroupReweightSampler, TrainBatchSampler
from miu_hooks.unlearn import check_split
from miu_hooks.wrappers import refuse_unsupported

require("accelerate", extra="hf")
from accelerate import Accelerator  # noqa: E402

from miu_hooks.integrations.accelerate_data import guard_for, reweighted_loader  # noqa: E402
from miu_hooks.integrations.accelerate_runtime import AccelerateRuntime  # noqa: E402
from miu_hooks.integrations.loaders import (  # noqa: E402
    EndingLoader,
    batch_sampler_chain,
    check_last_batch,
    index_sampler,
    user_collate,
)

__all__ = ["AccelerateRuntime", "MIUAccelerate", "prepare_miu", "reweighted_loader"]

logger = logging.getLogger(__name__)


def _is_prepared(loader: Any) -> bool:
    return hasattr(loader, "gradient_state")


def _per_process_batch_size(loader: Any, num_processes: int, default: int) -> int:
    total = getattr(loader, "total_batch_size", None)
    if isinstance(total, int) and total > 0:
        return max(1, total // num_processes)
    size = getattr(loader, "batch_size", None)
    return int(size) if isinstance(size, int) and size > 0 else default


class MIUAccelerate:
    """MIU attached to an Accelerate loop (returned by :func:`prepare_miu`).

    Attributes:
        accelerator: The run's accelerator.
        handle: The shared engine's :class:`~miu_hooks.engine.MIUHandle`.
        runtime: The :class:`AccelerateRuntime` the engine steps with.
        optimizer: The prepared model optimizer (stepped by the forget pass).
        retain_loader: The prepared retain loader (iterated by the user's loop).
        forget_loader: The prepared forget loader (iterated by :meth:`epoch_start`).
        tune_loader: Prepared shuffled loader over D for critic tuning.
        guard: The collapse guard (``None`` when off), checked by :meth:`epoch_end`.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        handle: MIUHandle,
        runtime: AccelerateRuntime,
        optimizer: torch.optim.Optimizer,
        retain_loader: Iterable[Any],
        forget_loader: Iterable[Any],
        tune_loader: Iterable[Any],
    ) -> None:
        self.accelerator = accelerator
        self.handle = handle
        self.runtime = runtime
        self.optimizer = optimizer
        self.retain_loader = retain_loader
        self.forget_loader = forget_loader
        self.tune_loader = tune_loader
        self.guard: CollapseGuard | None = None

    @property
    def config(self) -> MIUConfig:
        """The run's :class:`MIUConfig`."""
        return self.handle.config

    def epoch_start(self, epoch: int) -> None:
        """Tune both critics, then (``epoch < forget_epochs``) run the forget pass.

        Call it at the top of each epoch, before the retain loop. It is a full
        optimizer-step boundary: gradients still accumulated from an unfinished
        accumulation cycle are discarded (with a warning), every forget and
        critic step is a complete step, and the model's gradients are zeroed on
        return. It also redraws the REWEIGHT sample of the retain loader.
        """
        acc = self.accelerator
        if not acc.sync_gradients:
            logger.warning(
                "miu.epoch_start(%d) called inside an unfinished gradient-accumulation cycle; "
                "the accumulated gradients are discarded",
                epoch,
            )
        for loader in (self.retain_loader, self.forget_loader):
            set_epoch = getattr(loader, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
        # A sync boundary: the prepared optimizer only steps and zeroes while it holds.
        acc.sync_gradients = True
        self.handle.epoch_start(
            epoch,
            optimizer=self.optimizer,
            forget_loader=self.forget_loader,
            tune_loader=self.tune_loader,
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.handle.model.train()

    def epoch_end(self, epoch: int) -> bool:
        """Collapse guard: check held-out accuracy after ``epoch``; ``False`` means stop.

        Call it after each epoch's retain loop. When accuracy on the guard's slice
        falls more than ``config.guard_threshold`` points below the original
        model's, the weights of the last epoch that passed are restored (the model
        as attached before the first), a :class:`~miu_hooks.errors.CollapseWarning`
        is issued and ``False`` is returned: leave the loop. ``guard.outcome``
        records the run. Every process computes the same answer (same weights,
        same slice). Without a guard it returns ``True``.
        """
        if self.guard is None:
            return True
        return self.guard.check(self.handle.model, epoch, final=epoch == self.config.epochs - 1)

    def retain_loss(self, outputs: Any, batch: Any) -> Tensor:
        """MIU's retain loss CE + λ·(Î_u − sg Î_o)² for the forward that produced ``outputs``.

        Args:
            outputs: The model output of this batch (logits, an HF output with
                ``.logits``, or a tuple starting with the logits).
            batch: The batch as yielded by the retain loader (tuple or mapping
                with labels and groups).

        Returns:
            A scalar loss to pass to ``accelerator.backward``.
        """
        return self.handle.retain_loss(logits_of(outputs), self.handle.split(batch))

    def pop_logs(self) -> dict[str, float]:
        """Mean of each ``miu/*`` term since the last call.

        The MI terms are global-batch values, equal on every rank; ``miu/ce`` is
        this rank's cross-entropy.
        """
        return self.handle.pop_logs()

    def state_dict(self) -> dict[str, Tensor]:
        """Critics, EMA buffers, critic-optimizer state, RNG and counters."""
        return self.handle.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`'s output (for ``accelerator.load_state``)."""
        self.handle.load_state_dict(state)

    def remove(self) -> None:
        """Detach the feature taps (the model is left as it was attached)."""
        self.handle.remove()


def prepare_miu(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    retain_loader: Iterable[Any],
    forget_loader: Iterable[Any],
    *,
    config: MIUConfig | None = None,
    original: OriginalSpec = None,
    num_groups: int | None = None,
    train_dataset: Dataset | None = None,
    tune_loader: Iterable[Any] | None = None,
    feature_module: str | nn.Module | None = None,
    register_for_checkpointing: bool = True,
    check_batch_sizes: bool | None = None,
    val: Dataset | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> MIUAccelerate:
    """Attach MIU to an Accelerate loop; call after ``accelerator.prepare``.

    Pass the objects ``accelerator.prepare`` returned. The retain loader should
    come from :func:`reweighted_loader` (REWEIGHT) when ``config.reweight`` is
    true; with ``index=True`` there, the original model's features are cached
    here (once, on every process) when the data is deterministic and
    ``config.feature_cache`` allows. The forget and tuning loaders are iterated
    by :meth:`MIUAccelerate.epoch_start` and are prepared here when they are not
    already. The loaders built here (critic tuning, feature cache, the guard's
    slice) batch with ``collate_fn``, by default the one the retain loader was
    built with (e.g. ``DataCollatorWithPadding`` for text of varying length). The critics
    are not wrapped in DDP: they see the same global batch on every rank, so
    their gradients are identical by construction. With
    ``register_for_checkpointing`` the returned object is saved and restored
    by ``accelerator.save_state``/``load_state``.

    Args:
        accelerator: The run's ``Accelerator``.
        model: The prepared model (hooks go on ``accelerator.unwrap_model(model)``).
        optimizer: The prepared optimizer.
        retain_loader: The prepared retain loader the loop iterates.
        forget_loader: Loader of D_f (prepared here if needed).
        config: :class:`MIUConfig` (``device`` and ``precision`` come from the accelerator).
        original: The frozen original: ``None`` snapshots ``model`` now, or a
            safetensors path or module (rank 0's weights are broadcast).
        num_groups: |G| (default ``max group id + 1`` over D).
        train_dataset: D = D_r ∪ D_f for critic tuning (default: the two loaders' datasets).
        tune_loader: A loader of D to use for critic tuning instead of ``train_dataset``.
        feature_module: Head override for the feature tap.
        register_for_checkpointing: Register the result with the accelerator.
        check_batch_sizes: Check equal per-rank batch sizes before each step's
            gather (a host read per step). ``None``: only when the accelerator
            does not make batches even (``even_batches=False``).
        val: Held-out data for the collapse guard (:meth:`MIUAccelerate.epoch_end`);
            ``None`` reads the slice of the retain set that :func:`reweighted_loader`
            held out of its draw. With neither, the run is unguarded (a warning).
        collate_fn: Batches the items of the loaders built here (default: the retain
            loader's own ``collate_fn``, unless it is ``default_collate``).

    Returns:
        The :class:`MIUAccelerate` whose methods the loop calls.

    Raises:
        ConfigError: ``config.reweight`` is true but the retain loader does not
            sample with :class:`~miu_hooks.sampling.GroupReweightSampler`, the
            retain loader is not prepared in a multi-process run, or the
            datasets cannot be read from the loaders and ``num_groups`` or
            ``train_dataset`` is missing.

    Example:
        >>> from accelerate import Accelerator
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> torch.manual_seed(0) and None
        >>> x, y = torch.randn(48, 4), torch.randint(0, 2, (48,))
        >>> g = y * 2 + torch.randint(0, 2, (48,))
        >>> retain, forget = TensorDataset(x[8:], y[8:], g[8:]), TensorDataset(x[:8], y[:8], g[:8])
        >>> cfg = MIUConfig(mine_hidden=16, mine_warmup_iters=4, mine_iters=2)
        >>> accelerator = Accelerator(cpu=True)
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.05)
        >>> retain_loader = reweighted_loader(retain, forget, 8, config=cfg)  # was DataLoader(...)
        >>> forget_loader = DataLoader(forget, batch_size=8)
        >>> net, opt, retain_loader, forget_loader = accelerator.prepare(
        ...     net, opt, retain_loader, forget_loader)
        >>> miu = prepare_miu(accelerator, net, opt, retain_loader, forget_loader, config=cfg)
        >>> for epoch in range(2):
        ...     miu.epoch_start(epoch)                                    # added
        ...     for xb, yb, gb in retain_loader:
        ...         loss = miu.retain_loss(net(xb), (xb, yb, gb))         # was CE(net(xb), yb)
        ...         accelerator.backward(loss)
        ...         opt.step()
        ...         opt.zero_grad()
        ...     if not miu.epoch_end(epoch):                              # added: the guard
        ...         break
        >>> sorted(miu.pop_logs())[:2]
        ['miu/calibration', 'miu/ce']
    """
    cfg = config or MIUConfig()
    refuse_unsupported(model)
    runtime = AccelerateRuntime(accelerator, check_sizes=check_batch_sizes)
    if cfg.precision not in ("auto", "fp32") and cfg.precision != runtime.precision:
        logger.warning(
            "MIUConfig.precision=%s is ignored: the accelerator runs %s",
            cfg.precision,
            runtime.precision,
        )
    cfg = cfg.replace(precision=runtime.precision, device=str(runtime.device))
    collate = collate_fn if collate_fn is not None else user_collate(retain_loader)
    nproc = runtime.world_size
    if nproc > 1 and not _is_prepared(retain_loader):
        raise ConfigError(
            "prepare_miu needs the retain loader returned by accelerator.prepare in a "
            "multi-process run (each process must see its own shard)"
        )
    sampler = index_sampler(retain_loader)
    if cfg.reweight and not isinstance(sampler, GroupReweightSampler):
        raise ConfigError(
            "config.reweight=True but the retain loader does not sample with "
            f"GroupReweightSampler (found {type(sampler).__name__}): build it with "
            "miu_hooks.integrations.accelerate.reweighted_loader(retain, forget, batch_size, "
            "config=config) before accelerator.prepare, or use config.replace(reweight=False)"
        )
    retain_ds: Any = getattr(retain_loader, "dataset", None)
    forget_ds: Any = getattr(forget_loader, "dataset", None)
    if num_groups is None or (train_dataset is None and tune_loader is None):
        if retain_ds is None or forget_ds is None:
            raise ConfigError(
                "cannot read the retain/forget datasets from the loaders: pass num_groups "
                "and train_dataset (or tune_loader)"
            )
        _, found = check_split(
            dataset_groups(retain_ds, cfg.group_key),
            dataset_groups(forget_ds, cfg.group_key),
            num_groups,
        )
        num_groups = num_groups if num_groups is not None else found
    if not _is_prepared(forget_loader):
        forget_loader = accelerator.prepare_data_loader(forget_loader)
    # Retain batches that carry positions (reweighted_loader(index=True)) can read
    # cached features of D = D_r + D_f, retain positions first, as unlearn() does.
    cache_on: Dataset | None = None
    if isinstance(retain_ds, IndexedDataset) and train_dataset is None and tune_loader is None:
        cache_on = ConcatDataset([retain_ds.dataset, forget_ds])
    if tune_loader is None:
        train: Any = train_dataset
        if train is None:
            train = cache_on if cache_on is not None else ConcatDataset([retain_ds, forget_ds])
        tune_data: Dataset = IndexedDataset(train) if cache_on is not None else train
        tune_loader = SeededLoader(
            tune_data,
            batch_size=_per_process_batch_size(retain_loader, nproc, cfg.batch_size),
            sampler=ShuffleSampler(len(train), seed=cfg.seed + 2),
            drop_last=nproc > 1,
            collate_fn=collate,
            **loader_options(train, runtime.device, cfg.num_workers),
        )
    if not _is_prepared(tune_loader):
        tune_loader = accelerator.prepare_data_loader(tune_loader)
    _no_batch_of_one(accelerator.unwrap_model(model), cfg, nproc, retain_loader, forget_loader)

    unwrapped = accelerator.unwrap_model(model)
    frozen: OriginalSpec = original
    if isinstance(original, nn.Module) and nproc > 1:
        frozen = original.to(runtime.device)
        _broadcast_module(frozen)
    handle = attach(
        unwrapped,
        cfg,
        num_groups=num_groups,
        original=frozen,
        feature_module=feature_module,
        runtime=runtime,
        forward_model=model if runtime.forward_through_prepared else unwrapped,
    )
    if cache_on is not None:
        handle.cache_features(cache_on, num_workers=cfg.num_workers, collate_fn=collate)
    elif cfg.feature_cache == "on":
        handle.remove()
        raise ConfigError(
            "MIUConfig.feature_cache='on' needs retain batches that carry their positions: "
            "build the retain loader with reweighted_loader(..., index=True) and leave "
            "train_dataset and tune_loader unset"
        )
    miu = MIUAccelerate(
        accelerator,
        handle,
        runtime,
        optimizer,
        retain_loader,
        forget_loader,
        EndingLoader(tune_loader),
    )
    plain_retain = retain_ds.dataset if isinstance(retain_ds, IndexedDataset) else retain_ds
    miu.guard = guard_for(cfg, sampler, plain_retain, val, collate_fn=collate)
    if miu.guard is not None:
        miu.guard.start(handle.model)
    if register_for_checkpointing:
        accelerator.register_for_checkpointing(miu)
    logger.info(
        "MIU attached on %d process(es): global-batch MI, precision %s, tap on %r, %s",
        nproc,
        runtime.precision,
        handle.tap.name,
        "cached original features" if handle.feature_cache is not None else "no feature cache",
    )
    return miu


def _no_batch_of_one(model: nn.Module, cfg: MIUConfig, nproc: int, *loaders: Any) -> None:
    """No training pass feeds a batch of one: merging off under sharding, user loaders checked.

    Loaders built by the library (:func:`reweighted_loader`, the tuning loader)
    merge a last single sample into the batch before it on one process. Several
    processes get their batches from Accelerate's sharding, which evens the last
    batches (``even_batches=True``) and needs batches of at most the batch size,
    so merging is switched off there. A loader of the user's whose last batch
    holds one sample is refused when the model cannot train on one sample.
    """
    for loader in loaders:
        for node in batch_sampler_chain(loader):
            if isinstance(node, TrainBatchSampler) and nproc > 1:
                node.merge_single = False
    keys = split_keys(cfg)
    for what, loader in zip(("the retain loader", "the forget loader"), loaders, strict=True):
        check_last_batch(
            loader,
            model,
            what=what,
            fix="pass drop_last=True to its DataLoader, or another batch size",
            keys=keys,
            world_size=nproc,
        )


def _broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers of ``module`` to every rank."""
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)
