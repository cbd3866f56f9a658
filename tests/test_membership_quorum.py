"""The quorum core during membership changes (invariant 17, docs/membership.md): the
transitional write quorum (4/6 of the old set AND 4/6 of the new set), the read quorum
(3/6 of either), a second failure during a change, a wiped member forgotten, and PGCL
never moving back (invariant 5). Deterministic; the randomised check prints its seed."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from engine.writer.quorum import QuorumTracker

OLD = ("A", "B", "C", "D", "E", "F")
NEW = ("A", "B", "C", "D", "E", "G")
ALL = ("A", "B", "C", "D", "E", "F", "G", "H")


def tracker(members=OLD) -> QuorumTracker:
    return QuorumTracker(members)


def test_worked_example_of_the_docs():
    """docs/membership.md and quorum.py's module doc: PGCL is the lower of the two sets'
    4th-highest SCLs."""
    t = tracker()
    t.set_membership(0, 2, OLD, NEW)
    for name, scl in {"A": 10, "B": 10, "C": 9, "D": 8, "E": 8, "F": 10, "G": 0}.items():
        if scl:
            t.ack(name, 0, scl)
    # old set ABCDEF: 10 10 10 9 8 8 -> 9; new set ABCDEG: 10 10 9 8 8 0 -> 8
    assert t.pgcl[0] == 8


def test_transitional_write_needs_four_of_each_set():
    t = tracker()
    t.set_membership(0, 2, OLD, NEW)
    cases = {"ABCD": True, "ABCF": False, "ABCG": False, "ABCFG": True, "ABFG": False,
             "CDEFG": True, "DEF": False}
    for holders, want in cases.items():
        assert t.write_quorum(0, holders) is want, holders


def test_transitional_read_needs_three_of_either_set():
    t = tracker()
    t.set_membership(0, 2, OLD, NEW)
    assert t.read_quorum(0, "ABG")     # 3 of the new set
    assert t.read_quorum(0, "DEF")     # 3 of the old set
    assert not t.read_quorum(0, "AFG")  # 2 of each
    assert not t.read_quorum(0, "FG")


def test_every_read_quorum_meets_every_write_quorum_in_a_transition():
    """Vr + Vw > V per set: any read quorum (3 of either set) shares a segment with any
    write quorum (4 of both), exhaustively over the seven segments."""
    t = tracker()
    t.set_membership(0, 2, OLD, NEW)
    segs = sorted(set(OLD) | set(NEW))
    subsets = [frozenset(c) for r in range(len(segs) + 1) for c in itertools.combinations(segs, r)]
    writes = [s for s in subsets if t.write_quorum(0, s)]
    reads = [s for s in subsets if t.read_quorum(0, s)]
    assert writes and reads
    for w in writes:
        for r in reads:
            assert w & r, f"write quorum {sorted(w)} and read quorum {sorted(r)} do not meet"


def test_acks_drive_vdl_only_with_both_sets():
    t = tracker()
    t.set_membership(0, 2, OLD, NEW)
    t.record_sent(1, 0, True)
    for name in "ABCF":
        t.ack(name, 0, 1)
    assert t.vdl == 0, "4 of the old set but 3 of the new set is not durable"
    t.ack("G", 0, 1)
    assert t.vdl == 1
    t.record_sent(2, 0, True)
    for name in "DEG":   # new set: D E G + nothing else at 2 -> 3
        t.ack(name, 0, 2)
    assert t.vdl == 1
    t.ack("A", 0, 2)     # old A D E = 3, new A D E G = 4
    assert t.vdl == 1
    t.ack("F", 0, 2)     # old A D E F = 4
    assert t.vdl == 2


def test_after_the_change_only_the_new_set_counts():
    t = tracker()
    t.set_membership(0, 2, OLD, NEW)
    t.set_membership(0, 3, NEW)
    t.record_sent(1, 0, True)
    for name in "ABCF":
        t.ack(name, 0, 1)      # F is no longer a member: its ack counts nowhere
    assert t.vdl == 0
    assert t.node_scl("F", 0) == 0
    t.ack("G", 0, 1)
    assert t.vdl == 1


def test_second_failure_during_a_change_is_a_further_transition():
    """F was being replaced by G (epoch 2) when E failed too: epoch 3 replaces E by H in
    the new set; a write needs 4 of ABCDEF (the last set that completed) AND 4 of ABCDHG."""
    t = tracker()
    t.set_membership(0, 2, OLD, NEW)
    newer = ("A", "B", "C", "D", "H", "G")
    t.set_membership(0, 3, OLD, newer)
    assert t.pg_view(0).epoch == 3
    assert t.write_quorum(0, "ABCD")
    assert not t.write_quorum(0, "ABCE")       # E counts for the old set only now
    assert t.write_quorum(0, "ABCEGH") is True  # old ABCE, new ABCGH
    assert t.read_quorum(0, "DHG")
    t.set_membership(0, 4, newer)
    assert not t.write_quorum(0, "ABCE")
    assert t.write_quorum(0, "ABGH")


def test_stale_membership_epoch_is_ignored():
    t = tracker()
    t.set_membership(0, 3, OLD, NEW)
    t.set_membership(0, 2, OLD)       # late message of an older change
    assert t.pg_view(0).epoch == 3 and t.pg_view(0).transitional


def test_a_member_set_must_have_six_distinct_segments():
    t = tracker()
    with pytest.raises(ValueError):
        t.set_membership(0, 2, OLD, ("A", "B", "C", "D", "E", "E"))
    with pytest.raises(ValueError):
        t.set_membership(0, 2, OLD[:5])


def test_wiped_member_is_forgotten_and_pgcl_never_moves_back():
    """The fleet of six: sn4 comes back wiped under its own name. Its SCLs from before the
    wipe no longer count for new records, but what was already durable stays durable
    (invariant 5)."""
    nodes = tuple(f"sn{i}" for i in range(1, 7))
    t = QuorumTracker(nodes)
    t.record_sent(1, 0, True)
    for name in ("sn1", "sn2", "sn3", "sn4"):
        t.ack(name, 0, 1)
    assert t.vdl == 1 and t.pgcl[0] == 1
    t.set_membership(0, 2, nodes, nodes, forget=["sn4"])
    assert t.node_scl("sn4", 0) == 0
    assert t.pgcl[0] == 1 and t.vdl == 1     # never back
    t.record_sent(2, 0, True)
    for name in ("sn1", "sn2", "sn3"):
        t.ack(name, 0, 2)
    assert t.vdl == 1, "sn4's pre-wipe SCL must not count"
    t.ack("sn4", 0, 2)                        # rebuilt: it holds 2 now
    assert t.vdl == 2


def test_pgcl_matches_an_oracle_over_random_transitions():
    seed = int(os.environ.get("AURORA_SEED", "18"))
    rng = random.Random(seed)
    for trial in range(300):
        t = QuorumTracker(OLD)
        sets = [OLD]
        if rng.random() < 0.7:
            new = list(OLD)
            new[rng.randrange(6)] = rng.choice("GH")
            sets.append(tuple(new))
            t.set_membership(0, 2, OLD, sets[1])
        best: dict[str, int] = {}
        pgcl = 0
        for _ in range(40):
            name = rng.choice(ALL)
            scl = rng.randrange(0, 30)
            t.ack(name, 0, scl)
            if any(name in s for s in sets) and scl > best.get(name, 0):
                best[name] = scl
            oracle = min(sorted((best.get(n, 0) for n in s), reverse=True)[3] for s in sets)
            pgcl = max(pgcl, oracle)
            assert t.pgcl.get(0, 0) == pgcl, f"seed {seed} trial {trial}: {t.snapshot()}"
