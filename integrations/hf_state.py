"""Runtime, REWEIGHT sampler placement and checkpoint files for the Trainer integration.

Kept apart from :mod:`miu_hooks.integrations.hf` so that each piece stays small:

* :func:`make_runtime` picks the runtime of the callback's own steps (forget
  passes): the Trainer's optimizer and, under fp16, its gradient scaler, with
  collectives from :class:`~miu_hooks.distributed.DistributedRuntime` when
  several processes run;
* :func:`check_trainer_args` refuses what the hooks cannot follow: ``nn.DataParallel``
  (one process over several GPUs) and ``torch_compile``;
* :func:`install_sampler` swaps the sampler of the Trainer's prepared train
  loader for the REWEIGHT sampler (same length, so step counts stay valid);
* :func:`save_state` / :func:`load_state` write and read ``miu_state.safetensors``
  and ``miu_state.json`` inside a Trainer checkpoint folder;
  :func:`checkpoint_weights_restored` tells whether the Trainer's resume restored
  the model weights of that folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from miu_hooks.atomic import atomic_save_safetensors, atomic_write_text
from miu_hooks.data import IndexedDataset
from miu_hooks.engine import MIUHandle
from miu_hooks.errors import CheckpointError, ConfigError, ModelError
from miu_hooks.integrations.loaders import (
    batch_sampler_chain,
    index_sampler,
    replace_index_sampler,
)
from miu_hooks.runtime import LocalRuntime, Runtime
from miu_hooks.sampling import GroupReweightSampler
from miu_hooks.wrappers import COMPILED_MESSAGE, DATA_PARALLEL_MESSAGE

__all__ = [
    "META_FILE",
    "STATE_FILE",
    "check_trainer_args",
    "checkpoint_weights_restored",
    "even_batches",
    "index_train_dataset",
    "install_sampler",
    "load_state",
    "make_runtime",
    "save_state",
    "trainer_precision",
    "warn_if_weights_not_restored",
]

logger = logging.getLogger(__name__)

STATE_FILE = "miu_state.safetensors"
META_FILE = "miu_state.json"
STATE_VERSION = 1


def trainer_precision(args: Any) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``, from ``TrainingArguments.bf16``/``fp16``.

    Example:
        >>> from types import SimpleNamespace
        >>> trainer_precision(SimpleNamespace(bf16=True, fp16=False))
        'bf16'
    """
    if getattr(args, "bf16", False):
        return "bf16"
    if getattr(args, "fp16", False):
        return "fp16"
    return "fp32"


def check_trainer_args(args: Any) -> None:
    """Refuse Trainer settings the hooks cannot follow (one-line :class:`ModelError`).

    * more than one GPU in one process (``args.n_gpu > 1``): the Trainer then
      wraps the model in ``nn.DataParallel``;
    * ``torch_compile=True``: compiled graphs ignore hooks added later.

    Example:
        >>> from types import SimpleNamespace
        >>> check_trainer_args(SimpleNamespace(n_gpu=1, torch_compile=False))
        >>> check_trainer_args(SimpleNamespace(n_gpu=2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        miu_hooks.errors.ModelError: the Trainer runs 2 GPUs in one process...
    """
    n_gpu = int(getattr(args, "n_gpu", 1) or 1)
    if n_gpu > 1:
        raise ModelError(
            f"the Trainer runs {n_gpu} GPUs in one process, i.e. {DATA_PARALLEL_MESSAGE}"
        )
    if getattr(args, "torch_compile", False):
        raise ModelError(f"TrainingArguments.torch_compile=True: {COMPILED_MESSAGE}")


def index_train_dataset(trainer: Any, feature_cache: str) -> Any:
    """Wrap ``trainer.train_dataset`` so its items carry their positions (``__index__``).

    Retain batches then read the original model's cached features instead of
    running it (when reading an item twice gives the same values); the column
    hook drops the column before the model sees it. Returns the Trainer's own
    dataset (to put back later), or ``None`` when nothing was wrapped:
    ``feature_cache="off"``, no dataset, one wrapped already, or one without
    ``__len__``/``__getitem__``.

    Example:
        >>> from types import SimpleNamespace
        >>> trainer = SimpleNamespace(train_dataset=[{"x": 1, "group": 0}])
        >>> index_train_dataset(trainer, "auto"), trainer.train_dataset[0]["__index__"]
        ([{'x': 1, 'group': 0}], 0)
    """
    dataset = trainer.train_dataset
    if (
        feature_cache == "off"
        or dataset is None
        or isinstance(dataset, IndexedDataset)
        or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))
    ):
        return None
    trainer.train_dataset = IndexedDataset(dataset)
    return dataset


def even_batches(args: Any) -> bool:
    """Whether the Trainer's Accelerator gives every process equal batches (its default).

    Example:
        >>> from types import SimpleNamespace
        >>> even_batches(SimpleNamespace(accelerator_config={"even_batches": False}))
        False
    """
    config = getattr(args, "accelerator_config", None)
    value = (
        config.get("even_batches")
        if isinstance(config, dict)
        else getattr(config, "even_batches", None)
    )
    return True if value is None else bool(value)


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def make_runtime(args: Any, optimizer: torch.optim.Optimizer | None) -> Runtime:
    """Build the runtime of the callback's steps from the Trainer's arguments and optimizer.

    This is the single place where the Trainer integration chooses a runtime:
    with ``torch.distributed`` initialised and more than one process it is a
    :class:`~miu_hooks.distributed.DistributedRuntime` (global-batch MI through an
    autograd-aware all-gather, model gradients of the forget passes averaged by
    hand); otherwise a :class:`~miu_hooks.runtime.LocalRuntime`. Both step the
    Trainer's optimizer with its scaler: that optimizer is Accelerate's
    ``AcceleratedOptimizer``, which only steps while Accelerate says gradients are
    synchronised, so the runtime steps the torch optimizer it wraps (the forget
    steps run between the Trainer's steps) and reuses its fp16 scaler.

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(device=torch.device("cpu"), bf16=False, fp16=False)
        >>> runtime = make_runtime(args, None)
        >>> type(runtime).__name__, runtime.world_size, runtime.precision
        ('LocalRuntime', 1, 'fp32')
    """
    device = args.device if isinstance(args.device, torch.device) else torch.device(args.device)
    precision, scaler = trainer_precision(args), getattr(optimizer, "scaler", None)
    if _world_size() > 1:
        from miu_hooks.distributed import DistributedRuntime  # lazy: only for multi-process runs

        # The Trainer's loader (even_batches) and the callback's own (RankBatchSampler)
        # give every rank the same batch size: no per-step size check then.
        return DistributedRuntime(
            device, precision, scaler=scaler, check_sizes=not even_batches(args)
        )
    return LocalRuntime(device, precision, scaler=scaler)


# -- REWEIGHT sampler ----------------------------------------------------------------------
def install_sampler(loader: Any, make: Any) -> GroupReweightSampler:
    """Make the Trainer's train loader draw its indices from a REWEIGHT sampler.

    When the sampler in place already is a :class:`GroupReweightSampler` (the
    ``MIUTrainer`` route builds it in ``_get_train_sampler``) it is kept;
    otherwise ``make(num_samples)`` builds one of the same length as the
    sampler it replaces, so the number of steps per epoch is unchanged. The
    swap goes through :func:`~miu_hooks.integrations.loaders.replace_index_sampler`.

    Raises:
        ConfigError: The loader has no ``BatchSampler`` with a ``sampler`` (an
            iterable dataset or a custom batch sampler).

    Example:
        >>> from torch.utils.data import DataLoader
        >>> loader = DataLoader(range(6), batch_size=3, shuffle=True)
        >>> groups = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> sampler = install_sampler(loader, lambda n: GroupReweightSampler(
        ...     groups, torch.tensor([0, 0, 0, 1, 1, 1, 1]), num_samples=n, num_groups=2))
        >>> loader.batch_sampler.sampler is sampler, len(loader)
        (True, 2)
    """
    current = index_sampler(loader)
    if isinstance(current, GroupReweightSampler):
        return current
    if not batch_sampler_chain(loader) or not hasattr(current, "__len__"):
        raise ConfigError(
            "MIUCallback could not find the sampler of the Trainer's train DataLoader (an "
            "IterableDataset or a custom batch sampler?), so it cannot apply REWEIGHT. Use a "
            "map-style train_dataset, or make_miu_trainer(...), or MIUConfig(reweight=False)"
        )
    sampler: GroupReweightSampler = make(len(current))
    replace_index_sampler(loader, sampler)
    return sampler


# -- checkpoint files ------------------------------------------------------------------------
def save_state(folder: str | os.PathLike[str], handle: MIUHandle, meta: dict[str, Any]) -> Path:
    """Write the handle's state and ``meta`` into ``folder`` (a Trainer checkpoint).

    ``miu_state.safetensors`` holds the critics, their EMA buffers, the critic
    optimizers' momentum, the marginal-group generator and the counters (flat
    tensors, no pickle); ``miu_state.json`` holds ``meta`` (schedule position,
    config, versions), also stored as the safetensors metadata.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in handle.state_dict().items()}
    meta = {"version": STATE_VERSION, **meta}
    text = json.dumps(meta, sort_keys=True)
    atomic_save_safetensors(folder / STATE_FILE, tensors, {"miu": text})
    atomic_write_text(folder / META_FILE, text + "\n")
    return folder / STATE_FILE


def load_state(folder: str | os.PathLike[str], handle: MIUHandle) -> dict[str, Any]:
    """Restore :func:`save_state`'s files from ``folder`` into ``handle`` and return ``meta``.

    Raises:
        CheckpointError: The files are missing or unreadable.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"resuming needs the MIU state {path}, which does not exist: the checkpoint was not "
            "written with MIUCallback, or it lives elsewhere (pass MIUCallback(resume_from=DIR))"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("miu", "{}"))
        tensors = load_file(str(path), device="cpu")  # optimiser state loads from the CPU
    except Exception as exc:  # safetensors and json raise their own types
        raise CheckpointError(f"cannot read the MIU state {path}: {exc}") from exc
    handle.load_state_dict(tensors)
    return dict(meta)


def checkpoint_weights_restored(
    model: torch.nn.Module, folder: str | os.PathLike[str]
) -> bool | None:
    """Whether ``model`` holds the weights saved in the Trainer checkpoint ``folder``.

    The checkpoint's ``model.safetensors`` is loaded into a hook-free copy of the
    model (:func:`~miu_hooks.original.load_original`, which maps the keys
    ``save_pretrained`` renames) and compared tensor by tensor. ``None`` when
    that file is absent or cannot be loaded (sharded or FSDP checkpoints).
    """
    from miu_hooks.original import load_original
    from miu_hooks.taps import unwrap_model

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return None
    inner = unwrap_model(model)
    try:
        saved = load_original(inner, path)
    except CheckpointError:
        return None
    current = inner.state_dict()
    return all(
        torch.equal(value.detach().cpu(), current[key].detach().cpu())
        for key, value in saved.state_dict().items()
    )


def warn_if_weights_not_restored(model: torch.nn.Module, folder: str | os.PathLike[str]) -> None:
    """Log what to do when a resumed Trainer did not restore the checkpoint's model weights."""
    if checkpoint_weights_restored(model, folder) is not False:
        return
    import transformers

    logger.warning(
        "MIUCallback: the model's weights differ from those saved in %s: the Trainer "
        "(transformers %s) did not restore them (for ViT-family models save_pretrained renames "
        "the keys, and only from_pretrained maps them back), so the run would go on from the "
        "weights it started with. Load them before resuming, after the Trainer and the callback "
        "are built: trainer.model.load_state_dict(type(trainer.model).from_pretrained(%r)"
        ".state_dict()), then trainer.train(resume_from_checkpoint=%r)",
        folder,
        transformers.__version__,
        str(folder),
        str(folder),
    )


def resume_state(folder: str | os.PathLike[str], handle: MIUHandle, model: torch.nn.Module) -> int:
    """Restore ``handle`` from the checkpoint ``folder``; return the epoch the run had started.

    Also logs what to do when the Trainer did not restore the checkpoint's model
    weights (:func:`warn_if_weights_not_restored`).

    Raises:
        CheckpointError: The MIU state was written with another ``forget_epochs``,
            ``mi_weight`` or ``mine_hidden`` than ``handle.config``'s.
    """
    meta = load_state(folder, handle)
    warn_if_weights_not_restored(model, folder)
    saved = meta.get("config", {})
    current = handle.config.to_dict()
    changed = sorted(
        k
        for k in ("forget_epochs", "mi_weight", "mine_hidden")
        if k in saved and saved[k] != current[k]
    )
    if changed:
        raise CheckpointError(
            f"the MIU state in {folder} was written with different {changed}; resume with "
            "the same MIUConfig or start a new run"
        )
    return int(meta.get("started_epoch", -1))
