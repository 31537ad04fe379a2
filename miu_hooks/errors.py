"""Exception types raised by ``miu_hooks``.

Every error the library raises on bad input derives from :class:`MIUError` and
carries a one-line message that names the problem. The command line maps each
type to its own exit code (see ``miu_hooks.cli``).
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CollapseWarning",
    "ConfigError",
    "ConfigTypeError",
    "DataError",
    "EmptyForgetSetError",
    "EmptyGroupError",
    "FeatureModuleNotFoundError",
    "GroupRangeError",
    "InputMismatchError",
    "LedgerError",
    "MIUError",
    "ModelError",
    "NoClassifierOutputError",
    "NonFiniteInputError",
    "NonFiniteLossError",
    "OriginalMismatchError",
    "StateError",
]


class MIUError(Exception):
    """Base class of every error raised by ``miu_hooks`` on bad input or state."""


class ConfigError(MIUError, ValueError):
    """A setting or argument is unknown, misspelled, out of range or contradicts another.

    Raised by the config classes (constructor, ``from_dict``, ``replace``), by
    method names that are not registered, and by arguments of library objects.
    The message names the setting, the value given and the fix.
    """


class ConfigTypeError(ConfigError, TypeError):
    """An argument has the wrong type (e.g. a feature module neither a name nor a module)."""


class StateError(MIUError, RuntimeError):
    """An object is used out of order (state restored before setup, a hook that never fired)."""


class ModelError(MIUError, ValueError):
    """The model does not fit the run (no trainable weights, too few classes, bad outputs)."""


class DataError(MIUError, ValueError):
    """A data set, batch or id list is malformed (missing column, wrong type...)."""


class NonFiniteInputError(DataError):
    """The input data hold NaN or Inf values (a data error, not a training one)."""


class InputMismatchError(DataError, ModelError):
    """The inputs do not fit the model: its forward fails on them (image size, channels...)."""


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


class LedgerError(MIUError, ValueError):
    """A deletion-request ledger is unreadable, inconsistent, or does not fit the data."""


class OriginalMismatchError(LedgerError):
    """A file given as the ledger's original model has another sha256."""


class CollapseWarning(UserWarning):
    """The collapse guard stopped a run: held-out accuracy fell past its threshold.

    The message gives the accuracies, the threshold and which weights were restored.
    """
