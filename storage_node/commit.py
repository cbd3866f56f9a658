"""Group commit: one writer task turns all pending work into ONE LMDB write transaction.

Every durable change of a storage node goes through ``GroupCommitter.submit``. Foreground
work (Append, Truncate, fencing, CreateVolume, SetGcHorizon) and background work (records
pulled by gossip, page versions from the coalescer, GC steps, scrub quarantines) wait in
two bounded queues. A single writer task drains them::

    submit(op) --> [foreground queue, <= FG_OPS_MAX] --+
                                                       +--> writer task --> executor thread:
    submit(op, background=True) --> [background, <=   |       Store.apply_ops(ops)
                                     BG_OPS_MAX] ------+       (one txn, sync commit)
                                                               --> resolve every future

Priority (P17 Fig. 4: background work below foreground): a transaction takes every
pending foreground op (up to ``txn_ops_max`` / ``txn_bytes_max``) and at most one
background op, and that one only when no foreground op is waiting or the oldest
background op has waited longer than ``bg_max_wait_s`` (so background work is never
starved for good). While one transaction commits (fsync), new requests pile up and go
into the next one: the batch size adapts to load with no timer (invariant 2's group
commit, on the storage side). Acknowledgements are sent only after the commit returned,
i.e. after the data is on disk (invariant 3). In chaos mode ($AURORA_FAULTS_FILE) the
SCLs a transaction changed are appended to the node's SCL log first
(engine/chaos/faults.py), the record the durability checker trusts.

The LMDB transaction runs in a dedicated single-thread executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time

from engine.chaos import faults
from storage_node.store import AppendOp, Store

FG_OPS_MAX = 1024        # foreground ops waiting; submitters wait (back-pressure) above it
BG_OPS_MAX = 16          # background ops waiting
TXN_OPS_MAX = 512        # ops in one transaction
TXN_BYTES_MAX = 32 << 20  # record bytes in one transaction
BG_MAX_WAIT_S = 0.1


def _op_bytes(op) -> int:
    if isinstance(op, AppendOp):
        return sum(len(b.buf) for b in op.batches)
    return 0


class GroupCommitter:
    """The single writer of a Store (see module doc)."""

    def __init__(self, store: Store, logger: logging.LoggerAdapter | logging.Logger, *,
                 txn_ops_max: int = TXN_OPS_MAX, txn_bytes_max: int = TXN_BYTES_MAX,
                 bg_max_wait_s: float = BG_MAX_WAIT_S) -> None:
        self.store = store
        self.log = logger
        self.txn_ops_max = txn_ops_max
        self.txn_bytes_max = txn_bytes_max
        self.bg_max_wait_s = bg_max_wait_s
        self._fg: collections.deque = collections.deque()
        self._bg: collections.deque = collections.deque()
        self._fg_slots = asyncio.Semaphore(FG_OPS_MAX)
        self._bg_slots = asyncio.Semaphore(BG_OPS_MAX)
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmdb-writer")
        #: Ops per transaction of the last commits, for status and benchmarks.
        self.txns = 0
        self.ops = 0
        #: Chaos mode only: the node's record of its SCLs for the durability checker.
        self._scl_log = faults.scl_log_for(store.node_id)

    def start(self) -> None:
        assert self._task is None
        self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def submit(self, op, background: bool = False):
        """Queue ``op``; return its result once it is durable, or raise its StorageError."""
        if self._closing:
            raise RuntimeError("storage node is shutting down")
        slots = self._bg_slots if background else self._fg_slots
        await slots.acquire()
        fut = asyncio.get_running_loop().create_future()
        (self._bg if background else self._fg).append((op, fut, time.monotonic()))
        self._wake.set()
        try:
            result = await fut
        finally:
            slots.release()
        if isinstance(result, Exception):
            raise result
        return result

    def _take(self) -> list:
        taken = []
        nbytes = 0
        while self._fg and len(taken) < self.txn_ops_max:
            op_bytes = _op_bytes(self._fg[0][0])
            if taken and nbytes + op_bytes > self.txn_bytes_max:
                break
            taken.append(self._fg.popleft())
            nbytes += op_bytes
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
            ops = [t[0] for t in taken]
            slow_disk_s = faults.disk_delay_s(self.store.node_id)  # injected (engine/chaos/faults.py)
            if slow_disk_s > 0:
                await asyncio.sleep(slow_disk_s)
            try:
                results = await loop.run_in_executor(self._executor, self.store.apply_ops, ops)
            except Exception as exc:  # the whole transaction aborted: nothing of it stored
                self.log.error("write transaction of %d ops failed: %r", len(ops), exc)
                results = [exc] * len(ops)
            if self._scl_log is not None:  # after the sync, before any ack of this txn
                self._scl_log.record(self.store.segments())
            self.txns += 1
            self.ops += len(ops)
            for (_op, fut, _t), result in zip(taken, results):
                if not fut.done():
                    fut.set_result(result)

    async def close(self) -> None:
        """Finish every queued op (in-flight commits complete), then stop the writer."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
        if self._scl_log is not None:
            self._scl_log.close()
