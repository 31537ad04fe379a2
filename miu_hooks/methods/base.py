"""What every unlearning method shares: the run context, loaders and the step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from miu_hooks.batched import batched_loader_args
from miu_hooks.checks import NON_FINITE, deferred, require
from miu_hooks.config import TrainConfig
from miu_hooks.data import (
    Batch,
    forward_logits,
    raise_if_nonfinite_inputs,
    split_batch,
    split_keys,
)
from miu_hooks.errors import MIUError, NonFiniteLossError, StateError
from miu_hooks.functional import checked_cross_entropy
from miu_hooks.runtime import Runtime
from miu_hooks.sampling import TrainBatchSampler
from miu_hooks.seeding import epoch_generator

__all__ = [
    "ReweightRule",
    "RunContext",
    "SeededLoader",
    "ShuffleSampler",
    "UnlearningMethod",
    "checked_cross_entropy",
]

C = TypeVar("C", bound=TrainConfig)

#: How a method's name and ``config.reweight`` decide REWEIGHT (docs/method.md §2):
#: ``"by_name"``: ``X`` runs without it and ``X_reweight`` with it; ``"default_on"``:
#: on unless the config sets ``reweight=False`` (MIU; no ``_reweight`` name);
#: ``"not_applicable"``: the method has no retain pass (NegGrad; no ``_reweight`` name).
ReweightRule = Literal["by_name", "default_on", "not_applicable"]


class ShuffleSampler(Sampler[int]):
    """A random permutation per epoch, a pure function of ``(seed, epoch)``.

    Each epoch is a :class:`~torch.utils.data.RandomSampler` whose generator is
    seeded by :func:`~miu_hooks.seeding.epoch_seed` ``(seed, epoch)``. It holds
    one rather than being one, so that launchers which replace a
    ``RandomSampler`` by their own (Accelerate does) keep this order. The
    ``generator`` attribute is kept for launchers that look for one.

    ``exclude`` leaves positions out (the collapse guard's held-out slice): each
    epoch is then a permutation of the kept positions, repeated (reshuffled) up to
    ``num_samples`` draws (default: the number kept).

    Example:
        >>> s = ShuffleSampler(5, seed=1)
        >>> sorted(s) == [0, 1, 2, 3, 4]
        True
        >>> sorted(ShuffleSampler(5, seed=1, exclude=torch.tensor([1]), num_samples=8))
        [0, 0, 2, 2, 3, 3, 4, 4]
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        *,
        exclude: torch.Tensor | None = None,
        num_samples: int | None = None,
    ) -> None:
        self.size = int(size)
        self.seed = int(seed)
        self.epoch = 0
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)
        self.excluded = (
            torch.zeros(0, dtype=torch.long)
            if exclude is None
            else torch.as_tensor(exclude, dtype=torch.long).reshape(-1)
        )
        mask = torch.ones(self.size, dtype=torch.bool)
        mask[self.excluded] = False
        self.kept = torch.nonzero(mask).reshape(-1)
        self.num_samples = int(num_samples) if num_samples is not None else int(mask.sum())

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def epoch_sampler(self) -> RandomSampler:
        """Return this epoch's :class:`~torch.utils.data.RandomSampler` over the kept positions.

        It yields indices into the kept positions (``range(size)`` when nothing
        is excluded), ``num_samples`` of them.
        """
        return RandomSampler(
            range(len(self.kept)),
            num_samples=self.num_samples if self.num_samples != len(self.kept) else None,
            generator=epoch_generator(self.seed, self.epoch),
        )

    def __iter__(self) -> Iterator[int]:
        if not self.excluded.numel():
            yield from self.epoch_sampler()
            return
        for i in self.epoch_sampler():
            yield int(self.kept[i])


class SeededLoader(DataLoader):
    """A training ``DataLoader``: batches of a :class:`~miu_hooks.sampling.TrainBatchSampler`.

    ``sampler`` draws the indices and :meth:`set_epoch` reaches it. A last
    batch of one sample joins the batch before it (BatchNorm cannot train on
    one sample), unless ``merge_single=False``. A tensor-backed ``dataset`` is
    read one index per batch (:mod:`miu_hooks.batched`; ``self.dataset`` is then
    its :class:`~miu_hooks.batched.BatchedTensorView`) unless ``collate_fn`` is given.

    Args:
        dataset: The data set.
        sampler: The index sampler (e.g. :class:`ShuffleSampler`).
        batch_size: Samples per batch.
        drop_last: Drop a last incomplete batch.
        merge_single: Merge a last batch of one sample into the batch before it.
        **kwargs: Other ``DataLoader`` arguments (``num_workers``, ``collate_fn``...).

    Example:
        >>> loader = SeededLoader(range(9), sampler=ShuffleSampler(9), batch_size=4)
        >>> [len(b) for b in loader], loader.index_sampler.size
        ([4, 5], 9)
    """

    def __init__(
        self,
        dataset: Any,
        *,
        sampler: Any,
        batch_size: int = 1,
        drop_last: bool = False,
        merge_single: bool = True,
        **kwargs: Any,
    ) -> None:
        batches = TrainBatchSampler(sampler, batch_size, drop_last, merge_single=merge_single)
        # Tensor-backed data are read one index per batch (same batches, same order).
        dataset, kwargs = batched_loader_args(dataset, kwargs)
        super().__init__(dataset, batch_sampler=batches, **kwargs)

    @property
    def index_sampler(self) -> Any:
        """The sampler that draws the indices (``DataLoader.sampler`` is a placeholder)."""
        return self.batch_sampler.sampler  # type: ignore[union-attr]

    def set_epoch(self, epoch: int) -> None:
        """Forward ``epoch`` to the index sampler (reshuffle / redraw)."""
        set_epoch = getattr(self.index_sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


@dataclass
class RunContext:
    """Everything a method needs for one run; built by :func:`miu_hooks.unlearn`.

    Attributes:
        model: The model being unlearned (in place).
        config: The run's resolved config, an instance of the method's config
            class (``reweight`` resolved; see :func:`miu_hooks.methods.resolve_run`).
        runtime: Device, precision and step execution.
        retain: Retain set D_r.
        forget: Forget set D_f.
        train: D = D_r ∪ D_f, retain first (positions of D_r are kept).
        num_groups: |G|.
        train_groups: Group id of every sample of ``train``.
        optimizer: The model optimiser.
        retain_loader: Retain batches (REWEIGHT-sampled when ``config.reweight``).
        forget_loader: Shuffled forget batches.
        tune_loader: Shuffled batches of ``train``.
        feature_module: Head override for feature taps.
        original_factory: Builds the frozen original model on first use.
        progress: Wraps an iterable with a progress bar (identity when quiet).
        collate_fn: How the run's loaders batch items (``None``: ``default_collate``);
            loaders a method builds itself use it too.
        epoch: The epoch being run.
        logs: Values the method logged this epoch.
        steps: Optimizer steps finished so far, per phase (named in error messages).
        batch: The batch being processed (its inputs are checked when a loss is NaN/Inf).
    """

    model: nn.Module
    config: TrainConfig
    runtime: Runtime
    retain: Dataset
    forget: Dataset
    train: Dataset
    num_groups: int
    train_groups: Tensor
    optimizer: torch.optim.Optimizer
    retain_loader: SeededLoader
    forget_loader: SeededLoader
    tune_loader: SeededLoader
    feature_module: str | nn.Module | None = None
    original_factory: Callable[[], nn.Module] | None = None
    progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda it, _desc: it
    collate_fn: Callable[[list[Any]], Any] | None = None
    epoch: int = 0
    logs: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    batch: Batch | None = None
    _original: nn.Module | None = None

    @property
    def original(self) -> nn.Module:
        """The original model, in eval mode (use it under ``no_grad``)."""
        if self._original is None:
            if self.original_factory is None:
                raise StateError("this run has no original model")
            self._original = self.original_factory()
        self._original.eval()
        return self._original

    def config_as(self, cls: type[C]) -> C:
        """Return :attr:`config` typed as the method's config class ``cls``.

        Raises:
            StateError: The run's config is not a ``cls`` (the method was run
                without :func:`~miu_hooks.methods.resolve_run`).
        """
        if not isinstance(self.config, cls):
            raise StateError(
                f"this method needs a {cls.__name__}; the run holds a "
                f"{type(self.config).__name__} (resolve it with miu_hooks.methods.resolve_run)"
            )
        return self.config

    def split(self, raw: Any) -> Batch:
        """Split a raw batch with the config's keys and move it to the device."""
        return split_batch(raw, **split_keys(self.config)).to(self.runtime.device)

    def logits(self, batch: Batch, model: nn.Module | None = None) -> Tensor:
        """Forward ``model`` (default: the model being unlearned) under the run's autocast."""
        with self.runtime.autocast():
            return forward_logits(model or self.model, batch.inputs)

    def reduce_max(self) -> Callable[[Tensor], Tensor] | None:
        """The all-reduce that puts rank-local checks on every rank (``None`` alone)."""
        return self.runtime.all_reduce_max if self.runtime.world_size > 1 else None

    def step(self, loss: Tensor, phase: str, *, mask: dict[str, Tensor] | None = None) -> None:
        """Check ``loss`` is finite, back-propagate, (mask,) clip and step the model.

        Every check of the step (this one, the label range of
        :func:`~miu_hooks.functional.checked_cross_entropy`, MIU's terms) is read
        in one host sync right before the optimiser step
        (:mod:`miu_hooks.checks`), so the GPU is never stalled twice in a step.

        Raises:
            NonFiniteInputError: ``loss`` is NaN or Inf and so are inputs of the
                current batch (the data are bad, not the training).
            NonFiniteLossError: ``loss`` is NaN or Inf; weights are left as they were.
            GroupRangeError: A label lies outside the logits (weights left as they were).
        """
        steps, epoch, batch = dict(self.steps), self.epoch, self.batch

        def error() -> MIUError:  # evaluated only when a check failed
            done = ", ".join(f"{n} {p}" for p, n in steps.items()) or "none"
            where = (
                f"the {phase} step at epoch {epoch} ({phase} step "
                f"{steps.get(phase, 0) + 1} of the run; steps finished before it: {done})"
            )
            if batch is not None:
                raise_if_nonfinite_inputs(batch, where)
            return NonFiniteLossError(
                f"non-finite loss ({float(loss.detach().float())}) in {where}; lower lr or "
                "enable max_grad_norm"
            )

        rt, cfg = self.runtime, self.config
        with deferred(self.reduce_max()) as checks:
            require(torch.isfinite(loss.detach()), error, NON_FINITE)
            self.optimizer.zero_grad(set_to_none=True)
            rt.backward(loss)
            if mask is not None:
                for name, param in self.model.named_parameters():
                    if param.grad is not None and name in mask:
                        param.grad.mul_(mask[name])
            if cfg.max_grad_norm is not None:
                rt.clip_grad_norm(self.optimizer, self.model.parameters(), cfg.max_grad_norm)
            try:
                checks.flush(self.reduce_max())  # the step's one host read
            except MIUError:
                self.optimizer.zero_grad(set_to_none=True)
                raise
            rt.step(self.optimizer)
        self.steps[phase] = self.steps.get(phase, 0) + 1

    def batches(self, loader: Iterable[Any], desc: str) -> Iterator[Batch]:
        """Iterate ``loader`` (with a progress bar), yielding device batches."""
        for raw in self.progress(loader, desc):
            self.batch = self.split(raw)
            yield self.batch
        self.batch = None


class UnlearningMethod:
    """Base class of a registered method; one instance per run.

    Subclasses implement :meth:`run_epoch`; :meth:`setup`/:meth:`teardown`
    bracket the run and :meth:`state_dict` carries what resuming needs beyond
    the model and optimizer.

    Attributes:
        name: The registered name (set by :func:`~miu_hooks.methods.register_method`).
        config_class: The method's settings class (set at registration).
        needs_original: Whether the run builds the frozen original model.
        needs_features: Whether the method taps the head's input (checked by ``validate``).
        reweight_rule: How the name and ``config.reweight`` decide REWEIGHT
            (:data:`ReweightRule`).
    """

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[TrainConfig]] = TrainConfig
    needs_original: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    reweight_rule: ClassVar[ReweightRule] = "by_name"

    @classmethod
    def starts_fresh(cls, config: TrainConfig) -> bool:
        """Whether a run re-initialises the model (then the guard only checks the end)."""
        return False

    def setup(self, ctx: RunContext) -> None:
        """Prepare per-run state (hooks, masks, caches)."""

    def run_epoch(self, ctx: RunContext, epoch: int) -> None:
        """Run unlearning epoch ``epoch``."""
        raise NotImplementedError

    def teardown(self, ctx: RunContext) -> None:
        """Release hooks and per-run state (called in ``finally``)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Extra state to checkpoint, as flat tensors."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`'s output."""

    def retain_epoch(
        self, ctx: RunContext, loss_fn: Callable[[Tensor, Batch], Tensor], desc: str = "retain"
    ) -> None:
        """One pass over the retain loader minimising ``loss_fn(logits, batch)``."""
        ctx.model.train()
        for batch in ctx.batches(ctx.retain_loader, f"epoch {ctx.epoch} {desc}"):
            ctx.step(loss_fn(ctx.logits(batch), batch), desc)
