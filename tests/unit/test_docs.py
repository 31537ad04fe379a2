"""Every ``docs/*.md §N`` (or §N.M) cited in the project names a section that exists.

And nothing cites a document that does not ship with the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "method.md"
CITATION = re.compile(r"method\.md §(\d+)(?:\.(\d+))?", re.IGNORECASE)
INTEGRATIONS_CITATION = re.compile(r"integrations\.md §(\d+)(?:\.(\d+))?", re.IGNORECASE)
HEADING = re.compile(r"^#{2,3} (\d+)(?:\.(\d+))?\.? ", re.MULTILINE)
# Documents of the project's making that are not in the repository.
NOT_SHIPPED = re.compile(
    r"\b(?:METHOD|INTEGRATION|STYLE|DEPENDENCIES)(?:\.md\b| §)|shared/docs"
)


def _files() -> list[Path]:
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md")]
    for folder in ("miu_hooks", "integrations", "benchmarks", "examples", "tests"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def _cited(pattern: re.Pattern[str] = CITATION) -> dict[tuple[int, int | None], list[str]]:
    found: dict[tuple[int, int | None], list[str]] = {}
    for path in _files():
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
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


def test_every_integrations_citation_names_an_existing_section() -> None:
    text = (ROOT / "docs" / "integrations.md").read_text()
    headings = {(int(a), int(b) if b else None) for a, b in HEADING.findall(text)}
    cited = _cited(INTEGRATIONS_CITATION)
    assert cited, "no docs/integrations.md citations found; the pattern no longer matches"
    missing = {f"§{n}" + (f".{m}" if m else "") for (n, m) in cited if (n, m) not in headings}
    assert not missing, f"cited sections missing from docs/integrations.md: {missing}"


def test_nothing_cites_a_document_that_does_not_ship() -> None:
    this = Path(__file__).resolve()
    bad = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in _files()
        if path.resolve() != this
        for match in NOT_SHIPPED.finditer(path.read_text(encoding="utf-8"))
    ]
    assert not bad, f"citations of documents that are not in the repository: {bad}"
