"""Where :class:`~miu_hooks.integrations.hf.MIUCallback` sits in the Trainer's callback list.

``Trainer.log`` appends a copy of each log record to ``state.log_history`` and
then hands the record to every callback's ``on_log`` in list order. The
Trainer builds that list as ``[DefaultFlowCallback, <report_to callbacks>,
<user callbacks>, <progress printer>]``, so keys a user callback adds in
``on_log`` reach neither the ``report_to`` backends (they ran already) nor
``log_history``. The MIU callback therefore has to run right after
``DefaultFlowCallback`` (docs/integrations.md §0):

* :func:`place_before_reporters` moves it there; it needs the list, which only
  the Trainer holds (``trainer.callback_handler.callbacks``). This is what
  :func:`~miu_hooks.integrations.hf.prepare_trainer` and ``MIUTrainer`` use.
* :func:`calling_handler` is the fallback for a callback passed in
  ``Trainer(callbacks=[...])`` or ``trainer.add_callback``: the Trainer gives
  callbacks neither itself nor its handler, so the handler is found on the call
  stack while it dispatches one of the callback's events. When it is not found
  (another caller, a changed Trainer), the caller logs a warning and the
  ``miu/*`` keys still reach ``log_history``, only not the reporters.
"""

from __future__ import annotations

import inspect
from typing import Any

from miu_hooks._imports import require

require("transformers", extra="hf")
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback  # noqa: E402

__all__ = ["calling_handler", "place_before_reporters"]

_MAX_FRAMES = 6  # handler.call_event -> handler.on_<event> -> callback.on_<event> -> ...


def place_before_reporters(callbacks: list[Any], callback: Any) -> None:
    """Move ``callback`` right after the last ``DefaultFlowCallback`` of ``callbacks``, in place.

    ``callback`` is inserted when it is not in the list yet; it goes first when
    there is no ``DefaultFlowCallback``.

    Example:
        >>> from transformers import TrainerCallback
        >>> class Reporter(TrainerCallback): ...
        >>> class Mine(TrainerCallback): ...
        >>> callbacks = [DefaultFlowCallback(), Reporter(), mine := Mine()]
        >>> place_before_reporters(callbacks, mine)
        >>> [type(cb).__name__ for cb in callbacks]
        ['DefaultFlowCallback', 'Mine', 'Reporter']
    """
    for i, cb in enumerate(callbacks):
        if cb is callback:
            del callbacks[i]
            break
    flows = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
    callbacks.insert(flows[-1] + 1 if flows else 0, callback)


def calling_handler(callback: Any) -> CallbackHandler | None:
    """The Trainer's ``CallbackHandler`` now dispatching an event to ``callback``, if any.

    Call it from inside one of ``callback``'s ``on_<event>`` methods. It looks
    at the few frames above it for a ``CallbackHandler`` (the frame's ``self``)
    whose list holds ``callback``; it returns ``None`` when there is none, e.g.
    when the event was called by hand.

    Example:
        >>> from transformers import TrainerCallback, TrainerControl
        >>> class Probe(TrainerCallback):
        ...     def on_train_begin(self, args, state, control, **kwargs):
        ...         self.handler = calling_handler(self)
        >>> probe = Probe()
        >>> handler = CallbackHandler([DefaultFlowCallback(), probe], None, None, None, None)
        >>> _ = handler.on_train_begin(None, None, TrainerControl())
        >>> probe.handler is handler
        True
        >>> probe.on_train_begin(None, None, TrainerControl())  # not called by a handler
        >>> probe.handler is None
        True
    """
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        for _ in range(_MAX_FRAMES):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and any(cb is callback for cb in owner.callbacks):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold references to their locals
