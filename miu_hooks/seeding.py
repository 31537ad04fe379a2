"""One seed per (run seed, epoch, stream): every random draw of a run derives from it.

Samplers, random labels and the per-epoch global seed (dropout) all call
:func:`epoch_seed`, so a run's randomness is a pure function of the config's
seed and the epoch: a resumed run draws what an uninterrupted one would, and
every process of a distributed run draws the same stream.
"""

from __future__ import annotations

import torch

__all__ = ["GUARD_STREAM", "RANDOM_LABELS_STREAM", "REINIT_STREAM", "epoch_generator", "epoch_seed"]

_MAX_SEED = 2**63 - 1
_STREAM_STRIDE = 2_147_483_647  # a prime; stream k never meets stream 0 below 2**31 epochs

#: Stream of the random labels of RL and SalUn (independent of the loaders' order).
RANDOM_LABELS_STREAM = 1
#: Stream of the collapse guard's held-out slice.
GUARD_STREAM = 2
#: Stream of Retrain's re-initialisation.
REINIT_STREAM = 3


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """Return the seed of ``epoch`` in random ``stream`` of a run seeded with ``seed``.

    ``seed * 1_000_003 + epoch + stream * (2**31 - 1)``, reduced modulo ``2**63 - 1``
    (the range ``torch.Generator.manual_seed`` accepts).

    Example:
        >>> epoch_seed(1, 2)
        1000005
        >>> epoch_seed(1, 2) != epoch_seed(1, 2, stream=1)
        True
    """
    return (int(seed) * 1_000_003 + int(epoch) + int(stream) * _STREAM_STRIDE) % _MAX_SEED


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """Return a CPU generator seeded with :func:`epoch_seed`.

    Example:
        >>> a = torch.randint(0, 9, (4,), generator=epoch_generator(1, 2))
        >>> b = torch.randint(0, 9, (4,), generator=epoch_generator(1, 2))
        >>> bool((a == b).all())
        True
    """
    gen = torch.Generator()
    gen.manual_seed(epoch_seed(seed, epoch, stream))
    return gen
