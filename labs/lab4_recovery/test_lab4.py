"""Lab 4 grading tests: recovery (engine/writer/recovery.py, invariants 9, 10). The
truncation-set helpers are tested alone; the VDL walk and the truncation range are tested
on a real cluster: the writer is killed, the replica is promoted (it runs recovery with
your code under a new epoch), and no acknowledged commit may be lost. The VDL walk is also tested without I/O
(``walk_volume_chain``) on seeded volume chains against an oracle written here."""

from __future__ import annotations

import random
import re

import pytest

from engine.writer.recovery import lower_out_of, newest_truncation_set, walk_volume_chain


@pytest.mark.given
def test_recovery_reads_three_and_writes_four_of_six():
    """The quorum sizes recovery works with (engine/format/volume.py): Vr + Vw > V."""
    from engine.format.volume import V, VR, VW

    assert (V, VR, VW) == (6, 3, 4)


def test_no_truncation_set_at_all():
    assert newest_truncation_set([]) == ()


def test_the_newest_set_is_the_one_of_the_highest_epoch():
    older = [(100, 200, 2)]
    newer = [(100, 200, 2), (300, 450, 3)]
    assert newest_truncation_set([older, newer, older]) == ((100, 200, 2), (300, 450, 3))
    assert newest_truncation_set([newer, older]) == ((100, 200, 2), (300, 450, 3))


def test_sets_of_the_same_epoch_are_united_and_sorted():
    got = newest_truncation_set([[(500, 600, 4)], [(300, 350, 4)], [(10, 20, 1)]])
    assert got == ((300, 350, 4), (500, 600, 4))


def test_a_backtrack_can_shrink_the_set():
    """A newer set replaces an older one even when it has fewer ranges (backtrack)."""
    assert newest_truncation_set([[(10, 90, 2), (200, 300, 3)], [(50, 400, 5)]]) == ((50, 400, 5),)


def test_lower_out_of_a_range_goes_to_its_start():
    truncs = ((100, 200, 2), (300, 450, 3))
    assert lower_out_of(150, truncs) == 100
    assert lower_out_of(200, truncs) == 100      # (start, end]: end is hidden
    assert lower_out_of(100, truncs) == 100      # start is visible
    assert lower_out_of(250, truncs) == 250
    assert lower_out_of(451, truncs) == 451


def volume_chain(seed, n=60, pgs=4, since=0):
    """A seeded volume chain above ``since``: [(lsn, pg, is_cpl)] in LSN order (gaps of
    1-3 between LSNs, every 1-4 records a CPL, the last record not always one)."""
    rng = random.Random(seed)
    out, lsn = [], since
    for _ in range(n):
        lsn += rng.randint(1, 3)
        out.append((lsn, rng.randrange(pgs), rng.random() < 0.3))
    return out


def by_prev_of(chain, since=0, missing=()):
    """What a read quorum reports: prev volume LSN -> (lsn, pg, cpl), records in
    ``missing`` (LSNs no answering segment holds) left out."""
    out, prev = {}, since
    for lsn, pg, cpl in chain:
        if lsn not in missing:
            out[prev] = (lsn, pg, cpl)
        prev = lsn
    return out


def oracle(chain, since, tails_at_since, missing=()):
    """VCL: the last record before the first missing one; VDL: the last CPL up to it; a
    PG's tail: its newest record at or below VDL (or what it had at since)."""
    vcl = vdl = since
    for lsn, _pg, cpl in chain:
        if lsn in missing:
            break
        vcl = lsn
        vdl = lsn if cpl else vdl
    tails = dict(tails_at_since)
    for lsn, pg, _cpl in chain:
        if lsn <= vdl:
            tails[pg] = max(tails.get(pg, 0), lsn)
    return vcl, vdl, tails


def test_the_walk_of_a_whole_chain_ends_at_its_last_record(seed):
    chain = volume_chain(seed)
    vcl, vdl, tails, _end = walk_volume_chain(by_prev_of(chain), 0, {}, lal=100,
                                              last_truncate_end=0, max_lsn_seen=chain[-1][0])
    assert (vcl, vdl, tails) == oracle(chain, 0, {}), f"seed {seed}"
    assert vcl == chain[-1][0]


def test_the_walk_stops_at_a_hole_and_vdl_is_the_last_cpl_below_it(seed):
    """A record no segment of the read quorum holds was never durable: VCL stops before it,
    VDL is the last CPL at or below VCL, records above the hole count for nothing."""
    rng = random.Random(seed)
    chain = volume_chain(seed, n=80)
    hole = chain[rng.randrange(5, 75)][0]
    got = walk_volume_chain(by_prev_of(chain, missing={hole}), 0, {}, lal=100,
                            last_truncate_end=0, max_lsn_seen=chain[-1][0])
    want = oracle(chain, 0, {}, missing={hole})
    assert got[:3] == want, f"seed {seed}, hole at {hole}"
    assert got[0] < hole and got[1] <= got[0]


def test_the_walk_starts_at_since_and_keeps_the_tails_known_there(seed):
    """Recovery starts from the highest VDL a writer told storage (since): the records
    below it are not walked again, and a PG with no record above since keeps its tail."""
    since = 500
    chain = volume_chain(seed, n=40, pgs=3, since=since)
    tails_at_since = {0: 498, 1: 470, 2: 499, 3: 455}     # PG 3 gets no record above since
    got = walk_volume_chain(by_prev_of(chain, since), since, tails_at_since, lal=100,
                            last_truncate_end=0, max_lsn_seen=chain[-1][0])
    assert got[:3] == oracle(chain, since, tails_at_since), f"seed {seed}"
    assert got[2][3] == 455


def test_an_empty_walk_leaves_vdl_at_since():
    vcl, vdl, tails, end = walk_volume_chain({}, 700, {1: 690}, lal=100, last_truncate_end=0,
                                             max_lsn_seen=700)
    assert (vcl, vdl, tails, end) == (700, 700, {1: 690}, 800)


@pytest.mark.parametrize("last_end,max_seen,want", [
    (0, 0, 150),            # VDL + LAL
    (300, 0, 400),          # the previous range's end + LAL: its writer allocated up to it
    (0, 999, 999),          # the highest LSN any segment holds
])
def test_the_truncation_end_covers_everything_the_old_writer_may_have_allocated(last_end, max_seen, want):
    """Invariant 6: no LSN above max(VDL, truncation end) + LAL was allocated; the range
    (VDL, end] must cover all of it (invariant 10)."""
    by_prev = {0: (10, 0, False), 10: (50, 1, True), 50: (60, 0, False)}
    vcl, vdl, _tails, end = walk_volume_chain(by_prev, 0, {}, lal=100, last_truncate_end=last_end,
                                              max_lsn_seen=max_seen)
    assert (vcl, vdl, end) == (60, 50, want)


RECOVERED_RE = re.compile(r"recovered volume \S+: epoch (\d+), VDL (\d+) \(VCL (\d+), since (\d+)\), "
                          r"truncated \((\d+), (\d+)\]")


@pytest.mark.processes
def test_real_cluster_failover_recovers_every_acknowledged_commit(cluster):
    """Kill the writer: the control plane promotes db2, whose recovery (your VDL walk)
    computes the VDL from a read quorum and truncates above it. Every acknowledged commit
    is still there, the VDL is at least the last one, the truncation range starts at the
    VDL, and the new writer takes new commits above the range."""
    acked = {}
    for i in range(15):
        acked[f"k{i}"] = f"v{i}"
        last = cluster.put(f"k{i}", f"v{i}")
    cluster.run("node", "kill", "db1")
    cluster.wait_for("db2 to become the writer",
                     lambda: cluster.status().get("writer") == "db2"
                     and cluster.status()["by_name"]["db2"]["reported_role"] == "writer", timeout_s=60)
    for key, value in acked.items():
        assert cluster.get(key) == value
    found = RECOVERED_RE.findall(cluster.log_text("db2"))
    assert found, "db2's log has no 'recovered volume' line"
    epoch, vdl, vcl, since, t_start, t_end = map(int, found[-1])
    assert vdl >= last, f"recovered VDL {vdl} is below the last acknowledged commit {last}"
    assert vcl >= vdl and t_start == vdl and t_end > vdl
    after = cluster.put("after", "failover")
    assert after > t_end, f"new commit {after} inside the truncated range ({t_start}, {t_end}]"
    assert cluster.get("after") == "failover"
