"""A benchmark script's raw record and report: one JSON and one Markdown file, atomically."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from miu_hooks.atomic import atomic_write_text


def run_meta(script: str, start: float, json_path: Path, **extra: Any) -> dict[str, Any]:
    """The command that ran ``benchmarks/<script>``, its date, wall time and machine."""
    return {"command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]),
            "date": datetime.date.today().isoformat(), "wall_s": time.perf_counter() - start,
            "machine": platform.machine(), "torch": torch.__version__, **extra,
            "json": json_path.name}  # fmt: skip


def write_record(out: Path, json_path: Path, raw: dict[str, Any],
                 render: Callable[[dict[str, Any]], str]) -> str:  # fmt: skip
    """Write the raw record to ``json_path`` and its report to ``out``; print the report."""
    atomic_write_text(json_path, json.dumps(raw, separators=(",", ":")))
    text = render(raw)
    atomic_write_text(out, text)
    print(text)
    return text


def rerender(out: Path, record: Path, render: Callable[[dict[str, Any]], str]) -> None:
    """Write ``out`` again from a raw record alone (no runs)."""
    atomic_write_text(out, render(json.loads(record.read_text())))


def add_report_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """``--out`` (the report; its record is the same name with ``.json``) and ``--from-json``."""
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--from-json", type=Path, help="re-render --out from a record, no runs")


def rerendered(args: argparse.Namespace, render: Callable[[dict[str, Any]], str]) -> bool:
    """Re-render ``args.out`` when ``--from-json`` was given; whether it was."""
    if args.from_json is None:
        return False
    rerender(args.out, args.from_json, render)
    return True
