"""Lab 4 grading tests: recovery (engine/writer/recovery.py, invariants 9, 10). The
truncation-set helpers are tested alone; the VDL walk and the truncation range are tested
on a real cluster: the writer is killed, the replica is promoted (it runs recovery with
your code under a new epoch), and no acknowledged commit may be lost."""

from __future__ import annotations

import re

import pytest

from engine.writer.recovery import lower_out_of, newest_truncation_set


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
