"""``validate``: every problem a run would meet, found before any work is done.

Like Opacus' ``ModuleValidator.validate``, :func:`validate` returns all the
problems at once (a list of :class:`~miu_hooks.errors.MIUError`) instead of
stopping at the first: the settings and the method name, the retain/forget
split, the classification head and, with one evaluation forward on one
retain sample, the model's output and the shape of its features.
:func:`miu_hooks.unlearn` runs the same checks first and raises the first
problem, with the others appended to its message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from miu_hooks.config import TrainConfig
from miu_hooks.data import forward_logits, split_keys
from miu_hooks.data_checks import (
    batch_of_one_problem,
    dataset_labels_groups,
    label_group_problems,
    nonfinite_position,
    one_sample_inputs,
)
from miu_hooks.errors import (
    ConfigError,
    DataError,
    EmptyForgetSetError,
    EmptyGroupError,
    FeatureModuleNotFoundError,
    GroupRangeError,
    InputMismatchError,
    MIUError,
    ModelError,
    NonFiniteInputError,
)
from miu_hooks.methods import ResolvedRun, resolve_run
from miu_hooks.runtime import resolve_device
from miu_hooks.taps import FeatureTap, feature_width_error, infer_feature_dim
from miu_hooks.wrappers import unsupported_reason

__all__ = [
    "RunCheck",
    "check_run",
    "raise_first",
    "split_problems",
    "validate",
]


def _listed(values: list[int], limit: int = 8) -> str:
    text = ", ".join(map(str, values[:limit]))
    return text + (f" and {len(values) - limit} more" if len(values) > limit else "")


def split_problems(
    retain_groups: Tensor, forget_groups: Tensor, num_groups: int | None = None
) -> tuple[list[MIUError], Tensor, int]:
    """Check a retain/forget split; return ``(problems, train_groups, num_groups)``.

    Problems (each once, naming every offending id): an empty forget or retain
    set, ``num_groups < 1``, group ids outside ``[0, num_groups)``, and groups
    of D = D_r ∪ D_f left without a retain sample (REWEIGHT cannot restore them).

    Example:
        >>> problems, g, n = split_problems(torch.tensor([0, 1]), torch.tensor([1, 2, 5]), 4)
        >>> [type(p).__name__ for p in problems], n
        (['GroupRangeError', 'EmptyGroupError'], 4)
    """
    problems: list[MIUError] = []
    retain_groups = torch.as_tensor(retain_groups).long().reshape(-1)
    forget_groups = torch.as_tensor(forget_groups).long().reshape(-1)
    if forget_groups.numel() == 0:
        problems.append(EmptyForgetSetError("the forget set is empty: there is nothing to unlearn"))
    if retain_groups.numel() == 0:
        problems.append(
            DataError("the retain set is empty: unlearning everything leaves no model to keep")
        )
    train_groups = torch.cat([retain_groups, forget_groups])
    if num_groups is None:
        num_groups = int(train_groups.max()) + 1 if train_groups.numel() else 1
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        problems.append(ConfigError(f"num_groups must be an integer >= 1; got {num_groups!r}"))
        return problems, train_groups, 1
    bad = (train_groups < 0) | (train_groups >= num_groups)
    if bool(bad.any()):
        ids = sorted(set(train_groups[bad].tolist()))
        problems.append(
            GroupRangeError(
                f"group id {ids[0]} is outside [0, {num_groups})"
                + (f" (so are {_listed(ids[1:])})" if len(ids) > 1 else "")
            )
        )
    n_train = torch.bincount(train_groups[~bad], minlength=num_groups)
    n_retain = torch.bincount(retain_groups[(retain_groups >= 0) & (retain_groups < num_groups)],
                              minlength=num_groups)  # fmt: skip
    emptied = ((n_train > 0) & (n_retain == 0)).nonzero().flatten().tolist()
    if emptied and retain_groups.numel():
        counts = [int(n_train[g]) for g in emptied]
        what = (
            f"group {emptied[0]} has {counts[0]} training samples"
            if len(emptied) == 1
            else f"groups {_listed(emptied)} have {_listed(counts)} training samples"
        )
        problems.append(
            EmptyGroupError(
                f"{what} but none left in the retain set: REWEIGHT cannot restore "
                f"{'it' if len(emptied) == 1 else 'them'} (forget fewer samples of "
                f"{'that group' if len(emptied) == 1 else 'those groups'})"
            )
        )
    return problems, train_groups, num_groups


@dataclasses.dataclass
class RunCheck:
    """What :func:`check_run` found (and computed on the way, for :func:`~miu_hooks.unlearn`).

    Attributes:
        problems: Every problem found, settings first, then data, then the model.
        run: The resolved method and config, or ``None`` when they are invalid.
        retain_groups: Group ids of the retain set (empty when unreadable).
        train_groups: Group ids of D = D_r ∪ D_f, retain first.
        num_groups: |G|.
    """

    problems: list[MIUError]
    run: ResolvedRun | None
    retain_groups: Tensor
    train_groups: Tensor
    num_groups: int


def _collated_id_list(value: Any) -> bool:
    # default_collate turns one item's list of ints into a list of int tensors of shape [1].
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(
            isinstance(v, Tensor) and v.shape == (1,) and not v.is_floating_point() for v in value
        )
    )


def _one_forward(
    model: nn.Module,
    retain: Dataset,
    cfg: TrainConfig,
    *,
    taps: bool,
    feature_module: str | nn.Module | None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> tuple[list[MIUError], int | None]:
    """Evaluate ``model`` on ``retain[0]`` (eval mode, no grad); return problems and classes."""
    param = next(model.parameters(), None)
    inputs = one_sample_inputs(retain, split_keys(cfg), param.device if param is not None else
                               torch.device("cpu"), collate_fn)  # fmt: skip
    if isinstance(inputs, Tensor) and inputs.is_floating_point():
        if not bool(torch.isfinite(inputs).all()):
            return [NonFiniteInputError("retain set: sample 0's inputs hold NaN or Inf")], None
    values = inputs.values() if isinstance(inputs, Mapping) else [inputs]
    if collate_fn is None and any(_collated_id_list(v) for v in values):
        return [
            DataError(
                "retain set: sample 0's inputs are Python lists after default_collate (token "
                "ids of varying length?): pass collate_fn= to batch them, e.g. transformers' "
                "DataCollatorWithPadding(tokenizer)"
            )
        ], None
    tap = FeatureTap(model, feature_module, when="always") if taps else None
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        try:
            with torch.no_grad():
                logits = forward_logits(model, inputs)  # raises NoClassifierOutputError
        except MIUError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
            shape = tuple(inputs.shape[1:]) if isinstance(inputs, Tensor) else None
            err = InputMismatchError(
                "the model's forward fails on one retain sample"
                + (f" (inputs of shape {list(shape)})" if shape is not None else "")
                + f": {type(exc).__name__}: {' '.join(str(exc).split())}"
            )
            err.__cause__ = exc
            return [err], None
        classes = int(logits.shape[1])
        if tap is None:
            return [], classes
        z = tap.peek()
        if z is None:
            return [
                FeatureModuleNotFoundError(
                    f"the feature module {tap.name!r} is not called by the model's forward: "
                    "pass the classification head as feature_module='dotted.name'"
                )
            ], classes
        want = infer_feature_dim(tap.module)
        if want is not None and z.shape[1] != want:
            return [feature_width_error(tap.name, z.shape, want)], classes
        return [], classes
    finally:
        if tap is not None:
            tap.remove()
        for module, mode in modes.items():
            module.training = mode


def _batch_of_one(
    model: nn.Module,
    retain: Dataset,
    forget: Dataset,
    cfg: TrainConfig,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> list[MIUError]:
    """A model that cannot train on one sample, in a run that would feed it one."""
    sizes = {"retain": len(retain), "forget": len(forget)}  # type: ignore[arg-type]
    single = [name for name, n in sizes.items() if n == 1]
    batch_sizes = [cfg.batch_size, getattr(cfg, "scrub_retain_batch_size", None)]
    if not single and 1 not in batch_sizes:
        return []
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    inputs = one_sample_inputs(retain, split_keys(cfg), device, collate_fn)
    why = batch_of_one_problem(model, inputs)
    if why is None:
        return []
    cause = f"the {single[0]} set has one sample" if single else "batch size 1 gives batches of one"
    return [
        ModelError(
            f"{cause}, and the model cannot take a training step on one sample ({why}; its "
            "BatchNorm layers need more than one value per channel): "
            + (f"give the {single[0]} set at least 2 samples" if single else "use batch_size >= 2")
        )
    ]


def check_run(
    model: nn.Module,
    retain: Dataset,
    forget: Dataset,
    config: TrainConfig | None = None,
    *,
    method: str | None = None,
    num_groups: int | None = None,
    feature_module: str | nn.Module | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> RunCheck:
    """Run every check of :func:`validate` and keep what they computed."""
    problems: list[MIUError] = []
    run: ResolvedRun | None = None
    try:
        run = resolve_run(method, config)
    except MIUError as exc:
        problems.append(exc)
    cfg = run.config if run is not None else config
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig()
    if run is not None:
        try:
            resolve_device(cfg.device)
        except MIUError as exc:
            problems.append(exc)
    wrapper = unsupported_reason(model)
    if wrapper is not None:
        problems.append(ModelError(wrapper))
    empty = torch.zeros(0, dtype=torch.long)
    columns: list[tuple[Tensor, Tensor]] = []
    for name, dataset in (("retain", retain), ("forget", forget)):
        try:
            columns.append(dataset_labels_groups(dataset, cfg.label_key, cfg.group_key))
        except MIUError as exc:
            problems.append(type(exc)(f"{name} set: {exc}"))
    retain_groups, train_groups, n = empty, empty, num_groups or 1
    if len(columns) == 2:
        found, train_groups, n = split_problems(columns[0][1], columns[1][1], num_groups)
        retain_groups = columns[0][1]
        problems.extend(found)
    for name, dataset in (("retain", retain), ("forget", forget)):
        bad = nonfinite_position(dataset)
        if bad is not None:
            problems.append(
                NonFiniteInputError(f"{name} set: the inputs of sample {bad} hold NaN or Inf "
                                    "(positions count from 0): fix or drop those samples")
            )  # fmt: skip
    classes: int | None = None
    if retain_groups.numel() and wrapper is None:
        with torch.random.fork_rng(devices=[]):
            try:
                taps = run is not None and run.method_class.needs_features
                found, classes = _one_forward(
                    model, retain, cfg, taps=taps, feature_module=feature_module,
                    collate_fn=collate_fn,
                )  # fmt: skip
                problems.extend(found)
                if not found:
                    problems.extend(_batch_of_one(model, retain, forget, cfg, collate_fn))
            except MIUError as exc:
                problems.append(exc)
            except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
                err = ModelError(
                    f"the model's forward on one retain sample failed: {type(exc).__name__}: "
                    f"{' '.join(str(exc).split())}"
                )
                err.__cause__ = exc
                problems.append(err)
    if len(columns) == 2:
        for name, (labels, groups) in zip(("retain", "forget"), columns, strict=True):
            problems.extend(
                label_group_problems(
                    name,
                    labels,
                    groups,
                    num_groups=n,
                    num_sensitive=cfg.num_sensitive,
                    num_classes=classes,
                )
            )
    return RunCheck(problems, run, retain_groups, train_groups, n)


def validate(
    model: nn.Module,
    retain: Dataset,
    forget: Dataset,
    config: TrainConfig | None = None,
    *,
    method: str | None = None,
    num_groups: int | None = None,
    feature_module: str | nn.Module | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> list[MIUError]:
    """Return every problem :func:`~miu_hooks.unlearn` would meet, without doing any work.

    Checks, in order: the method name and the config (:func:`~miu_hooks.methods.resolve_run`)
    and the device; that the model is neither an ``nn.DataParallel`` nor a
    ``torch.compile`` wrapper; the group ids of both sets and the split (empty sets, ids
    out of range, groups emptied by the forget set); then one evaluation
    forward of ``model`` on ``retain[0]`` (no gradients, modes and the global
    RNG restored): that the output carries logits and, for methods that tap
    features (MIU), that the head is found, is called by the forward, and
    receives ``[batch, d]`` features matching its first linear layer. The
    model, the data and the config are not modified.

    Args:
        model: The classifier to unlearn.
        retain: The retain set D_r.
        forget: The forget set D_f.
        config: The run's config (any method's; see ``unlearn``).
        method: The method name (``None``: from the config's class, else ``"miu"``).
        num_groups: |G| (default: max group id + 1).
        feature_module: Head override for the feature tap.
        collate_fn: How to batch the data sets' items, as ``unlearn``'s (``None``:
            ``default_collate``).

    Returns:
        A list of :class:`~miu_hooks.errors.MIUError` instances, empty when the run can start.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> x, y = torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])
        >>> retain, forget = TensorDataset(x, y, y * 2), TensorDataset(x[:1], y[:1], y[:1] * 2 + 5)
        >>> from miu_hooks.config import TrainConfig
        >>> problems = validate(nn.Linear(3, 2), retain, forget, TrainConfig(reweight=True),
        ...                     method="finetune", num_groups=4)
        >>> [type(p).__name__ for p in problems]
        ['ConfigError', 'GroupRangeError']
    """
    return check_run(
        model,
        retain,
        forget,
        config,
        method=method,
        num_groups=num_groups,
        feature_module=feature_module,
        collate_fn=collate_fn,
    ).problems


def raise_first(problems: list[MIUError]) -> None:
    """Raise the first problem (its own type), naming the others in its message.

    Example:
        >>> raise_first([])
        >>> raise_first([ConfigError("a"), DataError("b")])
        Traceback (most recent call last):
        ...
        miu_hooks.errors.ConfigError: a (and 1 more problem: DataError: b)
    """
    if not problems:
        return
    first, rest = problems[0], problems[1:]
    if not rest:
        raise first
    more = "; ".join(f"{type(p).__name__}: {p}" for p in rest)
    noun = "problem" if len(rest) == 1 else "problems"
    try:
        combined: Any = type(first)(f"{first} (and {len(rest)} more {noun}: {more})")
    except TypeError:  # an error type with another constructor: raise it as it is
        raise first from None
    raise combined from first
