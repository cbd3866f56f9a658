"""The group-commit loop: one writer task turns every pending request into ONE durable write.

Used by the storage node (storage_node/commit.py: one LMDB write transaction per round,
invariant 3) and by the baseline's block server (engine/baseline/block_server.py). It
knows nothing of what is written: the owner passes ``durable_write(items) -> results``,
which runs in a dedicated single-thread executor (never on the event loop) and returns
one result per item, after the data is durable::

    submit(item) --> [foreground lane, <= fg_pending_max] --+
                                                            +--> writer task --> executor:
    submit(item, background=True) --> [background lane, <=  |      durable_write(items)
                                       bg_pending_max] -----+      --> resolve every future

Priority (P17 Fig. 4: background work below foreground): a round takes every pending
foreground item (up to ``txn_items_max`` items and ``txn_bytes_max`` bytes as measured by
``item_bytes``) and at most ONE background item, and that one only when no foreground
item is waiting or the oldest background item has waited longer than ``bg_max_wait_s``
(so background work is never starved for good). While one write runs, new requests pile
up and go into the next round: the batch size follows the load with no timer.

Results: ``submit`` returns the item's result once its round is durable; a result that is
an exception (a refusal of that item, or the error that aborted the whole write, which
then stored nothing) is raised to its submitter instead. ``before_write_s()``, if given,
is slept before each write (the injected slow disk of engine/hooks.py).

Imports only the standard library (asyncio, no grpc, no lmdb): storage_node/ and the
baseline may both use it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from typing import Any, Callable, Sequence

from engine.metrics import Buckets

#: Default bound on the items of one round (transaction).
TXN_ITEMS_MAX = 512
#: Default bound on the foreground items waiting; submitters wait (back-pressure) above it.
FG_PENDING_MAX = 1024
#: Default bound on the background items waiting.
BG_PENDING_MAX = 16
#: Default time after which the oldest background item goes in even with foreground work.
BG_MAX_WAIT_S = 0.1


def _no_bytes(_item: Any) -> int:
    return 0


class GroupCommitLoop:
    """One writer task over two lanes of pending items (see the module doc)."""

    def __init__(self, durable_write: Callable[[list], Sequence], *, owner: str,
                 logger: logging.Logger | logging.LoggerAdapter,
                 txn_items_max: int = TXN_ITEMS_MAX, txn_bytes_max: int | None = None,
                 item_bytes: Callable[[Any], int] = _no_bytes,
                 fg_pending_max: int = FG_PENDING_MAX, bg_pending_max: int = BG_PENDING_MAX,
                 bg_max_wait_s: float = BG_MAX_WAIT_S,
                 before_write_s: Callable[[], float] | None = None,
                 after_write: Callable[[], None] | None = None,
                 task_name: str = "group-commit", thread_name: str = "lmdb-writer") -> None:
        self.durable_write = durable_write
        self.owner = owner                  # for errors and logs: "storage node", ...
        self.log = logger
        self.txn_items_max = txn_items_max
        self.txn_bytes_max = txn_bytes_max  # None: no bound
        self.item_bytes = item_bytes
        self.bg_max_wait_s = bg_max_wait_s
        self.before_write_s = before_write_s
        self.after_write = after_write      # runs after each durable write, before any result
        self.task_name = task_name
        self._fg: collections.deque = collections.deque()   # (item, future, queued at s)
        self._bg: collections.deque = collections.deque()
        self._fg_slots = asyncio.Semaphore(fg_pending_max)
        self._bg_slots = asyncio.Semaphore(bg_pending_max)
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        #: Rounds (durable writes) and items written so far, for status and benchmarks.
        self.txns = 0
        self.ops = 0
        #: Wall time of each durable write (sync included) as this loop sees it, for the
        #: processes' metrics (engine/metrics.py); plain ints, no lock.
        self.write_seconds = Buckets()

    def start(self) -> None:
        assert self._task is None, "the writer task is already running"
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def submit(self, item, background: bool = False):
        """Queue ``item``; return its result once it is durable, or raise it if it is an
        exception."""
        result = await (await self.enqueue(item, background))
        if isinstance(result, Exception):
            raise result
        return result

    async def enqueue(self, item, background: bool = False) -> asyncio.Future:
        """Queue ``item`` (waiting for a slot: back-pressure) and return the future of its
        result, set once its round is durable; a result that is an exception is returned
        as the future's value, not raised. For callers that keep many items in flight
        without a task each (the storage node's AppendStream)."""
        if self._closing:
            raise RuntimeError(f"{self.owner} is shutting down")
        slots = self._bg_slots if background else self._fg_slots
        await slots.acquire()
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _f: slots.release())
        (self._bg if background else self._fg).append((item, fut, time.monotonic()))
        self._wake.set()
        return fut

    def _take(self) -> list:
        """The next round: foreground first, then at most one background item."""
        taken = []
        nbytes = 0
        while self._fg and len(taken) < self.txn_items_max:
            size = self.item_bytes(self._fg[0][0])
            if taken and self.txn_bytes_max is not None and nbytes + size > self.txn_bytes_max:
                break
            taken.append(self._fg.popleft())
            nbytes += size
        if self._bg and (not taken or time.monotonic() - self._bg[0][2] > self.bg_max_wait_s):
            taken.append(self._bg.popleft())
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._fg and not self._bg:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            taken = self._take()
            items = [t[0] for t in taken]
            if self.before_write_s is not None:
                delay_s = self.before_write_s()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.durable_write, items)
            except Exception as exc:  # the whole write aborted: nothing of it stored
                self.log.error("%s: write transaction of %d requests failed: %r", self.owner,
                               len(items), exc)
                results = [exc] * len(items)
            if self.after_write is not None:
                self.after_write()
            self.write_seconds.observe(time.perf_counter() - started)   # for metrics
            self.txns += 1
            self.ops += len(items)
            for (_item, fut, _t), result in zip(taken, results):
                if not fut.done():
                    fut.set_result(result)

    async def close(self) -> None:
        """Finish every queued item (in-flight writes complete), then stop the writer."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
