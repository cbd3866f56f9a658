"""Background work of a storage node, below foreground appends in priority [P17 Fig. 4].

Four asyncio tasks; each plans in the background read thread (``node.bg_executor``) and
writes through the group committer's background queue, in small batches, sleeping between
them. None of them can delay an Append by more than one small transaction.

    task        what                                                  bound per step
    coalesce    fold a page's new records into a new page version     coalesce_pages pages
                once it has ``coalesce_records`` of them, and every
                page with any new record every ``coalesce_sweep_s``;
                while writers append faster than busy_records_per_s,
                only pages with coalesce_records_busy new records,
                and pausing so that folding takes at most
                coalesce_busy_share of the time (duty cycle);
                first it folds page-index deltas into per-page   one segment's deltas
                rows (index_fold_deltas of them while busy)
    gc          below min(PGMRPL, SCL): keep each page's newest        gc_pages pages
                version <= horizon and all above; drop the rest
                and the records they cover (invariant 12)
    scrub       verify every stored record and page version            scrub_records records,
                checksum; quarantine what fails (invariant 13)         scrub_versions versions
    repair      quarantine what reads stumbled on; rebuild bad page    all quarantined pages
                versions from the local log (identical bytes,
                invariant 14); what the log cannot rebuild is left
                to gossip.py, which refetches from a peer

Page versions are only a cache of log application (invariant 14): dropping them all and
letting ``coalesce`` rebuild them gives identical bytes.
"""

from __future__ import annotations

import asyncio
import random
import time

from storage_node.node import StorageNode, node_logger
from storage_node.store import KIND_RECORD, KIND_RUN, FoldIndexOp, PutVersionsOp, QuarantineOp


class Background:
    """Coalesce, GC, scrub and repair tasks of one node (see module doc)."""

    def __init__(self, node: StorageNode, seed: int | None = None) -> None:
        self.node = node
        self.store = node.store
        self.t = node.tuning
        self.rng = random.Random(seed)
        self.log = node_logger("storage_node.background", node.node_id, node.az)
        self._tasks: list[asyncio.Task] = []
        self.scrub_passes = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for name, fn in (("coalesce", self._coalesce_loop), ("gc", self._gc_loop),
                         ("scrub", self._scrub_loop), ("repair", self._repair_loop)):
            self._tasks.append(loop.create_task(self._guard(name, fn), name=name))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _guard(self, name: str, fn) -> None:
        """Run a loop forever; a failure is logged and the loop restarts after a pause."""
        while True:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("background task %s failed; restarting it", name)
                await asyncio.sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds * self.rng.uniform(0.8, 1.2))

    # -- coalesce -------------------------------------------------------------------------

    def _foreground_rate(self) -> float:
        """Records/s received from writers since the last call (the load signal)."""
        now = time.monotonic()
        received = self.node.counters.records_received
        last_t, last_n = self._rate_mark
        self._rate_mark = (now, received)
        return (received - last_n) / max(1e-3, now - last_t)

    async def _coalesce_loop(self) -> None:
        last_sweep = time.monotonic()
        self._rate_mark = (last_sweep, self.node.counters.records_received)
        while True:
            await self._sleep(self.t.coalesce_interval_s)
            for key in list(self.store.needs_sweep)[:4]:
                self.store.needs_sweep.discard(key)
                counts = await self.node.read_bg(self.store.sweep_dirty, *key)
                self.store.set_dirty(key, counts)
            # Under heavy foreground load, fold only pages with a long backlog: coalescing
            # costs CPU (and the GIL) that appends need, and reads apply the records anyway.
            busy = self._foreground_rate() > self.t.busy_records_per_s
            sweep = not busy and time.monotonic() - last_sweep >= self.t.coalesce_sweep_s
            if sweep:
                last_sweep = time.monotonic()
            await self.fold_index(1 if not busy else self.t.index_fold_deltas)
            threshold = 1 if sweep else (self.t.coalesce_records_busy if busy else self.t.coalesce_records)
            work = self.store.take_dirty(threshold, self.t.coalesce_pages * 8)
            # Busy pages have long backlogs spread over the same runs: a step then takes
            # 4x the pages, so the one walk over those runs (Store._coalesce_by_walk)
            # serves more of them.
            step = self.t.coalesce_pages * (4 if busy else 1)
            for (volume, pg), pages in work:
                for i in range(0, len(pages), step):
                    started = time.monotonic()
                    await self.coalesce(volume, pg, pages[i:i + step])
                    if busy:  # duty cycle: at most coalesce_busy_share of the time
                        share = min(1.0, max(0.01, self.t.coalesce_busy_share))
                        await asyncio.sleep((time.monotonic() - started) * (1.0 / share - 1.0))

    async def fold_index(self, at_least: int) -> int:
        """Fold the page-index deltas of every segment that has ``at_least`` of them into
        per-page groups (one background transaction each). Returns the deltas folded."""
        folded = 0
        for key, n in list(self.store.deltas().items()):
            while n >= max(1, at_least):  # FoldIndexOp folds at most FOLD_DELTAS_MAX
                done = await self.node.commit(FoldIndexOp(*key), background=True)
                if not done:
                    break
                folded += done
                n -= done
        return folded

    async def coalesce(self, volume: str, pg: int, pages: list[int]) -> int:
        """Fold the pages' complete records into new page versions (one small txn)."""
        op, _next = await self.node.read_bg(self.store.plan_coalesce, volume, pg, pages)
        if op is None:
            return 0
        n = await self.node.commit(op, background=True)
        self.node.counters.pages_materialised += n
        return n

    # -- GC -------------------------------------------------------------------------------

    async def _gc_loop(self) -> None:
        while True:
            await self._sleep(self.t.gc_interval_s)
            for key in self.store.segment_keys():
                m = self.store.segment(*key)
                horizon = min(m.gc_horizon, m.scl)
                if horizon > m.gc_done:
                    await self.gc_segment(key[0], key[1], horizon)

    async def gc_segment(self, volume: str, pg: int, horizon: int) -> int:
        """One full GC pass of a segment below ``horizon``, in bounded steps."""
        start = 0
        removed = 0
        while start is not None:
            op, start = await self.node.read_bg(self.store.plan_gc, volume, pg, horizon, start,
                                                self.t.gc_pages)
            removed += await self.node.commit(op, background=True)
        self.node.counters.gc_records_deleted += removed
        if removed:
            self.log.info("gc: segment %s/%d below %d: %d records and versions removed",
                          volume, pg, horizon, removed)
        return removed

    # -- scrub ------------------------------------------------------------------------------

    async def _scrub_loop(self) -> None:
        await self._sleep(0.5)  # a restarted node scrubs soon after it starts
        while True:
            found = 0
            for key in self.store.segment_keys():
                found += await self.scrub_segment(*key)
            self.scrub_passes += 1
            if found:
                self.log.warning("scrub pass %d: %d bad items quarantined", self.scrub_passes, found)
            await self._sleep(self.t.scrub_interval_s)

    async def scrub_segment(self, volume: str, pg: int) -> int:
        found = 0
        after, done = 0, False
        while not done:
            bad, bad_runs, after, done = await self.node.read_bg(
                self.store.scrub_records, volume, pg, after, self.t.scrub_records)
            if bad or bad_runs:
                found += await self._quarantine(volume, pg, bad, [], bad_runs)
            await asyncio.sleep(self.t.scrub_pause_s)
        last, done = (0, 0), False
        while not done:
            bad, last, done = await self.node.read_bg(self.store.scrub_versions, volume, pg, last,
                                                      self.t.scrub_versions)
            if bad:
                found += await self._quarantine(volume, pg, [], bad)
            await asyncio.sleep(self.t.scrub_pause_s)
        return found

    async def _quarantine(self, volume: str, pg: int, records: list, versions: list,
                          runs: list = ()) -> int:
        n = await self.node.commit(QuarantineOp(volume, pg, records, versions, list(runs)),
                                   background=True)
        self.node.counters.scrub_errors_found += n
        return n

    # -- repair -----------------------------------------------------------------------------

    async def _repair_loop(self) -> None:
        while True:
            await self._sleep(self.t.repair_interval_s)
            for (volume, pg), kind, item in self.store.take_suspects():
                if kind == KIND_RECORD:
                    await self._quarantine(volume, pg, [item], [])
                elif kind == KIND_RUN:
                    await self._quarantine(volume, pg, [], [], [item])
                else:
                    await self._quarantine(volume, pg, [], [item])
            for key in self.store.segment_keys():
                _records, versions = self.store.quarantined(key)
                for page_id, lsn in sorted(versions):
                    await self.rebuild_version(key[0], key[1], page_id, lsn)

    async def rebuild_version(self, volume: str, pg: int, page_id: int, lsn: int) -> bool:
        """Rebuild a quarantined page version from the log; else mark it for a peer."""
        key = (volume, pg)
        if self.store.needs_peer_page(key, page_id, lsn):
            return False
        generation = self.store.segment(volume, pg).generation
        image = await self.node.read_bg(self.store.buildable_version, volume, pg, page_id, lsn)
        if image is None:
            self.store.mark_needs_peer_page(key, page_id, lsn)
            self.log.warning("repair: page %d version %d of %s/%d cannot be rebuilt from the "
                             "local log (GC'd); asking peers", page_id, lsn, volume, pg)
            return False
        await self.node.commit(PutVersionsOp(volume, pg, generation, [(page_id, lsn, image)]),
                               background=True)
        self.log.info("repair: page %d version %d of %s/%d rebuilt from the log", page_id, lsn,
                      volume, pg)
        return True
