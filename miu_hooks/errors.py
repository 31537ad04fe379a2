"""Exception types raised by ``miu_hooks``.

Every error the library raises on bad input derives from :class:`MIUError` and
carries a one-line message that names the problem. The command line maps each
type to its own exit code (see ``miu_hooks.cli``).
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "EmptyForgetSetError",
    "EmptyGroupError",
    "FeatureModuleNotFoundError",
    "GroupRangeError",
    "MIUError",
    "NoClassifierOutputError",
    "NonFiniteLossError",
]


class MIUError(Exception):
    """Base class of every error raised by ``miu_hooks`` on bad input or state."""


class DataError(MIUError, ValueError):
    """A data set, batch or id list is malformed (missing column, wrong type...)."""


class EmptyForgetSetError(DataError):
    """The forget set has no sample."""


class GroupRangeError(DataError):
    """A label, sensitive attribute or group id lies outside its valid range."""


class EmptyGroupError(DataError):
    """A group present in training data has no sample left in the retain set."""


class FeatureModuleNotFoundError(MIUError, LookupError):
    """The classification head (whose input are the features) could not be found."""


class NoClassifierOutputError(MIUError, TypeError):
    """The model's output carries no logits (tensor, ``.logits`` or first element)."""


class CheckpointError(MIUError, ValueError):
    """A safetensors checkpoint is missing, corrupt, or does not match the model."""


class NonFiniteLossError(MIUError, FloatingPointError):
    """A loss or MI estimate became NaN or Inf; the run stops and names the step."""
