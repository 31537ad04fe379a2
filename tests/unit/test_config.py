import dataclasses
import json
import pickle
from dataclasses import dataclass
from typing import Any

import pytest

from miu_hooks import (
    ConfigError,
    L1SparseConfig,
    MIUConfig,
    NegGradConfig,
    RetrainConfig,
    SalUnConfig,
    SCRUBConfig,
    TrainConfig,
    config_fields,
)
from miu_hooks.config_base import BaseConfig, setting
from miu_hooks.errors import ConfigTypeError, MIUError

pytestmark = pytest.mark.unit

ALL = (
    TrainConfig, MIUConfig, L1SparseConfig, SalUnConfig, SCRUBConfig, NegGradConfig,
    RetrainConfig,
)  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "fix"),
    [
        ("epochs", 0, "integer >= 1"),
        ("lr", -1.0, "finite number > 0"),
        ("lr", float("nan"), "finite number > 0"),
        ("momentum", 1.0, r"\[0, 1\)"),
        ("ema", 0.0, r"\(0, 1\]"),
        ("precision", "fp8", "fp32, bf16, fp16"),
        ("scheduler", "step", "cosine, constant"),
        ("max_grad_norm", 0.0, "or None"),
        ("reweight", "yes", "True or False"),
        ("reweight", None, "True or False"),  # MIU's is a plain bool (default on)
        ("batch_size", True, "integer >= 1"),
        ("seed", 1.5, "integer >= 0"),
        ("device", "", "non-empty string"),
        ("input_key", 3, "non-empty string, or None"),
    ],
)
def test_validation_names_field_value_and_fix(field, value, fix):
    with pytest.raises(ConfigError, match=rf"MIUConfig\.{field}=.* is invalid: .*{fix}"):
        MIUConfig(**{field: value})


def test_config_errors_keep_their_builtin_base():
    with pytest.raises(ValueError):
        MIUConfig(lr=-1.0)
    assert issubclass(ConfigError, MIUError) and issubclass(ConfigError, ValueError)
    assert issubclass(ConfigTypeError, ConfigError) and issubclass(ConfigTypeError, TypeError)


def test_defaults_match_issue_contract():
    cfg = MIUConfig()
    assert (cfg.epochs, cfg.forget_epochs, cfg.momentum, cfg.scheduler) == (10, 5, 0.9, "cosine")
    assert (cfg.mine_hidden, cfg.mine_warmup_iters, cfg.mine_iters, cfg.ema) == (512, 100, 10, 0.01)
    assert cfg.reweight and cfg.calibrate and cfg.max_grad_norm == 1.0  # safe defaults
    assert (cfg.forget_objective, cfg.guard, cfg.guard_threshold) == ("floor", True, 10.0)
    assert (cfg.precision, cfg.device, cfg.seed) == ("auto", "auto", 0)
    assert TrainConfig().reweight is None  # follows the method name


def test_loop_and_miu_settings_are_apart():
    loop = {f.name for f in config_fields(TrainConfig)}
    miu = {f.name for f in config_fields(MIUConfig)} - loop
    assert {"epochs", "lr", "batch_size", "seed", "reweight", "group_key", "num_sensitive",
            "guard", "guard_threshold", "guard_samples"} <= loop  # fmt: skip
    assert miu == {
        "forget_epochs", "forget_objective", "smile_tau", "mi_weight", "mine_lr",
        "mine_max_grad_norm", "mine_hidden",
        "mine_warmup_iters", "mine_iters", "ema", "calibrate", "clip", "feature_cache",
        "original_precision", "original_mode", "tune_original_on", "restore_batchnorm",
        "critic_init", "critic_width", "mine_warmup_tol", "tune_features", "tune_original",
    }  # fmt: skip
    assert MIUConfig(epochs=3, mi_weight=10.0).epochs == 3  # flat, as before


@pytest.mark.parametrize("cls", ALL)
def test_frozen_hashable_and_roundtrip(cls):
    cfg = cls(epochs=3, lr=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 4  # type: ignore[misc]
    assert cls.from_dict(cfg.to_dict()) == cfg
    assert cls.from_dict(json.loads(cfg.to_json())) == cfg
    assert cfg.replace(lr=0.25).lr == 0.25 and cfg.lr == 0.5
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert hash(cfg) == hash(cls(epochs=3, lr=0.5))
    # Only immutable scalars: nothing in a config can be changed in place.
    assert all(v is None or type(v) in (bool, int, float, str) for v in cfg.to_dict().values())


@pytest.mark.parametrize("cls", ALL)
def test_misspelled_settings_are_refused_everywhere(cls):
    with pytest.raises(ConfigError, match=rf"unknown setting {cls.__name__}\.epoch=3: .*epochs"):
        cls(epoch=3)
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.bogus=1"):
        cls.from_dict({"epochs": 2, "bogus": 1})
    with pytest.raises(ConfigError, match=r"\.lrr=0\.1: did you mean lr\?"):
        cls().replace(lrr=0.1)
    with pytest.raises(ConfigError, match="keyword arguments only"):
        cls(3)
    with pytest.raises(ConfigError, match="needs a mapping"):
        cls.from_dict([("epochs", 2)])  # type: ignore[arg-type]


def test_a_setting_of_another_method_names_its_config():
    with pytest.raises(ConfigError, match=r"salun_ratio=0.3: it is a setting of SalUnConfig"):
        MIUConfig(salun_ratio=0.3)
    with pytest.raises(
        ConfigError, match=r"mi_weight=2.0: it is a setting of MIUConfig \(method miu\), not of"
    ):
        TrainConfig(mi_weight=2.0)
    with pytest.raises(ConfigError, match=r"extra=\{\}: per-method settings are fields"):
        MIUConfig.from_dict({"extra": {}})


@pytest.mark.parametrize(
    ("cls", "field", "bad"),
    [
        (L1SparseConfig, "l1_alpha", -1.0),
        (SalUnConfig, "salun_ratio", 0.0),
        (SCRUBConfig, "scrub_temperature", 0.0),
        (SCRUBConfig, "scrub_kl_weight", float("inf")),
        (SCRUBConfig, "scrub_retain_batch_size", 0),
        (SCRUBConfig, "forget_epochs", -1),
    ],
)
def test_per_method_settings_are_checked(cls, field, bad):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field}=.* is invalid"):
        cls(**{field: bad})


def test_config_fields_lists_type_default_choices_and_help():
    fields = {f.name: f for f in config_fields(MIUConfig)}
    assert len(fields) == 43
    f = fields["max_grad_norm"]
    assert (f.type, f.optional, f.default, f.choices) == (float, True, 1.0, None)
    assert f.constraint == "> 0" and f.owner == "TrainConfig" and "clip" in f.help.lower()
    f = fields["critic_init"]
    assert (f.type, f.choices, f.default, f.owner) == (str, ("shared", "independent"), "shared",
                                                      "MIUConfig")  # fmt: skip
    assert fields["reweight"].type is bool and not fields["reweight"].optional
    assert all(f.help and f.help.endswith(".") for f in fields.values())
    # One source of truth: the class docstring lists each own field's help.
    assert fields["mi_weight"].help in (MIUConfig.__doc__ or "")
    assert config_fields(MIUConfig()) == config_fields(MIUConfig)


def test_a_mutable_field_cannot_be_declared():
    with pytest.raises(ConfigTypeError, match="immutable"):
        setting([], "A list.")

    @dataclass(frozen=True, kw_only=True)
    class Bad(BaseConfig):
        items: Any = setting(None, "Anything.")

    with pytest.raises(ConfigTypeError, match="so configs stay immutable"):
        Bad()
