"""A SQL session's transaction state, and the row locks SQL writers take on the writer.

Transactions
    A SQL transaction is one engine transaction (engine/db/database.py) begun with
    ``conflicts_from_commit=True``: its writes are buffered and committed as one MTR (or pieces, below), and
    it reads the latest committed state merged with its own writes (read committed, like
    PostgreSQL's default). Write-write safety comes from row locks instead of the engine's
    first-committer-wins check: every row a statement inserts, updates or deletes is locked
    (exclusive, until the transaction ends) BEFORE it is read for the change, so the read
    sees the last committer's durable value and no update is lost; a second writer waits,
    as in PostgreSQL. A wait that would close a cycle fails with 40P01 (deadlock_detected).
    Locks live in the writer process only: the SQL front end is the only writer of table
    ``pg`` (the key-value API could bypass them; it has no reason to).

    Big transactions are atomic up to ATOMIC_WRITES_MAX keys (rows plus index entries):
    the engine transaction is begun with that larger ``writes_max`` and, at COMMIT, is
    committed as ONE engine transaction emitted in several MTR pieces with ONE COMMIT
    record (engine/db/database.py, invariant 18): a ROLLBACK, an error or a crash before
    the COMMIT record is durable leaves nothing of it. Its writes stay buffered in the
    writer until COMMIT, and its records must fit in LAL (VDL cannot move inside one
    commit), so a transaction past ATOMIC_WRITES_MAX keys (pgbench -i's 100,000-row COPY
    per scale unit) is committed in pieces and is NOT atomic: the
    client gets a WARNING (docs/postgres.md): what it buffered is committed in engine
    transactions of PIECE_KEYS keys, and so is every PIECE_KEYS keys after.

    Early lock release (ARCHITECTURE.md invariant 20): a committing transaction releases
    its row locks as soon as its COMMIT record has an LSN and is in the log, before it is
    durable; the client still hears COMMIT only when VDL passes it. Whoever takes such a
    lock reads the row with a ``latest`` read (the newest committed value, durable or not),
    so its own commit lands at a higher LSN and can never be acknowledged first. A
    transaction that wrote nothing but read that way waits for VDL to pass what it read
    before its COMMIT succeeds; an autocommit statement's result is sent only after its
    implicit commit (engine/pg/protocol.py).

    Commit failures: a commit refused before anything was logged (engine CommitRefused)
    is "NOT committed" (40001, engine/pg/sqlstate.py); one that failed after its records
    were shipped (the durability wait) is raised as CommitUnknown (08006, outcome unknown).

    A session is bound to the Database it started with: if the instance changes role
    (promoted, stepped down: a new Database object), its next statement gets 57P01 and
    the connection ends, as PostgreSQL's connections end when their server restarts.

Status for ReadyForQuery: "I" idle, "T" in a transaction block, "E" failed block.
"""

from __future__ import annotations

import asyncio
import logging
import time

from engine import errors
from engine.pg.sqlstate import CommitUnknown, PgError

log = logging.getLogger("aurora.pg")

ATOMIC_WRITES_MAX = 40_000   # keys one SQL transaction may write and stay atomic (its
                             # records, ~1-2 per key, must fit in LAL = 100,000)
PIECE_KEYS = 500            # keys per piece once a transaction is past ATOMIC_WRITES_MAX
YIELD_EVERY_S = 0.01         # a statement over many rows lets the event loop run this often
STATEMENT_SLACK_KEYS = 1_000  # room past it for the keys of the row being written when
                             # the limit is crossed (a row plus its index entries)


async def commit_engine(txn, on_logged=None) -> None:
    """Commit an engine transaction; a failure after its records were shipped becomes
    CommitUnknown (outcome unknown), a refusal before stays CommitRefused (not committed)."""
    try:
        await txn.commit(on_logged=on_logged)
    except errors.CommitRefused:
        raise
    except errors.UnavailableError as exc:
        raise CommitUnknown(str(exc)) from exc


class LockManager:
    """Exclusive row locks (key -> owning session), FIFO waits, deadlock detection."""

    def __init__(self) -> None:
        self.owner: dict[bytes, "Session"] = {}
        self.waiters: dict[bytes, list[asyncio.Future]] = {}
        self.waiting_for: dict["Session", "Session"] = {}
        self.counters = {"lock_waits": 0, "deadlocks": 0}

    async def acquire(self, session: "Session", key: bytes) -> None:
        while True:
            holder = self.owner.get(key)
            if holder is None or holder is session:
                self.owner[key] = session
                session.locks.add(key)
                return
            # Deadlock check: would session -> holder -> ... -> session?
            node, seen = holder, set()
            while node is not None and node not in seen:
                if node is session:
                    self.counters["deadlocks"] += 1
                    raise PgError("40P01", "deadlock detected")
                seen.add(node)
                node = self.waiting_for.get(node)
            self.counters["lock_waits"] += 1
            fut = asyncio.get_running_loop().create_future()
            self.waiters.setdefault(key, []).append(fut)
            self.waiting_for[session] = holder
            try:
                await fut
            finally:
                self.waiting_for.pop(session, None)
                queue = self.waiters.get(key)
                if queue is not None and fut in queue:
                    queue.remove(fut)

    def release_all(self, session: "Session") -> None:
        for key in session.locks:
            if self.owner.get(key) is session:
                del self.owner[key]
                queue = self.waiters.pop(key, None)
                if queue:
                    for fut in queue:   # all wake; the first to run takes it, others wait again
                        if not fut.done():
                            fut.set_result(None)
        session.locks.clear()


class Session:
    """One client connection's SQL state: settings, the open transaction, its locks."""

    def __init__(self, backend) -> None:
        self.backend = backend          # engine/pg/sql.py Backend: the database and locks
        self.txn = None                 # engine Transaction, or None
        self.in_block = False           # inside BEGIN ... COMMIT
        self.failed = False             # an error happened in the block: wait for ROLLBACK
        self.writes = 0                 # rows buffered in self.txn
        self.locks: set[bytes] = set()
        self.settings: dict[str, str] = {}
        self.read_only = False          # connected to a replica
        self.database = None            # the engine Database of the first statement
        self.rows_in_pieces = 0         # keys of the open transaction already committed in pieces
        self.notices: list[str] = []    # WARNINGs for the client, sent before CommandComplete
        self._last_yield = time.perf_counter()

    @property
    def status(self) -> bytes:
        if self.failed:
            return b"E"
        return b"T" if self.in_block else b"I"

    def transaction(self):
        """The engine transaction for the current statement (begun on first use)."""
        if self.txn is None:
            db = self.backend.db()
            if self.database is None:
                self.database = db
            elif db is not self.database:
                raise PgError("57P01", "terminating connection: this instance changed role "
                                       "(failover); reconnect", "FATAL")
            self.txn = db.begin(conflicts_from_commit=True,
                                writes_max=ATOMIC_WRITES_MAX + STATEMENT_SLACK_KEYS)
            self.writes = 0
        return self.txn

    async def yield_if_due(self) -> None:
        """Let the instance's other tasks (health checks, other sessions) run if this one
        has run YIELD_EVERY_S without suspending (by wall clock, so a loaded machine does
        not stretch the stalls): a big COPY or INSERT rarely suspends on its own."""
        now = time.perf_counter()
        if now - self._last_yield >= YIELD_EVERY_S:
            await asyncio.sleep(0)
            self._last_yield = time.perf_counter()

    async def lock(self, key: bytes) -> None:
        if self.read_only:
            raise PgError("25006", "cannot execute a write on a read replica (read-only transaction)")
        await self.backend.locks.acquire(self, key)

    async def wrote(self, n: int = 1) -> None:
        """Count buffered keys; past ATOMIC_WRITES_MAX, commit what is buffered in pieces
        of PIECE_KEYS (the transaction stops being atomic: the client is warned), and from
        then on every PIECE_KEYS keys."""
        self.writes += n
        if self.writes >= (PIECE_KEYS if self.rows_in_pieces else ATOMIC_WRITES_MAX):
            if not self.rows_in_pieces:
                log.warning("transaction wrote %d keys: committing it in pieces (not atomic past "
                            "%d keys)", self.writes, ATOMIC_WRITES_MAX)
            txn, self.txn = self.txn, None
            await self._commit_in_pieces(txn)
            if not self.rows_in_pieces:
                self.notices.append(
                    f"this transaction wrote more than {ATOMIC_WRITES_MAX} rows and index entries: "
                    f"it is committed in pieces of {PIECE_KEYS} and is not atomic; a "
                    "ROLLBACK or an error will not undo the pieces already committed "
                    "(docs/postgres.md)")
            self.rows_in_pieces += self.writes

    async def _commit_in_pieces(self, txn) -> None:
        """Commit ``txn``'s writes as engine transactions of at most PIECE_KEYS keys each
        (small commits, each waited durable, keep the instance responsive: the transaction
        is not atomic any more anyway)."""
        writes = txn.buffered()
        if len(writes) <= PIECE_KEYS:
            await commit_engine(txn)
            return
        txn.abort()
        db = self.backend.db()
        for start in range(0, len(writes), PIECE_KEYS):
            piece = db.begin(conflicts_from_commit=True)
            for table, key, value in writes[start:start + PIECE_KEYS]:
                if value is None:
                    piece.delete(table, key)
                else:
                    piece.put(table, key, value)
            await commit_engine(piece)

    async def finish(self, commit: bool) -> None:
        """End the engine transaction (commit or abort) and release the locks."""
        txn, self.txn = self.txn, None
        try:
            if txn is not None:
                if commit and self.writes:
                    # Early lock release (invariant 20): the locks go once the COMMIT
                    # record is in the log; the client hears COMMIT once it is durable.
                    release = (lambda lsn: self.backend.locks.release_all(self)) \
                        if self.backend.early_lock_release else None
                    await commit_engine(txn, on_logged=release)
                else:
                    read_lsn = txn.read_lsn
                    txn.abort()
                    if commit and read_lsn:
                        # Read-only, but it read under a lock what a commit not yet durable
                        # wrote: it reports success only once that is durable (invariant 20).
                        self.backend.locks.release_all(self)
                        try:
                            await self.backend.db().wait_durable(read_lsn)
                        except errors.UnavailableError as exc:
                            raise CommitUnknown(f"what this transaction read is not durable: {exc}") from exc
            if self.rows_in_pieces and not commit:
                self.notices.append(f"{self.rows_in_pieces} rows and index entries of this "
                                    "transaction were already committed in pieces and stay "
                                    "committed")
        finally:
            self.writes = self.rows_in_pieces = 0
            self.backend.locks.release_all(self)

    async def close(self) -> None:
        self.in_block = self.failed = False
        await self.finish(commit=False)
