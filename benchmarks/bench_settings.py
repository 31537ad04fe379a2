"""Benchmark settings: the methods compared, the recipes, and the data sets."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from miu_hooks import TrainConfig, config_fields
from miu_hooks.demo import ColoredSplits, colored_digits, find_fashion_mnist
from miu_hooks.methods import config_class
from miu_hooks.metrics import GAP_METRICS

REF, REF2 = "retrain_reweight", "retrain"
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
    ("miu", "miu", {}),  # METHOD §2: MIU samples with REWEIGHT (its default)
    ("miu_no_reweight", "miu", {"reweight": False}),  # ablations (--ablation)
    ("miu_independent_critics", "miu", {"critic_init": "independent"}),
    ("miu_lambda10", "miu", {"mi_weight": 10.0}),  # METHOD §4's r=0.5 λ
    ("miu_lambda10_independent", "miu", {"mi_weight": 10.0, "critic_init": "independent"}),
    ("miu_clip", "miu", {"max_grad_norm": 1.0}),
    ("miu_lambda10_clip", "miu", {"mi_weight": 10.0, "max_grad_norm": 1.0}),
)  # fmt: skip
ABLATION_ROWS = ("miu_no_reweight", "miu_independent_critics", "miu_lambda10",
                 "miu_lambda10_independent")  # fmt: skip
# Not in --ablation's default set; pick with --methods (see RESULTS.md, clipping).
EXTRA_ROWS = ("miu_clip", "miu_lambda10_clip")
DEFAULT_ROWS = tuple(row for row, _, _ in METHODS if row not in ABLATION_ROWS + EXTRA_ROWS)
METRICS = (*GAP_METRICS[:4], "MIA_AUC", "EO", "GA", "worst_group")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a benchmark run (recorded in RESULTS.md and results.json)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    ratios: tuple[float, ...] = (0.1, 0.5, 0.9)
    datasets: tuple[str, ...] = ("digits", "fashion")
    methods: tuple[str, ...] = DEFAULT_ROWS
    digits_samples: int | None = None
    digits_copies: int = 4
    fashion_samples: int = 3000
    fashion_test_fraction: float = 0.5
    fashion_ratios: tuple[float, ...] = (0.5,)
    forget_group: int = 2
    size: int = 8
    label_noise: float = 0.05
    color_flip: float = 0.2
    hidden: tuple[int, int] = (128, 64)
    batch_size: int = 32
    train_epochs: int = 30
    train_lr: float = 0.05
    unlearn_epochs: int = 5
    unlearn_lr: float = 0.01
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
    timing_seeds=(0,),
)  # fmt: skip


def base_config(s: Settings, seed: int, method: str = "miu", **kw: Any) -> Any:
    """The shared unlearning recipe as ``method``'s config (library defaults otherwise).

    E_f (MIU's and SCRUB's forget epochs) keeps the paper's proportion E_f / E = 5 / 10;
    REWEIGHT follows the method name.
    """
    cls = config_class(method)
    fields = {f.name for f in config_fields(cls)}
    opts: dict[str, Any] = dict(epochs=s.unlearn_epochs, lr=s.unlearn_lr,
                                batch_size=s.batch_size, seed=seed, device="cpu")  # fmt: skip
    if "forget_epochs" in fields:
        opts["forget_epochs"] = math.ceil(s.unlearn_epochs / 2)
    if "mine_iters" in fields:
        opts.update(mine_warmup_iters=s.mine_warmup_iters, mine_iters=s.mine_iters)
    opts.update(kw)
    return cls(**opts)


def train_config(s: Settings, seed: int) -> TrainConfig:
    """The Original/Retrain recipe: SGD + momentum, cosine, ``train_epochs`` at ``train_lr``."""
    return TrainConfig(epochs=s.train_epochs, lr=s.train_lr, batch_size=s.batch_size, seed=seed,
                       device="cpu")  # fmt: skip


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
