"""Docs that drifted from the code (issue 15, section 4): each check fails if they drift again.

- every command-line option a pytest marker's description names exists;
- no test module skips itself as "not built yet" (everything it needs is built);
- (every module being in ARCHITECTURE.md's code map is tests/test_layers.py's job.)
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _markers() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]


def test_marker_descriptions_name_only_options_that_exist(pytestconfig):
    named = [(m, opt) for m in _markers() for opt in re.findall(r"(--[a-z][a-z0-9-]+)", m)]
    assert named, "expected the slow marker to say how to run slow tests"
    for marker, opt in named:
        try:
            pytestconfig.getoption(opt)
        except ValueError:
            pytest.fail(f"pyproject marker {marker!r} names {opt}, which pytest does not know")


def test_no_test_module_skips_itself_as_not_built():
    stale = [p.name for p in sorted((ROOT / "tests").glob("test_*.py"))
             if p.name != Path(__file__).name and "not built yet" in p.read_text()]
    assert not stale, f"stale 'not built yet' skips in {stale}"
