"""The group-commit loop (engine/group_commit.py) shared by the storage node and the block
server: one durable write per round, foreground before background, results and errors
delivered to each submitter. In-process, no LMDB: the durable write is a recording stub."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from engine.group_commit import GroupCommitLoop

log = logging.getLogger(__name__)


class Recorder:
    """A durable write that records each round and can be held until released."""

    def __init__(self, fail_on: object = None) -> None:
        self.rounds: list[list] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on

    def __call__(self, items: list) -> list:
        self.gate.wait(5)
        self.rounds.append(list(items))
        if self.fail_on in items:
            raise OSError("disk full")
        return [ValueError(f"refused {i}") if str(i).startswith("bad") else f"ok {i}"
                for i in items]


def run(body):
    return asyncio.run(asyncio.wait_for(body(), 10))


def test_one_round_takes_all_pending_foreground_and_one_background():
    """While a round is held, 5 foreground and 3 background items queue; the next round
    takes all 5 foreground items and no background one (foreground waits for nothing),
    then the background items go one per round."""
    async def body():
        write = Recorder()
        loop = GroupCommitLoop(write, owner="test", logger=log, bg_max_wait_s=60.0)
        loop.start()
        write.gate.clear()
        first = asyncio.ensure_future(loop.submit("first"))
        await asyncio.sleep(0.05)  # the writer task is now inside the held round
        fg = [asyncio.ensure_future(loop.submit(f"fg{i}")) for i in range(5)]
        bg = [asyncio.ensure_future(loop.submit(f"bg{i}", background=True)) for i in range(3)]
        await asyncio.sleep(0.05)
        write.gate.set()
        results = await asyncio.gather(first, *fg, *bg)
        await loop.close()
        return write.rounds, results
    rounds, results = run(body)
    assert rounds == [["first"], [f"fg{i}" for i in range(5)], ["bg0"], ["bg1"], ["bg2"]]
    assert results == ["ok first"] + [f"ok fg{i}" for i in range(5)] + [f"ok bg{i}" for i in range(3)]


def test_background_joins_foreground_round_after_max_wait():
    """A background item that waited longer than bg_max_wait_s rides along with the
    foreground items of the next round (it is never starved for good)."""
    async def body():
        write = Recorder()
        loop = GroupCommitLoop(write, owner="test", logger=log, bg_max_wait_s=0.01)
        loop.start()
        write.gate.clear()
        first = asyncio.ensure_future(loop.submit("first"))
        await asyncio.sleep(0.05)
        bg = asyncio.ensure_future(loop.submit("bg", background=True))
        fg = asyncio.ensure_future(loop.submit("fg"))
        await asyncio.sleep(0.05)
        write.gate.set()
        await asyncio.gather(first, bg, fg)
        await loop.close()
        return write.rounds
    assert run(body) == [["first"], ["fg", "bg"]]


def test_bounds_split_rounds_by_items_and_bytes():
    """txn_items_max and txn_bytes_max (by item_bytes) cut a backlog into several rounds;
    an item larger than the byte bound still goes, alone."""
    async def body():
        write = Recorder()
        loop = GroupCommitLoop(write, owner="test", logger=log, txn_items_max=3,
                               txn_bytes_max=10, item_bytes=len)
        loop.start()
        write.gate.clear()
        first = asyncio.ensure_future(loop.submit("x"))
        await asyncio.sleep(0.05)
        items = ["a", "b", "c", "d", "eeeeeeeeeeee", "ffff", "gggggg"]
        futs = [asyncio.ensure_future(loop.submit(i)) for i in items]
        await asyncio.sleep(0.05)
        write.gate.set()
        await asyncio.gather(first, *futs)
        await loop.close()
        return write.rounds
    assert run(body) == [["x"], ["a", "b", "c"], ["d"], ["eeeeeeeeeeee"], ["ffff", "gggggg"]]


def test_refusals_and_failed_writes_reach_their_submitters():
    """A result that is an exception is raised to its own submitter only; a write that
    raises fails every item of its round, and the loop goes on with the next round."""
    async def body():
        write = Recorder(fail_on="boom")
        loop = GroupCommitLoop(write, owner="test", logger=log)
        loop.start()
        ok = await loop.submit("good")
        with pytest.raises(ValueError, match="refused bad1"):
            await loop.submit("bad1")
        with pytest.raises(OSError, match="disk full"):
            await loop.submit("boom")
        after = await loop.submit("later")
        await loop.close()
        with pytest.raises(RuntimeError, match="test is shutting down"):
            await loop.submit("too late")
        return ok, after
    assert run(body) == ("ok good", "ok later")


def test_before_write_delay_is_slept_before_each_round():
    """before_write_s (the injected slow disk) delays every round by its value."""
    async def body():
        write = Recorder()
        loop = GroupCommitLoop(write, owner="test", logger=log, before_write_s=lambda: 0.05)
        loop.start()
        started = asyncio.get_running_loop().time()
        for i in range(3):
            await loop.submit(i)
        elapsed = asyncio.get_running_loop().time() - started
        await loop.close()
        return elapsed
    assert run(body) >= 3 * 0.05
