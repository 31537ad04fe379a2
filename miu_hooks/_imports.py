"""Availability checks for optional dependencies, imported lazily."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["is_available", "require"]

_EXTRAS = {
    "transformers": "hf",
    "accelerate": "hf",
    "sklearn": "metrics",
    "matplotlib": "plot",
    "PIL": "image",
    "tqdm": "demo",
    "datasets": "datasets",
}


def is_available(name: str) -> bool:
    """Return whether the top-level module ``name`` can be imported.

    Example:
        >>> is_available("torch")
        True
    """
    return importlib.util.find_spec(name) is not None


def require(name: str, extra: str | None = None) -> ModuleType:
    """Import ``name`` or raise an :class:`ImportError` that says how to install it.

    Example:
        >>> require("torch").__name__
        'torch'
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        extra = extra or _EXTRAS.get(name.split(".")[0])
        hint = f"pip install 'miu-hooks[{extra}]'" if extra else f"pip install {name}"
        raise ImportError(f"{name} is required for this feature: {hint}") from exc
