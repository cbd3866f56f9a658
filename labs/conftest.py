"""Fixtures every lab's tests share; the grader reads the markers this file records."""

from __future__ import annotations

import os
import random

import pytest


@pytest.fixture(autouse=True)
def _record_lab_markers(request):
    """Write the test's lab markers (given, processes) into the JUnit XML for the grader."""
    names = sorted({m.name for m in request.node.iter_markers() if m.name in ("given", "processes")})
    request.node.user_properties.append(("lab_markers", ",".join(names)))


@pytest.fixture
def seed():
    """A random seed, printed so the grader shows it with the command that replays it."""
    value = int(os.environ.get("AURORA_TEST_SEED", random.randrange(1 << 32)))
    print(f"seed={value} (replay with AURORA_TEST_SEED={value})")
    return value


@pytest.fixture
def cluster(tmp_path):
    """A real cluster started through the CLI (labs/support.py), torn down after the test."""
    from labs.support import CliCluster

    c = CliCluster(tmp_path / "cluster")
    try:
        c.up()
        yield c
    finally:
        c.down()
