"""``MIUConfig``: every knob of a run, frozen and validated once."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["MIUConfig"]

Precision = Literal["fp32", "bf16", "fp16"]
Scheduler = Literal["cosine", "constant"]
Optimizer = Literal["sgd", "adamw"]
FeatureCache = Literal["auto", "on", "off"]
Clip = Literal["norm", "adaptive"]


def _fail(name: str, value: Any, fix: str) -> None:
    raise ValueError(f"MIUConfig.{name}={value!r} is invalid: {fix}")


@dataclass(frozen=True)
class MIUConfig:
    """Configuration of an unlearning run (MIU, REWEIGHT and the baselines).

    Defaults follow the paper's fallback recipe (METHOD.md §4) except the
    schedule (cosine, as in every tuned configuration).

    Attributes:
        epochs: Unlearning epochs E.
        forget_epochs: Epochs (the first ones) that include a forget pass, E_f
            (every epoch when it exceeds ``epochs``).
        lr: Learning rate of the model optimiser.
        momentum: SGD momentum of the model optimiser.
        weight_decay: Weight decay of the model optimiser.
        batch_size: Batch size of the retain, forget and critic-tuning loaders.
        optimizer: ``"sgd"`` (the paper) or ``"adamw"`` (used for text models).
        scheduler: ``"cosine"`` (T_max = epochs, stepped once per epoch) or ``"constant"``.
        mi_weight: λ, weight of the squared MI calibration term on retain batches.
        mine_lr: Learning rate of the two critics (SGD, momentum 0.9, no decay).
        mine_hidden: Hidden width of the critics' statistics networks.
        mine_warmup_iters: Critic-tuning steps at the start of the first epoch, N_0.
        mine_iters: Critic-tuning steps at the start of every later epoch, N_e.
        ema: α of the MINE moving average of the partition term.
        reweight: Sample the retain set with REWEIGHT (``N_g(train) / N_g(retain)``).
        calibrate: Add the calibration term on retain batches (MIU's retain loss).
        max_grad_norm: Clip the model's global gradient norm in forget and retain
            steps; ``None`` disables clipping.
        clip: ``"norm"``: only ``max_grad_norm`` clips. ``"adaptive"``: MINE's rule
            on retain steps, g = g_CE + min(1, ‖g_CE‖/‖g_cal‖)·g_cal (METHOD.md
            §8.1), at the cost of two extra backward passes per retain step;
            ``max_grad_norm``, when set, still clips the combined gradient.
            Forget steps have no CE term and are unchanged. Not available with
            sharded models (FSDP, DeepSpeed).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast for the model; the
            critics and MI arithmetic always run in fp32.
        device: ``"auto"`` (CUDA when available, else CPU) or a torch device string.
        seed: Seed of every random draw in the run (sampler, marginals, init).
        feature_cache: Cache the frozen original model's features once instead of
            recomputing them every step. ``"auto"`` caches when the retain set
            returns identical items on repeated reads (no random augmentation).
        original_mode: ``"eval"`` keeps the original model in eval mode (our fix);
            ``"train"`` reproduces the reference implementation.
        tune_original_on: Features that tune the original model's critic:
            ``"original"`` (our fix) or ``"unlearned"`` (the reference's behaviour).
        restore_batchnorm: Snapshot and restore BatchNorm buffers around critic tuning.
        critic_init: ``"shared"`` (default) starts T_u and T_o from the same weights,
            so while z_u equals z_o the two critics, tuned on the same batches, give
            the same estimate and the calibration term measures only how the
            features moved; ``"independent"`` draws them separately, as the
            reference does (their different tuning progress then enters
            Î_u − Î_o as bias).
        num_workers: DataLoader workers.
        input_key: Key of the inputs in mapping items (``None``: first of
            ``pixel_values``, ``input``, ``inputs``, ``x``).
        label_key: Key of the labels in mapping items (``None``: ``labels`` or ``label``).
        group_key: Key of the group ids in mapping items.
        id_key: Key of sample ids in mapping items (dropped before the forward).
        num_sensitive: S, number of sensitive-attribute values (groups are
            ``s + y * S``); used by metrics to split groups into (y, s).

    Example:
        >>> cfg = MIUConfig(epochs=2, mi_weight=10.0)
        >>> cfg.replace(lr=0.1).lr
        0.1
        >>> MIUConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    epochs: int = 10
    forget_epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    optimizer: Optimizer = "sgd"
    scheduler: Scheduler = "cosine"
    mi_weight: float = 1.0
    mine_lr: float = 0.01
    mine_hidden: int = 512
    mine_warmup_iters: int = 100
    mine_iters: int = 10
    ema: float = 0.01
    reweight: bool = True
    calibrate: bool = True
    max_grad_norm: float | None = None
    clip: Clip = "norm"
    precision: Precision = "fp32"
    device: str = "auto"
    seed: int = 0
    feature_cache: FeatureCache = "auto"
    original_mode: Literal["eval", "train"] = "eval"
    tune_original_on: Literal["original", "unlearned"] = "original"
    restore_batchnorm: bool = True
    critic_init: Literal["shared", "independent"] = "shared"
    num_workers: int = 0
    input_key: str | None = None
    label_key: str | None = None
    group_key: str = "group"
    id_key: str = "id"
    num_sensitive: int = 2
    extra: dict[str, Any] = field(default_factory=dict, compare=True, hash=False)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "mine_hidden", "num_sensitive"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "use an integer >= 1")
        for name in ("forget_epochs", "mine_warmup_iters", "mine_iters", "num_workers", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(name, value, "use an integer >= 0")
        for name in ("lr", "mine_lr"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                _fail(name, value, "use a finite number > 0")
        for name in ("weight_decay", "mi_weight"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                _fail(name, value, "use a finite number >= 0")
        if not _finite(self.momentum) or not 0 <= self.momentum < 1:
            _fail("momentum", self.momentum, "use a number in [0, 1)")
        if not _finite(self.ema) or not 0 < self.ema <= 1:
            _fail("ema", self.ema, "use a number in (0, 1]; MINE uses 0.01")
        if self.max_grad_norm is not None and (
            not _finite(self.max_grad_norm) or self.max_grad_norm <= 0
        ):
            _fail("max_grad_norm", self.max_grad_norm, "use a number > 0, or None for no clipping")
        choices: dict[str, tuple[str, ...]] = {
            "precision": ("fp32", "bf16", "fp16"),
            "scheduler": ("cosine", "constant"),
            "optimizer": ("sgd", "adamw"),
            "feature_cache": ("auto", "on", "off"),
            "original_mode": ("eval", "train"),
            "tune_original_on": ("original", "unlearned"),
            "clip": ("norm", "adaptive"),
            "critic_init": ("shared", "independent"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"choose one of {', '.join(allowed)}")
        for name in ("reweight", "calibrate", "restore_batchnorm"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "use True or False")
        if not isinstance(self.device, str) or not self.device:
            _fail("device", self.device, "use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not isinstance(self.extra, dict):
            _fail("extra", self.extra, "use a dict of method-specific settings")

    def replace(self, **changes: Any) -> MIUConfig:
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Return the fields as compact, key-sorted JSON (for checkpoint metadata)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MIUConfig:
        """Build a config from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MIUConfig keys: {', '.join(unknown)}")
        return cls(**data)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
