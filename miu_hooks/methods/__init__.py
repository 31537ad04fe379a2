"""The registry of unlearning methods.

A method is an :class:`~miu_hooks.methods.base.UnlearningMethod` subclass in
its own module, registered with :func:`register_method`. Adding one is one
file plus one import line at the bottom of this module.

A name ending in ``_reweight`` (e.g. ``"retrain_reweight"``) runs the base
method with REWEIGHT sampling forced on; a plain name follows
``MIUConfig.reweight``.
"""

from __future__ import annotations

from collections.abc import Callable

from miu_hooks.methods.base import RunContext, UnlearningMethod

__all__ = [
    "METHODS",
    "RunContext",
    "UnlearningMethod",
    "available_methods",
    "register_method",
    "resolve_method",
]

METHODS: dict[str, type[UnlearningMethod]] = {}
REWEIGHT_SUFFIX = "_reweight"


def register_method(name: str) -> Callable[[type[UnlearningMethod]], type[UnlearningMethod]]:
    """Class decorator adding a method to the registry under ``name``."""

    def decorate(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        if name.endswith(REWEIGHT_SUFFIX):
            raise ValueError(f"method names may not end in {REWEIGHT_SUFFIX!r}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """Return every accepted method name, including the ``_reweight`` variants.

    Example:
        >>> "miu" in available_methods() and "retrain_reweight" in available_methods()
        True
    """
    return sorted([*METHODS, *(f"{n}{REWEIGHT_SUFFIX}" for n in METHODS if n != "miu")])


def resolve_method(name: str) -> tuple[type[UnlearningMethod], bool]:
    """Return ``(method class, force_reweight)`` for a method name.

    Raises:
        ValueError: Unknown method (the message lists the known ones).
    """
    force = name.endswith(REWEIGHT_SUFFIX)
    base = name[: -len(REWEIGHT_SUFFIX)] if force else name
    if base not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(available_methods())}")
    return METHODS[base], force


# Registration happens on import of each method module.
from miu_hooks.methods import finetune, l1_sparse, miu, neggrad, random_labels, salun, scrub  # noqa: E402,F401
