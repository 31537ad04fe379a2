"""Benchmark settings: the methods compared, the two protocols, the recipes and the data."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from miu_hooks import RetrainConfig, config_fields
from miu_hooks.demo import ColoredSplits, colored_digits, find_fashion_mnist
from miu_hooks.methods import config_class
from miu_hooks.metrics import GAP_METRICS

REF, REF2 = "retrain_reweight", "retrain"
REFERENCES = ("original", REF2, REF)
# (row name, registered method, extra config changes); "original" is evaluated, not run.
METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("retrain", "retrain", {}),
    ("retrain_reweight", "retrain_reweight", {}),
    ("finetune", "finetune", {}),
    ("finetune_reweight", "finetune_reweight", {}),
    ("neggrad", "neggrad", {}),
    ("random_labels", "random_labels", {}),
    ("random_labels_reweight", "random_labels_reweight", {}),
    ("l1_sparse", "l1_sparse", {}),
    ("l1_sparse_reweight", "l1_sparse_reweight", {}),
    ("salun", "salun", {}),
    ("salun_reweight", "salun_reweight", {}),
    ("scrub", "scrub", {}),
    ("scrub_reweight", "scrub_reweight", {}),
    ("miu", "miu", {}),  # docs/method.md §2: MIU samples with REWEIGHT (its default)
    # Ablations (--ablation; default protocol only, never used for a verdict):
    ("miu_no_reweight", "miu", {"reweight": False}),
    ("miu_independent_critics", "miu", {"critic_init": "independent"}),
    ("miu_lambda10", "miu", {"mi_weight": 10.0}),  # docs/method.md §4's r = 0.5 λ
    ("miu_dv", "miu", {"forget_objective": "dv"}),  # the paper's unbounded forget objective
    ("miu_dv_noclip", "miu", {"forget_objective": "dv", "max_grad_norm": None}),  # as before
    # Opt-in speed settings (docs/method.md §4; only with --methods, default protocol):
    ("miu_critic_feature", "miu", {"critic_width": "feature"}),
    ("miu_fast", "miu", {"critic_width": "feature", "mine_warmup_tol": 0.02,
                         "tune_original": "warmup"}),
)  # fmt: skip
ABLATION_ROWS = ("miu_no_reweight", "miu_independent_critics", "miu_lambda10", "miu_dv",
                 "miu_dv_noclip")  # fmt: skip
SPEED_ROWS = ("miu_critic_feature", "miu_fast")
DEFAULT_ROWS = tuple(row for row, _, _ in METHODS if row not in (*ABLATION_ROWS, *SPEED_ROWS))
METRICS = (*GAP_METRICS[:4], "MIA_AUC", "EO", "GA", "worst_group")

# The tuning budget (docs/method.md §11): at most 6 configurations per method, a learning
# rate times one method-specific knob; a method without a knob of its own gets six learning
# rates. The same budget for every method, MIU included; NegGrad's rates are its own scale.
LRS3 = (0.01, 0.03, 0.1)
LRS6 = (0.003, 0.01, 0.02, 0.03, 0.05, 0.1)
GRIDS: dict[str, tuple[tuple[float, ...], str | None, tuple[Any, ...]]] = {
    "finetune": (LRS6, None, ()),
    "random_labels": (LRS6, None, ()),
    "neggrad": ((1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2), None, ()),
    "l1_sparse": (LRS3, "l1_alpha", (5e-4, 5e-3)),
    "salun": (LRS3, "salun_ratio", (0.5, 0.2)),
    "scrub": (LRS3, "forget_epochs", (1, 3)),
    "miu": (LRS3, "mi_weight", (1.0, 10.0)),  # λ: the paper's two values (docs/method.md §4)
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a benchmark run (recorded in RESULTS.md and results.json)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    ratios: tuple[float, ...] = (0.1, 0.5, 0.9)
    datasets: tuple[str, ...] = ("digits", "fashion")
    methods: tuple[str, ...] = DEFAULT_ROWS
    protocols: tuple[str, ...] = ("default", "tuned")
    grid_size: int = 6
    tune_seed: int = 0
    digits_samples: int | None = None
    digits_copies: int = 4
    fashion_samples: int = 3000
    fashion_test_fraction: float = 0.5
    fashion_ratios: tuple[float, ...] = (0.1, 0.5, 0.9)
    forget_group: int = 2
    size: int = 8
    label_noise: float = 0.05
    color_flip: float = 0.2
    hidden: tuple[int, int] = (128, 64)
    batch_size: int = 32
    train_epochs: int = 30
    train_lr: float = 0.05
    unlearn_epochs: int = 5
    mine_warmup_iters: int = 100
    mine_iters: int = 10
    overhead_epochs: int = 9
    overhead_steps: int = 16
    resnet_overhead_epochs: int = 5
    resnet_overhead_steps: int = 8
    timing_seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1


QUICK_ROWS = ("finetune", "neggrad", "random_labels_reweight", "l1_sparse", "salun_reweight",
              "scrub", "miu")  # fmt: skip
QUICK = Settings(
    seeds=(0,), ratios=(0.5,), datasets=("digits",), methods=QUICK_ROWS, digits_samples=600,
    digits_copies=1, train_epochs=4, unlearn_epochs=2, mine_warmup_iters=20, mine_iters=5,
    overhead_epochs=2, overhead_steps=4, resnet_overhead_epochs=1, resnet_overhead_steps=2,
    timing_seeds=(0,), grid_size=2,
)  # fmt: skip


def default_config(s: Settings, seed: int, method: str = "miu", **kw: Any) -> Any:
    """The default protocol: the method's own defaults with the benchmark's loop length.

    Every setting is the library default of ``method``'s config class (its learning
    rate included: NegGrad's is its own) except the benchmark-wide ones: E
    (``unlearn_epochs``), the batch size, the seed and the device; E_f (MIU's and
    SCRUB's forget epochs) keeps the paper's proportion E_f / E = 5 / 10. REWEIGHT
    follows the method name.
    """
    cls = config_class(method)
    fields = {f.name for f in config_fields(cls)}
    opts: dict[str, Any] = dict(epochs=s.unlearn_epochs, batch_size=s.batch_size, seed=seed,
                                device="cpu")  # fmt: skip
    if "forget_epochs" in fields:
        opts["forget_epochs"] = math.ceil(s.unlearn_epochs / 2)
    if "mine_iters" in fields:
        opts.update(mine_warmup_iters=s.mine_warmup_iters, mine_iters=s.mine_iters)
    opts.update(kw)
    return cls(**opts)


base_config = default_config  # the timing code's name for the same recipe


def grid(s: Settings, method: str) -> list[dict[str, Any]]:
    """The tuned protocol's configurations of ``method``: changes to :func:`default_config`.

    :data:`GRIDS`, cut evenly to ``s.grid_size`` configurations (``--quick``).
    """
    lrs, knob, values = GRIDS[method.removesuffix("_reweight")]
    out = [{"lr": lr} for lr in lrs] if knob is None else [
        {"lr": lr, knob: v} for lr in lrs for v in values]  # fmt: skip
    if len(out) > s.grid_size:
        step = len(out) / s.grid_size
        out = [out[int(i * step)] for i in range(s.grid_size)]
    return out


def train_config(s: Settings, seed: int) -> RetrainConfig:
    """The Original/Retrain recipe: SGD + momentum, cosine, ``train_epochs`` at ``train_lr``.

    Retrain starts from the Original's own initial weights (``reinit=False``,
    docs/method.md §1) with the Original's recipe, so without gradient clipping; the
    guard is off (a reference's failure shows in its own metrics).
    """
    return RetrainConfig(epochs=s.train_epochs, lr=s.train_lr, batch_size=s.batch_size,
                         seed=seed, device="cpu", max_grad_norm=None, guard=False,
                         reinit=False)  # fmt: skip


def load_data(name: str, seed: int, s: Settings) -> ColoredSplits:
    """Colored digits (sklearn) or Colored Fashion-MNIST (Debian files), 3 x size x size."""
    kw: dict[str, Any] = dict(seed=seed, size=s.size, label_noise=s.label_noise,
                              color_flip=s.color_flip)  # fmt: skip
    if name == "fashion":
        kw.update(source="fashion", max_samples=s.fashion_samples,
                  test_fraction=s.fashion_test_fraction)  # fmt: skip
    else:
        kw.update(max_samples=s.digits_samples, copies=s.digits_copies)
    return colored_digits(**kw)


def fashion_available() -> bool:
    """Whether the Debian Fashion-MNIST files are installed."""
    try:
        find_fashion_mnist()
    except FileNotFoundError:
        return False
    return True
