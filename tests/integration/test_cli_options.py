"""``miu-unlearn``'s settings options are built from the config fields' metadata.

Every field of every method's settings class has an option (a new field cannot be
forgotten), its help is the field's help, a value given arrives in the config as
given, a value not given leaves the class's default (or ``--config``'s value), a bad
value is one stderr line with exit 2, and an option of a class the method does not
take is refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from miu_hooks.cli import cli
from miu_hooks.cli.commands import build_config
from miu_hooks.cli.errors import EXIT_USAGE
from miu_hooks.cli.options import (
    ALIASES,
    HAND_WRITTEN,
    SETTINGS_CLASSES,
    SettingOption,
    option_name,
    settings_sections,
)
from miu_hooks.config import MIUConfig, NegGradConfig, SCRUBConfig, TrainConfig
from miu_hooks.config_base import Bound, ConfigField, config_fields
from miu_hooks.methods import METHODS, available_methods, config_class, resolve_run

pytestmark = pytest.mark.integration

REGISTERED = list(dict.fromkeys(c.config_class for c in METHODS.values()))
SETTING_OPTIONS = {p.name: p for p in cli.params if isinstance(p, SettingOption)}
ALL_FIELDS = {(cls, f.name): f for cls in REGISTERED for f in config_fields(cls)}


def _longs(param: click.Parameter) -> list[str]:
    return [o for o in [*param.opts, *param.secondary_opts] if o.startswith("--")]


def _method_of(cls: type[TrainConfig]) -> str:
    """A method name whose settings class is ``cls`` (without REWEIGHT where it has a choice)."""
    return next(n for n in available_methods() if config_class(n) is cls)


def _bound(cls: type[TrainConfig], name: str) -> Bound:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    bound: Bound = field.metadata["bound"]
    return bound


def _parse(args: list[str]) -> click.Context:
    return cli.make_context("miu-unlearn", ["-m", "m", "-d", "d", "-f", "f", *args])


def _config_of(args: list[str], method: str, path: str | None = None) -> Any:
    return build_config(_parse(["--method", method, *args]), path, method)


# --------------------------------------------------------------------------- coverage and help


def test_every_registered_settings_class_is_covered() -> None:
    assert set(REGISTERED) <= set(SETTINGS_CLASSES)
    assert {"MIUConfig", "SalUnConfig", "SCRUBConfig", "L1SparseConfig", "RetrainConfig"} <= {
        c.__name__ for c in REGISTERED
    }


@pytest.mark.parametrize(("cls", "name"), list(ALL_FIELDS), ids=lambda v: getattr(v, "__name__", v))
def test_every_config_field_has_an_option(cls: type[TrainConfig], name: str) -> None:
    params = {p.name: p for p in cli.params}
    if name in HAND_WRITTEN:  # set by a hand-written option of the same name, or by the data
        assert name in params and not isinstance(params[name], SettingOption)
        assert option_name(name) in _longs(params[name])
        return
    option = SETTING_OPTIONS[name]
    assert option_name(name) in option.opts
    assert option.field.name == name


def test_no_option_string_is_declared_twice() -> None:
    strings = [o for p in cli.params for o in [*p.opts, *p.secondary_opts]]
    assert len(strings) == len(set(strings))
    assert {p.name for p in cli.params if isinstance(p, SettingOption)} == {
        name for _, name in ALL_FIELDS if name not in HAND_WRITTEN
    }


@pytest.mark.parametrize("name", sorted(SETTING_OPTIONS))
def test_option_help_type_and_default_come_from_the_field(name: str) -> None:
    option = SETTING_OPTIONS[name]
    holders = [c for c in SETTINGS_CLASSES if name in {f.name for f in config_fields(c)}]
    field: ConfigField = next(f for f in config_fields(holders[0]) if f.name == name)
    # The help is the field's help, of the most general class that has the field.
    assert option.help == field.help
    if TrainConfig in holders:
        assert holders[0] is TrainConfig
    # The option is unset unless given; --help shows the class's default.
    assert option.default is None
    spec, text = option.get_help_record(click.Context(cli))  # type: ignore[misc]
    shown = str(field.default) if field.default is not None else "none"
    if isinstance(field.default, bool):
        shown = "on" if field.default else "off"
    assert text == f"{field.help}  [default: {option.default_text}]"
    assert option.default_text.split(";")[0] == shown
    if field.type is bool:
        assert _longs(option) == [option_name(name), "--no-" + option_name(name)[2:]]
    elif field.choices is not None:
        assert spec.endswith("[" + "|".join(map(str, field.choices)) + "]")
    else:
        assert spec.endswith({int: "INTEGER", float: "NUMBER", str: "TEXT"}[field.type]
                             + ("|none" if field.optional else ""))  # fmt: skip


def test_defaults_that_differ_between_classes_are_all_shown() -> None:
    assert SETTING_OPTIONS["lr"].default_text == f"0.01; NegGradConfig: {NegGradConfig().lr}"
    assert SETTING_OPTIONS["reweight"].default_text == "none; MIUConfig: on"
    assert (
        SETTING_OPTIONS["mi_weight"].opts
        == ["--lambda", "--mi-weight"]
        == [
            *ALIASES["mi_weight"],
            "--mi-weight",
        ]
    )


def test_help_groups_the_settings_by_class() -> None:
    res = CliRunner().invoke(cli, ["--help"], terminal_width=200)
    assert res.exit_code == 0
    titles = re.findall(r"^(\S[^\n]*):$", res.stdout, flags=re.MULTILINE)
    sections = settings_sections(cli.params)
    assert list(sections) == [
        "Settings of every method (TrainConfig)",
        "MIU and SCRUB settings (MIUConfig, SCRUBConfig)",
        "MIU settings (MIUConfig)",
        "Retrain settings (RetrainConfig)",
        "L1Sparse settings (L1SparseConfig)",
        "SalUn settings (SalUnConfig)",
        "SCRUB settings (SCRUBConfig)",
    ]
    assert titles[:3] == ["Inputs and output", "Method", *list(sections)[:1]]
    assert [t for t in titles if t in sections] == list(sections)
    for title, options in sections.items():
        body = res.stdout.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0]
        assert re.findall(r"^  (?:--lambda, )?(--[\w-]+)", body, flags=re.MULTILINE) == options
    assert sections["SalUn settings (SalUnConfig)"] == ["--salun-ratio"]


# --------------------------------------------------------------------------- round trip


def _value(cls: type[TrainConfig], field: ConfigField) -> Any:
    """A valid value other than the default."""
    if field.choices is not None:
        return next(c for c in field.choices if c != field.default)
    if field.type is int:
        return (field.default or 0) + 1
    if field.type is float:
        return next(v for v in (0.37, 2.5) if _bound(cls, field.name).holds(v))
    if field.type is str:
        return "cpu"
    raise AssertionError(field)


def _cases() -> list[tuple[str, str, list[str], Any]]:
    cases = []
    for cls in REGISTERED:
        method = _method_of(cls)
        for field in config_fields(cls):
            if field.name in HAND_WRITTEN or field.name == "reweight":
                continue
            opt = option_name(field.name)
            if field.type is bool:
                flag = opt if not field.default else "--no-" + opt[2:]
                cases.append((method, field.name, [flag], not field.default))
                continue
            value = _value(cls, field)
            cases.append((method, field.name, [opt, str(value)], value))
            if field.optional:
                cases.append((method, field.name, [opt, "none"], None))
    cases += [
        ("finetune_reweight", "reweight", ["--reweight"], True),
        ("miu", "reweight", ["--no-reweight"], False),
        ("miu", "mi_weight", ["--lambda", "3"], 3.0),
        ("miu", "max_grad_norm", ["--max-grad-norm", "0"], None),  # 0: no clipping, as before
        ("miu", "num_workers", ["--num-workers", "3"], 3),
    ]
    return cases


@pytest.mark.parametrize(("method", "name", "args", "value"), _cases(),
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)  # fmt: skip
def test_a_value_given_arrives_unchanged(
    method: str, name: str, args: list[str], value: Any
) -> None:
    config = _config_of(args, method)
    got = getattr(config, name)
    assert got == value and type(got) is type(value)
    # Every setting not given keeps the method's default.
    defaults = resolve_run(method, config_class(method)()).config.to_dict()
    assert config.to_dict() == defaults | {name: value}


def test_an_option_not_given_leaves_the_config_file_value(tmp_path: Path) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"lr": 0.5, "mi_weight": 2.0, "guard": False}))
    config = _config_of(["--epochs", "3"], "miu", str(path))
    assert (config.lr, config.mi_weight, config.guard, config.epochs) == (0.5, 2.0, False, 3)
    # A value given on the command line wins, even when it equals the class's default.
    config = _config_of(["--lr", "0.01", "--guard"], "miu", str(path))
    assert (config.lr, config.guard, config.mi_weight) == (0.01, True, 2.0)
    assert MIUConfig().lr == 0.01


def test_scrub_and_miu_share_forget_epochs() -> None:
    assert _config_of(["--forget-epochs", "2"], "scrub").forget_epochs == 2
    assert isinstance(_config_of(["--forget-epochs", "2"], "scrub"), SCRUBConfig)
    assert _config_of(["--forget-epochs", "2"], "miu").forget_epochs == 2


# --------------------------------------------------------------------------- refusals


def _fails(args: list[str]) -> str:
    res = CliRunner().invoke(
        cli, ["-m", "m.safetensors", "-d", "d", "-f", "f", *args], catch_exceptions=False
    )
    assert res.exit_code == EXIT_USAGE == 2, (res.exit_code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("miu-unlearn: error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout and res.stdout == ""
    return lines[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--epochs", "abc"], ("--epochs 'abc'", "use an integer")),
        (["--epochs", "1.5"], ("--epochs '1.5'", "use an integer")),
        (["--lr", "fast"], ("--lr 'fast'", "use a number")),
        (["--clip", "bogus"], ("--clip 'bogus'", "norm, adaptive")),
        (["--precision", "fp8"], ("--precision", "auto, fp32, bf16, fp16")),
        (["--scrub-retain-batch-size", "x", "--method", "scrub"], ("use an integer, or none",)),
        (["--max-grad-norm", "off"], ("use a number, or none",)),
        (["--lambda", "much"], ("--lambda/--mi-weight 'much'",)),
        # values of the right type outside the field's range: the config's own check
        (["--lr", "-1"], ("MIUConfig.lr=-1.0", "> 0")),
        (["--lr", "nan"], ("MIUConfig.lr=nan", "finite")),
        (["--epochs", "0"], ("MIUConfig.epochs=0", ">= 1")),
        (["--ema", "2"], ("MIUConfig.ema=2.0", "in (0, 1]")),
        (["--device", ""], ("MIUConfig.device=''", "non-empty")),
        (["--guard-samples", "-3"], ("guard_samples=-3",)),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2(args: list[str], words: tuple[str, ...]) -> None:
    line = _fails(args)
    for word in words:
        assert word in line, (word, line)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--salun-ratio", "0.3"],
         ("--salun-ratio is not a setting of --method miu", "SalUnConfig")),
        (["--method", "finetune", "--lambda", "3"],
         ("--lambda/--mi-weight is not a setting of --method finetune",
          "mi_weight=3.0: it is a setting of MIUConfig")),
        (["--method", "salun", "--no-reinit"], ("--reinit/--no-reinit", "RetrainConfig")),
        (["--method", "retrain", "--forget-epochs", "2"],
         ("MIUConfig (method miu) and SCRUBConfig (method scrub), not of RetrainConfig",)),
        (["--method", "scrub", "--l1-alpha", "0.1"], ("--l1-alpha", "L1SparseConfig")),
        (["--method", "l1_sparse", "--scrub-retain-batch-size", "none"],
         ("--scrub-retain-batch-size", "SCRUBConfig")),
    ],
)  # fmt: skip
def test_a_setting_of_another_method_is_refused(args: list[str], words: tuple[str, ...]) -> None:
    line = _fails(args)
    for word in words:
        assert word in line, (word, line)


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("salun", ["--salun-ratio", "0.3"]),
        ("salun_reweight", ["--salun-ratio", "0.3"]),
        ("retrain_reweight", ["--no-reinit"]),
        ("neggrad", ["--lr", "0.001"]),
        ("scrub", ["--scrub-retain-batch-size", "none", "--forget-epochs", "1"]),
    ],
)
def test_a_setting_of_the_method_is_taken(method: str, args: list[str]) -> None:
    config = _config_of(args, method)
    assert isinstance(config, config_class(method))
