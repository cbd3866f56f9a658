"""Read replicas, promotion and fencing over real processes (issue step 5).

Six storage-node processes (tests/harness.py), a writer and replica processes
(tests/writer_harness.py), real gRPC, real signals. Each test uses its own volume.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from aurora_pb import database_pb2 as pb
from engine.errors import DatabaseError, FencedError, ReadOnlyError
from tests.writer_harness import WriterProcess

FAILOVER_TRIALS = int(os.environ.get("AURORA_FAILOVER_TRIALS", "10"))
#: The failover test's seed (kill moments); AURORA_SEED replays another one.
FAILOVER_SEED = 15
#: Commits the clients must see acknowledged in each trial before the kill (0.2-1.0 s of
#: load from 3 clients): a trial with none proves nothing about lost commits. Measured on
#: a shared 2-core machine with seed 15: 25 to 149 per trial; the floor is 5x below that.
MIN_ACKED_PER_TRIAL = 5


@pytest.fixture
def instances(storage_cluster, tmp_path):
    procs = []

    def writer(volume, **kw):
        w = WriterProcess(storage_cluster, tmp_path / f"{volume}-db1", volume=volume, **kw)
        procs.append(w)
        w.start()
        return w

    def replica(w, instance="db2", **kw):
        r = w.replica(tmp_path / f"{instance}-{len(procs)}", instance=instance, **kw)
        procs.append(r)
        r.start()
        return r

    yield writer, replica
    for p in procs:
        errors = p.error_lines()
        p.close()
        assert not errors, f"{p.instance} logged errors: {errors[:5]}"


class History:
    """Committed writes by commit LSN; the state at any LSN."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commits: list[tuple[int, dict]] = []   # (commit_lsn, {key: value or None})

    def add(self, lsn: int, writes: dict) -> None:
        with self.lock:
            bisect.insort(self.commits, (lsn, writes), key=lambda c: c[0])

    def state_at(self, lsn: int) -> dict:
        state: dict = {}
        with self.lock:
            commits = list(self.commits)
        for commit_lsn, writes in commits:
            if commit_lsn > lsn:
                break
            for k, v in writes.items():
                if v is None:
                    state.pop(k, None)
                else:
                    state[k] = v
        return state


def test_replica_reads_equal_writer_history_at_read_point(instances):
    """Scenario: 4 clients run transfers between 20 accounts (the total never changes) and
    inserts that split pages; a replica with a 6-page buffer pool (so GC and storage reads
    happen during long scans) is scanned over and over. Every scan equals the writer's
    committed history at the scan's read point: never half a transaction or a split."""
    seed = int(os.environ.get("AURORA_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    writer, replica = instances
    w = writer("rephist")
    history = History()
    with w.client() as db:
        txn = db.begin()
        init = {b"acct%02d" % i: b"%06d" % 1000 for i in range(20)}
        for k, v in init.items():
            txn.put(k, v)
        history.add(txn.commit(), init)
    r = replica(w, buffer_pool_pages=6)
    stop = threading.Event()
    failures = []

    def client(c):
        rng = random.Random(seed + c)
        try:
            with w.client() as db:
                n = 0
                while not stop.is_set():
                    if rng.random() < 0.5:
                        a, b = rng.sample(range(20), 2)
                        amount = rng.randrange(1, 50)
                        txn = db.begin()
                        va = int(txn.get(b"acct%02d" % a))
                        vb = int(txn.get(b"acct%02d" % b))
                        writes = {b"acct%02d" % a: b"%06d" % (va - amount),
                                  b"acct%02d" % b: b"%06d" % (vb + amount)}
                        for k, v in writes.items():
                            txn.put(k, v)
                        try:
                            lsn = txn.commit()
                        except DatabaseError:
                            continue  # conflict: retry with fresh reads
                        history.add(lsn, writes)
                    else:
                        key, value = b"row-%d-%05d" % (c, n), os.urandom(40).hex().encode()
                        n += 1
                        history.add(db.put(key, value), {key: value})
        except Exception as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    scans = []
    try:
        with r.client() as rdb:
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline:
                reply = rdb._stub.Scan(pb.ScanRequest(table="default", limit=100_000))
                seen = {kv.key: kv.value for kv in reply.items}
                total = sum(int(v) for k, v in seen.items() if k.startswith(b"acct"))
                assert total == 20 * 1000, f"seed {seed}: torn transfer visible at {reply.read_point}"
                scans.append((reply.read_point, seen))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures
    # Checked once every client has recorded its acknowledged commits: a replica may show
    # a commit before the committing client has heard its ack.
    for read_point, seen in scans:
        expected = history.state_at(read_point)
        assert seen == expected, (
            f"seed {seed}: replica at read point {read_point} differs from the writer's "
            f"history ({len(seen)} vs {len(expected)} keys)")
    assert len(scans) >= 3
    with r.client() as rdb:
        state = json.loads(rdb.status().json)
        assert state["role"] == "replica"
        rep = state["replica"]
        assert rep["connected"] and rep["lag_ms_p99"] >= 0 and "lag_lsn" in rep
        with pytest.raises(ReadOnlyError):
            rdb.put(b"x", b"y")
    with w.client() as db:
        wstate = json.loads(db.status().json)
        assert [x["instance"] for x in wstate["replicas"]] == ["db2"]
        assert wstate["gc_horizon"] <= wstate["replicas"][0]["oldest_read_point"] or \
            wstate["gc_horizon"] <= wstate["driver"]["vdl"]


def _acked_load(w, stop, acked, lock, prefix, clients=3):
    def run(c):
        try:
            db = w.client(timeout_s=10)
        except Exception:
            return
        j = 0
        while not stop.is_set():
            key = b"%s-c%d-%05d" % (prefix, c, j)
            try:
                db.put(key, b"v%d" % j, timeout_s=10)
            except Exception:
                break
            with lock:
                acked.append(key)
            j += 1
        db.close()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    return threads


def judge_failover_trial(seed: int, trial: int, acked: list[bytes], present: dict) -> None:
    """A trial passes if enough commits were acknowledged to mean something, and every
    one of them is on the new writer. Failure messages carry the seed (AURORA_SEED)."""
    assert len(acked) >= MIN_ACKED_PER_TRIAL, (
        f"seed {seed} trial {trial}: only {len(acked)} commits acknowledged before the kill "
        f"(at least {MIN_ACKED_PER_TRIAL} needed): the trial tested nothing")
    missing = [k for k in acked if k not in present]
    assert not missing, f"seed {seed} trial {trial}: acknowledged commits lost: {missing[:5]}"


def test_failover_trial_without_acknowledged_commits_fails():
    """The failover test cannot pass when no client ever committed."""
    with pytest.raises(AssertionError, match="seed 7 trial 0: only 0 commits"):
        judge_failover_trial(7, 0, [], {})
    with pytest.raises(AssertionError, match="lost"):
        judge_failover_trial(7, 0, [b"k%d" % i for i in range(MIN_ACKED_PER_TRIAL)], {})
    judge_failover_trial(7, 0, [b"k%d" % i for i in range(MIN_ACKED_PER_TRIAL)],
                         {b"k%d" % i: b"v" for i in range(MIN_ACKED_PER_TRIAL)})


def test_failover_under_load_loses_no_acknowledged_commit(instances):
    """Scenario: FAILOVER_TRIALS times: clients commit continuously to the writer, the
    writer is SIGKILLed at a seeded random moment, the replica is promoted (recovery under
    a new epoch) and every commit a client saw acknowledged is on the new writer. The dead
    writer is restarted as a replica of the new one for the next trial (names stay, roles
    move)."""
    seed = int(os.environ.get("AURORA_SEED", FAILOVER_SEED))
    print(f"seed {seed}")
    rng = random.Random(seed)
    writer, replica = instances
    a = writer("failover")
    b = replica(a, instance="db2")
    for trial in range(FAILOVER_TRIALS):
        stop, lock, acked = threading.Event(), threading.Lock(), []
        threads = _acked_load(a, stop, acked, lock, b"t%d" % trial)
        time.sleep(rng.uniform(0.2, 1.0))
        a.kill()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        stub, channel = b.admin()
        started = time.monotonic()
        reply = stub.Promote(pb.PromoteRequest(), timeout=60)
        channel.close()
        with b.client() as db:
            db.put(b"after-%d" % trial, b"ok", timeout_s=20)
            elapsed = time.monotonic() - started
            present = dict(db.scan(start=b"t%d-" % trial, end=b"t%d." % trial, limit=100_000))
        judge_failover_trial(seed, trial, acked, present)
        print(f"trial {trial}: {len(acked)} acked, promoted at epoch {reply.volume_epoch}, "
              f"first commit {elapsed:.2f}s after promote")
        # The old writer comes back as a replica of the new one; swap roles.
        a.writer_address = b.address
        a.start()
        a, b = b, a


def test_old_writer_is_fenced(instances):
    """Scenario: the writer is paused (SIGSTOP), the replica promoted, the old writer
    resumed: storage rejects its epoch, it refuses writes with FencedError, says so in its
    status, and not one of its writes reaches the volume."""
    writer, replica = instances
    a = writer("fence")
    b = replica(a, instance="db2")
    with a.client() as db:
        db.put(b"k", b"before")
    a.proc.send_signal(signal.SIGSTOP)
    try:
        stub, channel = b.admin()
        stub.Promote(pb.PromoteRequest(), timeout=60)
        channel.close()
        with b.client() as db:
            db.put(b"k", b"new-writer")
    finally:
        a.proc.send_signal(signal.SIGCONT)
    with a.client(timeout_s=30) as old:
        with pytest.raises((FencedError, ReadOnlyError, DatabaseError)) as info:
            old.put(b"k", b"zombie", timeout_s=10)
        assert "fenced" in str(info.value).lower() or "epoch" in str(info.value).lower(), info.value
        with pytest.raises(DatabaseError):
            old.put(b"zombie2", b"x", timeout_s=10)
        assert old.status().role == "fenced"
    with b.client() as db:
        assert db.get(b"k") == b"new-writer"
        assert not db.scan(start=b"zombie", end=b"zombie~")


def test_commit_on_a_writer_that_stepped_down_fails_at_once(instances):
    """Scenario (seen twice under a bulk load through the PostgreSQL front end): a session
    begins a transaction on the writer db1; db2 is promoted and db1 steps down (Follow,
    which closes its storage driver); the session then commits on db1's old engine
    Database. Nothing ships from a closed driver, so the commit must fail at once and say
    why. It used to wait the whole durable timeout (30 s) and then report "write quorum
    unavailable ... not durable (VDL <the recovery VDL>; nodes up: all six)", which reads
    as if the NEW writer's VDL were stuck while its storage nodes all answered."""
    from tests.test_pg_cluster import require_tools
    require_tools("psql")
    from engine.cluster.ports import free_ports
    pg_port = free_ports(1)[0]
    writer, replica = instances
    a = writer("stepdown", extra_args=["--pg-port", str(pg_port)])
    b = replica(a, instance="db2")
    psql = ["psql", "-X", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "tester", "-d", "aurora",
            "-At", "-v", "VERBOSITY=verbose"]
    made = subprocess.run([*psql, "-c", "CREATE TABLE t (id int PRIMARY KEY, body text)"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    session = subprocess.Popen([*psql, "-f", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        session.stdin.write("BEGIN;\nINSERT INTO t VALUES (1, 'from the old writer');\n")
        session.stdin.flush()
        assert session.stdout.readline().strip() == "BEGIN"
        assert session.stdout.readline().strip() == "INSERT 0 1"
        stub, channel = b.admin()
        stub.Promote(pb.PromoteRequest(), timeout=60)
        channel.close()
        stub, channel = a.admin()
        stub.Follow(pb.FollowRequest(writer_address=b.address), timeout=60)
        channel.close()
        started = time.monotonic()
        out, _ = session.communicate("COMMIT;\n", timeout=120)
        waited_s = time.monotonic() - started
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    print(f"COMMIT on the stepped-down writer answered after {waited_s:.1f}s: {out.strip()}")
    assert "ERROR" in out, out
    assert "not durable after" not in out and "write quorum unavailable" not in out, out
    assert "stepped down" in out, out
    with b.client() as db:   # the new writer: commits become durable, the old txn is not there
        db.put(b"k", b"new-writer")
        assert db.get(b"k") == b"new-writer"
