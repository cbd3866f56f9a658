"""A SQL session's transaction state, and the row locks SQL writers take on the writer.

Transactions
    A SQL transaction is one engine transaction (engine/db/database.py) begun with
    ``conflicts_from_commit=True``: its writes are buffered and committed as one MTR, and
    it reads the latest committed state merged with its own writes (read committed, like
    PostgreSQL's default). Write-write safety comes from row locks instead of the engine's
    first-committer-wins check: every row a statement inserts, updates or deletes is locked
    (exclusive, until the transaction ends) BEFORE it is read for the change, so the read
    sees the last committer's durable value and no update is lost; a second writer waits,
    as in PostgreSQL. A wait that would close a cycle fails with 40P01 (deadlock_detected).
    Locks live in the writer process only: the SQL front end is the only writer of table
    ``pg`` (the key-value API could bypass them; it has no reason to).

    A transaction that writes more than CHUNK_WRITES keys (COPY, bulk INSERT, pgbench -i's
    load) is committed in pieces of CHUNK_WRITES keys, since one engine transaction holds
    at most TXN_WRITES_MAX = 4096 keys (and a big MTR holds the event loop for its whole
    planning): such a transaction is NOT atomic (docs/postgres.md).

    A session is bound to the Database it started with: if the instance changes role
    (promoted, stepped down: a new Database object), its next statement gets 57P01 and
    the connection ends, as PostgreSQL's connections end when their server restarts.

Status for ReadyForQuery: "I" idle, "T" in a transaction block, "E" failed block.
"""

from __future__ import annotations

import asyncio
import logging

from engine.pg.sqlstate import PgError

log = logging.getLogger("aurora.pg")

CHUNK_WRITES = 500      # keys per piece of a big transaction: one MTR of 500 B+tree puts
                        # keeps the event loop (and the instance's health checks) moving


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
        self.rows_in_pieces = 0         # rows of the open transaction already committed in pieces
        self.notices: list[str] = []    # WARNINGs for the client, sent before CommandComplete

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
            self.txn = db.begin(conflicts_from_commit=True)
            self.writes = 0
        return self.txn

    async def lock(self, key: bytes) -> None:
        if self.read_only:
            raise PgError("25006", "cannot execute a write on a read replica (read-only transaction)")
        await self.backend.locks.acquire(self, key)

    async def wrote(self, n: int = 1) -> None:
        """Count buffered rows; commit a piece when a big transaction fills one."""
        self.writes += n
        if self.writes >= CHUNK_WRITES:
            log.info("transaction wrote %d rows: committing this piece (not atomic past %d rows)",
                     self.writes, CHUNK_WRITES)
            txn, self.txn = self.txn, None
            await txn.commit()
            if not self.rows_in_pieces:
                self.notices.append(
                    f"this transaction wrote more than {CHUNK_WRITES} rows: it is committed in "
                    f"pieces of {CHUNK_WRITES} and is not atomic; a ROLLBACK or an error will "
                    "not undo the pieces already committed (docs/postgres.md)")
            self.rows_in_pieces += self.writes

    async def finish(self, commit: bool) -> None:
        """End the engine transaction (commit or abort) and release the locks."""
        txn, self.txn = self.txn, None
        try:
            if txn is not None:
                if commit and self.writes:
                    await txn.commit()
                else:
                    txn.abort()
            if self.rows_in_pieces and not commit:
                self.notices.append(f"{self.rows_in_pieces} rows of this transaction were "
                                    "already committed in pieces and stay committed")
        finally:
            self.writes = self.rows_in_pieces = 0
            self.backend.locks.release_all(self)

    async def close(self) -> None:
        self.in_block = self.failed = False
        await self.finish(commit=False)
