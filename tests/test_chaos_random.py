"""A seeded random fault schedule on harness processes: the long version of the matrix.

Skipped by the default run; enable with ``AURORA_CHAOS_LONG_S=<seconds>`` (and replay a
failure with ``AURORA_SEED=<seed>``)::

    AURORA_CHAOS_LONG_S=120 AURORA_SEED=5 .venv/bin/python -m pytest tests/test_chaos_random.py

`aurora-lite chaos` runs the same kind of schedule on a control-plane cluster (with
automatic failover); this one keeps the writer's name fixed (no control plane: a killed
writer is restarted and runs recovery).
"""

from __future__ import annotations

import os

import pytest

from engine.chaos.nemesis import DEFAULT_FAULTS, seed_from_env
from tests.chaos_harness import ChaosRun

LONG_S = float(os.environ.get("AURORA_CHAOS_LONG_S", "0") or 0)


@pytest.mark.skipif(LONG_S <= 0, reason="long chaos run: set AURORA_CHAOS_LONG_S=<seconds>")
@pytest.mark.timeout(int(LONG_S * 3 + 300) if LONG_S > 0 else 300)
def test_random_schedule(tmp_path):
    """Scenario: a random schedule of every fault kind (seeded) for AURORA_CHAOS_LONG_S
    seconds under the bank + register + reads workload, then heal: every checker green."""
    seed = seed_from_env()
    run = ChaosRun(tmp_path, seed, replicas=1)
    try:
        run.start()
        schedule = run.nemesis.random_schedule(LONG_S, DEFAULT_FAULTS)
        for step in schedule:
            run.nemesis.note("scheduled: " + step.describe())
        run.nemesis.run_schedule(schedule)
        run.assert_green(allow_log=[r"(checksum|corrupt|quarantin|cannot be rebuilt)"])
    finally:
        run.close()
