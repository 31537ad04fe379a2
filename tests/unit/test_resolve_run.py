"""Method names, config classes and the config that actually runs (resolve_run)."""

import json

import pytest
from safetensors import safe_open
from toy_problem import toy_net, toy_split

from miu_hooks import (
    ConfigError,
    L1SparseConfig,
    MIUConfig,
    SalUnConfig,
    SCRUBConfig,
    TrainConfig,
    resolve_run,
    unlearn,
)
from miu_hooks.methods import available_methods
from miu_hooks.methods.finetune import FineTune
from miu_hooks.methods.miu import MIU
from miu_hooks.methods.salun import SalUn
from miu_hooks.unlearn import STATE_FILE

pytestmark = pytest.mark.unit

LOOP = TrainConfig(epochs=1, batch_size=32, lr=0.05, device="cpu")


@pytest.mark.parametrize(
    ("method", "reweight", "runs_with"),
    [
        ("finetune", None, False),
        ("finetune", False, False),
        ("finetune_reweight", None, True),
        ("finetune_reweight", True, True),
        ("retrain", None, False),
        ("retrain_reweight", None, True),
        ("salun_reweight", None, True),
        ("neggrad", None, False),
        ("neggrad", False, False),
    ],
)
def test_the_name_says_what_runs(method, reweight, runs_with):
    run = resolve_run(method, LOOP.replace(reweight=reweight))
    assert run.config.reweight is runs_with and run.name == method


@pytest.mark.parametrize(
    ("method", "reweight", "message"),
    [
        ("finetune", True, "'finetune' runs without REWEIGHT .* use method='finetune_reweight'"),
        ("retrain_reweight", False, "'retrain_reweight' runs with REWEIGHT .* method='retrain'"),
        ("scrub_reweight", False, "runs with REWEIGHT but the config sets reweight=False"),
        ("neggrad", True, "no retain pass"),
    ],
)
def test_a_name_and_flag_contradiction_is_refused(method, reweight, message):
    with pytest.raises(ConfigError, match=message):
        resolve_run(method, LOOP.replace(reweight=reweight))


def test_miu_samples_with_reweight_by_default_and_allows_the_ablation():
    assert resolve_run("miu").config.reweight is True
    assert resolve_run("miu", MIUConfig(reweight=False)).config.reweight is False
    assert resolve_run("miu", LOOP).config.reweight is True  # TrainConfig's None: MIU's default
    with pytest.raises(ConfigError, match=r"'miu_reweight' .*by default: use 'miu'"):
        resolve_run("miu_reweight")
    assert "miu_reweight" not in available_methods()


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; choose one of .*finetune"):
        resolve_run("nope")


def test_the_method_follows_the_config_class():
    assert resolve_run().name == "miu" and resolve_run().method_class is MIU
    assert resolve_run(config=MIUConfig(epochs=2)).name == "miu"
    assert resolve_run(config=SalUnConfig()).method_class is SalUn
    assert resolve_run(config=SalUnConfig(reweight=True)).name == "salun_reweight"
    assert resolve_run(config=SCRUBConfig()).name == "scrub"
    assert resolve_run(config=L1SparseConfig(reweight=False)).name == "l1_sparse"
    with pytest.raises(ConfigError, match="TrainConfig: its class is shared by finetune"):
        resolve_run(config=TrainConfig())


def test_a_config_of_another_class_is_converted():
    # Changed loop settings carry over; the target's defaults fill the rest.
    run = resolve_run("salun", MIUConfig(epochs=3, lr=0.1, seed=4))
    assert type(run.config) is SalUnConfig
    assert (run.config.epochs, run.config.lr, run.config.seed) == (3, 0.1, 4)
    assert run.config.salun_ratio == 0.5 and run.config.reweight is False
    # MIU's default reweight=True is a default, so plain finetune runs without REWEIGHT.
    assert resolve_run("finetune", MIUConfig(epochs=3)).config == LOOP.replace(
        epochs=3, batch_size=64, lr=0.01, device="auto", reweight=False
    )
    # A setting shared by both classes carries over (SCRUB has forget_epochs too).
    assert resolve_run("scrub", MIUConfig(forget_epochs=2)).config.forget_epochs == 2
    # A changed setting the method does not have is refused, all of them named.
    with pytest.raises(
        ConfigError,
        match=r"'finetune' takes TrainConfig, which has no mi_weight=10.0, mine_hidden=8 .*"
        r"drop them, or use method='miu'",
    ):
        resolve_run("finetune", MIUConfig(mi_weight=10.0, mine_hidden=8))
    with pytest.raises(ConfigError, match=r"no salun_ratio=0.3 .* use method='salun'"):
        resolve_run("scrub", SalUnConfig(salun_ratio=0.3))
    # The own class (or a subclass of it) is used as is.
    cfg = SalUnConfig(salun_ratio=0.3, reweight=False)
    assert resolve_run("salun", cfg).config is cfg
    assert resolve_run("salun", SalUnConfig(salun_ratio=0.3)).config == cfg  # None resolved


def test_the_resolved_config_is_what_is_recorded(tmp_path):
    _, retain, forget = toy_split()
    unlearn(toy_net(), retain, forget, config=LOOP, method="finetune_reweight", state_dir=tmp_path)
    with safe_open(str(tmp_path / STATE_FILE), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "finetune_reweight"
    assert json.loads(meta["config"])["reweight"] is True
    assert resolve_run("finetune_reweight", LOOP).method_class is FineTune


def test_unlearn_infers_the_method_from_the_config(monkeypatch):
    _, retain, forget = toy_split()
    seen = []
    setup = SalUn.setup

    def spy(self, ctx):
        seen.append(ctx.config)
        setup(self, ctx)

    monkeypatch.setattr(SalUn, "setup", spy)
    unlearn(toy_net(), retain, forget, config=SalUnConfig(epochs=1, device="cpu", salun_ratio=0.2))
    assert type(seen[0]) is SalUnConfig and seen[0].salun_ratio == 0.2
    assert seen[0].reweight is False
