"""README's tables match the code: the CLI's exit codes and settings options, default keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from miu_hooks.cli.errors import EXIT_CODES
from miu_hooks.cli.options import setting_options, settings_sections
from miu_hooks.data import INPUT_KEYS, LABEL_KEYS

pytestmark = pytest.mark.unit

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def _exit_table() -> dict[int, str]:
    start = README.index("| exit | meaning |")
    rows = README[start:].split("\n\n", 1)[0].splitlines()[2:]
    codes: dict[int, str] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        for code, meaning in zip(cells[::2], cells[1::2], strict=True):
            numbers = [int(n) for n in re.findall(r"\d+", code)]
            meanings = [m.strip() for m in meaning.split(" / ")] if len(numbers) > 1 else [meaning]
            for n in numbers:
                codes[n] = meanings[min(numbers.index(n), len(meanings) - 1)]
    return codes


def test_the_exit_code_table_lists_every_code_once() -> None:
    table = _exit_table()
    assert sorted(table) == sorted(code for code, _, _ in EXIT_CODES)
    # spot checks that the meaning is the code's
    assert "contradicts its label" in table[10]
    assert "replaceable" in table[14]
    assert "do not fit the model" in table[19]
    assert "NaN/Inf in the input data" in table[20]


def test_the_default_keys_of_mapping_items_are_the_codes() -> None:
    listed = re.search(r"tuples or mappings \(([^,]+),\s+([^,]+), `group`", README)
    assert listed is not None
    inputs = re.findall(r"`(\w+)`", listed.group(1))
    labels = re.findall(r"`(\w+)`", listed.group(2))
    assert tuple(inputs) == INPUT_KEYS and tuple(labels) == LABEL_KEYS


def test_the_settings_option_table_is_the_generated_options() -> None:
    # One row per --help section: the classes that have the fields, then their options.
    start = README.index("| settings | options |")
    rows = README[start:].split("\n\n", 1)[0].splitlines()[2:]
    table = []
    for row in rows:
        classes, options = (c.strip() for c in row.strip().strip("|").split("|"))
        table.append((re.findall(r"`(\w+Config)`", classes), re.findall(r"`(--[\w-]+)`", options)))
    generated = [
        (re.findall(r"\w+Config", title.rsplit("(", 1)[1]), options)
        for title, options in settings_sections(setting_options()).items()
    ]
    assert table == generated
