"""The writer's database: named B+tree tables, transactions, commits and reads.

This is the compute engine core of aurora-lite. It never writes a page (invariant 1):
each commit is one MTR of redo records (engine/db/mtr.py) applied to the buffer pool's cached
pages (engine/db/buffer_pool.py) and shipped through the RedoSink (engine/db/sink.py).

Transactions
    Writes are buffered privately in the Transaction (per table: key -> value, or None as
    a tombstone) and reads merge them over the tree (read your own writes). At commit all
    writes become ONE MTR whose last record is a COMMIT record (txn_id, timestamp_us) on
    the META page, tagged CPL. Uncommitted changes therefore never reach storage and
    recovery needs no undo. This is a deliberate difference from Aurora, which writes
    uncommitted changes and undoes in-flight transactions online after recovery.
    The COMMIT record's txn_id is assigned at commit, so txn_ids rise in commit (LSN)
    order and open() can continue from META aux1 + 1 without reusing one.

Commit (invariant 2)
    ``commit()`` returns only once VDL >= the commit record's LSN: the committing task
    awaits sink.wait_durable while the engine keeps serving other requests, and one batch
    of acks releases every commit it covers (group commit without a timer, in the sink).
    The commit lock is held while an MTR is planned and emitted (including page loads,
    buffer pool waits for VDL and LAL stalls), NOT while it waits for durability, so many
    commits wait at once. If the wait times out the client gets
    WriteQuorumUnavailable and the outcome is unknown: the MTR is already in the log and
    in the cache, and becomes durable if storage recovers.

Isolation: read committed, plus first-committer-wins on write-write conflicts
    A read returns the latest committed state (merged with the transaction's own writes);
    two reads of one key in a transaction may differ (no snapshot). A transaction that
    wrote key k aborts with ConflictError at commit if another transaction committed a
    write to k after this one began, so there are no lost updates (read-modify-write of
    one key by two transactions: one of them aborts). Write skew is possible. A client
    transaction begins here at its first read, or at its commit if it reads nothing
    (``begin(conflicts_from_commit=True)``; docs/decisions.md 11).
    Conflict tracking: (table, key) -> LSN of its last committed write, forgetting entries
    older than the oldest active transaction's start; if more than CONFLICT_KEYS_MAX
    entries are still needed, the oldest active transaction is doomed (it gets
    ConflictError at commit) so the memory stays bounded. Autocommit helpers are blind
    writes and check no conflicts (their writes are tracked for others).

Reads never expose non-durable data
    Reads use the cache, which may hold committed-but-not-yet-durable MTRs. A read
    remembers the highest page_lsn of the B+tree pages it used and, before returning, waits
    until VDL reaches it. The META page is the exception: every COMMIT record changes its
    page_lsn, so counting it would make every read wait for the newest commit; the LSN of
    the last catalog change (table created, root split) is used for it instead. Because
    MTRs are atomic and VDL is always a CPL, VDL >= a page_lsn means the whole MTR that
    wrote it is durable. If VDL does not get there within READ_DURABLE_WAIT_S (storage is
    slow, or a write quorum is down), the read runs again as of the current VDL
    (_SnapshotView): cached pages at or below it, older versions of newer pages from
    storage. So reads of durable data go on while commits wait.

Reads are consistent within one call
    Readers do not take the commit lock. A read (get, scan) that awaits a storage read can
    interleave with commits; it notes the allocator's last LSN before starting and, if any
    MTR ran meanwhile, starts again (most pages are cached by then). After
    READ_OPTIMISTIC_TRIES tries it takes the commit lock, which keeps MTRs out, so a read
    always finishes and never returns a torn result (half a split, half a transaction).

Big transactions (invariant 18)
    A transaction begun with a larger ``writes_max`` (the SQL front end's, up to
    TXN_BIG_WRITES_MAX keys) is still ONE transaction with ONE COMMIT record: its writes
    stay buffered until commit, are planned as one MTR plan (the event loop is let run
    every PLAN_YIELD_KEYS keys) and emitted in pieces of at most COMMIT_PIECE_RECORDS
    records, only the last record of the last piece tagged CPL (engine/db/mtr.py). So an
    abort leaves nothing anywhere, VDL never lands inside it (no reader, replica or
    recovery sees a part of it), and a crash before its COMMIT record is durable leaves
    nothing after recovery (the pieces lie above VDL: truncated). The commit lock is held
    from planning to the last piece, so other commits wait for it, as for one big MTR.
    Its record count is bounded by LAL (VDL cannot move inside it): a bigger one gets
    TooLargeError before anything is emitted.

Limits: SCAN_LIMIT_MAX rows per scan, TXN_WRITES_MAX buffered keys per transaction (unless
begun with a larger ``writes_max``), MTR_RECORDS_MAX records per single-piece commit and LAL
records per commit in pieces (engine/db/mtr.py), key/value sizes in engine/db/btree.py.

State of a Database: new --bootstrap() (brand-new volume) or open() (existing)--> open.
A Database with ``read_only`` set refuses writes with ReadOnlyError; a failure while an MTR
was half applied (a bug: MTRs are planned on copies first) sets it permanently.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import OrderedDict
from typing import Awaitable, Callable

from engine.db import btree
from engine.format import page as pagefmt
from engine.db.buffer_pool import BufferPool
from engine.errors import (
    CommitRefused,
    ConflictError,
    DatabaseError,
    ReadOnlyError,
    TableNotFound,
    TooLargeError,
    TransactionClosedError,
    UnavailableError,
    WriteQuorumUnavailable,
)
from engine.db.mtr import MtrPlan
from engine.metrics import Buckets
from engine.format.page import META_PAGE_ID, PageType
from engine.format.redo import RecordType as RT, commit_payload, p_init_page, p_set_aux

SCAN_LIMIT_DEFAULT = 1000        # rows a scan returns unless told otherwise
SCAN_LIMIT_MAX = 100_000         # most rows one scan call may return
TXN_WRITES_MAX = 4096            # most distinct keys one transaction may write (default)
TXN_BIG_WRITES_MAX = 80_000      # most keys a transaction begun with a larger writes_max may
                                 # write (its records must fit in LAL: invariant 18)
COMMIT_PIECE_RECORDS = 250       # records per piece of a commit in pieces (engine/db/mtr.py)
PLAN_YIELD_KEYS = 20             # a big commit's planning checks the clock this often and
PLAN_YIELD_S = 0.005             # lets the event loop run after this much wall time
CONFLICT_KEYS_MAX = 100_000      # most (table, key) entries kept for conflict checks
READ_OPTIMISTIC_TRIES = 3        # lock-free attempts of a read before it takes the lock
DURABLE_TIMEOUT_S = 30.0         # default wait for VDL to pass a commit
READ_DURABLE_WAIT_S = 0.1        # a read waits this long for what it saw to become durable,
                                 # then reads as of VDL instead (see _SnapshotView)

#: The read point of the last read of the current asyncio task (one request): the LSN as
#: of which its result is exact, <= VDL. Set by Database._read; the server returns it as
#: GetReply/ScanReply.read_point (the VDL taken after the read could name a commit the read
#: did not see: found by the chaos bank checker, docs/reliability.md).
LAST_READ_POINT: contextvars.ContextVar[int] = contextvars.ContextVar("last_read_point", default=0)


class _ReadView:
    """Page source for one read attempt: buffer pool pages, noting the LSNs it saw."""

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool
        self.seen_lsn = 0        # highest page_lsn of the B+tree pages loaded (META excluded)

    async def load(self, page_id: int) -> bytearray | None:
        page = await self._pool.get(page_id)
        if page is not None and page_id != META_PAGE_ID:
            lsn = pagefmt.page_lsn(page)
            if lsn > self.seen_lsn:
                self.seen_lsn = lsn
        return page


class _SnapshotView:
    """Page source for a read as of ``read_point`` (<= VDL): cached pages whose page_lsn is
    at or below it, copied; any page changed since (page_lsn > read_point) is read from
    storage as of the read point instead. Every page it returns is the version at the read
    point, so the read is one consistent, durable state without retries or locks. Used when
    a read saw pages that are not durable and storage is slow to make them so (e.g. with an
    AZ and one more node down, commits wait but reads of durable data go on)."""

    def __init__(self, pool: BufferPool, sink, read_point: int) -> None:
        self._pool = pool
        self._sink = sink
        self.read_point = read_point
        self.seen_lsn = 0
        self.storage_reads = 0

    async def load(self, page_id: int) -> bytearray | None:
        page = await self._pool.get(page_id)
        if page is not None and pagefmt.page_lsn(page) <= self.read_point:
            return bytearray(page)  # a copy: the cached frame may change at the next await
        self.storage_reads += 1
        image = await self._sink.read_page(page_id, read_point=self.read_point)
        return None if image is None else bytearray(image)


class Transaction:
    """A client transaction: private writes, merged reads, one MTR at commit.

    ``put`` and ``delete`` only buffer (no I/O, so they are plain methods); ``get``,
    ``scan`` and ``commit`` are coroutines. Use ``async with db.begin() as txn:`` to commit
    on success and abort on an exception.
    """

    def __init__(self, db: "Database", begin_seq: int, start_lsn: int | None,
                 writes_max: int = TXN_WRITES_MAX) -> None:
        self._db = db
        self.writes_max = writes_max    # most distinct keys it may write
        self.begin_seq = begin_seq      # order of begin() calls (this Database only)
        self.start_lsn = start_lsn      # allocator's last LSN at begin; None: no conflict check
        self.txn_id: int | None = None  # COMMIT record's txn_id, assigned at commit
        self.commit_lsn: int | None = None
        self.read_lsn = 0               # highest page LSN a ``latest`` read of it returned
        self.state = "active"           # active -> committed | aborted
        self.doomed: str | None = None  # why commit will raise ConflictError
        self._writes: dict[str, dict[bytes, bytes | None]] = {}
        self._n_writes = 0

    # --- Writes (buffered) -----------------------------------------------------------------

    def put(self, table: str, key: bytes, value: bytes) -> None:
        """Buffer insert-or-update of ``key``; applied at commit."""
        self._buffer(table, btree.check_key(key), btree.check_value(value))

    def delete(self, table: str, key: bytes) -> None:
        """Buffer removal of ``key`` (a no-op at commit if it is absent then)."""
        self._buffer(table, btree.check_key(key), None)

    def _buffer(self, table: str, key: bytes, value: bytes | None) -> None:
        self._check_active()
        self._db._check_writable()
        writes = self._writes.get(table)
        if writes is None:
            self._db._root(table)  # TableNotFound early (once per table); commit checks again
            writes = self._writes[table] = {}
        if key not in writes:
            if self._n_writes >= self.writes_max:
                raise TooLargeError(f"transaction writes more than {self.writes_max} keys")
            self._n_writes += 1
        writes[key] = value

    def buffered(self) -> list[tuple[str, bytes, bytes | None]]:
        """The buffered writes as (table, key, value or None for a delete), in key order."""
        return [(table, key, self._writes[table][key])
                for table in sorted(self._writes) for key in sorted(self._writes[table])]

    # --- Reads (own writes merged over the tree) ---------------------------------------------

    async def get(self, table: str, key: bytes, latest: bool = False) -> bytes | None:
        """The value of ``key`` as this transaction sees it, or None.

        ``latest``: the newest committed value in the log, durable or not (no wait for
        VDL, no snapshot fallback), for a caller that holds a lock the last writer of
        ``key`` released before its commit was durable (early lock release, invariant 20).
        ``read_lsn`` then rises to the page LSNs it used: this transaction's own commit will
        be above them, and a read-only one must wait for VDL to reach them
        (``Database.wait_durable``) before it reports success."""
        self._check_active()
        key = btree.check_key(key)
        writes = self._writes.get(table)
        if writes is not None and key in writes:
            return writes[key]
        return await self._db._get(table, key, txn=self, latest=latest)

    async def scan(self, table: str, start: bytes | None = None, end: bytes | None = None,
                   limit: int = SCAN_LIMIT_DEFAULT, latest: bool = False) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (key, value) with start <= key < end, own writes merged in
        (``latest``: as ``get``)."""
        self._check_active()
        _check_limit(limit)
        mine = sorted((k, v) for k, v in self._writes.get(table, {}).items()
                      if (start is None or k >= start) and (end is None or k < end))
        tombstones = sum(1 for _, v in mine if v is None)
        # Each tombstone can hide one tree row, so ask for that many more.
        merged = dict(await self._db._scan(table, start, end, limit + tombstones, txn=self,
                                           latest=latest))
        for key, value in mine:
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return sorted(merged.items())[:limit]

    # --- End -------------------------------------------------------------------------------

    async def commit(self, timeout_s: float | None = None, on_logged=None) -> int | None:
        """Apply the writes as one MTR; return its commit LSN once VDL >= it (invariant 2).

        Returns None for a transaction that wrote nothing. Raises ConflictError (first
        committer wins), ReadOnlyError, TableNotFound, TooLargeError (the transaction is
        then aborted), or WriteQuorumUnavailable if durability times out (outcome unknown),
        or CommitRefused if refused before anything was logged.

        ``on_logged(lsn)`` runs once the COMMIT record has its LSN and is in the log (the
        sink's buffer), BEFORE it is durable: the SQL front end releases its row locks there
        (invariant 20); the commit is still acknowledged only when durable (invariant 2).
        """
        self._check_active()
        return await self._db._commit(self, timeout_s, on_logged)

    def abort(self) -> None:
        """Drop the buffered writes. Nothing reached storage, so there is nothing to undo."""
        if self.state == "active":
            self._db._close(self, "aborted")

    async def __aenter__(self) -> "Transaction":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if self.state != "active":
            return
        if exc_type is None:
            await self.commit()
        else:
            self.abort()

    def _check_active(self) -> None:
        if self.state != "active":
            raise TransactionClosedError(f"transaction is {self.state}")


def _check_limit(limit: int) -> None:
    if not 0 <= limit <= SCAN_LIMIT_MAX:
        raise ValueError(f"scan limit must be 0..SCAN_LIMIT_MAX = {SCAN_LIMIT_MAX}, got {limit}")


class Database:
    """The writer's database over a RedoSink; see the module doc."""

    def __init__(self, sink, buffer_pool_pages: int, *, read_only: bool = False,
                 durable_timeout_s: float | None = DURABLE_TIMEOUT_S) -> None:
        self.sink = sink                                # RedoSink (engine/db/sink.py)
        self.pool = BufferPool(buffer_pool_pages, sink)
        self.read_only = read_only                      # True: writes raise ReadOnlyError
        self.durable_timeout_s = durable_timeout_s      # default commit / read durability wait
        self.conflict_keys_max = CONFLICT_KEYS_MAX
        self.broken: str | None = None                  # why writes stopped for good
        self._open = False
        self._commit_lock = asyncio.Lock()              # one MTR planned/emitted at a time
        self._next_txn_id = 1                           # txn_id of the next COMMIT record
        self._last_timestamp_us = 0                     # COMMIT timestamps never go back
        self.on_commit = None                           # callable(timestamp_us, lsn) or None
        self._emitting_pieces = False                   # between two pieces of a commit in pieces
        self.piece_pause_s = None                       # callable -> seconds between the pieces
                                                        # of a commit (test hook, engine/hooks.py)
        self._catalog_lsn = 0                           # LSN of the last catalog change
        self._begin_seq = 0
        self._active: dict[int, Transaction] = {}       # begin_seq -> txn, in begin order
        self._last_write: OrderedDict[tuple[str, bytes], int] = OrderedDict()  # -> commit LSN
        self.counters = {"commits": 0, "aborts": 0, "conflicts": 0, "doomed": 0,
                         "read_retries": 0, "read_locked": 0, "read_durable_waits": 0,
                         "read_snapshots": 0}
        #: Commit latency (MTR planned to durable) for metrics and the dashboard
        #: (engine/metrics.py Buckets: plain ints, read at scrape time).
        self.commit_latency = Buckets()

    # --- Lifecycle -------------------------------------------------------------------------

    async def bootstrap(self) -> int:
        """Initialise a brand-new volume: page 0 becomes META with next_page_id = 1.

        One MTR (INIT_PAGE, SET_AUX), waited durable. Returns its CPL."""
        if self._open:
            raise DatabaseError("database already open")
        self._check_writable()
        async with self._commit_lock:
            # As of VDL 0 nothing is durable, so page 0 cannot exist: no need to ask storage.
            if self.sink.vdl > 0 and await self.pool.get(META_PAGE_ID) is not None:
                raise DatabaseError("volume already has a META page: open() it instead")
            plan = MtrPlan(self.pool)
            try:
                plan.change(META_PAGE_ID, RT.INIT_PAGE, p_init_page(PageType.META))
                plan.change(META_PAGE_ID, RT.SET_AUX, p_set_aux(0, 1))
                lsn = await self._execute(plan)
            finally:
                plan.release()
            self.pool.pin(META_PAGE_ID)  # for the database's lifetime
            self._catalog_lsn = lsn
            self._open = True
        await self.sink.wait_durable(lsn, self.durable_timeout_s)
        return lsn

    async def open(self) -> None:
        """Open an existing volume: read page 0 (META) from storage at the current VDL."""
        if self._open:
            raise DatabaseError("database already open")
        meta = await self.pool.get(META_PAGE_ID, pin=True)
        if meta is None:
            raise DatabaseError("volume has no META page: bootstrap() it first")
        if pagefmt.page_type(meta) != PageType.META:
            self.pool.unpin(META_PAGE_ID)
            raise DatabaseError(f"page 0 has type {pagefmt.page_type(meta)}, not META")
        self._next_txn_id = pagefmt.aux(meta, 1) + 1
        self._last_timestamp_us = pagefmt.aux(meta, 2)
        self._catalog_lsn = pagefmt.page_lsn(meta)
        self._open = True

    # --- Tables ----------------------------------------------------------------------------

    def tables(self) -> list[str]:
        """Names of every table, in catalog (byte) order."""
        return btree.table_names(self._meta())

    def has_table(self, name: str) -> bool:
        """Whether table ``name`` exists (one catalog search, not a list of every table)."""
        return btree.catalog_root(self._meta(), btree.table_key(name)) is not None

    async def create_table(self, name: str, timeout_s: float | None = None) -> int:
        """Create an empty table (its own committed MTR); returns the commit LSN.

        Raises TableExistsError, TooLargeError (name too long, catalog full), ReadOnlyError."""
        self._check_writable()
        key = btree.table_key(name)

        async def build(plan: MtrPlan) -> None:
            await btree.create_table(plan, key)

        return await self._commit_mtr(build, None, None, timeout_s)

    async def height(self, table: str) -> int:
        """Levels of the table's B+tree (1: the root is a leaf)."""
        return await self._read(lambda view: btree.height(view, self._root(table)))

    # --- Transactions ----------------------------------------------------------------------

    def begin(self, *, conflicts_from_commit: bool = False, writes_max: int = TXN_WRITES_MAX) -> Transaction:
        """Start a transaction (isolation: see the module doc). ``conflicts_from_commit``:
        for a transaction that has read nothing and commits now (a client's write-only
        transaction, docs/decisions.md 11): it begins at its commit, so no commit can come
        between its begin and its own and it checks no conflicts, like the autocommit
        helpers (its writes are tracked for others)."""
        self._meta()
        if not 0 < writes_max <= TXN_BIG_WRITES_MAX:
            raise ValueError(f"writes_max must be 1..TXN_BIG_WRITES_MAX = {TXN_BIG_WRITES_MAX}")
        if conflicts_from_commit:
            return Transaction(self, 0, None, writes_max)
        self._begin_seq += 1
        txn = Transaction(self, self._begin_seq, self.sink.allocator.last_volume_lsn, writes_max)
        self._active[txn.begin_seq] = txn
        return txn

    # --- Autocommit helpers ----------------------------------------------------------------

    async def get(self, table: str, key: bytes) -> bytes | None:
        """The committed, durable value of ``key``, or None."""
        return await self._get(table, btree.check_key(key))

    async def scan(self, table: str, start: bytes | None = None, end: bytes | None = None,
                   limit: int = SCAN_LIMIT_DEFAULT) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` committed (key, value) with start <= key < end, in key order."""
        _check_limit(limit)
        return await self._scan(table, start, end, limit)

    async def get_as_of(self, table: str, key: bytes, read_point: int) -> bytes | None:
        """The value of ``key`` as of ``read_point`` (a commit LSN <= VDL, inside the
        retention window: engine/writer/backtrack.py checks it), read from versioned storage."""
        key = btree.check_key(key)
        view = _SnapshotView(self.pool, self.sink, read_point)
        return await btree.get(view, await self._view_root(view, table), key)

    async def scan_as_of(self, table: str, start: bytes | None, end: bytes | None, limit: int,
                         read_point: int) -> list[tuple[bytes, bytes]]:
        """``scan`` as of ``read_point`` (see get_as_of)."""
        _check_limit(limit)
        start = None if start is None else btree.check_key(start)
        end = None if end is None else btree.check_key(end)
        view = _SnapshotView(self.pool, self.sink, read_point)
        return await btree.scan(view, await self._view_root(view, table), start, end, limit)

    async def put(self, table: str, key: bytes, value: bytes, timeout_s: float | None = None) -> int:
        """Insert or update one key in its own transaction; returns the commit LSN."""
        txn = Transaction(self, 0, None)
        txn.put(table, key, value)
        return await self._commit(txn, timeout_s)

    async def delete(self, table: str, key: bytes, timeout_s: float | None = None) -> int:
        """Delete one key (absent: nothing but the COMMIT record) in its own transaction."""
        txn = Transaction(self, 0, None)
        txn.delete(table, key)
        return await self._commit(txn, timeout_s)

    async def wait_durable(self, lsn: int, timeout_s: float | None = None) -> None:
        """Return once VDL >= lsn: for a read-only transaction that read non-durable data
        with ``latest`` reads (invariant 20). WriteQuorumUnavailable on timeout."""
        if lsn > self.sink.vdl:
            await self.sink.wait_durable(lsn, self.durable_timeout_s if timeout_s is None else timeout_s)

    def stats(self) -> dict:
        """Counters for tests, metrics and the service's Status call (JSON-friendly)."""
        return {**self.counters, "buffer_pool": self.pool.stats(), "read_only": self.read_only,
                "commit_p50_ms": round(self.commit_latency.quantile(0.5) * 1000, 3),
                "commit_p99_ms": round(self.commit_latency.quantile(0.99) * 1000, 3),
                "broken": self.broken, "active_txns": len(self._active),
                "conflict_keys": len(self._last_write), "tables": self.tables() if self._open else [],
                "volume_pages": self._volume_pages()}

    def _volume_pages(self) -> int:
        """Page ids allocated so far (META aux0, next_page_id), if META is cached: the
        volume's size in pages, for `status` (docs/fleet.md)."""
        meta = self.pool.peek(pagefmt.META_PAGE_ID)
        return pagefmt.aux(meta, 0) if meta is not None else 0

    status = stats

    @property
    def mtr_lock(self) -> asyncio.Lock:
        """Held while an MTR changes cached pages: by commits on the writer, and by the
        replica's apply loop (engine/instance/replica.py), so that a read that fell back to taking
        it sees no MTR at all."""
        return self._commit_lock

    # --- Internals: reads ------------------------------------------------------------------

    def _meta(self) -> bytearray:
        if not self._open:
            raise DatabaseError("database not open: call bootstrap() or open() first")
        meta = self.pool.peek(META_PAGE_ID)
        assert meta is not None and self.pool.is_pinned(META_PAGE_ID)
        return meta

    def _root(self, table: str) -> int:
        root = btree.catalog_root(self._meta(), btree.table_key(table))
        if root is None:
            raise TableNotFound(f"no table named {table!r}")
        return root

    async def _view_root(self, view, table: str) -> int:
        """The table's root page as the view sees it (the catalog as of a snapshot's read
        point if it changed since)."""
        if isinstance(view, _SnapshotView) and self._catalog_lsn > view.read_point:
            meta = await view.load(META_PAGE_ID)
            root = None if meta is None else btree.catalog_root(meta, btree.table_key(table))
            if root is None:
                raise TableNotFound(f"no table named {table!r}")
            return root
        return self._root(table)

    async def _get(self, table: str, key: bytes, txn: "Transaction | None" = None,
                   latest: bool = False) -> bytes | None:
        async def run(view):
            return await btree.get(view, await self._view_root(view, table), key)
        return await self._read(run, txn, latest)

    async def _scan(self, table: str, start, end, limit: int,
                    txn: "Transaction | None" = None, latest: bool = False) -> list[tuple[bytes, bytes]]:
        start = None if start is None else btree.check_key(start)
        end = None if end is None else btree.check_key(end)
        async def run(view):
            return await btree.scan(view, await self._view_root(view, table), start, end, limit)
        return await self._read(run, txn, latest)

    async def _read(self, run: Callable[[_ReadView], Awaitable], txn: "Transaction | None" = None,
                    latest: bool = False):
        """Run a read consistently (retry, then lock) and wait until what it saw is durable
        (``latest``: do not wait; note what it saw in ``txn.read_lsn``)."""
        allocator = self.sink.allocator
        for _ in range(READ_OPTIMISTIC_TRIES):
            if latest and self._emitting_pieces:
                # Between the pieces of a commit in pieces the cached tree may be
                # mid-split: a durable read falls back to VDL there, a latest read takes
                # the commit lock (below), which waits for the last piece.
                continue
            view = _ReadView(self.pool)
            version = allocator.last_volume_lsn
            result = await run(view)
            if allocator.last_volume_lsn == version and not (latest and self._emitting_pieces):
                break  # no MTR ran while this read awaited: one consistent tree state
            self.counters["read_retries"] += 1
        else:
            self.counters["read_locked"] += 1
            async with self._commit_lock:
                view = _ReadView(self.pool)
                version = allocator.last_volume_lsn
                result = await run(view)
        seen = max(view.seen_lsn, self._catalog_lsn)
        if latest:
            if txn is not None:
                txn.read_lsn = max(txn.read_lsn, seen)
            LAST_READ_POINT.set(version)
            return result
        read_point = None
        if seen > self.sink.vdl:
            self.counters["read_durable_waits"] += 1
            try:
                await self.sink.wait_durable(seen, READ_DURABLE_WAIT_S)
            except (WriteQuorumUnavailable, asyncio.TimeoutError):
                # Storage is slow to make what we saw durable: read as of VDL instead.
                self.counters["read_snapshots"] += 1
                read_point = self.sink.vdl
                if txn is not None and txn.start_lsn is not None and read_point < txn.start_lsn:
                    # The transaction reads a state older than its begin: a commit after
                    # that state, to a key it then writes, must still be a conflict
                    # (first-committer-wins), or it would overwrite it unseen (lost update).
                    # Lowered BEFORE the snapshot read awaits storage: during that await
                    # VDL can pass such a commit and a prune (horizon = min(VDL, active
                    # starts)) would forget its conflict entry (found by chaos, seed 11).
                    txn.start_lsn = read_point
                result = await run(_SnapshotView(self.pool, self.sink, read_point))
        # Exact for the pages read: every MTR that touched them is <= seen <= VDL now, and
        # the state is that of every MTR <= version.
        LAST_READ_POINT.set(read_point if read_point is not None else min(version, self.sink.vdl))
        return result

    # --- Internals: commits ----------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            why = f" ({self.broken})" if self.broken else ""
            raise ReadOnlyError(f"database is read-only{why}: writes are refused")

    async def _commit(self, txn: Transaction, timeout_s: float | None, on_logged=None) -> int | None:
        try:
            self._check_writable()
            if not txn._writes:
                self._close(txn, "committed")
                return None
        except BaseException:
            self._close(txn, "aborted")
            raise

        big = txn._n_writes > PLAN_YIELD_KEYS

        async def build(plan: MtrPlan) -> None:
            n = 0
            last_yield = time.perf_counter()
            for table in sorted(txn._writes):
                name = btree.table_key(table)
                writes = txn._writes[table]
                for key in sorted(writes):
                    value = writes[key]
                    if value is None:
                        await btree.delete(plan, name, key)
                    else:
                        await btree.put(plan, name, key, value)
                    plan.release_unchanged()
                    n += 1
                    if big and n % PLAN_YIELD_KEYS == 0 and time.perf_counter() - last_yield >= PLAN_YIELD_S:
                        await asyncio.sleep(0)   # a big plan lets the instance's other work run
                        last_yield = time.perf_counter()

        def before() -> None:
            if txn.doomed is not None:
                raise ConflictError(txn.doomed)
            if txn.start_lsn is None:
                return
            for table, writes in txn._writes.items():
                for key in writes:
                    lsn = self._last_write.get((table, key))
                    if lsn is not None and lsn > txn.start_lsn:
                        self.counters["conflicts"] += 1
                        raise ConflictError(
                            f"write-write conflict on table {table!r} key {key[:32]!r}: another "
                            f"transaction committed it at LSN {lsn}, after this one began "
                            f"(LSN {txn.start_lsn}); retry")

        def after(lsn: int, txn_id: int) -> None:
            txn.txn_id, txn.commit_lsn = txn_id, lsn
            for table, writes in txn._writes.items():
                for key in writes:
                    self._last_write.pop((table, key), None)
                    self._last_write[(table, key)] = lsn
            self._close(txn, "committed")
            if on_logged is not None:
                on_logged(lsn)

        try:
            return await self._commit_mtr(build, before, after, timeout_s,
                                          pieces=txn.writes_max > TXN_WRITES_MAX)
        finally:
            if txn.state == "active":
                self._close(txn, "aborted")

    async def _commit_mtr(self, build, before, after, timeout_s: float | None,
                          pieces: bool = False) -> int:
        """Plan ``build`` plus a COMMIT record as one MTR, emit it, wait until durable."""
        started = time.perf_counter()
        try:
            lsn = await self._emit_commit(build, before, after, pieces)
        except CommitRefused:
            raise
        except UnavailableError as exc:
            # Refused inside the commit lock: the MTR was not submitted (submit() is the
            # last step and refuses before shipping anything), so nothing of it can become
            # durable. Only the wait below leaves the outcome unknown.
            raise CommitRefused(f"commit refused, nothing was written: {exc}") from exc
        # Invariant 2: the client hears "committed" only once VDL >= the commit record.
        await self.sink.wait_durable(lsn, self.durable_timeout_s if timeout_s is None else timeout_s)
        self.commit_latency.observe(time.perf_counter() - started)
        return lsn

    async def _emit_commit(self, build, before, after, pieces: bool = False) -> int:
        """Plan and emit ``build`` plus a COMMIT record as one MTR (``pieces``: one plan
        emitted in pieces, invariant 18); returns the COMMIT record's LSN."""
        async with self._commit_lock:
            self._check_writable()
            if before is not None:
                before()
            plan = MtrPlan(self.pool, records_max=getattr(self.sink, "lal", 0) if pieces else 0)
            try:
                await build(plan)
                txn_id = self._next_txn_id
                timestamp_us = max(self._last_timestamp_us, time.time_ns() // 1000)
                plan.change(META_PAGE_ID, RT.COMMIT, commit_payload(txn_id, timestamp_us))
                try:
                    lsn = await self._execute(plan, COMMIT_PIECE_RECORDS if pieces else 0)
                finally:
                    self._emitting_pieces = False
            finally:
                plan.release()
            self._next_txn_id = txn_id + 1
            self._last_timestamp_us = timestamp_us
            if self.on_commit is not None:
                self.on_commit(timestamp_us, lsn)  # engine/writer/backtrack.py CommitClock
            if plan.catalog_changed:
                self._catalog_lsn = lsn
            self.counters["commits"] += 1
            if after is not None:
                after(lsn, txn_id)
        return lsn

    async def _execute(self, plan: MtrPlan, piece_records: int = 0) -> int:
        """plan.execute, turning a failure after LSNs were allocated into a stop."""
        allocated_before = self.sink.allocator.last_volume_lsn

        def on_piece(lsn: int, last: bool) -> None:
            # Readers run between the pieces of a commit in pieces: a catalog change (a
            # root split) already in the cached META must count as not durable for them
            # (see "Reads never expose non-durable data"), and latest reads wait for the
            # last piece (_read).
            if plan.catalog_changed:
                self._catalog_lsn = lsn
            self._emitting_pieces = not last
        try:
            return await plan.execute(self.sink, piece_records, self.piece_pause_s, on_piece)
        except BaseException as exc:
            if self.sink.allocator.last_volume_lsn != allocated_before:
                # Half an MTR may be in the cache: never write again from this instance.
                self.broken = f"MTR failed after allocating LSNs: {exc!r}"
                self.read_only = True
            raise

    def _close(self, txn: Transaction, state: str) -> None:
        """End a transaction and forget conflict entries no active transaction needs."""
        if txn.state != "active":
            return
        txn.state = state
        if state == "aborted":
            self.counters["aborts"] += 1
        self._active.pop(txn.begin_seq, None)
        self._prune_conflicts()

    def _prune_conflicts(self) -> None:
        """Drop entries at or below every active start and at or below VDL; doom the oldest
        transaction if still too many. Entries above VDL stay: a transaction's read may fall
        back to a snapshot at VDL (_read), lowering its start below them."""
        while True:
            horizon = self.sink.vdl
            for txn in self._active.values():
                if txn.start_lsn is not None and txn.start_lsn < horizon:
                    horizon = txn.start_lsn
            while self._last_write:
                lsn = next(iter(self._last_write.values()))
                if lsn > horizon:
                    break
                self._last_write.popitem(last=False)
            if len(self._last_write) <= self.conflict_keys_max or not self._active:
                return
            oldest = self._active.pop(next(iter(self._active)))
            oldest.doomed = (f"transaction too old: more than {self.conflict_keys_max} keys were "
                             f"written since it began; retry")
            self.counters["doomed"] += 1
