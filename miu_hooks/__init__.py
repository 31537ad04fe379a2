"""Group-robust machine unlearning (REWEIGHT + MIU) for PyTorch models.

``import miu_hooks`` imports nothing heavy: the public names below are loaded
from their submodules on first access (PEP 562), so torch is imported when the
first of them is used, and scikit-learn, safetensors, click, transformers and
accelerate only when a feature needs them. This keeps ``miu-unlearn --help``
fast.

Example:
    >>> import torch
    >>> import miu_hooks
    >>> miu_hooks.group_index(torch.tensor([1]), torch.tensor([0]), 2).tolist()
    [2]
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs
    from miu_hooks.config import (
        L1SparseConfig,
        MIUConfig,
        NegGradConfig,
        RetrainConfig,
        SalUnConfig,
        SCRUBConfig,
        TrainConfig,
    )
    from miu_hooks.config_base import ConfigField, config_fields
    from miu_hooks.data import (
        Batch,
        GroupTensorDataset,
        IndexedDataset,
        dataset_groups,
        forward_logits,
        split_batch,
    )
    from miu_hooks.demo.toy_data import ColoredSplits, colored_digits
    from miu_hooks.engine import MIUHandle, attach
    from miu_hooks.errors import (
        CheckpointError,
        CollapseWarning,
        ConfigError,
        ConfigTypeError,
        DataError,
        EmptyForgetSetError,
        EmptyGroupError,
        FeatureModuleNotFoundError,
        GroupRangeError,
        InputMismatchError,
        LedgerError,
        MIUError,
        ModelError,
        NoClassifierOutputError,
        NonFiniteInputError,
        NonFiniteLossError,
        OriginalMismatchError,
        StateError,
    )
    from miu_hooks.estimators import MIEstimator
    from miu_hooks.evaluation import Report, evaluate
    from miu_hooks.functional import (
        calibration_loss,
        dv_bound,
        ema_log_mean_exp,
        forget_objective,
        group_counts,
        group_index,
        group_weights,
        log_mean_exp,
    )
    from miu_hooks.guard import GuardOutcome
    from miu_hooks.ledger import Ledger, LedgerEntry
    from miu_hooks.methods import available_methods, register_method, resolve_run
    from miu_hooks.methods.retrain import reinitialize
    from miu_hooks.original import load_original, load_weights, save_weights
    from miu_hooks.runtime import LocalRuntime, Runtime
    from miu_hooks.sampling import GroupReweightSampler, ResampledView
    from miu_hooks.splits import forget_split, subset
    from miu_hooks.taps import FeatureTap, resolve_features, resolve_head
    from miu_hooks.unlearn import unlearn
    from miu_hooks.validation import validate

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CheckpointError",
    "ColoredSplits",
    "CollapseWarning",
    "ConfigError",
    "ConfigField",
    "ConfigTypeError",
    "DataError",
    "EmptyForgetSetError",
    "EmptyGroupError",
    "FeatureModuleNotFoundError",
    "FeatureTap",
    "GroupRangeError",
    "GuardOutcome",
    "GroupReweightSampler",
    "GroupTensorDataset",
    "IndexedDataset",
    "InputMismatchError",
    "L1SparseConfig",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "LocalRuntime",
    "MIEstimator",
    "MIUConfig",
    "MIUError",
    "MIUHandle",
    "NegGradConfig",
    "ModelError",
    "NoClassifierOutputError",
    "NonFiniteInputError",
    "NonFiniteLossError",
    "OriginalMismatchError",
    "Report",
    "RetrainConfig",
    "ResampledView",
    "Runtime",
    "SCRUBConfig",
    "SalUnConfig",
    "StateError",
    "TrainConfig",
    "__version__",
    "attach",
    "available_methods",
    "calibration_loss",
    "colored_digits",
    "config_fields",
    "dataset_groups",
    "dv_bound",
    "ema_log_mean_exp",
    "evaluate",
    "forget_objective",
    "forget_split",
    "forward_logits",
    "group_counts",
    "group_index",
    "group_weights",
    "load_original",
    "load_weights",
    "log_mean_exp",
    "register_method",
    "reinitialize",
    "resolve_features",
    "resolve_head",
    "resolve_run",
    "save_weights",
    "split_batch",
    "subset",
    "unlearn",
    "validate",
]


# Public name -> submodule that defines it (loaded on first access).
_SOURCES: dict[str, tuple[str, ...]] = {
    "config": (
        "L1SparseConfig", "MIUConfig", "NegGradConfig", "RetrainConfig", "SCRUBConfig",
        "SalUnConfig", "TrainConfig",
    ),
    "config_base": ("ConfigField", "config_fields"),
    "data": (
        "Batch", "GroupTensorDataset", "IndexedDataset", "dataset_groups", "forward_logits",
        "split_batch",
    ),
    "demo.toy_data": ("ColoredSplits", "colored_digits"),
    "engine": ("MIUHandle", "attach"),
    "errors": (
        "CheckpointError", "CollapseWarning", "ConfigError", "ConfigTypeError", "DataError",
        "EmptyForgetSetError", "EmptyGroupError", "FeatureModuleNotFoundError", "GroupRangeError",
        "InputMismatchError", "LedgerError", "MIUError", "ModelError", "NoClassifierOutputError",
        "NonFiniteInputError", "NonFiniteLossError", "OriginalMismatchError", "StateError",
    ),
    "estimators": ("MIEstimator",),
    "functional": (
        "calibration_loss", "dv_bound", "ema_log_mean_exp", "forget_objective", "group_counts",
        "group_index", "group_weights", "log_mean_exp",
    ),
    "ledger": ("Ledger", "LedgerEntry"),
    "methods": ("available_methods", "register_method", "resolve_run"),
    "methods.retrain": ("reinitialize",),
    "evaluation": ("Report", "evaluate"),
    "guard": ("GuardOutcome",),
    "original": ("load_original", "load_weights", "save_weights"),
    "runtime": ("LocalRuntime", "Runtime"),
    "sampling": ("GroupReweightSampler", "ResampledView"),
    "splits": ("forget_split", "subset"),
    "taps": ("FeatureTap", "resolve_features", "resolve_head"),
    "unlearn": ("unlearn",),
    "validation": ("validate",),
}  # fmt: skip
_EXPORTS = {name: module for module, names in _SOURCES.items() for name in names}


def __getattr__(name: str) -> Any:
    # PEP 562: load a public name from its submodule on first use.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'miu_hooks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module; keeps a re-exported name over a same-named submodule.

    Importing a submodule binds it as an attribute of its package. For
    ``miu_hooks.unlearn`` (both a submodule and the function it defines) the
    function must win, as it did when this package imported everything eagerly.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
