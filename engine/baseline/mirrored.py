"""The mirrored page-writing baseline: the SAME engine over mirrored MySQL's storage path.

The write-amplification benchmark (docs/benchmarks.md, engine/baseline/wa_bench.py) runs one
engine.db.database.Database twice: over engine/writer/storage_driver.py (aurora-lite: redo records
to six storage nodes, 4/6 quorum) and over ``BaselineSink`` here, a RedoSink
(engine/db/sink.py) that stores the database the way mirrored MySQL does [P17 3.2, Fig. 2]::

       primary instance (this process, AZ a)                     standby (AZ b)
       engine --submit--> BaselineSink
                            | redo log write  \\  every write, in order:
                            | binlog write     |  (1) -> bs1 (AZ a) --(2) mirror--> bs2
                            | double-write     |       ack once both hold it
                            | page writes      |  (3) -> bs3 (AZ b) --(4) mirror--> bs4
                            | metadata write  /        ack once both hold it
                            v
                          BlockChain: (1)+(2) then (3)+(4), sequential and synchronous

The engine itself is unchanged: it still never writes a page and still hands redo records
to its sink. What differs is only what the sink puts on the network.

Modelling choices (each one also in docs/benchmarks.md; none of them is meant to cripple
or flatter the baseline):

* Commit = redo-log write, then binlog write (MySQL's two-phase commit with
  innodb_flush_log_at_trx_commit=1 and sync_binlog=1: InnoDB prepare is synced before the
  binlog is written and synced). The commit's LSN is durable (VDL moves, commits are
  released) when the binlog write of its group is acked by the whole chain. MySQL's third
  step, the InnoDB commit marker, is not synced in MySQL 5.7 and is not written here.
* Group commit, no timer, like the storage driver: at most one group is in the redo stage
  and one in the binlog stage (MySQL's flush and sync stages pipeline the same way).
  While a group's redo write is in flight, new commits pile up in the open group and leave
  together when it returns; a lone commit goes out at once.
* The redo write carries the engine's redo records byte for byte (the very bytes
  aurora-lite sends), with no 512-byte log-block framing. The binlog is MySQL 5.7 ROW
  format with binlog_row_image=FULL: per transaction a GTID (65 B), BEGIN (80 B),
  TABLE_MAP (60 B per table) and XID (31 B) event; per changed row one rows event (36 B of
  header and checksum) carrying the after image (insert), the before image (delete) or
  both (update). Rows are cell changes (INSERT/UPDATE/DELETE_CELL) on B+tree leaves of the
  tables in ``binlog_tables`` (None: every table): a secondary index modelled as its own
  table is not binlogged, as in MySQL. Page splits are physical and have no event.
* The sink keeps its own image of every page by applying the records with
  engine.materialiser, so it knows each dirty page's bytes (MySQL's buffer pool holds
  them). A page is dirty from its first record after it was last written home.
* Page flushing is in the background (the page cleaner task), by MySQL's two rules:
  LRU flushing: a page the engine's buffer pool evicts while still dirty here must be
  written (MySQL can free a frame only by writing it first; the engine's pool, of the same
  size as aurora-lite's, calls ``page_evicted``); checkpoint flushing: when the checkpoint
  age (redo bytes since the oldest unwritten change) exceeds ``flush_lwm`` (10%, MySQL's
  innodb_adaptive_flushing_lwm) of the redo log capacity (96 MiB, MySQL's 2 x 48 MiB),
  the oldest dirty pages are written until the age is below half of that. A page is
  written only once its newest record is durable (the WAL rule).
* A flush batch (at most ``dblwr_pages`` = 120 pages, innodb's doublewrite batch) is
  three writes, in order: all pages to the double-write area (one sequential write), then
  each page at its home location (one write per page, all in one request, as MySQL issues
  them asynchronously before one fsync), then a 512-byte metadata write (the checkpoint
  record). Each goes through the whole chain.
* Back-pressure: a commit waits before allocating LSNs (``wait_room``) while more than
  ``lru_backlog_max`` evicted pages wait to be written (MySQL's foreground threads wait
  for a free page), while the checkpoint age exceeds 7/8 of the log capacity (MySQL's
  sync flush point), or at VDL + LAL (the same LAL as aurora-lite).
* Reads (``read_page``, i.e. the engine's buffer pool missed): a page the pool evicted
  while it was dirty here waits until its LRU write has finished (MySQL wrote it before
  reusing the frame; a thread that needs it again waits for that I/O), and is then read
  back like any clean page: from the primary's block server (one Read RPC, counted). A
  page that is dirty here for another reason (being written by a checkpoint flush when
  the pool dropped it) is served from the image with no I/O.
  A read as of an older read point (the engine's snapshot reads) is rebuilt from the
  page's image before its dirty period plus its records; if the page was written home
  past the read point meanwhile, ``UnavailableError`` is raised (counted as
  ``old_version_misses``; MySQL would use undo, which is not modelled).
* Logs are circular: the redo and binlog areas hold LOG_SLOTS writes; a write overwrites
  the slot LOG_SLOTS writes back (block_server.py stores one value per slot).

No I/O happens outside ``BlockChain``; every write it sends is counted in a
engine.baseline.io_count.Ledger (rules R1-R7 there).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass, field

from aurora_pb import block_pb2 as pb
from engine import materialiser
from engine.format import page as pagefmt
from engine.format.cluster_config import DEFAULT_LAL
from engine.errors import RpcError, UnavailableError, WriteQuorumUnavailable
from engine.transport import Channel, Transport, service_of
from engine.baseline.io_count import Ledger
from engine.format.page import META_PAGE_ID, PageType
from engine.writer.quorum import CommitQueue
from engine.format.redo import HEADER_SIZE, RecordType as RT
from engine.db.sink import LsnAllocator
from engine.format.volume import VolumeLayout

log = logging.getLogger(__name__)

REDO_LOG_BYTES_DEFAULT = 96 << 20   # MySQL 5.7 default: 2 log files x 48 MiB
FLUSH_LWM_DEFAULT = 0.10            # innodb_adaptive_flushing_lwm = 10 (%)
SYNC_FLUSH_AGE = 7 / 8              # checkpoint age (fraction of capacity) that stalls commits
DBLWR_PAGES_DEFAULT = 120           # innodb doublewrite batch (srv_doublewrite_batch_size)
LRU_BACKLOG_MAX_DEFAULT = 2 * DBLWR_PAGES_DEFAULT
PAGE_CLEANER_INTERVAL_S = 1.0       # MySQL's page cleaner wakes at least once a second
META_WRITE_BYTES = 512              # checkpoint record: one log-header block
LOG_SLOTS = 4096                    # writes a circular log area holds
RPC_TIMEOUT_S = 10.0
RETRY_BACKOFF_MAX_S = 1.0

# Binlog event sizes (MySQL 5.7, binlog_checksum=CRC32): 19-byte header + body + 4-byte CRC.
EVENT_HEADER = struct.Struct("<IBIIIH")   # timestamp, type, server_id, size, next_pos, flags
assert EVENT_HEADER.size == 19
GTID_EVENT_BYTES = 65
BEGIN_EVENT_BYTES = 80
TABLE_MAP_EVENT_BYTES = 60
XID_EVENT_BYTES = 31
ROWS_EVENT_OVERHEAD = 36                  # header, post-header, width, bitmaps, CRC
TXN_EVENTS_BYTES = GTID_EVENT_BYTES + BEGIN_EVENT_BYTES + XID_EVENT_BYTES
_ROW_RTYPES = (RT.INSERT_CELL, RT.UPDATE_CELL, RT.DELETE_CELL)
_U16 = struct.Struct("<H")
_U16U16 = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_META = struct.Struct("<QQQd")            # checkpoint LSN, redo position, pages flushed, time

AREA_REDO = pb.BLOCK_AREA_REDO
AREA_BINLOG = pb.BLOCK_AREA_BINLOG
AREA_DOUBLEWRITE = pb.BLOCK_AREA_DOUBLEWRITE
AREA_PAGE = pb.BLOCK_AREA_PAGE
AREA_META = pb.BLOCK_AREA_META
WRITE_KINDS = ("redo", "binlog", "doublewrite", "page", "meta")


def binlog_event(event_type: int, body_bytes: int, payload: bytes = b"") -> bytes:
    """One binlog event of 19 + body_bytes + 4 bytes; ``payload`` (row images) starts the
    body, zero filler completes it (the benchmark needs the sizes, not MySQL's layout)."""
    assert len(payload) <= body_bytes
    size = EVENT_HEADER.size + body_bytes + 4
    return (EVENT_HEADER.pack(int(time.time()), event_type, 1, size, 0, 0) + payload
            + bytes(body_bytes - len(payload)) + b"\0\0\0\0")


def rows_event_bytes(image_bytes: int) -> int:
    """Size of one rows event carrying ``image_bytes`` of row images."""
    return ROWS_EVENT_OVERHEAD + image_bytes


@dataclass
class BlockTarget:
    """One block server the instance writes to directly."""

    name: str
    az: str
    address: str
    delay_ms: float = 0.0        # one-way simulated delay from this instance (AZ + slow extra)


class BlockChain:
    """Sends block writes through the mirrored chain and counts them (see module doc).

    ``write`` sends one request to the primary's block server (which mirrors it in its AZ
    before acking), then, once acked, the same bytes to the standby's block server (which
    mirrors it too): [P17 Fig. 2] steps 1-2 then 3-5, sequential and synchronous. A failed
    RPC is retried with backoff until it succeeds or the chain is closed.
    """

    def __init__(self, volume: str, primary: BlockTarget, standby: BlockTarget,
                 ledger: Ledger | None = None, instance: str = "baseline",
                 rpc_timeout_s: float = RPC_TIMEOUT_S, *, transport: Transport) -> None:
        self.volume = volume
        self.transport = transport
        self.primary = primary
        self.standby = standby
        self.ledger = ledger if ledger is not None else Ledger()
        self.kinds = Ledger()           # sends to the primary, by write kind (redo, binlog, ...)
        self.instance = instance
        self.rpc_timeout_s = rpc_timeout_s
        self.retries = 0
        self._channels: dict[str, Channel] = {}
        self._stubs: dict[str, object] = {}
        self._closed = False

    async def start(self) -> None:
        for target in (self.primary, self.standby):
            channel = self.transport.channel(target.address, timeout_s=self.rpc_timeout_s)
            self._channels[target.name] = channel
            self._stubs[target.name] = channel.stub(service_of(pb, "Block"))

    async def close(self) -> None:
        self._closed = True
        for channel in self._channels.values():
            await channel.close()

    async def write(self, writes: list[pb.BlockWrite], kind: str) -> None:
        """Make ``writes`` durable on all four block servers (primary pair, then standby pair)."""
        assert kind in WRITE_KINDS and writes
        data = pb.BlockWriteRequest(volume=self.volume, writes=writes,
                                    sender=self.instance).SerializeToString()
        sizes = [len(w.data) for w in writes]
        self.kinds.sent_blocks(kind, sizes, len(data))
        for target in (self.primary, self.standby):
            await self._send(target, data, sizes)

    async def _send(self, target: BlockTarget, data: bytes, sizes: list[int]) -> None:
        backoff_s = 0.05
        while True:
            if self._closed:
                raise UnavailableError("the block chain is closed")
            self.ledger.sent_blocks(target.name, sizes, len(data))
            try:
                await _sleep_ms(target.delay_ms)
                await self._stubs[target.name].Write(data)   # serialised once for both pairs
                await _sleep_ms(target.delay_ms)
                return
            except RpcError as exc:
                if self._closed:
                    raise UnavailableError("the block chain is closed") from None
                self.retries += 1
                log.warning("block write to %s failed (%s); retrying", target.name, exc)
            await asyncio.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, RETRY_BACKOFF_MAX_S)

    async def read(self, area: int, offset: int) -> bytes | None:
        """The block at (area, offset) from the primary's block server (one hop)."""
        target = self.primary
        request = pb.BlockReadRequest(volume=self.volume, area=area, offset=offset)
        await _sleep_ms(target.delay_ms)
        reply = await self._stubs[target.name].Read(request)
        await _sleep_ms(target.delay_ms)
        self.ledger.read(target.name, len(reply.data))
        return reply.data if reply.found else None


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000.0)


@dataclass
class _Dirty:
    """A page's unwritten changes: its image before them plus the records since."""

    first_redo_pos: int                 # redo position of the first change (checkpoint age)
    base_lsn: int                       # page_lsn of ``base`` (0: page did not exist)
    base: bytes | None                  # image before the first change (None: created since)
    records: list[bytes] = field(default_factory=list)


@dataclass
class _Group:
    """One group commit: redo and binlog bytes of the MTRs submitted while the previous
    group's redo write was in flight."""

    redo: list[bytes] = field(default_factory=list)
    binlog: list[bytes] = field(default_factory=list)
    max_lsn: int = 0
    mtrs: int = 0


class BaselineSink:
    """RedoSink over the mirrored block chain (see the module doc for every choice)."""

    def __init__(self, chain: BlockChain, *, layout: VolumeLayout | None = None,
                 lal: int = DEFAULT_LAL, redo_log_bytes: int = REDO_LOG_BYTES_DEFAULT,
                 flush_lwm: float = FLUSH_LWM_DEFAULT, dblwr_pages: int = DBLWR_PAGES_DEFAULT,
                 lru_backlog_max: int = LRU_BACKLOG_MAX_DEFAULT,
                 binlog_tables: set[str] | None = None) -> None:
        assert lal > 0 and 0 < flush_lwm < SYNC_FLUSH_AGE and dblwr_pages >= 1
        self.chain = chain
        self.layout = layout or VolumeLayout()
        self.lal = lal
        self.allocator = LsnAllocator()
        self.redo_log_bytes = redo_log_bytes
        self.flush_lwm_bytes = int(flush_lwm * redo_log_bytes)
        self.sync_flush_bytes = int(SYNC_FLUSH_AGE * redo_log_bytes)
        self.dblwr_pages = dblwr_pages
        self.lru_backlog_max = lru_backlog_max
        self.binlog_tables = None if binlog_tables is None else {t.encode() for t in binlog_tables}
        self.commits = CommitQueue()
        self.pages: dict[int, bytearray] = {}        # every page's current image
        self._dirty: dict[int, _Dirty] = {}          # oldest first change first
        self._flushing: dict[int, _Dirty] = {}       # being written home
        self._evicted_dirty: dict[int, None] = {}    # LRU flush list (ordered set)
        self._lru_pending: set[int] = set()          # evicted dirty, write not finished
        self._page_table: dict[int, bytes] = {}      # leaf -> table name (cache)
        self._vdl = 0
        self._redo_pos = 0                           # redo bytes submitted
        self._redo_slot = 0
        self._binlog_slot = 0
        self._open = _Group()
        self._redo_busy = False
        self._binlog_stage = asyncio.Lock()
        self._progress = asyncio.Event()             # VDL moved or a flush finished
        self._cleaner_wake = asyncio.Event()
        self._flush_idle = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self.stats = {
            "groups": 0, "mtrs": 0, "transactions": 0, "redo_bytes": 0, "binlog_bytes": 0,
            "row_events": 0, "flush_batches": 0, "pages_flushed": 0, "lru_pages_flushed": 0,
            "checkpoint_pages_flushed": 0, "page_reads_block": 0, "page_reads_memory": 0,
            "old_version_misses": 0, "stalls_lal": 0, "stalls_lru": 0, "stalls_checkpoint": 0,
            "lru_read_waits": 0, "page_reads": 0, "page_read_ms_total": 0.0,
        }

    # --- Lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._flush_idle.set()
        self._spawn(self._page_cleaner())

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        for fut in self.commits.drain():
            if not fut.done():
                fut.set_exception(UnavailableError("baseline sink is shutting down"))
        await self.chain.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._closed:
            log.error("baseline background task failed: %r", task.exception())

    # --- RedoSink ------------------------------------------------------------------------

    @property
    def vdl(self) -> int:
        """Highest LSN whose group is durable on the whole chain (always an MTR's last)."""
        return self._vdl

    def checkpoint_age(self) -> int:
        """Redo bytes written since the oldest change not yet written home."""
        oldest = next(iter(self._dirty.values()), None)
        flushing = min((d.first_redo_pos for d in self._flushing.values()), default=None)
        firsts = [p for p in (oldest.first_redo_pos if oldest else None, flushing) if p is not None]
        return self._redo_pos - min(firsts) if firsts else 0

    async def wait_room(self, n_records: int) -> None:
        """LAL as in aurora-lite, plus MySQL's free-page and sync-flush waits."""
        if n_records > self.lal:
            raise ValueError(f"an MTR of {n_records} records can never fit under LAL {self.lal}")
        counted: set[str] = set()   # each kind of stall counts once per MTR
        while True:
            if self._closed:
                raise UnavailableError("baseline sink is closed")
            if self.allocator.next_lsn + n_records - 1 > self._vdl + self.lal:
                why = "stalls_lal"
            elif len(self._evicted_dirty) > self.lru_backlog_max:
                why = "stalls_lru"
                self._cleaner_wake.set()
            elif self.checkpoint_age() > self.sync_flush_bytes:
                why = "stalls_checkpoint"
                self._cleaner_wake.set()
            else:
                break
            if why not in counted:
                counted.add(why)
                self.stats[why] += 1
            self._progress.clear()
            await self._progress.wait()
        self.allocator.limit_lsn = self._vdl + self.lal

    def submit(self, records: list[tuple[int, int, bytes]]) -> None:
        """Apply one MTR to the page images, add its redo and binlog to the open group."""
        if self._closed:
            raise UnavailableError("baseline sink is closed")
        rows: list[bytes] = []
        tables: set[bytes] = set()
        is_txn = False
        redo_bytes = 0
        for _pg, _lsn, record in records:
            page_id = _U32.unpack_from(record, 32)[0]
            rtype = record[36]
            image = self.pages.get(page_id)
            dirty = self._dirty.get(page_id)
            if dirty is None:
                dirty = _Dirty(self._redo_pos, 0 if image is None else pagefmt.page_lsn(image),
                               None if image is None else bytes(image))
                self._dirty[page_id] = dirty
            dirty.records.append(record)
            if rtype == RT.COMMIT:
                is_txn = True
            elif rtype in _ROW_RTYPES and image is not None and pagefmt.page_type(image) == PageType.LEAF:
                self._row_event(page_id, image, rtype, record, rows, tables)
            new = materialiser.apply(image, page_id, record, verify_pages=False)
            if image is None:
                self.pages[page_id] = new
            redo_bytes += len(record)
        group = self._open
        group.redo.extend(r for _, _, r in records)
        if is_txn:
            group.binlog.append(binlog_event(33, GTID_EVENT_BYTES - 23))
            group.binlog.append(binlog_event(2, BEGIN_EVENT_BYTES - 23))
            for _ in tables:
                group.binlog.append(binlog_event(19, TABLE_MAP_EVENT_BYTES - 23))
            group.binlog.extend(rows)
            group.binlog.append(binlog_event(16, XID_EVENT_BYTES - 23))
            self.stats["transactions"] += 1
        group.max_lsn = records[-1][1]
        group.mtrs += 1
        self._redo_pos += redo_bytes
        self.stats["mtrs"] += 1
        if self.checkpoint_age() > self.flush_lwm_bytes:
            self._cleaner_wake.set()
        self._maybe_start_group()

    def _row_event(self, page_id: int, image: bytearray, rtype: int, record: bytes,
                   rows: list[bytes], tables: set[bytes]) -> None:
        """A ROW-format rows event for one leaf cell change (before the record is applied)."""
        payload = memoryview(record)[HEADER_SIZE:]
        slot = _U16.unpack_from(payload, 0)[0]
        images = []
        if rtype in (RT.UPDATE_CELL, RT.DELETE_CELL):
            key, value = pagefmt.cell(image, slot)
            images.append(key + value)              # before image
        else:
            key = bytes(payload[4:4 + _U16U16.unpack_from(payload, 0)[1]])
        if rtype in (RT.INSERT_CELL, RT.UPDATE_CELL):
            images.append(bytes(payload[4:]))       # after image: key + value
        table = self._table_of(page_id, key)
        if self.binlog_tables is not None and table is not None and table not in self.binlog_tables:
            return
        row = b"".join(images)
        tables.add(table or b"?")
        rows.append(binlog_event(30 if rtype == RT.INSERT_CELL else 31 if rtype == RT.UPDATE_CELL else 32,
                                 rows_event_bytes(len(row)) - 23, row))
        self.stats["row_events"] += 1

    def _table_of(self, page_id: int, key: bytes) -> bytes | None:
        """The table whose B+tree leads to leaf ``page_id`` for ``key`` (cached), or None."""
        table = self._page_table.get(page_id)
        if table is not None:
            return table
        meta = self.pages.get(META_PAGE_ID)
        if meta is None:
            return None
        for name, root_bytes in pagefmt.cells(meta):
            node = _U32.unpack(root_bytes)[0]
            for _ in range(64):
                image = self.pages.get(node)
                if image is None or pagefmt.page_type(image) != PageType.INTERNAL:
                    break
                node = pagefmt.child_for(image, key)
            if node == page_id:
                self._page_table[page_id] = name
                return name
        return None

    async def wait_durable(self, lsn: int, timeout_s: float | None = None) -> None:
        if self._vdl >= lsn:
            return
        if self._closed:
            raise UnavailableError("baseline sink is closed")
        fut = asyncio.get_running_loop().create_future()
        self.commits.put(lsn, fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            raise WriteQuorumUnavailable(
                f"baseline: commit LSN {lsn} not acked by the block chain after {timeout_s:.1f}s "
                f"(VDL {self._vdl})") from None

    async def read_page(self, page_id: int, read_point: int) -> bytes | None:
        """The page as of ``read_point``: from memory while dirty, else from bs1 (see doc)."""
        started = time.perf_counter()
        try:
            return await self._read_page(page_id, read_point)
        finally:
            self.stats["page_reads"] += 1
            self.stats["page_read_ms_total"] += (time.perf_counter() - started) * 1000

    async def _read_page(self, page_id: int, read_point: int) -> bytes | None:
        if page_id in self._lru_pending:
            # MySQL evicted it by writing it: a re-read waits for that write, then reads
            # the page back from the block server (it is clean by then).
            self.stats["lru_read_waits"] += 1
            while page_id in self._lru_pending:
                if self._closed:
                    raise UnavailableError("baseline sink is closed")
                self._cleaner_wake.set()
                self._progress.clear()
                await self._progress.wait()
        if page_id not in self._dirty and page_id not in self._flushing:
            # Clean (or never seen): MySQL had to drop it, so it reads it from its block server.
            data = await self.chain.read(AREA_PAGE, page_id)
            self.stats["page_reads_block"] += 1
            if page_id not in self.pages:
                if data is None:
                    return None
                self.pages[page_id] = bytearray(data)   # a page of an earlier run
        else:
            self.stats["page_reads_memory"] += 1
        image = self.pages.get(page_id)
        if image is None:
            return None
        if pagefmt.page_lsn(image) <= read_point:
            return bytes(image)
        for dirty in (self._dirty.get(page_id), self._flushing.get(page_id)):
            if dirty is not None and dirty.base_lsn <= read_point:
                base = None if dirty.base is None else bytearray(dirty.base)
                old = materialiser.apply(base, page_id, b"".join(dirty.records),
                                         upto_lsn=read_point, verify_pages=False)
                return None if old is None else bytes(old)
        self.stats["old_version_misses"] += 1
        raise UnavailableError(
            f"baseline: page {page_id} was written home past read point {read_point}; "
            f"no older version is kept")

    # --- Group commit (redo stage, then binlog stage) -------------------------------------

    def _maybe_start_group(self) -> None:
        if self._redo_busy or not self._open.redo or self._closed:
            return
        group, self._open = self._open, _Group()
        self._redo_busy = True
        self._spawn(self._write_group(group))

    async def _write_group(self, group: _Group) -> None:
        redo = b"".join(group.redo)
        try:
            await self.chain.write([pb.BlockWrite(area=AREA_REDO, offset=self._next_slot("redo"),
                                                  data=redo)], "redo")
        finally:
            self._redo_busy = False
        self._maybe_start_group()          # the next group's redo write overlaps our binlog
        async with self._binlog_stage:     # FIFO: groups finish in order, so VDL only rises
            if group.binlog:
                binlog = b"".join(group.binlog)
                await self.chain.write([pb.BlockWrite(area=AREA_BINLOG, offset=self._next_slot("binlog"),
                                                      data=binlog)], "binlog")
                self.stats["binlog_bytes"] += len(binlog)
            self.stats["groups"] += 1
            self.stats["redo_bytes"] += len(redo)
            assert group.max_lsn > self._vdl, "groups must become durable in LSN order"
            self._vdl = group.max_lsn
        for fut in self.commits.release(self._vdl):
            if not fut.done():
                fut.set_result(None)
        self._progress.set()
        self._cleaner_wake.set()

    def _next_slot(self, area: str) -> int:
        if area == "redo":
            self._redo_slot = (self._redo_slot + 1) % LOG_SLOTS
            return self._redo_slot
        self._binlog_slot = (self._binlog_slot + 1) % LOG_SLOTS
        return self._binlog_slot

    # --- Page cleaner --------------------------------------------------------------------

    def page_evicted(self, page_id: int) -> None:
        """Buffer pool hook: the engine dropped ``page_id``; if it is dirty here, MySQL
        would have had to write it first (LRU flush)."""
        if page_id in self._dirty:
            self._evicted_dirty[page_id] = None
            self._lru_pending.add(page_id)
            self._cleaner_wake.set()

    def _pick_flush_batch(self) -> tuple[list[int], int]:
        """(pages to write now, how many of them are LRU flushes)."""
        batch: list[int] = []
        vdl = self._vdl
        for page_id in list(self._evicted_dirty):
            if len(batch) >= self.dblwr_pages:
                break
            if page_id not in self._dirty:
                del self._evicted_dirty[page_id]    # written home meanwhile
                if page_id not in self._flushing:
                    self._lru_pending.discard(page_id)
            elif pagefmt.page_lsn(self.pages[page_id]) <= vdl:  # WAL rule
                batch.append(page_id)
        lru = len(batch)
        if self.checkpoint_age() > self.flush_lwm_bytes:
            target = self._redo_pos - self.flush_lwm_bytes // 2
            chosen = set(batch)
            for page_id, dirty in self._dirty.items():  # oldest first change first
                if len(batch) >= self.dblwr_pages or dirty.first_redo_pos >= target:
                    break
                if page_id not in chosen and pagefmt.page_lsn(self.pages[page_id]) <= vdl:
                    batch.append(page_id)
        return batch, lru

    async def _page_cleaner(self) -> None:
        while not self._closed:
            batch, lru = self._pick_flush_batch()
            if not batch:
                self._flush_idle.set()
                self._cleaner_wake.clear()
                try:
                    await asyncio.wait_for(self._cleaner_wake.wait(), PAGE_CLEANER_INTERVAL_S)
                except asyncio.TimeoutError:
                    pass
                continue
            self._flush_idle.clear()
            await self._flush(batch, lru)

    async def _flush(self, batch: list[int], lru: int) -> None:
        """Double-write, home writes, metadata: three writes through the chain, in order."""
        images = []
        for page_id in batch:
            images.append((page_id, bytes(self.pages[page_id])))
            self._flushing[page_id] = self._dirty.pop(page_id)
            self._evicted_dirty.pop(page_id, None)
        try:
            await self.chain.write([pb.BlockWrite(area=AREA_DOUBLEWRITE, offset=0,
                                                  data=b"".join(img for _, img in images))],
                                   "doublewrite")
            await self.chain.write([pb.BlockWrite(area=AREA_PAGE, offset=page_id, data=img)
                                    for page_id, img in images], "page")
            checkpoint = min((d.first_redo_pos for d in self._dirty.values()), default=self._redo_pos)
            meta = _META.pack(self._vdl, checkpoint, self.stats["pages_flushed"] + len(batch), time.time())
            await self.chain.write([pb.BlockWrite(area=AREA_META, offset=0,
                                                  data=meta + bytes(META_WRITE_BYTES - len(meta)))], "meta")
        finally:
            for page_id, _ in images:
                self._flushing.pop(page_id, None)
                if page_id not in self._evicted_dirty:
                    self._lru_pending.discard(page_id)
        self.stats["flush_batches"] += 1
        self.stats["pages_flushed"] += len(batch)
        self.stats["lru_pages_flushed"] += lru
        self.stats["checkpoint_pages_flushed"] += len(batch) - lru
        self._progress.set()

    # --- For the benchmark and tests -----------------------------------------------------

    def log_idle(self) -> bool:
        """True when no commit is open or in flight."""
        return not self._open.redo and not self._redo_busy and not self._binlog_stage.locked()

    async def quiesce(self, timeout_s: float = 60.0) -> None:
        """Wait until the log is idle and no LRU flush is pending (before a measurement)."""
        deadline = time.monotonic() + timeout_s
        while not (self.log_idle() and not self._evicted_dirty and not self._lru_pending
                   and self._flush_idle.is_set()):
            if time.monotonic() > deadline:
                raise TimeoutError("baseline sink did not quiesce")
            self._cleaner_wake.set()
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def flush_all(self) -> int:
        """Write every dirty page home now (durable ones; the log must be idle). Returns
        how many pages were written. For tests and an orderly end."""
        written = 0
        while True:
            batch = [p for p in self._dirty if pagefmt.page_lsn(self.pages[p]) <= self._vdl]
            batch = batch[:self.dblwr_pages]
            if not batch:
                return written
            await self._flush(batch, 0)
            written += len(batch)

    def status(self) -> dict:
        return {**self.stats, "vdl": self._vdl, "dirty_pages": len(self._dirty),
                "evicted_dirty": len(self._evicted_dirty), "pages": len(self.pages),
                "checkpoint_age": self.checkpoint_age(), "chain_retries": self.chain.retries}
