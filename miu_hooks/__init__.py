"""Group-robust machine unlearning (REWEIGHT + MIU) for PyTorch models.

``import miu_hooks`` imports torch only; scikit-learn, safetensors, click,
transformers and accelerate are imported when a feature needs them.

Example:
    >>> import miu_hooks
    >>> miu_hooks.group_index(torch.tensor([1]), torch.tensor([0]), 2).tolist()
    [2]
"""

from __future__ import annotations

from typing import Any

import torch

from miu_hooks.config import MIUConfig
from miu_hooks.data import Batch, IndexedDataset, dataset_groups, forward_logits, split_batch
from miu_hooks.engine import MIUHandle, attach
from miu_hooks.errors import (
    CheckpointError,
    DataError,
    EmptyForgetSetError,
    EmptyGroupError,
    FeatureModuleNotFoundError,
    GroupRangeError,
    MIUError,
    NoClassifierOutputError,
    NonFiniteLossError,
)
from miu_hooks.estimators import MIEstimator
from miu_hooks.functional import (
    calibration_loss,
    dv_bound,
    ema_log_mean_exp,
    group_counts,
    group_index,
    group_weights,
    log_mean_exp,
)
from miu_hooks.methods import available_methods, register_method
from miu_hooks.reference import load_original, load_weights, save_weights
from miu_hooks.runtime import LocalRuntime, Runtime
from miu_hooks.sampling import GroupReweightSampler, ResampledView
from miu_hooks.taps import FeatureTap, resolve_head
from miu_hooks.unlearn import unlearn

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CheckpointError",
    "DataError",
    "EmptyForgetSetError",
    "EmptyGroupError",
    "FeatureModuleNotFoundError",
    "FeatureTap",
    "GroupRangeError",
    "GroupReweightSampler",
    "IndexedDataset",
    "LocalRuntime",
    "MIEstimator",
    "MIUConfig",
    "MIUError",
    "MIUHandle",
    "NoClassifierOutputError",
    "NonFiniteLossError",
    "Report",
    "ResampledView",
    "Runtime",
    "__version__",
    "attach",
    "available_methods",
    "calibration_loss",
    "dataset_groups",
    "dv_bound",
    "ema_log_mean_exp",
    "evaluate",
    "forward_logits",
    "group_counts",
    "group_index",
    "group_weights",
    "load_original",
    "load_weights",
    "log_mean_exp",
    "register_method",
    "resolve_head",
    "save_weights",
    "split_batch",
    "unlearn",
]


def __getattr__(name: str) -> Any:
    # The metrics module is only needed for evaluation; load it on first use.
    if name in ("evaluate", "Report"):
        from miu_hooks import metrics  # noqa: PLC0415

        return getattr(metrics, name)
    raise AttributeError(f"module 'miu_hooks' has no attribute {name!r}")


_ = torch  # torch is the only import-time dependency
