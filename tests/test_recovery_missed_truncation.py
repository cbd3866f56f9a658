"""Recovery with segments that missed an earlier recovery's truncation (invariant 10).

A truncation range is recorded at a write quorum, so up to two segments of a PG (an AZ)
can miss it: they were down during that recovery. When they come back they still hold the
annulled records as chain-complete, until gossip or the writer tells them the range. The
annulled records' volume backlinks are the same as the newer epoch's first records (both
point at the VDL where the truncation starts), so a recovery that fences such a segment
before it learned the range must not walk down them.

The storage nodes here gossip only once an hour, so "before gossip told them" is certain.
"""

from __future__ import annotations

import pytest

from engine.errors import KeyNotFound, WriteQuorumUnavailable
from tests.harness import StorageCluster
from tests.writer_harness import WriterProcess


@pytest.fixture
def quiet_cluster(tmp_path):
    cluster = StorageCluster(tmp_path / "nodes", env={"AURORA_SN_GOSSIP_INTERVAL_S": "3600"})
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def test_recovery_ignores_records_a_returning_az_missed_the_truncation_of(quiet_cluster, tmp_path):
    """Scenario: az-c alone takes a commit that never reaches quorum ("lost"); the writer
    dies; az-c goes down; recovery annuls "lost" on sn1-sn4; the new writer acknowledges
    "acked" and dies before another Append; az-c returns still holding "lost"; the next
    recovery must keep "acked" and must not bring "lost" back."""
    cluster = quiet_cluster
    w = WriterProcess(cluster, tmp_path / "writer", volume="missed", lal=1000)
    try:
        w.start()
        with w.client() as db:
            for i in range(10):
                db.put(b"k%d" % i, b"v")
        for name in ("sn1", "sn2", "sn3", "sn4"):
            cluster.pause(name)
        with w.client() as db:
            with pytest.raises(WriteQuorumUnavailable):
                db.put(b"lost", b"x", timeout_s=1)   # stored on sn5 and sn6 only
        w.kill()
        cluster.kill("sn5")
        cluster.kill("sn6")
        # Killed and restarted, not resumed: a stopped node's kernel keeps the writer's
        # Appends of "lost" in its socket buffer, and a resumed node could still store
        # them (the epoch is not fenced yet), so "lost" would reach a write quorum and
        # rightly survive. A killed process's buffered requests die with it.
        for name in ("sn1", "sn2", "sn3", "sn4"):
            cluster.kill(name)
        for name in ("sn1", "sn2", "sn3", "sn4"):
            cluster.start_node(name)
        w.start()                                    # truncates "lost" at sn1-sn4
        with w.client() as db:
            assert db.put(b"acked", b"yes")
        w.kill()                                     # before any Append carries the new VDL
        cluster.start_node("sn5")
        cluster.start_node("sn6")
        w.start()
        with w.client() as db:
            assert db.get(b"acked") == b"yes", "an acknowledged commit was lost"
            with pytest.raises(KeyNotFound):
                db.get(b"lost")                      # annulled by the earlier recovery
            assert [k for k, _ in db.scan()] == [b"acked"] + [b"k%d" % i for i in range(10)]
        assert not w.error_lines(), w.error_lines()[:5]
    finally:
        w.close()
