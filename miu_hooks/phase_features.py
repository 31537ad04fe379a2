"""``PhaseFeatures``: the model's features of rows already seen in one critic-tuning phase.

During a tuning phase the model does not change (docs/method.md §3.3: features under
``no_grad``, BatchNorm statistics restored afterwards), so a row of D drawn a second
time in the same phase would get its features from the same weights. When a phase
draws more rows than D holds (the warm-up's N_0 batches on a small D), keeping the
features of each row's first draw saves a model forward for every batch whose rows
were all seen: a phase then costs at most one forward pass over D.

Only where that gives the features a forward would: the first batch drawn again is
still computed and compared with the stored rows (one host read per phase). Where they
differ beyond float round-off (BatchNorm in train mode normalises a row with its
batch's statistics, dropout draws a new mask), nothing is reused in that phase: there,
fresh features per draw are part of what the critics are tuned on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from miu_hooks.data import Batch

__all__ = ["PhaseFeatures"]


class PhaseFeatures:
    """Features of the rows of D (positions ``0..size-1``) drawn so far in one phase.

    Rows are looked up by the batch's host index (``Batch.host_index``, or ``index``
    when it lives on the host), so deciding whether a batch was seen needs no
    device-to-host read. The table is allocated by the first :meth:`store`, in the
    features' dtype on their device. :meth:`lookup` answers only once a batch drawn
    again has been computed and matched its stored rows (:attr:`verified`).

    Args:
        size: |D|, the number of positions.
        steps: The phase's batches; when ``steps`` times the first batch's rows cannot
            exceed ``size``, no row can be drawn twice and no table is kept.
        rtol: Relative tolerance of the check (float round-off of a row computed
            in another batch).
        atol: Absolute tolerance of the check.

    Example:
        >>> memo = PhaseFeatures(size=4)
        >>> b = Batch(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), torch.tensor([1, 3]))
        >>> memo.store(b, torch.tensor([[1.0], [3.0]]))
        >>> memo.lookup(b) is None  # seen, but not yet checked: compute it
        True
        >>> memo.store(b, torch.tensor([[1.0], [3.0]]))  # the same features again
        >>> memo.verified, memo.lookup(b).reshape(-1).tolist()
        (True, [1.0, 3.0])
    """

    def __init__(
        self, size: int, steps: int | None = None, rtol: float = 1e-4, atol: float = 1e-5
    ) -> None:
        self.size = int(size)
        self.steps = steps
        self.rtol, self.atol = float(rtol), float(atol)
        self.table: Tensor | None = None
        self.seen = np.zeros(self.size, dtype=bool)
        #: None until a batch drawn again was compared; False: no reuse in this phase.
        self.verified: bool | None = None
        self.reused = 0  # batches answered from the table

    def _host_index(self, batch: Batch) -> np.ndarray | None:
        """The batch's positions as a NumPy array (host memory: no device read), if valid."""
        host = batch.host_index
        if host is None and batch.index is not None and batch.index.device.type == "cpu":
            host = batch.index
        if host is None or host.dim() != 1 or host.numel() == 0:
            return None
        rows = host.numpy()
        if rows.min() < 0 or rows.max() >= self.size:
            return None
        return rows

    def lookup(self, batch: Batch) -> Tensor | None:
        """The stored features of every row of ``batch``, or ``None`` if one is missing."""
        host = self._host_index(batch)
        if not self.verified or self.table is None or host is None:
            return None
        if not self.seen[host].all():
            return None
        self.reused += 1
        assert batch.index is not None
        return self.table[batch.index.to(self.table.device)]

    def store(self, batch: Batch, z: Tensor) -> None:
        """Keep ``z`` (``[B, d]``) as the features of the batch's rows.

        The first batch whose rows were all stored before is compared instead: it
        decides :attr:`verified` (one host read), and a mismatch frees the table.
        """
        host = self._host_index(batch)
        if self.verified is False or host is None:
            return
        if z.dim() != 2 or z.shape[0] != host.size:
            return
        if self.table is None:
            if self.steps is not None and self.steps * host.size <= self.size:
                self.verified = False  # no row can come back in this phase: keep nothing
                return
            self.table = z.new_empty(self.size, int(z.shape[1]))
        elif self.table.shape[1] != z.shape[1] or self.table.dtype != z.dtype:
            return
        assert batch.index is not None
        index = batch.index.to(self.table.device)
        if self.verified is None and self.seen[host].all():
            stored = self.table[index]
            # The phase's one host read (a device sync on a GPU).
            self.verified = bool(torch.allclose(stored, z.detach(), rtol=self.rtol, atol=self.atol))
            if not self.verified:
                self.table = None
            return
        self.table[index] = z.detach()
        self.seen[host] = True
