"""``FeatureTap``: records the penultimate features, the input of a model's logits layer.

:func:`resolve_head` finds the classification head; :func:`resolve_features`
goes down a composite head (dense -> activation -> ``out_proj``, as in RoBERTa-
style text classifiers) to the linear layer that emits the logits, whose input
is the penultimate representation (docs/method.md §3.1). The tap is a native
forward pre-hook on that layer, kept as a handle and removed on exit; the model
is never wrapped and its ``state_dict`` is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from miu_hooks.errors import (
    ConfigError,
    ConfigTypeError,
    FeatureModuleNotFoundError,
    StateError,
)
from miu_hooks.token_pool import LastTokenPool, pools_after_logits

__all__ = [
    "FeatureTap",
    "feature_width_error",
    "infer_feature_dim",
    "logits_layer",
    "resolve_features",
    "resolve_head",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's module under DDP/FSDP/compile/Opacus-style wrappers.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> unwrap_model(lin) is lin
        True
    """
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(model, "_orig_mod", None) or getattr(model, "_module", None)
        if inner is None and type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
            "FullyShardedDataParallel",
        ):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def _num_labels(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    n = getattr(config, "num_labels", None)
    return int(n) if isinstance(n, int) else None


def _usable(module: Any) -> bool:
    return isinstance(module, nn.Module) and not isinstance(module, nn.Identity)


def resolve_head(
    model: nn.Module, module: str | nn.Module | None = None, *, num_classes: int | None = None
) -> tuple[str, nn.Module]:
    """Find the classification head of ``model``; its input are the features.

    Resolution order when ``module`` is ``None``: ``get_classifier()`` (timm),
    ``classifier`` (Hugging Face), ``fc`` (torchvision), ``head``, then the last
    ``nn.Linear`` whose output size is the number of logits (``num_classes``,
    else ``model.config.num_labels``, else the last ``nn.Linear``).

    Args:
        model: The classifier (wrappers such as DDP are looked through).
        module: A dotted submodule name or the module itself, to override the search.
        num_classes: Number of logits, for the last-resort search.

    Returns:
        ``(dotted_name, module)``.

    Raises:
        FeatureModuleNotFoundError: Nothing suitable was found, or ``module`` is
            not a submodule of ``model``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> resolve_head(net)[0]
        '2'
    """
    model = unwrap_model(model)
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(module, str):
        try:
            found = model.get_submodule(module)
        except AttributeError as exc:
            raise FeatureModuleNotFoundError(
                f"feature module {module!r} not found in {type(model).__name__}; "
                f"top-level children are {[n for n, _ in model.named_children()]}"
            ) from exc
        return module, found
    if isinstance(module, nn.Module):
        if id(module) not in names:
            raise FeatureModuleNotFoundError(
                f"the given feature module ({type(module).__name__}) is not a submodule of "
                f"{type(model).__name__}: pass a module of the unwrapped model or a dotted name"
            )
        return names[id(module)], module
    if module is not None:
        raise ConfigTypeError(
            f"feature_module must be a dotted name, an nn.Module or None; got {module!r}"
        )

    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        with contextlib.suppress(Exception):
            head = get_classifier()
            if _usable(head) and id(head) in names:
                return names[id(head)], head
    for attr in ("classifier", "fc", "head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module) and _usable(head) and id(head) in names:
            return names[id(head)], head
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    want = num_classes if num_classes is not None else _num_labels(model)
    if want is not None:
        linears = [(n, m) for n, m in linears if m.out_features == want]
    if linears:
        return linears[-1]
    raise FeatureModuleNotFoundError(
        f"could not find the classification head of {type(model).__name__} (tried "
        "get_classifier(), .classifier, .fc, .head and the last nn.Linear"
        + (f" with {want} outputs" if want is not None else "")
        + "): pass feature_module='dotted.name'"
    )


def logits_layer(head: nn.Module, num_classes: int | None = None) -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` inside ``head`` that emits the logits, with its name in ``head``.

    With ``num_classes`` given, only layers with that many outputs qualify;
    without it, the last linear layer of ``head`` does. ``head`` itself counts
    (its name is then ``""``).

    Args:
        head: The classification head (any module).
        num_classes: Number of logits, or ``None`` when unknown.

    Returns:
        ``(name_in_head, layer)``, or ``None`` when no linear layer qualifies.

    Example:
        >>> head = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> logits_layer(head, 3)[0], logits_layer(head, 5)
        ('2', None)
    """
    found = [
        (n, m)
        for n, m in head.named_modules()
        if isinstance(m, nn.Linear) and (num_classes is None or m.out_features == num_classes)
    ]
    return found[-1] if found else None


def resolve_features(
    model: nn.Module, module: str | nn.Module | None = None, *, num_classes: int | None = None
) -> tuple[str, nn.Module]:
    """Find the layer whose input are the penultimate features of ``model``.

    Without ``module``, this is the head of :func:`resolve_head` when it is a
    single ``nn.Linear``. A composite head (e.g. RoBERTa's dense -> tanh ->
    ``out_proj``, fed the whole token sequence, or ResNet's Flatten -> Linear)
    is replaced by its last linear layer that emits the logits (``num_classes``
    outputs, else ``model.config.num_labels``, else its last linear layer): the
    input of that layer is the pooled, transformed representation [B, d]. A
    composite head without such a layer is kept as it is. ``module`` is an
    override and is returned as given.

    Args:
        model: The classifier (wrappers such as DDP are looked through).
        module: A dotted submodule name or the module itself, tapped as given.
        num_classes: Number of logits.

    Returns:
        ``(dotted_name, module)``.

    Raises:
        FeatureModuleNotFoundError: As :func:`resolve_head`.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body = nn.Linear(4, 6)
        ...         self.classifier = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
        >>> resolve_features(Net())[0], resolve_features(Net(), "classifier")[0]
        ('classifier.2', 'classifier')
    """
    name, head = resolve_head(model, module, num_classes=num_classes)
    if module is not None or isinstance(head, nn.Linear):
        return name, head
    want = num_classes if num_classes is not None else _num_labels(unwrap_model(model))
    found = logits_layer(head, want)
    if found is None:
        return name, head
    sub, layer = found
    return ".".join(part for part in (name, sub) if part), layer


def infer_feature_dim(head: nn.Module) -> int | None:
    """Return the input width of ``head`` when it can be read off its layers.

    Example:
        >>> infer_feature_dim(nn.Sequential(nn.Flatten(), nn.Linear(5, 2)))
        5
    """
    if isinstance(head, nn.Linear):
        return head.in_features
    for sub in head.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.LazyLinear)):
            return None
    return None


def feature_width_error(name: str, shape: Any, want: int) -> FeatureModuleNotFoundError:
    """The error for tapped features whose width is not the tapped layer's input width.

    Example:
        >>> str(feature_width_error("fc", (2, 6), 3))[:57]
        "the input of the feature module 'fc' flattens to 6 values"
    """
    shape = tuple(shape)
    got = shape[1] if len(shape) == 2 else "not 2-D"
    return FeatureModuleNotFoundError(
        f"the input of the feature module {name!r} flattens to {got} values per sample "
        f"(shape {shape}), but it takes [batch, {want}] features: tap the layer that "
        f"receives [batch, {want}] features (feature_module='dotted.name')"
    )


class FeatureTap:
    """Record the penultimate features on each forward, as fp32 [B, d].

    A forward pre-hook on the layer :func:`resolve_features` finds (the linear
    layer that emits the logits, or the ``module`` override) stores its first
    positional input, cast to fp32 (a differentiable cast) and flattened to
    ``[B, d]``. Only the last value is kept; :meth:`pop` returns and clears it.

    Decoder text classifiers (GPT-2, Llama, ...: a ``*ForSequenceClassification`` whose
    ``score`` layer is applied to every token before the logits are pooled) are tapped at
    ``score`` and pooled the way they pool their logits: each row's last non-padding token
    (:class:`~miu_hooks.token_pool.LastTokenPool`), so the features are [B, d] there too.

    With ``when="train"`` the hook records only while the head is in training
    mode with grad enabled, so evaluation forwards are ignored; use
    :meth:`capturing` to record anyway (e.g. ``no_grad`` critic tuning). With
    ``when="always"`` (the default) every forward is recorded.

    Args:
        model: The classifier to tap (not wrapped, not modified).
        module: Override: dotted name or module, tapped as given (see
            :func:`resolve_features`).
        when: ``"always"`` or ``"train"``.
        num_classes: Number of logits, for the last-resort head search.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> with FeatureTap(net) as tap:
        ...     _ = net(torch.randn(2, 4))
        ...     tap.pop().shape
        torch.Size([2, 8])
        >>> len(net[2]._forward_pre_hooks)
        0
    """

    def __init__(
        self,
        model: nn.Module,
        module: str | nn.Module | None = None,
        *,
        when: Literal["always", "train"] = "always",
        num_classes: int | None = None,
    ) -> None:
        if when not in ("always", "train"):
            raise ConfigError(f"FeatureTap when={when!r}: choose 'always' or 'train'")
        self.name, self.module = resolve_features(model, module, num_classes=num_classes)
        inner = unwrap_model(model)
        self._pool = LastTokenPool(inner) if pools_after_logits(inner, self.module) else None
        self.when = when
        self.enabled = True
        self._force = 0
        self._value: Tensor | None = None
        self._handle: RemovableHandle | None = self.module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.enabled:
            return
        if self.when == "train" and not self._force:
            if not (module.training and torch.is_grad_enabled()):
                return
        if not args or not isinstance(args[0], Tensor):
            raise FeatureModuleNotFoundError(
                f"feature module {self.name!r} was called without a tensor as first input; "
                "tap the classification head (feature_module=...)"
            )
        z = args[0] if self._pool is None else self._pool(args[0])
        self._value = z.float().reshape(z.shape[0], -1)

    @property
    def pooling(self) -> str | None:
        """``"last_token"`` on a decoder classifier's per-token ``score`` layer, else ``None``."""
        return None if self._pool is None else "last_token"

    @property
    def active(self) -> bool:
        """Whether the hook is still registered."""
        return self._handle is not None

    @contextlib.contextmanager
    def capturing(self) -> Iterator[FeatureTap]:
        """Record every forward inside this scope, even in eval mode or under ``no_grad``."""
        self._force += 1
        try:
            yield self
        finally:
            self._force -= 1

    def peek(self) -> Tensor | None:
        """Return the last value without clearing it (``None`` if nothing recorded)."""
        return self._value

    def pop(self) -> Tensor:
        """Return the last recorded features and clear them.

        Raises:
            StateError: Nothing was recorded since the last ``pop`` (a ``RuntimeError``).
        """
        value, self._value = self._value, None
        if value is None:
            state = "removed" if not self.active else ("disabled" if not self.enabled else "active")
            raise StateError(
                f"feature tap on {self.name!r} did not fire (hook {state}): the forward did not "
                "reach this module. Likely causes: the tap was attached after torch.compile "
                "traced the model, the wrong layer was tapped (pass feature_module=...), or "
                "the model ran in eval mode / under no_grad with when='train'"
            )
        return value

    def clear(self) -> None:
        """Drop the last recorded value."""
        self._value = None

    def remove(self) -> None:
        """Remove the hook and drop the value; safe to call more than once."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._pool is not None:
            self._pool.remove()
        self._value = None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureTap(module={self.name!r}, when={self.when!r}, active={self.active})"
