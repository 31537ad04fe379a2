"""The registry of unlearning methods, each with its settings class.

A method is an :class:`~miu_hooks.methods.base.UnlearningMethod` subclass in
its own module, registered with :func:`register_method` together with its
config class (``register_method("salun", config=SalUnConfig)``). Adding one is
one file plus one import line at the bottom of this module.

A name says what runs: ``X`` runs without REWEIGHT and ``X_reweight`` with it.
MIU samples with REWEIGHT by default (``miu``; ``reweight=False`` is the
paper's ablation), and NegGrad has no retain pass, so neither has a
``_reweight`` name. :func:`resolve_run` turns a name and a config into the
method class and the config that actually runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

from miu_hooks.config import TrainConfig
from miu_hooks.config_base import note_method
from miu_hooks.errors import ConfigError, ConfigTypeError
from miu_hooks.methods.base import ReweightRule, RunContext, UnlearningMethod

__all__ = [
    "METHODS",
    "REWEIGHT_SUFFIX",
    "ResolvedRun",
    "ReweightRule",
    "RunContext",
    "UnlearningMethod",
    "available_methods",
    "config_class",
    "describe_methods",
    "register_method",
    "resolve_run",
]

METHODS: dict[str, type[UnlearningMethod]] = {}
REWEIGHT_SUFFIX = "_reweight"
_NO_SUFFIX = {
    "default_on": "samples with REWEIGHT by default",
    "not_applicable": "has no retain pass, so REWEIGHT does not apply",
}


def register_method(
    name: str, *, config: type[TrainConfig] = TrainConfig
) -> Callable[[type[UnlearningMethod]], type[UnlearningMethod]]:
    """Class decorator adding a method to the registry under ``name`` with its config class.

    Args:
        name: The method's name (without the ``_reweight`` suffix).
        config: Its settings class: :class:`~miu_hooks.config.TrainConfig` or a subclass.

    Raises:
        ConfigError: ``name`` is taken or ends in ``_reweight``.
        ConfigTypeError: ``config`` is not a ``TrainConfig`` subclass.
    """
    if not (isinstance(config, type) and issubclass(config, TrainConfig)):
        raise ConfigTypeError(f"config must be TrainConfig or a subclass of it; got {config!r}")

    def decorate(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
        if name in METHODS:
            raise ConfigError(f"method {name!r} is already registered")
        if name.endswith(REWEIGHT_SUFFIX):
            raise ConfigError(f"method names may not end in {REWEIGHT_SUFFIX!r}; got {name!r}")
        cls.name = name
        cls.config_class = config
        METHODS[name] = cls
        note_method(config, name)
        return cls

    return decorate


def available_methods() -> list[str]:
    """Return every accepted method name, including the ``_reweight`` variants.

    Example:
        >>> "miu" in available_methods() and "retrain_reweight" in available_methods()
        True
        >>> "miu_reweight" in available_methods()
        False
    """
    suffixed = [f"{n}{REWEIGHT_SUFFIX}" for n, c in METHODS.items() if c.reweight_rule == "by_name"]
    return sorted([*METHODS, *suffixed])


def describe_methods() -> list[tuple[str, str, str]]:
    """Return ``(name, settings class, what runs)`` for every accepted method name.

    Example:
        >>> rows = {name: what for name, _, what in describe_methods()}
        >>> rows["retrain"], rows["retrain_reweight"]
        ('REWEIGHT off', 'REWEIGHT on')
        >>> rows["miu"]
        "REWEIGHT on (reweight=False: the paper's ablation, no REWEIGHT)"
    """
    what = {
        "default_on": "REWEIGHT on (reweight=False: the paper's ablation, no REWEIGHT)",
        "not_applicable": "no retain pass (REWEIGHT does not apply)",
    }
    rows = []
    for name in available_methods():
        cls, suffixed = _lookup(name)
        runs = what.get(cls.reweight_rule, "REWEIGHT on" if suffixed else "REWEIGHT off")
        rows.append((name, cls.config_class.__name__, runs))
    return rows


def _lookup(method: str) -> tuple[type[UnlearningMethod], bool]:
    """Return ``(method class, has the _reweight suffix)`` for a method name."""
    if not isinstance(method, str):
        raise ConfigTypeError(f"method must be a name such as 'miu'; got {method!r}")
    base = method.removesuffix(REWEIGHT_SUFFIX)
    cls = METHODS.get(base)
    suffixed = base != method
    if cls is not None and (not suffixed or cls.reweight_rule == "by_name"):
        return cls, suffixed
    why = ""
    if cls is not None:
        why = f" ({base} {_NO_SUFFIX[cls.reweight_rule]}: use {base!r})"
    raise ConfigError(
        f"unknown method {method!r}{why}; choose one of {', '.join(available_methods())}"
    )


def config_class(method: str) -> type[TrainConfig]:
    """Return the settings class of a method name (``X`` and ``X_reweight`` share one).

    Raises:
        ConfigError: Unknown method (the message lists the known ones).

    Example:
        >>> config_class("salun_reweight").__name__, config_class("finetune").__name__
        ('SalUnConfig', 'TrainConfig')
    """
    return _lookup(method)[0].config_class


class ResolvedRun(NamedTuple):
    """What :func:`resolve_run` returns: the canonical name, the method class, the config.

    Attributes:
        name: The method name that says what runs (e.g. ``"salun_reweight"``).
        method_class: The registered :class:`UnlearningMethod` subclass.
        config: The resolved config (an instance of ``method_class.config_class``,
            ``reweight`` set to what runs); record this one.
    """

    name: str
    method_class: type[UnlearningMethod]
    config: TrainConfig


def _registered_class(klass: type[TrainConfig]) -> type[TrainConfig] | None:
    """The first class of ``klass``'s MRO that some method registered as its config."""
    registered = {c.config_class for c in METHODS.values()}
    return next((k for k in klass.__mro__ if k in registered), None)


def _infer(config: TrainConfig) -> str:
    """The method a config's class names (``method=None``)."""
    registered = _registered_class(type(config))
    users = sorted(n for n, c in METHODS.items() if c.config_class is registered)
    if len(users) != 1:
        shared = f"is shared by {', '.join(users)}" if users else "belongs to no registered method"
        raise ConfigError(
            f"cannot tell the method from a {type(config).__name__}: its class {shared}; "
            "pass method=... (e.g. method='finetune')"
        )
    cls = METHODS[users[0]]
    if cls.reweight_rule == "by_name" and config.reweight is True:
        return f"{users[0]}{REWEIGHT_SUFFIX}"
    return users[0]


def _convert(config: TrainConfig, target: type[TrainConfig], method: str) -> TrainConfig:
    """Carry the settings changed from their defaults over to ``target``; refuse the rest."""
    if _registered_class(type(config)) is target:
        return config
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    changed = {k: v for k, v in config.to_dict().items() if v != defaults[k]}
    known = {f.name for f in dataclasses.fields(target)}
    foreign = [k for k in changed if k not in known]
    if foreign:
        values = ", ".join(f"{k}={changed[k]!r}" for k in foreign)
        takers = sorted(
            n
            for n, c in METHODS.items()
            if foreign[0] in {f.name for f in dataclasses.fields(c.config_class)}
        )
        other = f", or use method={takers[0]!r}" if takers else ""
        raise ConfigError(
            f"method {method!r} takes {target.__name__}, which has no {values} (set in the "
            f"{type(config).__name__} given): drop {'it' if len(foreign) == 1 else 'them'}{other}"
        )
    return target(**changed)


def _reweight(cls: type[UnlearningMethod], method: str, suffixed: bool, value: bool | None) -> bool:
    if cls.reweight_rule == "default_on":
        return True if value is None else value
    if cls.reweight_rule == "not_applicable":
        if value:
            raise ConfigError(
                f"method {method!r} {_NO_SUFFIX['not_applicable']}: drop reweight=True"
            )
        return False
    if value is None or value == suffixed:
        return suffixed
    if suffixed:
        raise ConfigError(
            f"method {method!r} runs with REWEIGHT but the config sets reweight=False: use "
            f"method={cls.name!r}, or drop reweight=False"
        )
    raise ConfigError(
        f"method {method!r} runs without REWEIGHT but the config sets reweight=True: use "
        f"method={method + REWEIGHT_SUFFIX!r}, or drop reweight=True"
    )


def resolve_run(method: str | None = None, config: TrainConfig | None = None) -> ResolvedRun:
    """Return the method and the config that actually run for a name and a config.

    * ``method=None`` takes the method from the config's class (``SalUnConfig``:
      ``salun``, or ``salun_reweight`` when it sets ``reweight=True``), and
      ``"miu"`` when ``config`` is ``None`` too. A class shared by several
      methods (:class:`~miu_hooks.config.TrainConfig`) needs ``method=``.
    * A config of the method's own class (or a subclass of it) is used as is.
      A config of another class is converted: every setting changed from that
      class's defaults carries over, the method's defaults fill the rest, and a
      changed setting the method does not have is refused. (A value equal to its
      class's default counts as unchanged.)
    * ``reweight`` is set to what runs: ``None`` follows the name, and an
      explicit value that contradicts the name is refused.

    Args:
        method: A name of :func:`available_methods`, or ``None``.
        config: Any registered method's config, or ``None`` (the method's defaults).

    Returns:
        ``ResolvedRun(name, method_class, config)``.

    Raises:
        ConfigError: Unknown method, a setting the method does not have, or a
            ``reweight`` that contradicts the name.

    Example:
        >>> from miu_hooks.config import MIUConfig, TrainConfig
        >>> name, cls, cfg = resolve_run("finetune_reweight", TrainConfig(lr=0.1))
        >>> name, cls.__name__, cfg.reweight, cfg.lr
        ('finetune_reweight', 'FineTune', True, 0.1)
        >>> resolve_run(config=MIUConfig(epochs=3)).name
        'miu'
        >>> resolve_run("finetune", MIUConfig(mi_weight=10.0))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        miu_hooks.errors.ConfigError: method 'finetune' takes TrainConfig, which has no ...
    """
    if config is not None and not isinstance(config, TrainConfig):
        raise ConfigTypeError(
            f"config must be a TrainConfig (or a method's subclass of it, e.g. MIUConfig); "
            f"got {type(config).__name__}"
        )
    if method is None:
        method = "miu" if config is None else _infer(config)
    cls, suffixed = _lookup(method)
    cfg = cls.config_class() if config is None else _convert(config, cls.config_class, method)
    reweight = _reweight(cls, method, suffixed, cfg.reweight)
    if cfg.reweight is not reweight:
        cfg = cfg.replace(reweight=reweight)
    name = cls.name + (REWEIGHT_SUFFIX if cls.reweight_rule == "by_name" and reweight else "")
    return ResolvedRun(name, cls, cfg)


# Registration happens on import of each method module.
from miu_hooks.methods import (  # noqa: E402,F401
    finetune,
    l1_sparse,
    miu,
    neggrad,
    random_labels,
    retrain,
    salun,
    scrub,
)
