"""Every ``docs/method.md §N`` (or §N.M) cited in the project names a section that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "method.md"
CITATION = re.compile(r"method\.md §(\d+)(?:\.(\d+))?", re.IGNORECASE)
HEADING = re.compile(r"^#{2,3} (\d+)(?:\.(\d+))?\.? ", re.MULTILINE)


def _cited() -> dict[tuple[int, int | None], list[str]]:
    found: dict[tuple[int, int | None], list[str]] = {}
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md")]
    for folder in ("miu_hooks", "integrations", "benchmarks", "examples", "tests"):
        files += sorted((ROOT / folder).rglob("*.py"))
    for path in files:
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            key = (int(match.group(1)), int(match.group(2)) if match.group(2) else None)
            found.setdefault(key, []).append(str(path.relative_to(ROOT)))
    return found


def test_method_doc_keeps_sections_1_to_12() -> None:
    headings = {(int(a), int(b) if b else None) for a, b in HEADING.findall(DOC.read_text())}
    assert {(n, None) for n in range(1, 13)} <= headings


def test_every_citation_names_an_existing_section() -> None:
    headings = {(int(a), int(b) if b else None) for a, b in HEADING.findall(DOC.read_text())}
    cited = _cited()
    assert cited, "no section citations found; the pattern no longer matches the code"
    missing = {
        f"§{n}" + (f".{m}" if m else ""): where
        for (n, m), where in cited.items()
        if (n, m) not in headings
    }
    assert not missing, f"cited sections missing from docs/method.md: {missing}"
