"""Big transactions (invariant 18) and commit refusals, in-process over tests/fake_sink.py:
a transaction begun with a larger ``writes_max`` is ONE engine transaction committed in
several MTR pieces with ONE COMMIT record; VDL never lands between its pieces, so reads
never see a part of it and an abort leaves nothing; a commit refused before any LSN was
allocated raises CommitRefused (nothing logged), one that fails after stays "unknown".
The same through psql/psycopg and a SIGKILLed writer: tests/test_pg_cluster.py."""

from __future__ import annotations

import asyncio

import pytest

from engine.db import database as dbmod
from engine.db.database import Database
from engine.errors import CommitRefused, TooLargeError, UnavailableError, WriteQuorumUnavailable
from engine.format.redo import FLAG_CPL, read_header
from engine.format.volume import VolumeLayout

try:
    from tests.fake_sink import FakeSink
except ImportError:  # tests/ is not a package here
    from fake_sink import FakeSink

ROWS = 3000


def run(coro, timeout_s: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def open_db(**sink_kw) -> tuple[Database, FakeSink]:
    sink = FakeSink(layout=VolumeLayout(pg_count=3, stripe_pages=4), **sink_kw)
    db = Database(sink, 512)
    await db.bootstrap()
    await db.create_table("t")
    return db, sink


def key(i: int) -> bytes:
    return b"k%06d" % i


def test_big_commit_is_one_transaction_in_pieces_and_vdl_never_lands_inside():
    async def main():
        db, sink = await open_db()
        vdl_before = sink.vdl
        cpls_before, submits_before = len(sink.cpls), sink.submits
        txn = db.begin(conflicts_from_commit=True, writes_max=dbmod.TXN_BIG_WRITES_MAX)
        for i in range(ROWS):
            txn.put("t", key(i), b"v" * 40)
        seen_during: list[tuple[int, bytes | None, int]] = []
        db.piece_pause_s = lambda: 0.15   # time between pieces for the checks below

        async def watch():
            while txn.state == "active":
                # Every piece submitted so far is acked (ack_delay 0) and still VDL stays:
                # no CPL among them. A read sees none of the transaction (it waits
                # READ_DURABLE_WAIT_S for the pieces' pages, then reads as of VDL).
                got = await db.get("t", key(0))
                if txn.state == "active":
                    seen_during.append((sink.vdl, got, sink.submits))
                await asyncio.sleep(0.003)
        watcher = asyncio.ensure_future(watch())
        lsn = await txn.commit()
        await watcher
        pieces = sink.submits - submits_before
        assert pieces >= 3, pieces                       # several MTR pieces ...
        assert len(sink.cpls) == cpls_before + 1         # ... with ONE CPL: the COMMIT record
        assert lsn in sink.cpls and sink.vdl >= lsn
        assert read_header(sink.records[lsn], 0).flags & FLAG_CPL
        mid = [(v, got) for v, got, submits in seen_during if submits - submits_before > 1]
        assert mid, "no observation between pieces"
        assert all(v == vdl_before and got is None for v, got in mid), mid[:5]
        assert all(v <= vdl_before or v >= lsn for v in sink.vdl_history)
        assert await db.get("t", key(ROWS - 1)) == b"v" * 40
        assert len(await db.scan("t", limit=dbmod.SCAN_LIMIT_MAX)) == ROWS
        assert sink.violations == []
    run(main())


def test_aborted_big_transaction_leaves_nothing_and_limits_hold():
    async def main():
        db, sink = await open_db()
        submits = sink.submits
        txn = db.begin(conflicts_from_commit=True, writes_max=dbmod.TXN_BIG_WRITES_MAX)
        for i in range(ROWS):
            txn.put("t", key(i), b"x")
        txn.abort()
        assert sink.submits == submits and await db.scan("t") == []
        small = db.begin()
        with pytest.raises(TooLargeError):           # the default bound is unchanged
            for i in range(dbmod.TXN_WRITES_MAX + 1):
                small.put("t", key(i), b"x")
        with pytest.raises(ValueError):
            db.begin(writes_max=dbmod.TXN_BIG_WRITES_MAX + 1)
        # A commit whose records cannot fit in LAL is refused before anything is emitted.
        tiny_db, tiny = await open_db(lal=500)
        allocated = tiny.allocator.last_volume_lsn
        txn = tiny_db.begin(conflicts_from_commit=True, writes_max=dbmod.TXN_BIG_WRITES_MAX)
        for i in range(ROWS):
            txn.put("t", key(i), b"x")
        with pytest.raises(TooLargeError):
            await txn.commit()
        assert tiny.allocator.last_volume_lsn == allocated and not tiny_db.read_only
        await tiny_db.put("t", b"after", b"ok")           # the database goes on
        assert sink.violations == [] and tiny.violations == []
    run(main())


def test_commit_refused_before_any_lsn_is_commit_refused():
    """A commit the sink refuses before LSNs are allocated (a writer that stepped down:
    its driver is closed) raises CommitRefused: nothing was logged, safe to retry; the
    database stays writable. A failure of the durability wait stays an UnavailableError
    that is NOT CommitRefused (its outcome is unknown)."""
    async def main():
        db, sink = await open_db()
        real_wait_room = sink.wait_room

        async def refused(n):
            raise UnavailableError("writer db1 stepped down: its storage driver is closed")
        sink.wait_room = refused
        allocated, submits = sink.allocator.last_volume_lsn, sink.submits
        with pytest.raises(CommitRefused) as info:
            await db.put("t", b"a", b"1")
        assert "nothing was written" in str(info.value)
        assert sink.allocator.last_volume_lsn == allocated and sink.submits == submits
        sink.wait_room = real_wait_room
        assert not db.read_only
        await db.put("t", b"a", b"2")
        assert await db.get("t", b"a") == b"2"

        async def lost(lsn, timeout_s=None):
            raise WriteQuorumUnavailable("no write quorum within the timeout")
        sink.wait_durable = lost
        with pytest.raises(UnavailableError) as info:
            await db.put("t", b"b", b"1")
        assert not isinstance(info.value, CommitRefused)
        assert sink.submits > submits   # it was shipped: the outcome is unknown
    run(main())


def test_on_logged_runs_before_durable_and_latest_reads_see_it():
    """Invariant 20's engine side: ``commit(on_logged=...)`` runs when the COMMIT record is
    in the log, before VDL reaches it; a ``latest`` read then sees the value (and notes its
    LSN in read_lsn) while a durable read does not; the commit returns only once durable."""
    async def main():
        db, sink = await open_db()
        sink.ack_delay_s = None     # from now on, acks only when the test says so
        logged = []
        txn = db.begin(conflicts_from_commit=True)
        txn.put("t", b"k", b"new")
        task = asyncio.ensure_future(txn.commit(on_logged=lambda lsn: logged.append((lsn, sink.vdl))))
        for _ in range(20):
            await asyncio.sleep(0)
        assert logged and logged[0][1] < logged[0][0] and not task.done()
        reader = db.begin(conflicts_from_commit=True)
        assert await reader.get("t", b"k", latest=True) == b"new"
        # Its page's LSN: above VDL, inside the commit's MTR (VDL >= it means VDL >= the
        # MTR's CPL, as VDL is always a CPL).
        assert sink.vdl < reader.read_lsn <= logged[0][0]
        assert await db.get("t", b"k") is None        # durable read: as of VDL
        sink.ack_all()
        assert await task == logged[0][0]
        await db.wait_durable(reader.read_lsn)
        assert sink.violations == []
    run(main())
