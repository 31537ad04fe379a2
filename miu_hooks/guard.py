r"""The collapse guard: stop a run whose held-out accuracy falls far below the original's.

After each epoch the model's accuracy on a fixed held-out slice (the validation
set when one is given, else a seeded slice of the retain set kept out of
training) is compared with the original model's on the same slice. A drop of
more than ``guard_threshold`` points restores the weights of the last epoch that
passed (the input model before the first epoch), stops the run, warns with the
numbers and records them (docs/method.md §10).

Cost: one ``eval()``/``no_grad`` pass over the slice per epoch (at most
``guard_samples`` samples) and one copy of the model's weights in CPU memory,
refreshed after every epoch that passes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from miu_hooks.batched import batched_loader_args
from miu_hooks.errors import CollapseWarning, DataError
from miu_hooks.seeding import GUARD_STREAM, epoch_generator

__all__ = [
    "MIN_HOLDOUT",
    "CollapseGuard",
    "GuardOutcome",
    "build_guard",
    "holdout_indices",
    "slice_of",
]

logger = logging.getLogger(__name__)

Source = Literal["val", "retain"]

#: Smallest held-out slice of D_r the guard reads (one sample = 2 points); with
#: fewer, the guard needs ``val``.
MIN_HOLDOUT = 50


@dataclasses.dataclass
class GuardOutcome:
    """What the collapse guard saw and did in one run.

    Attributes:
        enabled: Whether the guard ran.
        fired: Whether a drop past the threshold stopped the run.
        threshold: The largest allowed drop, in accuracy points.
        source: ``"val"`` (the validation set) or ``"retain"`` (a held-out slice of D_r).
        samples: Size of the slice.
        original_accuracy: The input model's accuracy on the slice (×100).
        accuracies: Accuracy after each finished epoch (×100), in order.
        failed_epoch: The epoch whose accuracy fell past the threshold, else ``None``.
        restored_epoch: The epoch whose weights were restored (-1: the input model),
            else ``None``.
        final_only: Only the final model was checked (a run from re-initialised
            weights, which have no earlier state worth restoring).
        message: A one-line summary (the warning's text when it fired).
    """

    enabled: bool = True
    fired: bool = False
    threshold: float = 10.0
    source: str = "val"
    samples: int = 0
    original_accuracy: float = math.nan
    accuracies: list[float] = dataclasses.field(default_factory=list)
    failed_epoch: int | None = None
    restored_epoch: int | None = None
    final_only: bool = False
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def holdout_indices(groups: Tensor, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split positions ``0..N-1`` into ``(kept for training, held out)``, stratified by group.

    At most ``samples`` positions and at most a tenth of every group are held
    out (rounded down), so no group loses its last samples; the draw is a pure
    function of ``seed``.

    Args:
        groups: LongTensor[N], the group of each retain sample.
        samples: Largest slice size.
        seed: Seed of the draw.

    Returns:
        Two sorted LongTensors of positions.

    Example:
        >>> keep, held = holdout_indices(torch.tensor([0] * 30 + [1] * 10), 100, seed=0)
        >>> len(keep), len(held), int((torch.tensor([0] * 30 + [1] * 10)[held] == 1).sum())
        (36, 4, 1)
    """
    groups = groups.long().reshape(-1)
    n = groups.numel()
    fraction = min(0.1, samples / n) if n else 0.0
    gen = epoch_generator(seed, 0, GUARD_STREAM)
    held = []
    for g in torch.unique(groups).tolist():
        members = torch.nonzero(groups == g).reshape(-1)
        take = math.floor(fraction * members.numel())
        if take:
            held.append(members[torch.randperm(members.numel(), generator=gen)[:take]])
    held_t = torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_t] = False
    return torch.nonzero(mask).reshape(-1), held_t


def slice_of(size: int, samples: int, seed: int) -> Tensor:
    """The first ``samples`` positions of a seeded permutation of ``range(size)``, sorted.

    Example:
        >>> slice_of(5, 10, 0).tolist()
        [0, 1, 2, 3, 4]
    """
    if size <= samples:
        return torch.arange(size)
    perm = torch.randperm(size, generator=epoch_generator(seed, 1, GUARD_STREAM))
    return torch.sort(perm[:samples]).values


class CollapseGuard:
    """Per-epoch accuracy check on a held-out slice, with the last good weights on the CPU.

    Args:
        data: The slice (items like the retain set's).
        threshold: Largest allowed drop below the original's accuracy, in points.
        source: Where the slice comes from, for the record (``"val"`` or ``"retain"``).
        batch_size: Evaluation batch size.
        keys: ``input_key``/``label_key``/``group_key`` of mapping items.
        final_only: Check the final model only, never restore (re-initialised runs).
        collate_fn: How to batch the slice's items (e.g. a Trainer's data collator).

    Example:
        >>> x = torch.eye(2).repeat(8, 1); y = torch.tensor([0, 1] * 8)
        >>> ds = torch.utils.data.TensorDataset(x, y, y)
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2)); _ = net.bias.zero_()
        >>> guard = CollapseGuard(ds, threshold=10.0)
        >>> guard.start(net)
        100.0
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     guard.check(net, epoch=0)
        False
        >>> guard.outcome.restored_epoch, bool(net.weight[0, 0] == 1.0)
        (-1, True)
    """

    def __init__(
        self,
        data: Dataset,
        *,
        threshold: float = 10.0,
        source: Source = "val",
        batch_size: int = 256,
        keys: Mapping[str, Any] | None = None,
        final_only: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.keys = dict(keys or {})
        self.collate_fn = collate_fn
        self.outcome = GuardOutcome(
            threshold=float(threshold),
            source=source,
            samples=len(data),  # type: ignore[arg-type]
            final_only=final_only,
        )
        self._good: dict[str, Tensor] | None = None
        self._good_epoch = -1

    def accuracy(self, model: nn.Module) -> float:
        """Accuracy (×100) of ``model`` on the slice (``eval()``, ``no_grad``; modes restored)."""
        from miu_hooks.data import forward_logits, split_batch
        from miu_hooks.evaluation import inference

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        data, options = batched_loader_args(self.data, {"collate_fn": self.collate_fn})
        loader = DataLoader(data, batch_size=self.batch_size, **options)
        right = total = 0
        with inference(model):
            for raw in loader:
                batch = split_batch(raw, **self.keys).to(device)
                preds = forward_logits(model, batch.inputs).argmax(-1)
                right += int((preds == batch.labels).sum())
                total += len(batch.labels)
        return 100.0 * right / max(total, 1)

    def start(self, model: nn.Module, *, keep_weights: bool = True) -> float:
        """Measure the original (``model`` as it is now); keep its weights as the last good."""
        acc = self.accuracy(model)
        self.outcome.original_accuracy = acc
        if keep_weights and not self.outcome.final_only:
            self._keep(model, -1)
        return acc

    def _keep(self, model: nn.Module, epoch: int) -> None:
        self._good = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self._good_epoch = epoch

    def set_good(self, model: nn.Module, epoch: int) -> None:
        """Take ``model``'s weights as the last good (e.g. when resuming after ``epoch``)."""
        if not self.outcome.final_only:
            self._keep(model, epoch)

    def drop(self, accuracy: float) -> float:
        """Points below the original's accuracy (negative when above)."""
        return self.outcome.original_accuracy - accuracy

    def check(self, model: nn.Module, epoch: int, *, final: bool = True) -> bool:
        """Check ``model`` after ``epoch``; on a collapse restore the last good weights.

        Args:
            model: The model being unlearned.
            epoch: The epoch just finished.
            final: Whether this is the run's last epoch (``final_only`` guards only
                check then).

        Returns:
            ``True`` when the run may go on (or the check was skipped), ``False``
            when it fired (weights restored unless ``final_only``; a
            :class:`~miu_hooks.errors.CollapseWarning` was issued).
        """
        if self.outcome.final_only and not final:
            return True
        acc = self.accuracy(model)
        self.outcome.accuracies.append(acc)
        if self.drop(acc) <= self.outcome.threshold:
            if not self.outcome.final_only:
                self._keep(model, epoch)
            return True
        self.fire(model, epoch, acc)
        return False

    def restore(self, model: nn.Module) -> int | None:
        """Load the last good weights into ``model``; return their epoch (-1: the input)."""
        if self._good is None:
            return None
        model.load_state_dict(self._good)
        return self._good_epoch

    def fire(self, model: nn.Module, epoch: int, accuracy: float) -> None:
        """Record a collapse after ``epoch``, restore the last good weights and warn."""
        out = self.outcome
        out.fired, out.failed_epoch = True, epoch
        where = "the validation set" if out.source == "val" else "a held-out slice of D_r"
        head = (
            f"collapse guard: after epoch {epoch} the accuracy on {where} ({out.samples} "
            f"samples) is {accuracy:.1f}, {self.drop(accuracy):.1f} points below the "
            f"original's {out.original_accuracy:.1f} (threshold {out.threshold:g})"
        )
        if out.final_only:
            tail = "; the model is kept as trained (a re-initialised run has no earlier state)"
        else:
            restored = self.restore(model)
            out.restored_epoch = restored
            what = (
                "the input model was" if restored == -1 else f"the weights of epoch {restored} were"
            )
            tail = f"; the run stopped and {what} restored"
            if restored == -1:
                tail += " (nothing was unlearned)"
        out.message = head + tail + "; lower lr, or set guard=False to keep the run's weights"
        logger.warning("%s", out.message)
        warnings.warn(out.message, CollapseWarning, stacklevel=3)


def build_guard(
    retain: Dataset,
    retain_groups: Tensor,
    val: Dataset | None,
    config: Any,
    *,
    final_only: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> tuple[CollapseGuard | None, Tensor]:
    """The guard of a run and the retain positions it holds out of training.

    With ``val`` the guard reads a seeded slice of it (``config.guard_samples``
    samples at most) and nothing is held out. Without, a seeded, group-stratified
    slice of the retain set is held out (:func:`holdout_indices`); when that slice
    would have fewer than :data:`MIN_HOLDOUT` samples the run is unguarded (a
    warning says to pass ``val``).

    Args:
        retain: D_r.
        retain_groups: LongTensor[N_r], its groups.
        val: Held-out data, or ``None``.
        config: A :class:`~miu_hooks.config.TrainConfig` (``guard*``, ``seed``, column keys).
        final_only: See :class:`CollapseGuard`.
        collate_fn: See :class:`CollapseGuard`.

    Returns:
        ``(guard or None, held-out retain positions)``; the positions are empty
        with ``val``, without a guard, or when the slice would be too small.

    Raises:
        DataError: ``val`` is empty.
    """
    none = torch.zeros(0, dtype=torch.long)
    if not config.guard:
        return None, none
    keys = {"input_key": config.input_key, "label_key": config.label_key,
            "group_key": config.group_key}  # fmt: skip
    common: dict[str, Any] = dict(threshold=config.guard_threshold, keys=keys,
                                  final_only=final_only, collate_fn=collate_fn)  # fmt: skip
    if val is not None:
        n_val = len(val)  # type: ignore[arg-type]
        if n_val == 0:
            raise DataError("val is empty: pass a validation set with samples, or val=None")
        part = slice_of(n_val, config.guard_samples, config.seed).tolist()
        return CollapseGuard(Subset(val, part), source="val", **common), none
    _, held = holdout_indices(retain_groups, config.guard_samples, config.seed)
    if held.numel() < MIN_HOLDOUT:
        logger.warning(
            "collapse guard off: a tenth of the retain set (%d samples) is fewer than %d, too "
            "few to measure a %g-point drop; pass val= to guard this run",
            held.numel(),
            MIN_HOLDOUT,
            config.guard_threshold,
        )
        return None, none
    return CollapseGuard(Subset(retain, held.tolist()), source="retain", **common), held
