"""Regression tests for bugs the chaos suite found (docs/reliability.md, "Findings").

Each is the smallest deterministic reproduction of what a chaos run showed, on the
in-process engine with the fake sink (tests/fake_sink.py).
"""

from __future__ import annotations

import asyncio

import pytest

from engine.db.database import LAST_READ_POINT
from engine.errors import ConflictError
from tests.fake_sink import FakeSink
from tests.test_engine import LAYOUT, acked, new_db, run, spin


def test_snapshot_fallback_conflict_survives_a_prune_during_the_snapshot_read():
    """Scenario (chaos seed 11, bank total 800 -> 810): T1 commits k, not yet durable. T2
    begins after it and reads k: the read falls back to a snapshot at VDL (k's OLD value)
    and, WHILE the snapshot read awaits storage, T1 becomes durable and another
    transaction's close prunes the conflict entries at or below VDL. T2 then writes k and
    must still abort: it read a value older than T1's commit. Before the fix T2 lowered
    its start LSN only after the snapshot read returned, the entry for T1 was already
    pruned, and T2 overwrote T1's update (a lost update, money created)."""
    async def main():
        sink, db = await new_db(sink=FakeSink(layout=LAYOUT, ack_delay_s=None))
        await acked(sink, db.put("t", b"k", b"100"))
        t1 = db.begin()
        t1.put("t", b"k", b"90")
        t1_commit = asyncio.ensure_future(t1.commit())
        await spin()
        assert sink.unacked() and not t1_commit.done()
        t2 = db.begin()
        real_read_page = sink.read_page

        async def read_page_while_t1_becomes_durable(page_id, read_point):
            sink.read_page = real_read_page
            sink.ack_all()
            await t1_commit              # VDL now covers T1
            db.begin().abort()           # a close prunes conflict entries <= horizon
            return await real_read_page(page_id, read_point)

        sink.read_page = read_page_while_t1_becomes_durable
        assert await t2.get("t", b"k") == b"100"       # the snapshot value, older than T1
        assert db.counters["read_snapshots"] >= 1
        t2.put("t", b"k", b"110")
        with pytest.raises(ConflictError):
            await acked(sink, t2.commit())
        assert await acked(sink, db.get("t", b"k")) == b"90"
    run(main())


def test_read_point_names_the_state_the_read_saw():
    """Scenario (chaos bank checker, rolling restart): a read sees a not-yet-durable page
    and waits for it; meanwhile a LATER commit to the same key is emitted and both become
    durable together. The read returns the earlier value, so the read point it reports
    (GetReply.read_point) must be below the later commit: before the fix it was the VDL
    after the wait, which covered the later commit the read never saw."""
    async def main():
        sink, db = await new_db(sink=FakeSink(layout=LAYOUT, ack_delay_s=None))
        await acked(sink, db.put("t", b"a", b"1"))
        c1 = asyncio.ensure_future(db.put("t", b"a", b"2"))      # not durable yet
        await spin()

        async def read_and_point():
            v = await db.get("t", b"a")
            return v, LAST_READ_POINT.get()

        read = asyncio.ensure_future(read_and_point())           # sees a=2, waits for it
        await spin()
        c2 = asyncio.ensure_future(db.put("t", b"a", b"3"))      # a later commit
        await spin()
        sink.ack_all()
        lsn1, lsn2 = await c1, await c2
        value, point = await read
        assert value == b"2"
        assert lsn1 <= point < lsn2, (lsn1, point, lsn2)
    run(main())
