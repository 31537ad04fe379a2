"""``LastTokenPool``: the features of decoder text classifiers that pool after their logits layer.

Hugging Face's decoder sequence classifiers (GPT-2, Llama, Mistral, Qwen, ... built as
``*ForSequenceClassification``) apply their logits layer ``score`` to every token,
[B, T, d] -> [B, T, C], and then keep the logits of each row's last token that is not
padding. Their penultimate representation is therefore ``score``'s input at that
token. This module finds that token the way those models do (the rightmost position
whose ``input_ids`` differ from the config's ``pad_token_id``, which covers left and
right padding; the last position when there is no pad id or the model was given
``inputs_embeds``) and picks those rows from the tapped [B, T, d] tensor, keeping its
graph. It reads attributes only: no ``transformers`` import.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["LastTokenPool", "pools_after_logits"]


def _pad_token_id(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", None)
    if callable(text):
        try:
            config = text()
        except Exception:  # a config without a text part keeps its own pad id
            pass
    pad = getattr(config, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else None


def pools_after_logits(model: nn.Module, layer: nn.Module) -> bool:
    """Whether ``layer`` is the per-token ``score`` layer of a decoder sequence classifier.

    True when ``model`` (unwrapped) is a ``*ForSequenceClassification`` with a config
    and ``layer`` is its top-level ``score`` linear layer, the head that Hugging Face's
    decoder classifiers apply before pooling.

    Example:
        >>> class GPTLikeForSequenceClassification(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.config = type("Config", (), {"pad_token_id": 0})()
        ...         self.score = nn.Linear(4, 2)
        >>> net = GPTLikeForSequenceClassification()
        >>> pools_after_logits(net, net.score), pools_after_logits(nn.Linear(4, 2), net.score)
        (True, False)
    """
    return (
        type(model).__name__.endswith("ForSequenceClassification")
        and getattr(model, "config", None) is not None
        and isinstance(layer, nn.Linear)
        and getattr(model, "score", None) is layer
    )


class LastTokenPool:
    """Pick each row's last non-padding token from the tapped [B, T, d] features.

    A forward pre-hook on the classifier (``with_kwargs=True``) keeps a reference to the
    ``input_ids`` of the forward in progress; :meth:`__call__` turns a [B, T, d] tensor
    into [B, d] at the positions the model pools its logits at, and drops the ids (one
    use per forward). The hook is a handle, removed by :meth:`remove`.

    Args:
        model: The unwrapped decoder classifier (see :func:`pools_after_logits`).

    Example:
        >>> class TinyForSequenceClassification(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.config = type("Config", (), {"pad_token_id": 0})()
        ...         self.embed, self.score = nn.Embedding(5, 3), nn.Linear(3, 2)
        ...     def forward(self, input_ids):
        ...         return self.score(self.embed(input_ids))
        >>> net = TinyForSequenceClassification()
        >>> pool = LastTokenPool(net)
        >>> ids = torch.tensor([[3, 4, 0], [0, 2, 1]])
        >>> hidden = net.embed(ids)
        >>> _ = net(input_ids=ids)
        >>> torch.equal(pool(hidden), torch.stack([hidden[0, 1], hidden[1, 2]]))
        True
        >>> pool.remove()
    """

    def __init__(self, model: nn.Module) -> None:
        self.pad_token_id = _pad_token_id(model)
        self._input_ids: Tensor | None = None
        self._handle: RemovableHandle | None = model.register_forward_pre_hook(
            self._record, with_kwargs=True
        )

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._input_ids = ids if isinstance(ids, Tensor) else None

    def positions(self, batch: int, length: int, device: torch.device) -> Tensor:
        """LongTensor[B]: the token each row's logits are taken at."""
        ids = self._input_ids
        if self.pad_token_id is None or ids is None or tuple(ids.shape) != (batch, length):
            return torch.full((batch,), length - 1, dtype=torch.long, device=device)
        non_pad = (ids.to(device) != self.pad_token_id).to(torch.int32)
        index = torch.arange(length, device=device, dtype=torch.int32)
        return (index * non_pad).argmax(-1).long()

    def __call__(self, z: Tensor) -> Tensor:
        """Return [B, d]: ``z[b, positions[b]]`` for a [B, T, d] ``z`` (other shapes unchanged)."""
        if z.dim() != 3:
            return z
        rows = torch.arange(z.shape[0], device=z.device)
        positions = self.positions(z.shape[0], z.shape[1], z.device)
        self._input_ids = None  # used once: a later call without a forward takes the last token
        return z[rows, positions]

    def remove(self) -> None:
        """Remove the hook and drop the recorded ids; safe to call more than once."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._input_ids = None
