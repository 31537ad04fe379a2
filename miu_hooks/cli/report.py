"""Presenting a ``miu-unlearn`` run: console output, ``report.md`` and ``groups.png``.

Nothing here imports torch at module import (the metrics table helper is
imported when a report is rendered). Progress bars use tqdm when it is installed (the
``demo`` extra) and are silent with ``--quiet``; ``groups.png`` needs matplotlib
(the ``plot`` extra) and is skipped with a note otherwise.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Console",
    "guard_summary",
    "per_group_markdown",
    "plot_groups",
    "render_markdown",
]

T = TypeVar("T")


class Console:
    """Messages and progress bars on stderr; silent when ``quiet``.

    Args:
        quiet: Print nothing (errors are printed by the command line itself).
        bars: Draw tqdm progress bars; ``None`` draws them when stderr is a
            terminal and tqdm is installed, and prints one line per phase and
            epoch otherwise (logs and CI stay readable).
    """

    def __init__(self, quiet: bool = False, bars: bool | None = None) -> None:
        self.quiet = quiet
        if bars is None:
            bars = sys.stderr.isatty()
        self._tqdm: Any = None
        if bars and not quiet:
            with contextlib.suppress(ImportError):
                import tqdm

                self._tqdm = tqdm.tqdm

    def log(self, message: str) -> None:
        """Print one line to stderr."""
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def progress(self, iterable: Iterable[T], desc: str) -> Iterable[T]:
        """Wrap ``iterable`` with a transient progress bar (``unlearn``'s ``progress``)."""
        if self._tqdm is None:
            return iterable
        return self._tqdm(iterable, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    @contextlib.contextmanager
    def counter(self, total: int, desc: str) -> Iterator[Callable[[int], None]]:
        """Yield ``show(done)``, which sets a transient bar of ``total`` steps to ``done``.

        ``done`` is absolute, so a resumed run counts on from where it stopped.

        Example:
            >>> import contextlib, io
            >>> err = io.StringIO()
            >>> with contextlib.redirect_stderr(err):
            ...     with Console(bars=False).counter(6, "miu epochs") as show:
            ...         show(5); show(6)
            >>> err.getvalue().splitlines()
            ['miu epochs: 5/6', 'miu epochs: 6/6']
        """
        if self._tqdm is None:
            yield lambda done: self.log(f"{desc}: {done}/{total}")
            return
        bar = self._tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

        def show(done: int) -> None:
            bar.n = done
            bar.refresh()

        try:
            yield show
        finally:
            bar.close()

    def steps(self, names: Sequence[str], desc: str) -> Iterator[str]:
        """Yield ``names`` under one persistent bar: the phases of a run."""
        if self._tqdm is None:
            for name in names:
                self.log(f"{desc}: {name}")
                yield name
            return
        bar = self._tqdm(total=len(names), desc=desc, file=sys.stderr, dynamic_ncols=True)
        try:
            for name in names:
                bar.set_postfix_str(name)
                yield name
                bar.update(1)
        finally:
            bar.close()


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def per_group_markdown(
    models: Mapping[str, Mapping[str, Any]], names: Sequence[str], digits: int = 2
) -> str:
    """Return a markdown table: one row per model, one column per group (accuracy x100).

    Example:
        >>> print(per_group_markdown({"m": {"per_group": {"0": 50.0, "1": None}}}, ["a", "b"]))
        | model | a | b |
        |---|---:|---:|
        | m | 50.00 | - |
    """
    lines = ["| model | " + " | ".join(names) + " |", "|---" + "|---:" * len(names) + "|"]
    for model, rep in models.items():
        per = rep.get("per_group", {})
        cells = [_fmt(per.get(str(g), per.get(g)), digits) for g in range(len(names))]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _counts_markdown(report: Mapping[str, Any]) -> str:
    groups = report["groups"]
    lines = ["| group | in data | forgotten | retained |", "|---|---:|---:|---:|"]
    for g, name in enumerate(groups["names"]):
        c = groups["counts"][str(g)]
        lines.append(f"| {name} | {c['total']} | {c['forget']} | {c['retain']} |")
    return "\n".join(lines)


def _ledger_markdown(report: Mapping[str, Any]) -> list[str]:
    entries = report.get("ledger")
    if not entries:
        return []
    original = report["original"]
    lines = [
        "## Deletion requests (ledger.json, forgotten.csv)",
        "",
        f"Calibrated against the original model `{original['path']}` (sha256 "
        f"`{original['sha256'][:16]}…`); {report['forgotten']} ids forgotten in all.",
        "",
        "| request | ids | new ids | forgotten | method | model in | model out | finished |",
        "|---:|---:|---:|---:|---|---|---|---|",
    ]
    for k, e in enumerate(entries, 1):
        lines.append(
            f"| {k} | {len(e['ids'])} | {len(e['new_ids'])} | {e['forgotten']} | {e['method']} "
            f"| `{e['model_in_sha256'][:12]}` | `{e['model_out_sha256'][:12]}` "
            f"| {e['finished_at']} |"
        )
    return [*lines, ""]


def guard_summary(guard: Mapping[str, Any] | None) -> str:
    """One line on the collapse guard of a run (``report.json``'s ``guard``).

    Example:
        >>> guard_summary(None)
        'Collapse guard: off'
        >>> guard_summary({"enabled": True, "fired": False, "source": "val", "samples": 50,
        ...                "original_accuracy": 90.0, "accuracies": [89.0, 88.5],
        ...                "threshold": 10.0})
        'Collapse guard: passed (val, 50 samples: original 90.0, last epoch 88.5, threshold 10)'
    """
    if not guard or not guard.get("enabled"):
        reason = (guard or {}).get("reason")
        return f"Collapse guard: off ({reason})" if reason else "Collapse guard: off"
    if guard.get("fired"):
        return f"Collapse guard: FIRED: {guard['message']}"
    accs = guard.get("accuracies") or []
    last = f", last epoch {accs[-1]:.1f}" if accs else ""
    return (
        f"Collapse guard: passed ({guard['source']}, {guard['samples']} samples: original "
        f"{guard['original_accuracy']:.1f}{last}, threshold {guard['threshold']:g})"
    )


def render_markdown(report: Mapping[str, Any], notes: Sequence[str] = ()) -> str:
    """Return ``report.md``: summary, metrics, per-group accuracy before/after, counts."""
    from miu_hooks.evaluation import format_table

    models = report["models"]
    refs = {k: models[k] for k in report["references"]}
    on = report["evaluated_on"]
    inputs = report["inputs"]
    request = report.get("request", {})
    lines = [
        f"# miu-unlearn report: {report['method']}",
        "",
        f"- model: `{inputs['model']}` (sha256 `{inputs['model_sha256'][:16]}…`)",
        f"- forget list: `{inputs['forget']}` ({request.get('ids', report['forgotten'])} ids, "
        f"sha256 `{inputs['forget_sha256'][:16]}…`)",
        f"- data: `{inputs['data']}`; accuracy per group on the {on} set",
        f"- EO and GA refer to group(s) {', '.join(map(str, report['forget_groups']))}",
        f"- miu_hooks {report['miu_hooks_version']}, wall time {report['wall_s']:.1f} s",
        f"- {guard_summary(report.get('guard'))}",
        "",
        "## Metrics (x100)",
        "",
        format_table(models, references=refs or None),
        "",
        f"## Per-group accuracy, {on} set (before = original, after = unlearned)",
        "",
        per_group_markdown(models, report["groups"]["names"]),
        "",
        "## Samples per group",
        "",
        _counts_markdown(report),
        "",
        *_ledger_markdown(report),
    ]
    if on != "test":
        lines += ["Pass `--test` for TA, MIA, EO, GA and Gap/ToW.", ""]
    lines += [f"Note: {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def plot_groups(report: Mapping[str, Any], path: Path) -> bool:
    """Draw per-group accuracy of every model as grouped bars; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = report["groups"]["names"]
    models = report["models"]
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names)), 3.6))
    try:
        for i, (model, rep) in enumerate(models.items()):
            per = rep["per_group"]
            values = [per.get(str(g)) or 0.0 for g in range(len(names))]
            ax.bar(
                [g + (i - (len(models) - 1) / 2) * width for g in range(len(names))],
                values,
                width,
                label=model,
            )
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel(f"{report['evaluated_on']} accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"Per-group accuracy, {report['method']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return True


def dump_json(data: Any) -> str:
    """Return ``data`` as indented JSON with a trailing newline."""
    return json.dumps(data, indent=2, sort_keys=False) + "\n"
