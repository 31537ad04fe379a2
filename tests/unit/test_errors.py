"""Every input or setting error of the core is an MIUError that keeps its builtin base."""

import ast
import builtins
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import miu_hooks
from miu_hooks import errors as E
from miu_hooks.config import MIUConfig, TrainConfig
from miu_hooks.data import dataset_groups, split_batch
from miu_hooks.demo.toy_data import colored_digits
from miu_hooks.engine import attach, resolve_original
from miu_hooks.estimators import MIEstimator
from miu_hooks.functional import group_index
from miu_hooks.methods import register_method, resolve_run
from miu_hooks.methods.base import UnlearningMethod
from miu_hooks.methods.l1_sparse import l1_alpha, l1_norm
from miu_hooks.methods.random_labels import uniform_random_labels
from miu_hooks.methods.salun import SalUn, saliency_mask, top_fraction_mask
from miu_hooks.methods.scrub import distill_kl
from miu_hooks.runtime import resolve_device
from miu_hooks.sampling import GroupReweightSampler
from miu_hooks.splits import forget_split
from miu_hooks.taps import FeatureTap, resolve_head
from miu_hooks.unlearn import check_split

pytestmark = pytest.mark.unit


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _frozen() -> nn.Module:
    return nn.Linear(2, 2).requires_grad_(False)


def _tap_never_fired() -> None:
    with FeatureTap(_net()) as tap:
        tap.pop()


class _Dummy(UnlearningMethod):
    pass


EMPTY = torch.zeros(0, dtype=torch.long)

# (name, call, the MIUError subclass, the builtin base it keeps)
CASES: list[tuple[str, Callable[[], Any], type[E.MIUError], type[Exception]]] = [
    ("config value", lambda: MIUConfig(lr=-1.0), E.ConfigError, ValueError),
    ("config name", lambda: TrainConfig(epoch=3), E.ConfigError, ValueError),
    ("unknown method", lambda: resolve_run("nope"), E.ConfigError, ValueError),
    ("name vs flag", lambda: resolve_run("finetune", TrainConfig(reweight=True)),
     E.ConfigError, ValueError),
    ("foreign setting", lambda: resolve_run("finetune", MIUConfig(mi_weight=3.0)),
     E.ConfigError, ValueError),
    ("config type", lambda: resolve_run("miu", {"epochs": 1}), E.ConfigTypeError, TypeError),
    ("method taken", lambda: register_method("miu")(_Dummy), E.ConfigError, ValueError),
    ("method config", lambda: register_method("x", config=dict), E.ConfigTypeError, TypeError),
    ("empty retain sampler", lambda: GroupReweightSampler(EMPTY, EMPTY), E.DataError, ValueError),
    ("sampler length", lambda: GroupReweightSampler(torch.tensor([0]), torch.tensor([0]),
                                                    num_samples=0), E.ConfigError, ValueError),
    ("estimator size", lambda: MIEstimator(0, 2), E.ConfigError, ValueError),
    ("estimator ema", lambda: MIEstimator(2, 2, ema=2.0), E.ConfigError, ValueError),
    ("feature shape", lambda: MIEstimator(4, 2)(torch.zeros(3, 5), torch.zeros(3).long()),
     E.ModelError, ValueError),
    ("device", lambda: resolve_device("tpu:9"), E.ConfigError, ValueError),
    ("original type", lambda: resolve_original(_net(), 3), E.ConfigTypeError, TypeError),  # type: ignore[arg-type]
    ("num_groups", lambda: attach(_net(), MIUConfig(device="cpu"), num_groups=0),
     E.ConfigError, ValueError),
    ("original is model", lambda: attach(n := _net(), MIUConfig(device="cpu"), num_groups=2,
                                         original=n), E.ConfigError, ValueError),
    ("head type", lambda: resolve_head(_net(), 3), E.ConfigTypeError, TypeError),  # type: ignore[arg-type]
    ("head missing", lambda: resolve_head(_net(), "nope"), E.FeatureModuleNotFoundError,
     LookupError),
    ("tap when", lambda: FeatureTap(_net(), when="never"), E.ConfigError, ValueError),  # type: ignore[arg-type]
    ("tap never fired", _tap_never_fired, E.StateError, RuntimeError),
    ("l1 epoch", lambda: l1_alpha(5, 5), E.ConfigError, ValueError),
    ("l1 no weights", lambda: l1_norm(_frozen()), E.ModelError, ValueError),
    ("saliency ratio", lambda: top_fraction_mask({"a": torch.ones(2)}, 0.0),
     E.ConfigError, ValueError),
    ("saliency no weights", lambda: top_fraction_mask({}, 0.5), E.ModelError, ValueError),
    ("saliency no batch", lambda: saliency_mask(_net(), []), E.EmptyForgetSetError, ValueError),
    ("salun order", lambda: SalUn().load_state_dict({}), E.StateError, RuntimeError),
    ("kl temperature", lambda: distill_kl(torch.zeros(1, 2), torch.zeros(1, 2), 0.0),
     E.ConfigError, ValueError),
    ("kl shapes", lambda: distill_kl(torch.zeros(1, 2), torch.zeros(1, 3)),
     E.ModelError, ValueError),
    ("one class", lambda: uniform_random_labels(torch.zeros(2).long(), 1), E.ModelError,
     ValueError),
    ("batch", lambda: split_batch(3), E.DataError, ValueError),
    ("dataset items", lambda: dataset_groups([1, 2]), E.DataError, ValueError),  # type: ignore[arg-type]
    ("empty forget", lambda: check_split(torch.tensor([0]), EMPTY), E.EmptyForgetSetError,
     ValueError),
    ("group range", lambda: check_split(torch.tensor([0]), torch.tensor([5]), 2),
     E.GroupRangeError, ValueError),
    ("emptied group", lambda: check_split(torch.tensor([0]), torch.tensor([1])),
     E.EmptyGroupError, ValueError),
    ("sensitive", lambda: group_index(torch.tensor([0]), torch.tensor([0]), 0),
     E.GroupRangeError, ValueError),
    ("toy data", lambda: colored_digits(label_noise=2.0), E.ConfigError, ValueError),
    ("forget ratio", lambda: forget_split(torch.tensor([0, 1]), forget_groups=(1,), ratio=2.0),
     E.ConfigError, ValueError),
]  # fmt: skip


@pytest.mark.parametrize(("name", "call", "kind", "base"), CASES, ids=[c[0] for c in CASES])
def test_input_errors_are_miu_errors(name, call, kind, base):
    with pytest.raises(kind) as info:
        call()
    assert isinstance(info.value, E.MIUError) and isinstance(info.value, base)
    assert str(info.value) and "\n" not in str(info.value)


ALLOWED = {
    # (module, builtin): why a builtin is right there
    ("evaluation.py", "KeyError"),  # Report.__getitem__: the Mapping protocol
    ("sampling.py", "AttributeError"),  # ResampledView.__getattr__: attribute protocol
    ("batched.py", "AttributeError"),  # BatchedTensorView.__getattr__: attribute protocol
    ("batched.py", "IndexError"),  # __getitems__: a position out of range, as __getitem__
    ("__init__.py", "AttributeError"),  # the package's PEP 562 __getattr__
    ("_imports.py", "ImportError"),  # a missing optional dependency
    ("toy_data.py", "FileNotFoundError"),  # Fashion-MNIST files not installed
    ("base.py", "NotImplementedError"),  # the abstract run_epoch
}
BUILTIN_ERRORS = {n for n in dir(builtins) if n.endswith("Error")}


def test_no_plain_builtin_error_is_raised_outside_the_cli():
    root = Path(miu_hooks.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = func.id if isinstance(func, ast.Name) else None
                if name in BUILTIN_ERRORS and (path.name, name) not in ALLOWED:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    assert found == []


def test_the_command_line_maps_setting_errors_to_bad_usage():
    from miu_hooks.cli.errors import EXIT_USAGE, exit_code

    assert exit_code(E.ConfigError("x")) == exit_code(E.ConfigTypeError("x")) == EXIT_USAGE == 2
    assert exit_code(E.ModelError("x")) == exit_code(E.StateError("x")) == 16
