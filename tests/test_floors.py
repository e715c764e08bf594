"""The dependency floors CI tests (`.ci/floors.txt`) are the ones pyproject.toml declares, and nothing lower."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
# The floors `.ci/floors.txt` must pin; numpy is pinned there for another reason (its comment says why).
FLOORED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets")


def _declared_floors() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    floors = {}
    for text in requirements:
        requirement = Requirement(text)
        for specifier in requirement.specifier:
            if specifier.operator == ">=":
                floors[requirement.name.lower()] = specifier.version
    return floors


def _pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_the_floor_leg_pins_exactly_the_declared_floors():
    declared, pinned = _declared_floors(), _pinned()
    for name in FLOORED:
        assert name in declared, f"pyproject.toml declares no floor (>=) for {name}"
        assert name in pinned and Version(pinned[name]) == Version(declared[name]), (
            f"{name}: pyproject.toml allows >={declared[name]} but .ci/floors.txt tests {pinned.get(name)}"
        )
