"""The installed environment is the tested one: constraints.txt pins every distribution installed with the
project, and the versions installed are those pins (scripts/setup.sh installs with them)."""

import re
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_canonical(name)] = version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements) -> set[str]:
    return {_canonical(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in requirements or []}


def test_every_dependency_of_the_project_is_pinned():
    requires = metadata.requires("fuss-components")
    names = _requirement_names(r for r in requires if "extra ==" not in r or
                               any(f'extra == "{e}"' in r for e in ("dev", "bench", "onnx", "tracking")))
    assert names and names <= set(_pins()), sorted(names - set(_pins()))


def test_installed_versions_are_the_pinned_ones():
    pins = _pins()
    installed = {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {name: (installed[name], pin) for name, pin in pins.items() if name in installed and installed[name] != pin}
    if not (REPO / ".venv").is_dir() and wrong:  # not the project's own environment (e.g. a site's other venv)
        pytest.skip(f"not installed with constraints.txt: {sorted(wrong)[:5]}")
    assert not wrong, f"installed != constraints.txt (regenerate it or reinstall with scripts/setup.sh): {wrong}"
