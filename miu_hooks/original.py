"""Loading the frozen original model and saving weights, safetensors only."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from miu_hooks.atomic import atomic_write
from miu_hooks.errors import CheckpointError

__all__ = ["freeze", "load_original", "load_weights", "save_weights", "strip_hooks"]


def strip_hooks(model: nn.Module) -> nn.Module:
    """Remove every forward/backward hook from ``model`` and its submodules, in place.

    Used on deep copies: ``copy.deepcopy`` copies hooks, and a copied tap would
    record the copy's features into the live model's tap.
    """
    for sub in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            hooks = getattr(sub, attr, None)
            if isinstance(hooks, dict):
                hooks.clear()
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode without gradients and return it."""
    model.eval()
    model.requires_grad_(False)
    return model


def copy_frozen(model: nn.Module) -> nn.Module:
    """Return a frozen, eval-mode deep copy of ``model`` with no hooks."""
    return freeze(strip_hooks(copy.deepcopy(model)))


def _diff(expected: dict[str, torch.Size], found: dict[str, torch.Size]) -> str:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    parts = []
    if missing:
        parts.append(
            f"missing {len(missing)}: {', '.join(missing[:5])}" + (" ..." * (len(missing) > 5))
        )
    if unexpected:
        parts.append(
            f"unexpected {len(unexpected)}: {', '.join(unexpected[:5])}"
            + (" ..." * (len(unexpected) > 5))
        )
    if shapes:
        parts.append(
            "shape mismatch: "
            + ", ".join(f"{k} {tuple(found[k])} vs model {tuple(expected[k])}" for k in shapes[:5])
        )
    return "; ".join(parts)


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a safetensors file into ``model`` with strict key and shape checks.

    Tied or shared tensors are handled as ``safetensors.torch.load_model`` does.
    A Transformers model whose ``save_pretrained`` file names its tensors
    differently (the keys Transformers renames on save) is loaded through
    ``from_pretrained``, which maps them back. No pickle is ever read.

    Raises:
        CheckpointError: The file is missing or unreadable, or its keys/shapes
            differ from the model's (the message lists the differences).
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    expected = {k: v.shape for k, v in model.state_dict().items()}
    # Tied weights are stored once; accept a file that omits a key whose tensor
    # is shared with a stored one (load_model resolves those).
    diff = _diff(expected, found)
    if set(found) != set(expected) and _load_with_transformers(model, path):
        return model  # a save_pretrained file whose keys transformers renames on save
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:
        raise CheckpointError(
            f"{path} does not match {type(model).__name__}: {diff or exc}"
        ) from exc
    if unexpected or _shape_mismatch(expected, found) or _untied_missing(model, missing):
        raise CheckpointError(f"{path} does not match {type(model).__name__}: {diff}")
    return model


def _load_with_transformers(model: nn.Module, path: Path) -> bool:
    """Load a ``save_pretrained`` file into a Transformers model through ``from_pretrained``.

    Recent Transformers releases name some modules differently from the keys
    ``save_pretrained`` writes (ViT-family models on 5.24: ``vit.layers.0`` in the
    model, ``vit.encoder.layer.0`` in the file) and map the names back only in
    ``from_pretrained``. This loads the file that way into a fresh model of the
    same class and config, and copies its weights into ``model`` when every key
    matched. Returns ``False`` (nothing changed) for other models, or when the
    file does not match either way.
    """
    if not type(model).__module__.startswith("transformers.") or not hasattr(model, "config"):
        return False
    import tempfile

    import transformers

    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        hf_model: Any = model  # a transformers PreTrainedModel
        with tempfile.TemporaryDirectory() as tmp:
            hf_model.config.save_pretrained(tmp)
            os.symlink(path.resolve(), Path(tmp) / "model.safetensors")
            loaded, info = type(hf_model).from_pretrained(
                tmp, config=hf_model.config, local_files_only=True, output_loading_info=True
            )
    except Exception:  # transformers raises OSError/ValueError/RuntimeError: not loadable this way
        return False
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        return False
    model.load_state_dict(loaded.state_dict(), strict=True)
    return True


def _shape_mismatch(expected: dict[str, torch.Size], found: dict[str, torch.Size]) -> bool:
    return any(expected[k] != found[k] for k in set(expected) & set(found))


def _untied_missing(model: nn.Module, missing: list[str]) -> bool:
    if not missing:
        return False
    state = model.state_dict(keep_vars=True)
    by_ptr: dict[int, list[str]] = {}
    for k, v in state.items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    missing_set = set(missing)
    return any(all(n in missing_set for n in by_ptr[state[k].data_ptr()]) for k in missing)


def load_original(model: nn.Module, path: str | os.PathLike[str] | None = None) -> nn.Module:
    """Return a frozen, eval-mode deep copy of ``model``, optionally with weights from ``path``.

    The copy carries no hooks (a deep copy of a tapped model would otherwise
    feed the tap) and has ``requires_grad=False`` everywhere. ``model`` itself
    is not modified.

    Args:
        model: The architecture (and, when ``path`` is ``None``, the weights).
        path: A safetensors file with the original model's weights.

    Returns:
        The frozen copy.

    Raises:
        CheckpointError: ``path`` is missing, corrupt, or does not match ``model``.

    Example:
        >>> orig = load_original(nn.Linear(2, 2))
        >>> orig.training, any(p.requires_grad for p in orig.parameters())
        (False, False)
    """
    original = strip_hooks(copy.deepcopy(model))
    if path is not None:
        load_weights(original, path)
    return freeze(original)


def save_weights(
    model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model``'s weights to ``path`` as safetensors, atomically.

    The file is written next to its destination and renamed into place
    (:func:`miu_hooks.atomic.atomic_write`), so an interruption never leaves a
    half-written checkpoint.

    Example:
        >>> import tempfile, os
        >>> p = save_weights(nn.Linear(2, 2), os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> p.name
        'm.safetensors'
    """
    from safetensors.torch import save_model

    meta = OrderedDict(sorted((metadata or {}).items()))
    return atomic_write(path, lambda tmp: save_model(model, str(tmp), metadata=meta))
