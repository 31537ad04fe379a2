"""The settings of a run: the shared loop (:class:`TrainConfig`) and each method's own.

* :class:`TrainConfig`: the unlearning loop every method runs (optimiser,
  schedule, batches, precision, seed, REWEIGHT, data columns). Fine-tuning,
  Retrain, NegGrad and random labels take it as is.
* :class:`MIUConfig`: the loop plus MIU's critics and calibration term, so
  ``MIUConfig(epochs=3, mi_weight=10.0)`` sets both.
* :class:`L1SparseConfig`, :class:`SalUnConfig`, :class:`SCRUBConfig`: the loop
  plus the baseline's own knobs.

Each method is registered with its config class
(``register_method("salun", config=SalUnConfig)``); :func:`miu_hooks.unlearn`
infers the method from the config's class when ``method=`` is not given, and
converts a config of another class (see :func:`miu_hooks.methods.resolve_run`).
Every class is frozen and keyword-only; unknown names and invalid values raise
:class:`~miu_hooks.errors.ConfigError`. ``config_fields(cls)`` lists the fields
with their type, default, choices and help.

Imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from miu_hooks.config_base import BaseConfig, setting

__all__ = [
    "L1SparseConfig",
    "MIUConfig",
    "NegGradConfig",
    "RetrainConfig",
    "SCRUBConfig",
    "SalUnConfig",
    "TrainConfig",
]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
OriginalPrecision = Literal["fp32", "compute"]
Scheduler = Literal["cosine", "constant"]
Optimizer = Literal["sgd", "adamw"]
FeatureCache = Literal["auto", "on", "off"]
CriticWidth = Literal["fixed", "feature"]
TuneOriginal = Literal["every_epoch", "warmup"]
TuneFeatures = Literal["reuse", "fresh"]
Clip = Literal["norm", "adaptive"]
ForgetObjective = Literal["floor", "smile", "dv"]


def _forget_epochs(what: str) -> Any:
    return setting(
        5,
        f"Epochs (the first ones) that include a {what}, E_f (every epoch when above epochs).",
        low=0,
    )


@dataclass(frozen=True, kw_only=True)
class TrainConfig(BaseConfig):
    """Settings of the unlearning loop shared by every method.

    Defaults follow the paper's fallback recipe (docs/method.md §4) except the
    schedule (cosine, as in every tuned configuration).

    ``reweight=None`` follows the method name: ``X`` runs without REWEIGHT and
    ``X_reweight`` with it (MIU samples with REWEIGHT by default). An explicit
    value that contradicts the name is refused; the config recorded for a run
    holds the resolved value.

    Example:
        >>> cfg = TrainConfig(epochs=2, lr=0.1)
        >>> cfg.replace(batch_size=32).batch_size
        32
        >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    epochs: int = setting(10, "Unlearning epochs E.", low=1)
    lr: float = setting(0.01, "Learning rate of the model optimiser.", low=0, low_open=True)
    momentum: float = setting(
        0.9, "SGD momentum of the model optimiser.", low=0, high=1, high_open=True
    )
    weight_decay: float = setting(1e-4, "Weight decay of the model optimiser.", low=0)
    batch_size: int = setting(64, "Batch size of the retain and forget loaders.", low=1)
    optimizer: Optimizer = setting("sgd", "Model optimiser: sgd (the paper) or adamw (text).")
    scheduler: Scheduler = setting(
        "cosine", "LR schedule: cosine (T_max = epochs, stepped per epoch) or constant."
    )
    max_grad_norm: float | None = setting(
        1.0,
        "Clip the model's global gradient norm in every step, as the HF Trainer does "
        "(None: no clipping).",
        low=0,
        low_open=True,
    )
    precision: Precision = setting(
        "auto",
        "Autocast precision of the model: auto (bf16 on CUDA devices with bf16, else fp16 "
        "with a loss scaler; fp32 on CPU), fp32, bf16 or fp16 (the MI terms stay fp32).",
    )
    device: str = setting("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
    seed: int = setting(0, "Seed of every random draw (sampler, init, marginals).", low=0)
    num_workers: int = setting(
        0, "DataLoader worker processes of every loader the run builds (0: the main process).",
        low=0,
    )  # fmt: skip
    reweight: bool | None = setting(
        None,
        "REWEIGHT retain sampling, N_g(D)/N_g(D_r); None follows the method name "
        "(X: off, X_reweight: on).",
    )
    input_key: str | None = setting(
        None, "Inputs key of mapping items (None: pixel_values, input, inputs or x)."
    )
    label_key: str | None = setting(None, "Label key of mapping items (None: labels or label).")
    group_key: str = setting("group", "Group-id key of mapping items.")
    id_key: str = setting("id", "Sample-id key of mapping items (dropped before the forward).")
    num_sensitive: int = setting(
        2, "S, values of the sensitive attribute (groups are s + y*S); for metrics.", low=1
    )
    guard: bool = setting(
        True,
        "Collapse guard: after each epoch, compare held-out accuracy with the original's; "
        "past guard_threshold, restore the last good epoch, stop and warn.",
    )
    guard_threshold: float = setting(
        10.0, "Largest allowed drop of held-out accuracy below the original's, in points.",
        low=0,
    )  # fmt: skip
    guard_samples: int = setting(
        512,
        "Size of the guard's held-out slice: of val when given, else drawn from D_r (at most "
        "a tenth of each group, stratified, seeded) and kept out of training.",
        low=1,
    )


@dataclass(frozen=True, kw_only=True)
class MIUConfig(TrainConfig):
    """Settings of MIU: the loop of :class:`TrainConfig` plus MIU's critics and terms.

    MIU samples the retain set with REWEIGHT (``reweight=True``, the default);
    ``reweight=False`` is the paper's ablation and logs a warning. The defaults
    of the fixes to the reference implementation are described in
    docs/method.md §8; each has a switch restoring the reference behaviour.

    Example:
        >>> cfg = MIUConfig(epochs=2, mi_weight=10.0)
        >>> cfg.replace(lr=0.1).lr
        0.1
        >>> MIUConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    reweight: bool = setting(
        True, "REWEIGHT retain sampling (MIU's default; False is the paper's ablation)."
    )
    forget_epochs: int = _forget_epochs("forget pass")
    forget_objective: ForgetObjective = setting(
        "floor",
        "Forget-step loss: floor, max(0, Î_u) (an estimate below zero carries no "
        "information); smile, SMILE's clipped estimate, floored; dv, Î_u as is (the "
        "paper's, unbounded below).",
    )
    smile_tau: float = setting(
        5.0, "τ, the bound of the marginal scores with forget_objective='smile'.", low=0,
        low_open=True,
    )  # fmt: skip
    mi_weight: float = setting(
        1.0, "λ, weight of the squared MI calibration term on retain batches.", low=0
    )
    mine_lr: float = setting(
        0.01, "Learning rate of the two critics (SGD, momentum 0.9).", low=0, low_open=True
    )
    mine_max_grad_norm: float | None = setting(
        10.0,
        "Clip each critic's gradient norm at every tuning step (None: never, the paper's). "
        "MINE's corrected gradient divides by a slow moving average, so one large score "
        "makes a step that can diverge; a bound well above the typical norm stops that.",
        low=0,
        low_open=True,
    )
    mine_hidden: int = setting(512, "Hidden width of the critics' statistics networks.", low=1)
    mine_warmup_iters: int = setting(
        100, "Critic-tuning steps at the start of the first epoch, N_0.", low=0
    )
    mine_iters: int = setting(10, "Critic-tuning steps at the start of every later epoch.", low=0)
    critic_width: CriticWidth = setting(
        "fixed",
        "Hidden width of the critics: fixed, mine_hidden (the paper's 512); feature, "
        "min(mine_hidden, max(32, 2d)) for d-wide features (cheaper for small models; "
        "changes the estimates).",
    )
    mine_warmup_tol: float | None = setting(
        None,
        "Stop the first tuning phase early once the critics' mean estimate over 10 steps "
        "has moved by less than this many nats from the previous 10 steps' twice in a row "
        "(None: always mine_warmup_iters steps; one host read per 10 steps).",
        low=0,
        low_open=True,
    )
    tune_features: TuneFeatures = setting(
        "reuse",
        "Model features in a critic-tuning phase: reuse (a row of D drawn again in the same "
        "phase keeps the features of its first draw once a check shows that a forward gives "
        "them again, to round-off; not so under BatchNorm in train mode or dropout; "
        "single-process runs with the feature cache) or fresh (a forward every step).",
    )
    tune_original: TuneOriginal = setting(
        "every_epoch",
        "When T_o, the original model's critic, is tuned: every_epoch (with T_u, the "
        "paper's schedule) or warmup (the first tuning phase only: its features never "
        "change; later phases tune T_u alone).",
    )
    ema: float = setting(
        0.01,
        "α of MINE's moving average of the partition term.",
        low=0,
        high=1,
        low_open=True,
        hint="MINE uses 0.01",
    )
    calibrate: bool = setting(True, "Add the calibration term on retain batches.")
    clip: Clip = setting(
        "norm",
        "norm: only max_grad_norm clips; adaptive: MINE's rule on retain steps, "
        "g_CE + min(1, |g_CE|/|g_cal|)·g_cal (two extra backward passes; not with FSDP).",
    )
    feature_cache: FeatureCache = setting(
        "auto",
        "Cache the original model's features once (auto: when reading an item twice "
        "gives the same values, i.e. no random augmentation).",
    )
    original_precision: OriginalPrecision = setting(
        "fp32",
        "Weights of the frozen original model: fp32, or compute (a copy in the run's autocast "
        "dtype, bf16/fp16: half the memory; no effect at fp32).",
    )
    original_mode: Literal["eval", "train"] = setting(
        "eval", "Mode of the original model: eval (our fix) or train (the reference)."
    )
    tune_original_on: Literal["original", "unlearned"] = setting(
        "original",
        "Features tuning the original model's critic: original (our fix) or unlearned.",
    )
    restore_batchnorm: bool = setting(
        True, "Restore BatchNorm running statistics after critic tuning."
    )
    critic_init: Literal["shared", "independent"] = setting(
        "shared",
        "shared: T_u and T_o start from the same weights (equal estimates while the "
        "features are the original's); independent: drawn separately, as the reference.",
    )


@dataclass(frozen=True, kw_only=True)
class RetrainConfig(TrainConfig):
    """Settings of Retrain: the loop of :class:`TrainConfig` from re-initialised weights.

    Retrain re-initialises the model (seeded by ``seed``) before training on D_r:
    ``reset_parameters()`` of every submodule that has one, or the model's own
    initialisation for Hugging Face models. ``reinit=False`` trains the weights
    given instead (e.g. the original model's own initial weights, as the
    benchmark does, docs/method.md §1).

    Example:
        >>> RetrainConfig().reinit, RetrainConfig(reinit=False).reinit
        (True, False)
    """

    reinit: bool = setting(
        True, "Re-initialise the model (seeded) before training; False trains the weights given."
    )


@dataclass(frozen=True, kw_only=True)
class NegGradConfig(TrainConfig):
    """Settings of NegGrad: the loop of :class:`TrainConfig` with a smaller learning rate.

    Gradient ascent on the forget set is unbounded: its default learning rate,
    3e-4, is measured not to collapse the benchmark's models at r = 0.9, where
    1e-3 did (docs/method.md §10).

    Example:
        >>> NegGradConfig().lr
        0.0003
    """

    lr: float = setting(
        3e-4,
        "Learning rate of the model optimiser (small: the gradient ascent is unbounded).",
        low=0,
        low_open=True,
    )


@dataclass(frozen=True, kw_only=True)
class L1SparseConfig(TrainConfig):
    r"""Settings of L1-sparse: fine-tuning with a decaying L1 penalty (docs/method.md §6).

    Example:
        >>> L1SparseConfig(l1_alpha=1e-3).l1_alpha
        0.001
    """

    l1_alpha: float = setting(
        5e-4, "α_0 of the penalty α_e·|θ|_1, with α_e = α_0 (1 - e/E).", low=0
    )


@dataclass(frozen=True, kw_only=True)
class SalUnConfig(TrainConfig):
    """Settings of SalUn: random labels on the salient weights only (docs/method.md §6).

    Example:
        >>> SalUnConfig(salun_ratio=0.3).salun_ratio
        0.3
    """

    salun_ratio: float = setting(
        0.5, "ρ, the fraction of weights (by saliency) that may change.", low=0, high=1,
        low_open=True,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SCRUBConfig(TrainConfig):
    """Settings of SCRUB: a student kept close to the original on D_r, far on D_f.

    See docs/method.md §6.

    Example:
        >>> SCRUBConfig(scrub_temperature=2.0).scrub_retain_batch_size
        128
    """

    forget_epochs: int = _forget_epochs("max pass over the forget set")
    scrub_temperature: float = setting(
        4.0, "T, the distillation temperature.", low=0, low_open=True
    )
    scrub_kl_weight: float = setting(0.001, "α, weight of the KL term of the min step.", low=0)
    scrub_ce_weight: float = setting(0.99, "γ, weight of the CE term of the min step.", low=0)
    scrub_retain_batch_size: int | None = setting(
        128, "Batch size of the min step's retain batches (None: batch_size).", low=1
    )
