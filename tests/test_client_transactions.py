"""Client transactions in one RPC (engine/client.py, docs/decisions.md 11), over real processes.

Every test runs six real storage-node processes (tests/harness.py) and a real writer
(tests/writer_harness.py). The client buffers a transaction's writes and sends them with
the commit; its first read sends Begin. What must hold: reads inside the transaction see
its own writes (get and scan), a read-then-write race is still a ConflictError (no lost
update), a write-only transaction is ONE Commit call (counted by the writer's own RPC
counters in Status), abort leaves nothing behind, and a commit whose outcome is unknown
still raises CommitOutcomeUnknown and is never sent twice.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from aurora_pb import database_pb2 as pb
from engine import errors
from engine.client import ClusterClient
from tests import test_cluster_client as fakes
from tests.writer_harness import WriterProcess


@pytest.fixture
def make_writer(storage_cluster, tmp_path):
    writers = []

    def make(volume, **kw):
        w = WriterProcess(storage_cluster, tmp_path / f"writer-{volume}", volume=volume, **kw)
        writers.append(w)
        w.start()
        return w

    yield make
    for w in writers:
        w.close()


def state(db) -> dict:
    return json.loads(db.status().json)


def rpcs(db) -> dict:
    """The writer's count of Database calls served, per method (Status calls left out:
    the test's own)."""
    counts = state(db)["rpcs"]
    del counts["Status"]
    return counts


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_own_writes_visible_to_get_and_scan(make_writer):
    """Scenario: a transaction updates, deletes and inserts over committed rows, in the
    default table and in a table that does not exist yet: its gets and scans see exactly
    its own writes over the committed state; nothing is visible outside before commit;
    after commit everyone sees the same rows."""
    w = make_writer("ownwrites")
    with w.client() as db:
        for i in range(20):
            db.put(b"k%02d" % i, b"v%d" % i)
        txn = db.begin()
        txn.put(b"k03", b"three")
        txn.delete(b"k04")
        txn.delete(b"k05")
        txn.put(b"k05", b"five-again")        # a later write to a key wins
        txn.put(b"k07a", b"new")
        txn.delete(b"absent")                 # no error: a delete of an absent key is a no-op
        txn.put(b"x", b"1", table="fresh")    # the table is created at commit
        assert txn.get(b"k03") == b"three"
        assert txn.get(b"k05") == b"five-again"
        assert txn.get(b"k06") == b"v6"       # not written: from the writer
        with pytest.raises(errors.KeyNotFound):
            txn.get(b"k04")
        with pytest.raises(errors.KeyNotFound):
            txn.get(b"y", table="fresh")
        assert txn.get(b"x", table="fresh") == b"1"
        assert txn.scan(b"k02", b"k08") == [
            (b"k02", b"v2"), (b"k03", b"three"), (b"k05", b"five-again"), (b"k06", b"v6"),
            (b"k07", b"v7"), (b"k07a", b"new")]
        # Deletes hide rows: a limited scan still returns `limit` rows when there are more.
        assert [k for k, _ in txn.scan(b"k03", limit=3)] == [b"k03", b"k05", b"k06"]
        assert txn.scan(table="fresh") == [(b"x", b"1")]
        with pytest.raises(errors.KeyNotFound):
            db.get(b"k07a")                   # invisible outside before commit
        assert db.get(b"k04") == b"v4"
        assert txn.commit() > 0
        assert db.get(b"k03") == b"three" and db.get(b"x", table="fresh") == b"1"
        with pytest.raises(errors.KeyNotFound):
            db.get(b"k04")
        assert [k for k, _ in db.scan(b"k02", b"k08")] == [b"k02", b"k03", b"k05", b"k06",
                                                           b"k07", b"k07a"]
        with pytest.raises(errors.TransactionClosedError):
            txn.put(b"late", b"1")


def test_scan_pages_past_many_buffered_deletes(make_writer):
    """Scenario: a transaction deletes more rows than one scan page holds and scans with a
    small limit: the client pages on until the limit is filled by rows that survive."""
    w = make_writer("scandeletes")
    with w.client() as db:
        with db.transaction() as txn:
            for i in range(60):
                txn.put(b"r%03d" % i, b"v")
        txn = db.begin()
        for i in range(0, 50):
            txn.delete(b"r%03d" % i)
        txn.put(b"r055", b"mine")
        assert txn.scan(limit=5) == [(b"r050", b"v"), (b"r051", b"v"), (b"r052", b"v"),
                                     (b"r053", b"v"), (b"r054", b"v")]
        assert len(txn.scan()) == 10 and dict(txn.scan())[b"r055"] == b"mine"
        txn.abort()


def test_write_only_transaction_is_one_rpc(make_writer):
    """Scenario: the bench load write-only transaction (two updates, a delete and an
    insert of the same key) is ONE Commit call on the writer: no Begin, Put or Delete. A
    transaction that reads first sends Begin once, its Gets, and the Commit."""
    w = make_writer("onerpc")
    with w.client() as db:
        for i in range(1, 4):
            db.put(b"%08d" % i, b"old")
        before = rpcs(db)
        for _ in range(5):
            txn = db.begin()
            txn.put(b"00000001", b"a")
            txn.put(b"00000002", b"b")
            txn.delete(b"00000003")
            txn.put(b"00000003", b"c")
            assert txn.commit() > 0
        assert delta(rpcs(db), before) == {"Commit": 5}

        before = rpcs(db)
        with db.transaction() as txn:
            a = txn.get(b"00000001")
            txn.get(b"00000002")
            txn.put(b"00000001", a + b"!")
        assert delta(rpcs(db), before) == {"Begin": 1, "Get": 2, "Commit": 1}
        assert db.get(b"00000001") == b"a!"

        before = rpcs(db)
        db.begin().commit()      # nothing read, nothing written: nothing sent
        assert delta(rpcs(db), before) == {}


def test_read_then_write_race_is_a_conflict(make_writer):
    """Scenario: t1 reads x, then t2 (a write-only transaction, one RPC) commits x, then
    t1 writes x from what it read: t1's commit raises ConflictError (no lost update). The
    same when the other writer is an autocommit put. A write-only transaction begins at
    its commit, so a commit before that is no conflict for it (it read nothing)."""
    w = make_writer("race")
    with w.client() as db:
        db.put(b"x", b"0")
        t1 = db.begin()
        seen = t1.get(b"x")
        with db.transaction() as t2:
            t2.put(b"x", b"t2")
        t1.put(b"x", seen + b"+1")
        with pytest.raises(errors.ConflictError):
            t1.commit()
        assert db.get(b"x") == b"t2"

        t3 = db.begin()
        seen = t3.get(b"x")
        db.put(b"x", b"autocommit")
        t3.put(b"x", seen + b"+1")
        with pytest.raises(errors.ConflictError):
            t3.commit()
        assert db.get(b"x") == b"autocommit"

        blind = db.begin()
        blind.put(b"x", b"blind")
        db.put(b"x", b"before-the-blind-commit")
        assert blind.commit() > 0
        assert db.get(b"x") == b"blind"
        assert state(db)["database"]["active_txns"] == 0


def test_abort_discards_the_buffer(make_writer):
    """Scenario: a write-only transaction aborted (explicitly, or by an exception in its
    `with` block) sends nothing and writes nothing; one that had read sends one Abort and
    leaves no open transaction on the writer."""
    w = make_writer("abort")
    with w.client() as db:
        db.put(b"keep", b"1")
        before = rpcs(db)
        txn = db.begin()
        txn.put(b"gone", b"1")
        txn.delete(b"keep")
        txn.abort()
        with pytest.raises(RuntimeError):
            with db.transaction() as txn2:
                txn2.put(b"gone2", b"1")
                raise RuntimeError("the caller failed")
        assert delta(rpcs(db), before) == {}

        txn = db.begin()
        assert txn.get(b"keep") == b"1"
        txn.put(b"gone3", b"1")
        assert state(db)["open_txns"] == 1
        txn.abort()
        assert state(db)["open_txns"] == 0
        for key in (b"gone", b"gone2", b"gone3"):
            with pytest.raises(errors.KeyNotFound):
                db.get(key)
        assert db.get(b"keep") == b"1"


def test_limits_are_checked_at_put_and_old_clients_still_work(make_writer):
    """Scenario: an oversized key or value raises TooLargeError at put, as before (the
    client checks the same limits); an old client's Begin, Put/Delete with txn_id, Commit
    still commits (the wire stays backward compatible)."""
    w = make_writer("compat")
    with w.client() as db:
        txn = db.begin()
        with pytest.raises(errors.TooLargeError):
            txn.put(b"k", b"x" * 100_000)
        with pytest.raises(errors.TooLargeError):
            txn.put(b"k" * 5000, b"v")
        txn.abort()

        stub = db._stub
        txn_id = stub.Begin(pb.BeginRequest(), timeout_s=10).txn_id
        stub.Put(pb.PutRequest(key=b"old", value=b"client", txn_id=txn_id), timeout_s=10)
        stub.Delete(pb.DeleteRequest(key=b"absent", txn_id=txn_id), timeout_s=10)
        assert stub.Commit(pb.CommitRequest(txn_id=txn_id), timeout_s=10).commit_lsn > 0
        assert db.get(b"old") == b"client"


@pytest.mark.parametrize("reads_first", [False, True], ids=["write-only", "read-then-write"])
def test_commit_outcome_unknown_is_raised_and_not_resent(make_writer, storage_cluster, reads_first):
    """Scenario: through a ClusterClient, a transaction's commit (with its writes) waits
    because three storage nodes are down; the writer is SIGKILLed mid-call: the commit
    raises CommitOutcomeUnknown, and the client neither resends it nor asks the control
    plane again (the module doc's table: connection lost mid-call -> unknown)."""
    w = make_writer("unknown-" + ("rw" if reads_first else "wo"))
    control = fakes.FakeControl()
    control.routes["cluster"] = [("db1", w.address, True)]
    try:
        with ClusterClient(control.address, "cluster", timeout_s=30, failover_wait_s=5) as db:
            db.put(b"x", b"0")
            txn = db.begin()
            if reads_first:
                assert txn.get(b"x") == b"0"
            txn.put(b"x", b"1")
            txn.put(b"y", b"1")
            for name in ("sn4", "sn5", "sn6"):
                storage_cluster.kill(name)
            outcome = {}

            def commit():
                try:
                    outcome["lsn"] = txn.commit()
                except Exception as exc:   # checked below
                    outcome["error"] = exc

            thread = threading.Thread(target=commit)
            thread.start()
            time.sleep(1.0)
            assert thread.is_alive(), f"the commit should be waiting for a quorum: {outcome}"
            w.kill()
            thread.join(timeout=20)
            assert isinstance(outcome.get("error"), errors.CommitOutcomeUnknown), outcome
            assert "may or may not have committed" in str(outcome["error"])
            assert db.retries == 0     # never sent again (the watcher only asked who the writer is)
    finally:
        control.server.stop(None)
