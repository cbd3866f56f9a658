"""Backtrack meets crashes and the window: real storage nodes and a real writer process.

tests/test_clones_backtrack.py checks the features against a model; these check what a
crash, a short window or missing nodes do to them:

- a writer SIGKILLed right after a backtrack (back, and forward again) recovers to the
  backtracked state: the new truncation set is what recovery opens with;
- with a 2 s window, the GC horizon moves past old points once they leave the window,
  as-of reads there are refused naming the window, and reads inside it still work;
- with three storage nodes down a backtrack is refused before it writes anything, and the
  volume is unchanged.
"""

from __future__ import annotations

import os
import random
import time

import grpc
import pytest

from aurora_pb import database_pb2 as dpb
from aurora_pb import storage_pb2 as spb
from aurora_pb import storage_pb2_grpc as spb_grpc
from engine import errors
from tests.writer_harness import WriterProcess


@pytest.fixture
def seed():
    value = int(os.environ.get("AURORA_SEED", random.randrange(1 << 32)))
    print(f"seed={value} (replay with AURORA_SEED={value})")
    return value


def _scan(writer) -> dict:
    with writer.client() as db:
        return dict(db.scan())


def _backtrack(writer, **target) -> dpb.BacktrackReply:
    admin, channel = writer.admin()
    try:
        return admin.Backtrack(dpb.BacktrackRequest(**target), timeout=120)
    finally:
        channel.close()


def test_writer_killed_after_backtracks_recovers_the_backtracked_state(storage_cluster, tmp_path, seed):
    """Scenario: commits k0..k9 (model after each); backtrack to k4; SIGKILL; restart: the
    volume is as of k4. A commit on the new timeline; backtrack forward to k9 of the old
    one; SIGKILL; restart: as of k9, without the new-timeline key."""
    rng = random.Random(seed)
    writer = WriterProcess(storage_cluster, tmp_path / "w", volume=f"bt{seed % 10000}",
                           extra_args=["--backtrack-window", "600"])
    try:
        writer.start()
        model: dict = {}
        states, lsns = [], []
        with writer.client() as db:
            for i in range(10):
                key, value = b"k%d" % rng.randrange(6), b"v%d" % i
                lsns.append(db.put(key, value))
                model[key] = value
                states.append(dict(model))
        reply = _backtrack(writer, to_lsn=lsns[4])
        assert reply.target_lsn == lsns[4], f"seed={seed}"
        assert _scan(writer) == states[4], f"seed={seed}"
        writer.kill()
        writer.start()
        assert _scan(writer) == states[4], f"seed={seed}: recovery lost the backtrack"
        with writer.client() as db:
            new_lsn = db.put(b"new-timeline", b"x")
        assert new_lsn > lsns[-1]
        reply = _backtrack(writer, to_lsn=lsns[9])
        assert reply.target_lsn == lsns[9], f"seed={seed}"
        writer.kill()
        writer.start()
        assert _scan(writer) == states[9], f"seed={seed}: forward backtrack lost in recovery"
        reply = _backtrack(writer, to_lsn=new_lsn)   # and back to the other timeline
        assert _scan(writer) == {**states[4], b"new-timeline": b"x"}, f"seed={seed}"
        assert not writer.error_lines()
    finally:
        writer.close()


def _gc_horizon(storage_cluster, volume: str) -> int:
    best = 0
    for name in storage_cluster.nodes:
        with grpc.insecure_channel(storage_cluster.address(name)) as channel:
            reply = spb_grpc.StorageStub(channel).NodeStatus(spb.NodeStatusRequest(), timeout=10)
        best = max([best] + [s.gc_horizon for s in reply.segments if s.volume == volume])
    return best


def test_a_short_window_lets_gc_pass_old_points_and_refuses_them(storage_cluster, tmp_path):
    """Scenario: window 2 s. While a commit is inside the window the GC horizon stays at or
    below it; once it is older, the horizon passes it and an as-of read of it is refused
    with a message naming the window; a read inside the window still answers."""
    volume = f"win{random.randrange(1 << 20)}"
    writer = WriterProcess(storage_cluster, tmp_path / "w", volume=volume,
                           extra_args=["--backtrack-window", "2"])
    writer.env["AURORA_GC_HORIZON_INTERVAL_S"] = "0.2"
    try:
        writer.start()
        with writer.client() as db:
            old = db.put(b"a", b"1")
            db.put(b"a", b"2")
            time.sleep(0.5)
            assert _gc_horizon(storage_cluster, volume) <= old
            assert db.get(b"a", as_of_lsn=old) == b"1"
            time.sleep(3.0)   # `old` leaves the window
            recent = [db.put(b"b", b"%d" % i) for i in range(3)]
            deadline = time.monotonic() + 20
            while _gc_horizon(storage_cluster, volume) <= old:
                assert time.monotonic() < deadline, "the GC horizon never passed a point outside the window"
                db.put(b"c", b"tick")
                time.sleep(0.3)
            with pytest.raises(errors.OutOfWindowError) as exc:
                db.get(b"a", as_of_lsn=old)
            assert "window" in str(exc.value) and "2 s" in str(exc.value), exc.value
            assert db.get(b"b", as_of_lsn=recent[1]) == b"1"
        assert not writer.error_lines()
    finally:
        writer.close()


def test_backtrack_with_three_nodes_down_is_refused_and_changes_nothing(storage_cluster, tmp_path):
    """Scenario: sn4..sn6 stopped (AZ+1 down): a backtrack needs a write quorum, so it is
    refused before writing anything; with the nodes back the volume reads as before and a
    backtrack then works."""
    writer = WriterProcess(storage_cluster, tmp_path / "w", volume=f"azp{random.randrange(1 << 20)}",
                           extra_args=["--backtrack-window", "600"])
    try:
        writer.start()
        with writer.client() as db:
            first = db.put(b"x", b"1")
            db.put(b"x", b"2")
        for name in ("sn4", "sn5", "sn6"):
            storage_cluster.stop(name)
        with pytest.raises(grpc.RpcError) as exc:
            _backtrack(writer, to_lsn=first)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE, exc.value
        assert "Nothing was changed" in exc.value.details(), exc.value.details()
        for name in ("sn4", "sn5", "sn6"):
            storage_cluster.start_node(name)
        assert _scan(writer) == {b"x": b"2"}
        _backtrack(writer, to_lsn=first)
        assert _scan(writer) == {b"x": b"1"}
    finally:
        writer.close()
