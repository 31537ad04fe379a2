import pytest

from miu_hooks import MIUConfig

pytestmark = pytest.mark.unit


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
        ("batch_size", True, "integer >= 1"),
    ],
)
def test_validation_names_field_value_and_fix(field, value, fix):
    with pytest.raises(ValueError, match=rf"MIUConfig\.{field}=.* is invalid: .*{fix}"):
        MIUConfig(**{field: value})


def test_defaults_match_issue_contract():
    cfg = MIUConfig()
    assert (cfg.epochs, cfg.forget_epochs, cfg.momentum, cfg.scheduler) == (10, 5, 0.9, "cosine")
    assert (cfg.mine_hidden, cfg.mine_warmup_iters, cfg.mine_iters, cfg.ema) == (512, 100, 10, 0.01)
    assert cfg.reweight and cfg.calibrate and cfg.max_grad_norm is None
    assert (cfg.precision, cfg.device, cfg.seed) == ("fp32", "auto", 0)


def test_frozen_and_roundtrip():
    cfg = MIUConfig(epochs=3, mi_weight=10.0, extra={"temperature": 4.0})
    with pytest.raises(AttributeError):
        cfg.epochs = 4  # type: ignore[misc]
    assert MIUConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(lr=0.5).lr == 0.5
    assert '"mi_weight":10.0' in cfg.to_json()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown MIUConfig keys: bogus"):
        MIUConfig.from_dict({"epochs": 2, "bogus": 1})
