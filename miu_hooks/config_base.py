"""What every settings class shares: typed, documented, checked, immutable fields.

A settings class is a frozen, keyword-only dataclass deriving from
:class:`BaseConfig` whose fields are declared with :func:`setting`. Each field
carries its one-line help and its range in the field's metadata, so the
documentation, the checks and :func:`config_fields` (which the command line can
build its options from) read one source. Only scalar fields are allowed (bool,
int, float, str, ``Literal`` choices, each optionally ``None``), so a config
cannot be changed after it is built.

Imports only the standard library (the command line reads it before torch).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from miu_hooks.errors import ConfigError, ConfigTypeError

__all__ = ["BaseConfig", "ConfigField", "config_fields", "setting"]

C = TypeVar("C", bound="BaseConfig")
_SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class Bound:
    """A numeric range ``low <(=) value <(=) high`` (``None``: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """The range as text, e.g. ``">= 1"`` or ``"in (0, 1]"``."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return ""

    def holds(self, value: float) -> bool:
        """Whether ``value`` lies in the range."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (
            self.high is not None and (value >= self.high if self.high_open else value > self.high)
        )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def setting(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> Any:
    """Declare a config field with its default, one-line help and range.

    Args:
        default: The default value (a scalar or ``None``; never a mutable object).
        help: One line saying what the field does (shown in docs and ``--help``).
        low: Smallest allowed value of a number (``None``: no lower bound).
        high: Largest allowed value of a number.
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.
        hint: Text appended to the fix of an invalid value (e.g. ``"MINE uses 0.01"``).

    Returns:
        A ``dataclasses.field`` carrying the metadata.

    Example:
        >>> f = setting(3, "Epochs.", low=1)
        >>> f.default, f.metadata["help"]
        (3, 'Epochs.')
    """
    if isinstance(default, (list, dict, set, bytearray)):
        raise ConfigTypeError(f"setting defaults must be immutable scalars; got {default!r}")
    bound = Bound(low, high, low_open, high_open)
    return dataclasses.field(default=default, metadata={"help": help, "bound": bound, "hint": hint})


@dataclass(frozen=True)
class ConfigField:
    """One field of a settings class, as :func:`config_fields` lists it.

    Attributes:
        name: Field name (the keyword, the JSON key; the CLI option is ``--name-with-dashes``).
        type: Python type of the value: ``bool``, ``int``, ``float`` or ``str``.
        optional: Whether ``None`` is allowed.
        default: Default value.
        choices: Allowed values of a ``Literal`` field, else ``None``.
        help: One-line description.
        constraint: The allowed range as text (``">= 1"``, ``"in (0, 1]"``), or ``""``.
        owner: Name of the settings class that declares the field.
    """

    name: str
    type: type
    optional: bool
    default: Any
    choices: tuple[Any, ...] | None
    help: str
    constraint: str
    owner: str


def _analyse(annotation: Any) -> tuple[type, bool, tuple[Any, ...] | None]:
    """Return ``(scalar type, optional, choices)`` of a field annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            raise ConfigTypeError(f"config fields take one scalar type (or None); got {annotation}")
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1 or not kinds <= set(_SCALARS):
            raise ConfigTypeError(
                f"Literal config fields need choices of one scalar type; got {choices}"
            )
        return kinds.pop(), optional, choices
    if annotation not in _SCALARS:
        raise ConfigTypeError(
            f"config fields must be bool, int, float, str or Literal (optionally | None), "
            f"so configs stay immutable; got {annotation!r}"
        )
    return annotation, optional, None


_FIELDS: dict[type, tuple[ConfigField, ...]] = {}


def _fields(cls: type[BaseConfig]) -> tuple[ConfigField, ...]:
    if cls in _FIELDS:
        return _FIELDS[cls]
    hints = typing.get_type_hints(cls)
    owners = {}
    for klass in reversed(cls.__mro__):
        for name in getattr(klass, "__annotations__", {}):
            owners[name] = klass.__name__
    out = []
    for f in dataclasses.fields(cls):
        kind, optional, choices = _analyse(hints[f.name])
        bound: Bound = f.metadata.get("bound", Bound())
        out.append(
            ConfigField(
                name=f.name,
                type=kind,
                optional=optional,
                default=f.default,
                choices=choices,
                help=str(f.metadata.get("help", "")),
                constraint=bound.describe(),
                owner=owners.get(f.name, cls.__name__),
            )
        )
    _FIELDS[cls] = tuple(out)
    return _FIELDS[cls]


def config_fields(config: type[BaseConfig] | BaseConfig) -> tuple[ConfigField, ...]:
    """List the fields of a settings class with type, default, choices and help.

    Args:
        config: A settings class (e.g. :class:`~miu_hooks.config.MIUConfig`) or an instance.

    Returns:
        One :class:`ConfigField` per field, in declaration order (inherited fields first).

    Example:
        >>> from miu_hooks.config import TrainConfig
        >>> f = {f.name: f for f in config_fields(TrainConfig)}["optimizer"]
        >>> f.type.__name__, f.default, f.choices
        ('str', 'sgd', ('sgd', 'adamw'))
    """
    cls = config if isinstance(config, type) else type(config)
    return _fields(cls)


def _fix(field: ConfigField, bound: Bound, hint: str) -> str:
    if field.choices is not None:
        fix = f"choose one of {', '.join(map(str, field.choices))}"
    elif field.type is bool:
        fix = "use True or False"
    elif field.type is int:
        fix = f"use an integer {bound.describe()}".rstrip()
    elif field.type is float:
        text = bound.describe()
        fix = f"use a number {text}" if text.startswith("in") else f"use a finite number {text}"
        fix = fix.rstrip()
    else:
        fix = "use a non-empty string"
    if field.optional:
        fix += ", or None"
    return f"{fix}; {hint}" if hint else fix


def _valid(field: ConfigField, bound: Bound, value: Any) -> bool:
    if value is None:
        return field.optional
    if field.choices is not None:
        return any(value == c and type(value) is type(c) for c in field.choices)
    if field.type is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if field.type is int:
        return isinstance(value, int) and bound.holds(value)
    if field.type is float:
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        return ok and bound.holds(value)
    return isinstance(value, str) and bool(value)


@dataclass(frozen=True, kw_only=True)
class BaseConfig:
    """Base of every settings class: checks names and values, converts to and from JSON.

    Subclasses are ``@dataclass(frozen=True, kw_only=True)`` with fields declared by
    :func:`setting`. Unknown or misspelled names (in the constructor,
    :meth:`from_dict` and :meth:`replace`) and invalid values raise
    :class:`~miu_hooks.errors.ConfigError` naming the field, the value and the fix.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = [
            (name, value.metadata["help"])
            for name, value in vars(cls).items()
            if isinstance(value, dataclasses.Field) and "help" in value.metadata
        ]
        if own and cls.__doc__:
            lines = "\n".join(f"    {name}: {text}" for name, text in own)
            cls.__doc__ = f"{cls.__doc__.rstrip()}\n\nSettings (own fields):\n{lines}\n"

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Refuse positional values and unknown names before the dataclass ``__init__``."""
        if args:
            raise ConfigError(
                f"{cls.__name__} takes keyword arguments only; got {len(args)} positional "
                f"value(s): write {cls.__name__}(name=value, ...)"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        for name, value in kwargs.items():
            if name not in known:
                raise ConfigError(_unknown(cls, name, value))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        cls = type(self)
        metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}
        for field in config_fields(cls):
            value = getattr(self, field.name)
            bound: Bound = metadata[field.name].get("bound", Bound())
            if not _valid(field, bound, value):
                hint = str(metadata[field.name].get("hint", ""))
                raise ConfigError(
                    f"{cls.__name__}.{field.name}={value!r} is invalid: {_fix(field, bound, hint)}"
                )

    def replace(self: C, **changes: Any) -> C:
        """Return a copy with ``changes`` applied (names and values checked).

        Example:
            >>> from miu_hooks.config import TrainConfig
            >>> TrainConfig(lr=0.1).replace(epochs=2).epochs
            2
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Return the fields as compact, key-sorted JSON (for checkpoint metadata)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build a config from a mapping (e.g. parsed JSON), rejecting unknown keys by name.

        Raises:
            ConfigError: ``data`` is not a mapping, or a key or value is invalid.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{cls.__name__}.from_dict needs a mapping of settings; got {type(data).__name__}"
            )
        return cls(**dict(data))


_METHODS: dict[type, list[str]] = {}


def note_method(config: type[BaseConfig], method: str) -> None:
    """Record that ``method`` takes ``config`` (for messages naming the method of a setting)."""
    _METHODS.setdefault(config, []).append(method)


def _all_config_classes(root: type[BaseConfig] = BaseConfig) -> list[type[BaseConfig]]:
    out = []
    for sub in root.__subclasses__():
        out.append(sub)
        out.extend(_all_config_classes(sub))
    return out


def _unknown(cls: type[BaseConfig], name: str, value: Any) -> str:
    message = f"unknown setting {cls.__name__}.{name}={value!r}"
    if name == "extra":
        return (
            f"{message}: per-method settings are fields of the method's config "
            "(e.g. SalUnConfig(salun_ratio=0.3), SCRUBConfig(scrub_temperature=2.0))"
        )
    # The registry fills as the methods are imported; a message names them all.
    importlib.import_module("miu_hooks.methods")
    owners = sorted(
        {
            other.__name__
            + (f" (method {', '.join(_METHODS[other])})" if other in _METHODS else "")
            for other in _all_config_classes()
            if not issubclass(cls, other) and name in {f.name for f in dataclasses.fields(other)}
        }
    )
    if owners:
        return f"{message}: it is a setting of {' and '.join(owners)}, not of {cls.__name__}"
    known = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"{message}: did you mean {close[0]}?"
    return f"{message}: {cls.__name__} has {', '.join(known)}"
