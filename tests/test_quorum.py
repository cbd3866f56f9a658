"""Tests of engine/writer/quorum.py: the SCL -> PGCL -> VCL -> VDL state machine (invariants 2, 5)."""

import random

import pytest

from engine.writer.quorum import CommitQueue, QuorumTracker
from engine.format.volume import VW

NODES = ("sn1", "sn2", "sn3", "sn4", "sn5", "sn6")


def ack_all(tracker, pg, scl, nodes=NODES[:VW]):
    for node in nodes:
        tracker.ack(node, pg, scl)


def test_worked_example_vdl_p17():
    """Scenario: CPLs at 900, 1000 and 1100, log complete up to 1007 -> VDL 1000 [P17 4.1]."""
    t = QuorumTracker(NODES)
    for lsn in range(1, 1201):
        t.record_sent(lsn, pg=0, is_cpl=lsn in (900, 1000, 1100))
    ack_all(t, 0, 1007)
    assert t.vcl == 1007
    assert t.vdl == 1000


def test_worked_example_vcl_p18():
    """Scenario: PG1 holds odd LSNs, PG2 even ones; PGCL 103 and 104 give VCL 104 [P18 2.3]."""
    t = QuorumTracker(NODES)
    for lsn in range(1, 111):
        t.record_sent(lsn, pg=1 if lsn % 2 else 2, is_cpl=True)
    ack_all(t, 1, 103)
    ack_all(t, 2, 104)
    assert t.pgcl == {1: 103, 2: 104}
    assert t.vcl == 104
    assert t.vdl == 104


def test_three_acks_are_not_a_quorum():
    """Scenario: three segments of six hold a record: it is not durable; the fourth makes it."""
    t = QuorumTracker(NODES)
    t.record_sent(1, 0, True)
    for node in NODES[:VW - 1]:
        assert not t.ack(node, 0, 1)
    assert t.vdl == 0
    assert t.ack(NODES[VW - 1], 0, 1)
    assert t.vdl == 1


def test_reordered_lower_scl_is_ignored():
    """Scenario: a late reply reports an older SCL: nothing moves backwards (invariant 5)."""
    t = QuorumTracker(NODES)
    for lsn in (1, 2, 3):
        t.record_sent(lsn, 0, True)
    ack_all(t, 0, 3)
    assert t.vdl == 3
    ack_all(t, 0, 1)
    assert t.vdl == 3 and t.pgcl[0] == 3


def test_vdl_tails_track_each_pg_at_vdl():
    """Scenario: each PG's newest record at or below VDL is known, for reads' min_scl."""
    t = QuorumTracker(NODES)
    t.record_sent(1, 0, False)
    t.record_sent(2, 1, True)     # MTR 1 = {1, 2}
    t.record_sent(3, 0, False)    # MTR 2 = {3, 4}, not yet durable
    t.record_sent(4, 1, True)
    ack_all(t, 0, 3)
    ack_all(t, 1, 2)
    assert t.vcl == 3 and t.vdl == 2
    assert t.min_scl_for_read(0) == 1 and t.min_scl_for_read(1) == 2
    ack_all(t, 1, 4)
    assert t.vdl == 4
    assert t.min_scl_for_read(0) == 3 and t.min_scl_for_read(1) == 4


def test_start_after_recovery():
    """Scenario: after recovery LSNs resume above the truncation range; VDL starts at the old VDL."""
    t = QuorumTracker(NODES, start_lsn=100, pg_tails={0: 99, 1: 100})
    assert t.vdl == 100 and t.min_scl_for_read(0) == 99
    t.record_sent(1101, 0, True)
    ack_all(t, 0, 1101)
    assert t.vdl == 1101


@pytest.mark.parametrize("seed", range(40))
def test_random_ack_orders(seed):
    """Scenario: random records over PGs, acks from random nodes in random order. VDL never
    passes a record that lacks quorum, never passes a non-CPL boundary, never moves back."""
    rng = random.Random(seed)
    pg_count = rng.randint(1, 5)
    n = rng.randint(1, 200)
    t = QuorumTracker(NODES)
    records = []  # (lsn, pg, cpl)
    for lsn in range(1, n + 1):
        rec = (lsn, rng.randrange(pg_count), rng.random() < 0.3 or lsn == n)
        records.append(rec)
        t.record_sent(*rec)
    # Each node receives each PG's records as a prefix of growing length (its SCL).
    held = {(node, pg): 0 for node in NODES for pg in range(pg_count)}
    pg_lsns = {pg: [r[0] for r in records if r[1] == pg] for pg in range(pg_count)}
    last_vdl = 0
    for step in range(600):
        node, pg = rng.choice(NODES), rng.randrange(pg_count)
        lsns = pg_lsns[pg]
        if not lsns:
            continue
        held[(node, pg)] = min(len(lsns), held[(node, pg)] + rng.randint(0, 3))
        if held[(node, pg)] == 0:
            continue
        t.ack(node, pg, lsns[held[(node, pg)] - 1])
        assert t.vdl >= last_vdl, f"seed {seed}: VDL moved back"
        last_vdl = t.vdl
        # Oracle: a record is durable iff >= VW nodes hold it.
        for lsn, rpg, _cpl in records:
            if lsn > t.vdl:
                break
            holders = sum(1 for nd in NODES
                          if held[(nd, rpg)] and pg_lsns[rpg][held[(nd, rpg)] - 1] >= lsn)
            assert holders >= VW, f"seed {seed}: VDL {t.vdl} passes record {lsn} held by {holders}"
        if t.vdl:
            assert any(r[0] == t.vdl and r[2] for r in records), f"seed {seed}: VDL not a CPL"
        # Oracle VDL: highest CPL such that every record up to it is durable.
        expect = 0
        for lsn, rpg, cpl in records:
            holders = sum(1 for nd in NODES
                          if held[(nd, rpg)] and pg_lsns[rpg][held[(nd, rpg)] - 1] >= lsn)
            if holders < VW:
                break
            if cpl:
                expect = lsn
        assert t.vdl == expect, f"seed {seed}: VDL {t.vdl} != oracle {expect}"


def test_commit_queue_releases_in_lsn_order():
    """Scenario: one VDL advance releases many commits at once (group commit), lowest first."""
    q = CommitQueue()
    for lsn in (5, 3, 9, 7):
        q.put(lsn, f"t{lsn}")
    assert q.release(2) == []
    assert q.release(7) == ["t3", "t5", "t7"]
    assert len(q) == 1
    assert q.drain() == ["t9"]
