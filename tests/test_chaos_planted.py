"""Planted bugs: the checkers must REPORT them (issue 9, "how it is judged").

Each test plants one bug through its test-only switch (engine/hooks.py), runs the
scenario that should expose it, and expects the named checker to report a violation. The
same scenario without the bug is a test of tests/test_chaos_scenarios.py and must be
green there (test_power_loss_every_process_killed_at_once, test_az_plus_one_down_...),
so a checker that always fails would fail those instead.
"""

from __future__ import annotations

import time

from engine.chaos import checkers as cc
from engine.chaos.nemesis import seed_from_env
from engine.hooks import ACK_BEFORE_COMMIT_ENV, VDL_SHORT_QUORUM_ENV
from tests.chaos_harness import ChaosRun
from tests.test_chaos_scenarios import wait_ok

SEED = seed_from_env(default=9)


def test_planted_ack_before_commit_is_reported_as_lost_writes(tmp_path):
    """Scenario: storage nodes ack an Append from memory and commit it 3 s later
    (AURORA_BUG_ACK_BEFORE_COMMIT=3). A power loss (every process SIGKILLed at once)
    then loses writes that clients saw acknowledged: the lost-write checker must say so."""
    run = ChaosRun(tmp_path, SEED, storage_env={ACK_BEFORE_COMMIT_ENV: "3"})
    try:
        run.start()
        wait_ok(run, 30)
        for n in ["db1", *run.target.storage]:
            run.target.kill(n)
        run.nemesis.note("power loss: SIGKILL to every process")
        run.nemesis.heal()
        run.workload.stop()
        lost = cc.check_lost_writes(run.workload, run.writer_client)
        assert any(v.startswith("lost write") for v in lost), (
            "the lost-write checker did not report the planted ack-before-commit bug\n"
            + run.header() + "\n" + "\n".join(lost))
    finally:
        run.close()


def test_planted_short_quorum_vdl_is_reported_by_the_durability_checker(tmp_path):
    """Scenario: the writer's PGCL counts 3 of 6 segments as a quorum
    (AURORA_BUG_VDL_SHORT_QUORUM=1). With az-c and sn1 down (3 nodes left) writes are
    then acknowledged; the durability checker must report acks below the write quorum,
    from the storage nodes' own SCL logs (not from the nemesis' record of what is down)."""
    run = ChaosRun(tmp_path, SEED, writer_env={VDL_SHORT_QUORUM_ENV: "1"})
    try:
        run.start()
        wait_ok(run, 10)
        run.nemesis.az_down("az-c")
        run.nemesis.kill("sn1")
        time.sleep(4.0)
        run.nemesis.heal()
        run.workload.stop()
        found = cc.check_acks_held_by_storage(run.workload, run.fault_file.parent, run.volume)
        assert found, ("the durability checker did not report the planted short-quorum bug\n"
                       + run.header())
    finally:
        run.close()


def test_planted_short_quorum_under_slow_disks_is_reported_from_the_nodes_records(tmp_path):
    """Scenario: the same planted short quorum, but no node is down: sn4, sn5 and sn6 get
    a slow disk (every LMDB commit waits 300 ms), so commits are acknowledged once sn1-sn3
    hold them. The nemesis believes all six could ack; only the storage nodes' own SCL
    records show that three held each commit when it was acknowledged."""
    run = ChaosRun(tmp_path, SEED, writer_env={VDL_SHORT_QUORUM_ENV: "1"})
    try:
        run.start()
        wait_ok(run, 10)
        for n in ("sn4", "sn5", "sn6"):
            run.nemesis.slow_disk(n, 300)
        time.sleep(4.0)
        run.nemesis.heal()
        run.workload.stop()
        found = cc.check_acks_held_by_storage(run.workload, run.fault_file.parent, run.volume)
        assert found, ("the durability checker did not report the planted short-quorum bug "
                       "under slow disks\n" + run.header())
    finally:
        run.close()


def test_floors_fail_a_run_that_did_nothing():
    """The bank checker must not pass with zero reads."""
    w = cc.Workload(lambda: None, lambda: {}, seed=1)
    assert any("reads to judge" in v for v in cc.check_bank_reads(w))
