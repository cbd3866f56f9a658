"""Planted bugs: test-only switches that break a guarantee ON PURPOSE, off by default.

They exist so the reliability suite can prove that its checkers catch real bugs
(tests/test_chaos_planted.py): each test plants one bug, runs a scenario and expects a
checker to REPORT the violation; the same scenario without the bug must pass. Never set
them outside such a test. Both are read once, at import, from the environment of the
process that has the code (a storage node, the writer).

    variable                        where              what breaks
    AURORA_BUG_ACK_BEFORE_COMMIT=S  storage_node/node  a storage node acks an Append from
                                                       memory and commits it to LMDB only S
                                                       seconds later (invariant 3)
    AURORA_BUG_VDL_SHORT_QUORUM=1   engine/quorum      PGCL is the (Vw-1)-th highest SCL, so
                                                       VDL passes records that only 3 of 6
                                                       segments hold (invariant 5)
"""

from __future__ import annotations

import logging
import os

ACK_BEFORE_COMMIT_ENV = "AURORA_BUG_ACK_BEFORE_COMMIT"
VDL_SHORT_QUORUM_ENV = "AURORA_BUG_VDL_SHORT_QUORUM"

log = logging.getLogger("aurora_lite.planted_bugs")


def ack_before_commit_s() -> float:
    """Seconds a storage node defers its LMDB commit after acking (0: bug not planted)."""
    raw = os.environ.get(ACK_BEFORE_COMMIT_ENV, "")
    return float(raw) if raw else 0.0


def vdl_short_quorum() -> bool:
    return os.environ.get(VDL_SHORT_QUORUM_ENV, "") not in ("", "0")


def warn_if_planted(where: str) -> None:
    """One WARNING line per process with a planted bug, so a log shows it was on purpose."""
    if ack_before_commit_s() or vdl_short_quorum():
        log.warning("%s runs with a PLANTED BUG (%s=%s, %s=%s): test only", where,
                    ACK_BEFORE_COMMIT_ENV, os.environ.get(ACK_BEFORE_COMMIT_ENV, ""),
                    VDL_SHORT_QUORUM_ENV, os.environ.get(VDL_SHORT_QUORUM_ENV, ""))
