"""Torch-free checks of ``miu-unlearn`` data that need more than one input.

Run by :func:`miu_hooks.cli.inputs.prepare` before anything heavy is imported:
group ids must name their labels (``group // S == label``, g = s + y·S), and
``--group-names`` must name every group.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from miu_hooks.cli.data_index import DataIndex
from miu_hooks.errors import ConfigError, GroupRangeError

__all__ = ["check_group_names", "check_labels_match_groups", "row_name"]


def row_name(index: DataIndex, row: int) -> str:
    """``row 4 (id 104)``: a sample by its row (from 0, header not counted) and id, if any."""
    return f"row {row}" + (f" (id {int(index.ids[row])})" if index.ids is not None else "")


def check_labels_match_groups(index: DataIndex, num_sensitive: int, what: str = "data") -> None:
    """Refuse group ids that contradict their labels: ``group // S`` must be the label.

    Group ids are ``g = s + y·S`` (S values of the sensitive attribute), so a
    row with label 0 and group 7 (S = 2) claims y = 3. Negative ids are left to
    the range check.

    Raises:
        GroupRangeError: Rows whose group names another label (the first five shown).

    Example:
        >>> from pathlib import Path
        >>> idx = DataIndex(Path("d.csv"), "manifest", {}, np.array([0, 1, 0]),
        ...                 np.array([1, 2, 7]))
        >>> check_labels_match_groups(idx, 2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        miu_hooks.errors.GroupRangeError: --data d.csv: 1 group id contradicts its label ...
    """
    s = int(num_sensitive)
    wrong = np.nonzero((index.groups >= 0) & (index.groups // s != index.labels))[0]
    if not len(wrong):
        return
    shown = "; ".join(
        f"{row_name(index, int(r))} has label {int(index.labels[r])} and group "
        f"{int(index.groups[r])} (y = {int(index.groups[r]) // s})"
        for r in wrong[:5]
    )
    more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
    plural = len(wrong) > 1
    raise GroupRangeError(
        f"--{what} {index.path}: {len(wrong)} group id{'s' if plural else ''} "
        f"contradict{'' if plural else 's'} {'their' if plural else 'its'} label (groups are "
        f"s + y·S with S = {s}, so group // {s} must be the label): {shown}{more} (rows count "
        "from 0, header not counted); fix the groups, or set --num-sensitive"
    )


def check_group_names(names: Sequence[str], num_groups: int) -> None:
    """Refuse ``--group-names`` that do not name each of the ``num_groups`` groups once.

    Raises:
        ConfigError: Too few or too many names (a usage error).

    Example:
        >>> check_group_names(["a", "b"], 4)
        Traceback (most recent call last):
        ...
        miu_hooks.errors.ConfigError: --group-names gives 2 names for 4 groups (ids 0..3): ...
    """
    if names and len(names) != num_groups:
        raise ConfigError(
            f"--group-names gives {len(names)} names for {num_groups} groups (ids "
            f"0..{num_groups - 1}): give one name per group id, in order, or set --num-groups"
        )
