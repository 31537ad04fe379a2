"""Command-line options built from the settings classes' field metadata.

Every field of every settings class of :mod:`miu_hooks.config` becomes one
option of ``miu-unlearn``, so the option, its type, its default and its help
are read from the field (:func:`~miu_hooks.config_base.config_fields`) and
cannot drift from the library:

* the name: ``mi_weight`` is ``--mi-weight`` (plus the aliases of
  :data:`ALIASES`, e.g. ``--lambda``);
* the type: ``int``, ``float`` and ``str`` take one value, a ``Literal`` one of
  its choices, a field that may be ``None`` also ``none``; a ``bool`` field is a
  flag pair ``--x/--no-x``;
* the help: the field's one-line help, with its default (and where another
  class has another default, that one too);
* the section of ``--help``: the classes that have the field (the loop's
  fields are every method's settings).

An option that is not given leaves the field unset (the class's default
applies, and :func:`given_settings` does not list it), so "not given" stays
distinct from "given the default value" (a ``--config`` file's value is kept
unless the option is given). The options fill the ``--method``'s class, and an
option of a field that class lacks is refused with a ``ConfigError``, exit 2
(:func:`miu_hooks.cli.commands.build_config`).

Fields not listed here are set by hand-written options (:data:`HAND_WRITTEN`).
Imports click and the standard library only (``--help`` does not import torch).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

import click
from click.core import ParameterSource

from miu_hooks import config as _config
from miu_hooks.config import TrainConfig
from miu_hooks.config_base import ConfigField, config_fields

__all__ = [
    "ALIASES",
    "HAND_WRITTEN",
    "SETTINGS_CLASSES",
    "OptionValueError",
    "SectionOption",
    "SettingOption",
    "given_settings",
    "option_name",
    "option_names",
    "setting_options",
    "settings_options_decorator",
    "settings_sections",
]

#: The settings classes whose fields are options, most general first (definition order).
SETTINGS_CLASSES: tuple[type[TrainConfig], ...] = tuple(
    value
    for value in vars(_config).values()
    if isinstance(value, type)
    and issubclass(value, TrainConfig)
    and value.__module__ == _config.__name__
)

#: Fields set by a hand-written option instead, and why.
HAND_WRITTEN: dict[str, str] = {
    "num_workers": "--num-workers: its default depends on the data (image files: decoded in "
    "worker processes)",
    "input_key": "--input-key names a column of the data file; the items the command builds "
    "use the default keys",
    "label_key": "--label-key names a column of the data file",
    "group_key": "--group-key names a column of the data file",
    "id_key": "--id-key names a column of the data file",
}

#: Further option names of a field (kept from earlier releases).
ALIASES: dict[str, tuple[str, ...]] = {"mi_weight": ("--lambda",)}

SETTINGS_NOTE = (
    "--method picks the settings class (`miu-unlearn methods` lists each method's); the "
    "settings sections below are the classes' fields. An option of a class the method does "
    "not take is refused (exit 2), an option not given keeps the class's default, and a "
    "field that may be None also takes 'none'."
)


def option_name(field: str) -> str:
    """The long option of a field: ``mi_weight`` -> ``--mi-weight``.

    Example:
        >>> option_name("scrub_retain_batch_size")
        '--scrub-retain-batch-size'
    """
    return "--" + field.replace("_", "-")


class OptionValueError(click.UsageError):
    """A value the option's type refuses: one stderr line, exit code 2 (bad usage)."""

    def show(self, file: IO[Any] | None = None) -> None:
        """Print ``miu-unlearn: error: <message>`` as one line (no usage block)."""
        message = " ".join(self.format_message().split())
        click.echo(f"miu-unlearn: error: {message}", file=file, err=file is None)


class SectionOption(click.Option):
    """A click option that names the ``--help`` section it is listed in (``section``)."""

    def __init__(self, *args: Any, section: str = "Other options", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.section = section


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


class SettingType(click.ParamType):
    """The value of one settings field: its scalar type or choices, and ``none`` if optional.

    Refusals raise :class:`OptionValueError` (one line); ranges are checked by the
    settings class itself when the config is built.
    """

    def __init__(self, field: ConfigField, option: str) -> None:
        self.field = field
        self.option = option
        self.name = field.type.__name__

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        """``[a|b]`` for choices, else ``INTEGER``/``NUMBER``/``TEXT``; ``|none`` if optional."""
        field = self.field
        if field.choices is not None:
            names = [str(c) for c in field.choices] + (["none"] if field.optional else [])
            return "[" + "|".join(names) + "]"
        kind = {int: "INTEGER", float: "NUMBER"}.get(field.type, "TEXT")
        return f"{kind}|none" if field.optional else kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Return the field's value for the text given (``none``: ``None``)."""
        if not isinstance(value, str):
            return value
        field, text = self.field, value.strip()
        if field.optional and text.lower() == "none":
            return None
        if field.choices is not None:
            for choice in field.choices:
                if str(choice) == text:
                    return choice
            self._refuse(value, f"choose one of {', '.join(map(str, field.choices))}")
        if field.type is int:
            if re.fullmatch(r"[+-]?\d+", text):
                return int(text)
            self._refuse(value, "use an integer")
        if field.type is float:
            try:
                return float(text)
            except ValueError:
                self._refuse(value, "use a number")
        return value

    def _refuse(self, value: str, fix: str) -> None:
        if self.field.optional:
            fix += ", or none"
        raise OptionValueError(f"{self.option} {value!r} is invalid: {fix}")


class SettingOption(SectionOption):
    """The option of one settings field (``field``), its default shown from the classes."""

    def __init__(self, field: ConfigField, default_text: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.field = field
        self.default_text = default_text

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        """The help of the field followed by ``[default: ...]`` (from every class)."""
        record = super().get_help_record(ctx)
        if record is None:
            return None
        return record[0], f"{record[1]}  [default: {self.default_text}]"


def _holders(name: str) -> list[type[TrainConfig]]:
    """The classes that have field ``name``, most general first."""
    return [c for c in SETTINGS_CLASSES if any(f.name == name for f in config_fields(c))]


def _section(holders: list[type[TrainConfig]]) -> str:
    """The ``--help`` section of a field held by ``holders``."""
    if TrainConfig in holders:
        return "Settings of every method (TrainConfig)"
    top = [c for c in holders if not any(o is not c and issubclass(c, o) for o in holders)]
    words = " and ".join(c.__name__.removesuffix("Config") for c in top)
    return f"{words} settings ({', '.join(c.__name__ for c in top)})"


def _default_text(name: str, holders: list[type[TrainConfig]]) -> str:
    """The default of the first holder, then ``; Class: value`` for each class that differs."""
    defaults = [(c, next(f.default for f in config_fields(c) if f.name == name)) for c in holders]
    first = defaults[0][1]
    others = [f"{c.__name__}: {_shown(v)}" for c, v in defaults[1:] if v != first]
    return "; ".join([_shown(first), *others])


def _make_option(name: str) -> SettingOption:
    holders = _holders(name)
    field = next(f for f in config_fields(holders[0]) if f.name == name)
    long = option_name(name)
    decls = [*ALIASES.get(name, ()), long]
    kwargs: dict[str, Any] = {"help": field.help, "default": None, "show_default": False}
    if field.type is bool:
        decls = [*ALIASES.get(name, ()), f"{long}/--no-{long[2:]}"]
    else:
        kwargs["type"] = SettingType(field, "/".join(decls))
    return SettingOption(
        field,
        _default_text(name, holders),
        param_decls=[*decls, name],
        section=_section(holders),
        **kwargs,
    )


def setting_options() -> list[SettingOption]:
    """One option per field of the settings classes (except :data:`HAND_WRITTEN`), in order."""
    names: dict[str, None] = {}
    for cls in SETTINGS_CLASSES:
        names.update((f.name, None) for f in config_fields(cls) if f.name not in HAND_WRITTEN)
    return [_make_option(name) for name in names]


def settings_options_decorator() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding :func:`setting_options` to a click command, in order."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        params = getattr(func, "__click_params__", [])
        # click reverses __click_params__ when building the command: append in reverse.
        params.extend(reversed(setting_options()))
        func.__click_params__ = params  # type: ignore[attr-defined]
        return func

    return decorate


def settings_sections(options: Iterable[click.Parameter]) -> dict[str, list[str]]:
    """The settings sections of ``--help`` and the long options listed in each.

    Example:
        >>> sections = settings_sections(setting_options())
        >>> sections["SalUn settings (SalUnConfig)"]
        ['--salun-ratio']
    """
    out: dict[str, list[str]] = {}
    for param in options:
        if isinstance(param, SettingOption):
            out.setdefault(param.section, []).append(option_name(param.field.name))
    return out


def given_settings(ctx: click.Context) -> dict[str, Any]:
    """The settings given on the command line (not those left at their defaults).

    Returns:
        ``{field name: value}`` for each :class:`SettingOption` whose value did not
        come from its default (``None`` when ``none`` was given).
    """
    out = {}
    for param in ctx.command.params:
        if isinstance(param, SettingOption) and param.name is not None:
            source = ctx.get_parameter_source(param.name)
            if source not in (None, ParameterSource.DEFAULT):
                out[param.name] = ctx.params[param.name]
    return out


def option_names(ctx: click.Context) -> Mapping[str, str]:
    """``{field name: its options joined by '/'}`` of the settings options (for messages)."""
    return {
        p.name: "/".join([*p.opts, *p.secondary_opts])
        for p in ctx.command.params
        if isinstance(p, SettingOption) and p.name is not None
    }
