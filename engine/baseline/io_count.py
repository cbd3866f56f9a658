"""Counting rules of the write-amplification benchmark: pure functions, no I/O.

[P17 3.2, Table 1] compares network I/Os per transaction of Aurora (0.95) and of mirrored
MySQL (7.4). [P17] fixes the unit: write I/Os are counted in 4 KiB units,
small records batched together, and Aurora batches ("boxcars") per protection group: one
PG's records go to that PG's six segments. Everything that counts I/Os in aurora-lite (the benchmark
runner, the baseline's block chain, the block servers) uses these functions, so the rules
live in one place and tests/test_write_amplification.py checks them by hand.

Counting rules (numbered; docs/benchmarks.md cites them):

    (R1) An I/O is up to IO_UNIT_BYTES = 4096 payload bytes of ONE write: a write of n > 0
         bytes costs ceil(n / 4096) I/Os; an empty write costs nothing.
    (R2) aurora-lite: each PG batch (``PgBatch``) of an Append to one storage node is one
         write, costing ceil(its records' bytes / 4096): Aurora boxcars per PG, and each PG
         has its own six segments, so one PG's batch to one segment is the unit [P17]
         counts. An Append that carries batches of several PGs costs the SUM of its
         batches' I/Os. (It carries several only because every PG of aurora-lite lives on
         the same six nodes; in Aurora they would be separate requests to different nodes.)
    (R2-old) The figure before issue 16, kept beside the headline: one Append to one node
         is one write of all its PG batches together, ceil(sum of their bytes / 4096).
         It is never larger than R2's count (``Tally.append_ios``).
    (R3) Baseline: every BlockWrite is its own write (a redo-log write, a binlog write, a
         double-write-buffer write, ONE data page at its home location, a metadata write)
         even when one RPC carries several of them; a request costs the sum.
    (R4) Every destination counts: the same write sent to six storage nodes is six writes.
    (R5) Bytes sent are the serialised protobuf request bytes (payload plus framing) of
         every write request, per destination.
    (R6) Reads are counted apart (ReadPage / block Read replies, also per R1) and are not
         part of the write I/O figures, as in [P17 Table 1].
    (R7) Per-transaction figures divide by the transactions COMMITTED in the measured
         window (aborted attempts cost I/Os but do not count as transactions).

Which sends are "from the compute node" for the headline figure is the runner's choice
(engine/baseline/wa_bench.py documents it); ``Ledger`` just keeps one tally per destination.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

IO_UNIT_BYTES = 4096

#: [P17] Table 1 (SysBench write-only, 30 minutes): the figures the benchmark prints beside
#: its own. I/Os per transaction and transactions are the paper's; the ratios follow.
PAPER = {
    "mysql_transactions": 780_000,
    "mysql_ios": 7_388_000,
    "aurora_transactions": 27_378_000,
    "aurora_ios": 158_000_000,
    "mysql_ios_per_txn": 7.4,
    "aurora_ios_per_txn": 0.95,
    "ios_ratio": 7.7,            # 7.4 / 0.95 ("7.7x fewer I/Os per transaction")
    "txn_ratio": 35.0,           # 27,378,000 / 780,000 ("35x more transactions")
    "per_node_ratio": 46.0,      # "each storage node ... 46x fewer I/Os"
}


def write_ios(nbytes: int) -> int:
    """(R1) I/Os of one write of ``nbytes`` payload bytes."""
    if nbytes < 0:
        raise ValueError(f"a write cannot have {nbytes} bytes")
    return -(-nbytes // IO_UNIT_BYTES)


def pg_batch_ios(pg_batch_bytes) -> int:
    """(R2) I/Os of one aurora-lite Append to one node: each PG batch is a write of its own."""
    return sum(write_ios(n) for n in pg_batch_bytes)


def append_ios(pg_batch_bytes) -> int:
    """(R2-old) I/Os of one aurora-lite Append to one node with its PG batches as ONE write."""
    return write_ios(sum(pg_batch_bytes))


def block_request_ios(write_bytes) -> int:
    """(R3) I/Os of one baseline block request: each BlockWrite is a write of its own."""
    return sum(write_ios(n) for n in write_bytes)


@dataclass
class Tally:
    """Writes sent to one destination (or any sum of them)."""

    requests: int = 0      # RPCs
    writes: int = 0        # writes in them (R2: one per PG batch; R3: one per BlockWrite)
    ios: int = 0           # 4 KiB units (R1), by R2 / R3: the headline's count
    payload_bytes: int = 0  # bytes of the writes' data
    bytes: int = 0         # serialised request bytes (R5)
    append_ios: int = 0    # the same writes by R2-old (an Append is one write); = ios for R3

    def add(self, ios: int, payload_bytes: int, request_bytes: int, writes: int = 1,
            append_ios: int | None = None) -> None:
        append_ios = ios if append_ios is None else append_ios
        assert ios >= 0 and payload_bytes >= 0 and request_bytes >= 0 and writes >= 0
        assert 0 <= append_ios <= ios
        self.requests += 1
        self.writes += writes
        self.ios += ios
        self.payload_bytes += payload_bytes
        self.bytes += request_bytes
        self.append_ios += append_ios

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(self.requests + other.requests, self.writes + other.writes,
                     self.ios + other.ios, self.payload_bytes + other.payload_bytes,
                     self.bytes + other.bytes, self.append_ios + other.append_ios)

    def __sub__(self, other: "Tally") -> "Tally":
        return Tally(self.requests - other.requests, self.writes - other.writes,
                     self.ios - other.ios, self.payload_bytes - other.payload_bytes,
                     self.bytes - other.bytes, self.append_ios - other.append_ios)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Ledger:
    """Write tallies per destination name, plus read tallies (R6). Not thread-safe: fed
    from one event loop."""

    writes: dict[str, Tally] = field(default_factory=dict)
    reads: dict[str, Tally] = field(default_factory=dict)

    def sent_append(self, dest: str, pg_batch_bytes, request_bytes: int) -> int:
        """Record one Append to ``dest``: its PG batches' sizes, one per batch. Counts R2
        (each PG batch a write) and, beside it, R2-old (the Append one write); returns
        the R2 I/Os."""
        sizes = list(pg_batch_bytes)
        ios = pg_batch_ios(sizes)
        self.writes.setdefault(dest, Tally()).add(ios, sum(sizes), request_bytes, len(sizes),
                                                  append_ios=append_ios(sizes))
        return ios

    def sent_blocks(self, dest: str, write_bytes, request_bytes: int) -> int:
        """Record one block Write request to ``dest`` (R3); returns its I/Os."""
        sizes = list(write_bytes)
        ios = block_request_ios(sizes)
        self.writes.setdefault(dest, Tally()).add(ios, sum(sizes), request_bytes, len(sizes))
        return ios

    def read(self, dest: str, reply_bytes: int) -> None:
        """Record one read answered by ``dest`` with ``reply_bytes`` bytes (R6)."""
        ios = write_ios(reply_bytes)
        self.reads.setdefault(dest, Tally()).add(ios, reply_bytes, reply_bytes)

    def total(self, dests=None) -> Tally:
        """Sum of the write tallies of ``dests`` (default: every destination)."""
        out = Tally()
        for name, tally in self.writes.items():
            if dests is None or name in dests:
                out = out + tally
        return out

    def read_total(self) -> Tally:
        out = Tally()
        for tally in self.reads.values():
            out = out + tally
        return out

    def snapshot(self) -> "Ledger":
        """A copy, to subtract later (``delta``)."""
        return Ledger({k: Tally(**asdict(v)) for k, v in self.writes.items()},
                      {k: Tally(**asdict(v)) for k, v in self.reads.items()})

    def delta(self, before: "Ledger") -> "Ledger":
        """What was counted since ``before`` (a snapshot of this ledger)."""
        return Ledger({k: v - before.writes.get(k, Tally()) for k, v in self.writes.items()},
                      {k: v - before.reads.get(k, Tally()) for k, v in self.reads.items()})


def per_txn(value: float, transactions: int) -> float:
    """(R7) ``value`` per committed transaction (0.0 when nothing committed)."""
    return value / transactions if transactions > 0 else 0.0


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is 0."""
    return numerator / denominator if denominator else None


def percentile(values, p: float) -> float:
    """Nearest-rank percentile (p in [0, 100]) of ``values``; 0.0 for no values.

    Nearest rank: the smallest value such that at least p% of the values are <= it,
    i.e. sorted(values)[ceil(p / 100 * n) - 1] (index 0 for p = 0).
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is not in [0, 100]")
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[rank - 1])


def fmt_number(value, digits: int = 2) -> str:
    """A table cell: '-' for None, thousands separators for big numbers."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int) or (isinstance(value, float) and abs(value) >= 1000):
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def format_table(header: list[str], rows: list[list], first_width: int | None = None) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) if isinstance(c, str) else fmt_number(c) for c in row] for row in rows]
    widths = [max(len(header[i]), *(len(r[i]) for r in cells)) for i in range(len(header))]
    if first_width:
        widths[0] = max(widths[0], first_width)
    lines = ["  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                       for i, h in enumerate(header))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(row)))
    return "\n".join(lines)
