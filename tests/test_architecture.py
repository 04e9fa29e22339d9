"""docs/architecture.md kept true by the code, as docs/config.md is: every module and public name its module
tables cite exists, and every module of the library and of benchmarks/ has its row."""

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "architecture.md").read_text()


def _table(heading: str) -> list[tuple[str, str]]:
    """(first cell, second cell) of every row of the table under ``heading``."""
    section = DOC.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append((cells[0], cells[1]))
    return rows


def _names(cell: str) -> list[str]:
    """The identifiers a cell cites in backticks (``load_backbone(cfg)`` -> ``load_backbone``; ``main``'s
    command list is not a name)."""
    names = []
    for quoted in re.findall(r"`([^`]+)`", cell):
        match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", quoted)
        if match and not quoted.startswith("fuss "):
            names.append(match.group(0))
    return names


LIBRARY = _table("## `fuss_components` modules (public surface)")
BENCHMARKS = _table("## `benchmarks` (drivers, not library)")


def _modules(cell: str) -> list[str]:
    return [m.strip("` ") for m in cell.split(",")]


@pytest.mark.parametrize("package, rows", [("fuss_components", LIBRARY), ("benchmarks", BENCHMARKS)])
def test_every_cited_module_and_name_exists(package, rows):
    assert rows
    missing = []
    for modules, names in rows:
        for module in _modules(modules):
            mod = importlib.import_module(f"{package}.{module}")
            missing += [f"{package}.{module}.{n}" for n in _names(names) if not hasattr(mod, n)]
    assert not missing, f"docs/architecture.md cites names the code does not have: {missing}"


@pytest.mark.parametrize("package, rows", [("fuss_components", LIBRARY), ("benchmarks", BENCHMARKS)])
def test_every_module_has_its_row(package, rows):
    cited = {m for modules, _ in rows for m in _modules(modules)}
    files = {p.stem for p in (REPO / package).glob("*.py") if not p.stem.startswith("_")}
    assert files - cited == set(), f"modules missing from docs/architecture.md: {sorted(files - cited)}"
    assert cited - files == set(), f"docs/architecture.md cites modules that do not exist: {sorted(cited - files)}"
