"""A SysBench oltp_write_only-like workload on an engine.db.database.Database.

Schema, as SysBench's ``sbtest1`` (id INT PRIMARY KEY, k INT, c CHAR(120), pad CHAR(60),
INDEX(k)), in two B+tree tables because aurora-lite has no secondary indexes::

    table       key                         value
    sbtest1     id  (4 bytes, big-endian)   k (4 bytes BE) + c (120 bytes) + pad (60 bytes)
    sbtest1_k   k + id (8 bytes, BE)        empty: the secondary index on k, made unique by
                                            the primary key as InnoDB does

One transaction = SysBench oltp_write_only's write statements, each on its own random id
in 1..rows (so a transaction changes up to three rows)::

    index update      UPDATE sbtest1 SET k = k + 1 WHERE id = i1
                      -> read row i1; put row; delete index (k, i1); put index (k + 1, i1)
    non-index update  UPDATE sbtest1 SET c = ? WHERE id = i2
                      -> read row i2; put row with a new c
    delete + insert   DELETE FROM sbtest1 WHERE id = i3; INSERT INTO sbtest1 (id, k, c, pad)
                      -> read row i3; delete row and index (k, i3); put row with a new k, c,
                         pad; put index (new k, i3)

The transaction buffers its writes (engine/db/database.py), so the delete and the re-insert of
row i3 reach the log as ONE update of its leaf cell; both configurations of the benchmark
get the same records. A write-write conflict (first committer wins) aborts the attempt,
which counts as an abort and is not retried with the same ids (SysBench reports errors and
goes on). Each client is a coroutine on the caller's event loop; all clients share the
Database, as connections of one MySQL server would.

The random choices come from ``random.Random(seed + client)``, so a run can be replayed.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from engine.errors import ConflictError, DatabaseError

TABLE = "sbtest1"
INDEX = "sbtest1_k"
C_BYTES = 120
PAD_BYTES = 60
ROW_BYTES = 4 + C_BYTES + PAD_BYTES
LOAD_ROWS_PER_TXN = 200
_ID = struct.Struct(">I")
_INDEX = struct.Struct(">II")
_VALUE_POOL = 64          # distinct c / pad strings per client (random choice among them)


def id_key(row_id: int) -> bytes:
    return _ID.pack(row_id)


def index_key(k: int, row_id: int) -> bytes:
    return _INDEX.pack(k, row_id)


def row_value(k: int, c: bytes, pad: bytes) -> bytes:
    assert len(c) == C_BYTES and len(pad) == PAD_BYTES
    return _ID.pack(k) + c + pad


def row_k(value: bytes) -> int:
    return _ID.unpack_from(value, 0)[0]


def _digits(rng: random.Random, n: int) -> bytes:
    """SysBench-style filler: groups of 11 digits joined by '-', cut to ``n`` bytes."""
    groups = (str(rng.randrange(10 ** 10, 10 ** 11)) for _ in range(n // 12 + 1))
    return "-".join(groups).encode()[:n]


class _Values:
    """A small pool of c and pad strings per client, so a transaction costs no formatting."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.c = [_digits(rng, C_BYTES) for _ in range(_VALUE_POOL)]
        self.pad = [_digits(rng, PAD_BYTES) for _ in range(_VALUE_POOL)]

    def new_c(self) -> bytes:
        return self.rng.choice(self.c)

    def new_pad(self) -> bytes:
        return self.rng.choice(self.pad)


async def create_schema(db) -> None:
    for name in (TABLE, INDEX):
        await db.create_table(name)


async def load(db, rows: int, seed: int = 1,
               progress: Callable[[int], None] | None = None) -> None:
    """Insert rows 1..rows (k random in 1..rows), LOAD_ROWS_PER_TXN per transaction."""
    rng = random.Random(seed)
    values = _Values(rng)
    for start in range(1, rows + 1, LOAD_ROWS_PER_TXN):
        txn = db.begin()
        for row_id in range(start, min(rows + 1, start + LOAD_ROWS_PER_TXN)):
            k = rng.randint(1, rows)
            txn.put(TABLE, id_key(row_id), row_value(k, values.new_c(), values.new_pad()))
            txn.put(INDEX, index_key(k, row_id), b"")
        await txn.commit()
        if progress is not None:
            progress(min(rows, start + LOAD_ROWS_PER_TXN - 1))


@dataclass
class PhaseResult:
    """What the clients saw during one measured phase."""

    committed: int = 0
    aborted: int = 0                 # write-write conflicts (first committer wins)
    errors: int = 0                  # other database errors (e.g. a timed-out commit)
    error_samples: list[str] = field(default_factory=list)
    commit_latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0


async def transaction(db, rng: random.Random, values: _Values, rows: int, result: PhaseResult) -> None:
    """One oltp_write_only transaction (see the module doc); records its commit latency."""
    txn = db.begin()
    try:
        i1 = rng.randint(1, rows)
        row = await txn.get(TABLE, id_key(i1))
        if row is not None:
            k = row_k(row)
            txn.put(TABLE, id_key(i1), _ID.pack(k + 1) + row[4:])
            txn.delete(INDEX, index_key(k, i1))
            txn.put(INDEX, index_key(k + 1, i1), b"")
        i2 = rng.randint(1, rows)
        row = await txn.get(TABLE, id_key(i2))
        if row is not None:
            txn.put(TABLE, id_key(i2), row[:4] + values.new_c() + row[4 + C_BYTES:])
        i3 = rng.randint(1, rows)
        row = await txn.get(TABLE, id_key(i3))
        if row is not None:
            txn.delete(TABLE, id_key(i3))
            txn.delete(INDEX, index_key(row_k(row), i3))
        k3 = rng.randint(1, rows)
        txn.put(TABLE, id_key(i3), row_value(k3, values.new_c(), values.new_pad()))
        txn.put(INDEX, index_key(k3, i3), b"")
        started = time.perf_counter()
        await txn.commit()
        result.commit_latencies_s.append(time.perf_counter() - started)
        result.committed += 1
    except ConflictError:
        result.aborted += 1
    except DatabaseError as exc:
        result.errors += 1
        if len(result.error_samples) < 5:
            result.error_samples.append(f"{type(exc).__name__}: {exc}")
    finally:
        txn.abort()  # no-op after commit


async def run_clients(db, rows: int, clients: int, *, duration_s: float | None = None,
                      transactions: int | None = None, seed: int = 1,
                      progress: Callable[[PhaseResult, float], None] | None = None,
                      progress_interval_s: float = 0.5) -> PhaseResult:
    """Run ``clients`` concurrent clients until ``duration_s`` passed or ``transactions``
    committed in total (whichever is given; both: whichever comes first)."""
    if duration_s is None and transactions is None:
        raise ValueError("give a duration or a transaction count")
    result = PhaseResult()
    started = time.perf_counter()
    deadline = None if duration_s is None else started + duration_s

    def done() -> bool:
        if deadline is not None and time.perf_counter() >= deadline:
            return True
        return transactions is not None and result.committed >= transactions

    async def client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        values = _Values(rng)
        while not done():
            await transaction(db, rng, values, rows, result)

    async def reporter() -> None:
        while True:
            await asyncio.sleep(progress_interval_s)
            progress(result, time.perf_counter() - started)

    report = asyncio.ensure_future(reporter()) if progress is not None else None
    try:
        await asyncio.gather(*(client(n) for n in range(clients)))
    finally:
        if report is not None:
            report.cancel()
    result.elapsed_s = time.perf_counter() - started
    return result
