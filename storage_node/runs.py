"""Log runs: how a segment's redo records are stored in the ``log`` database (format 3).

The value format of a run, the cursor walks over a segment's runs, and the write-side
helpers that merge into, rewrite and delete from runs inside a write transaction (a mixin
of ``storage_node.store.Store``: it uses ``self.db_log`` and a transaction context,
storage_node/writes.py). It changes when the way records are stored changes.

Log runs (format 3). An Append's PG batch is stored as ONE value, not one per record:
py-lmdb gives the GIL up and takes it back around every put, so 256 puts per batch convoy
with the event-loop thread, where one put does not. A run value::

    OFFSET     SIZE  MEANING
    0          4     n: records in the run (u32, >= 1)
    4          4     flags: bit 0 (RUN_CHAINED) every record's prev_pg_lsn is the LSN of
                     the record before it: the run is one piece of the segment chain
    8          4     CRC32 (zlib) of bytes [0, 8) and of the directory
    12         8n    the records' LSNs, strictly ascending (u64 LE)
    12+8n      4n    each record's end offset within the records area (u32 LE)
    12+12n     ...   the records exactly as received (header + payload, own CRC32)

Its rules:

    * the runs of a segment cover disjoint LSN ranges [first, last] and the key carries
      ``last``, so ``set_range(seg|lsn)`` lands on the only run that can hold ``lsn``;
    * an Append whose batch is ascending and above the segment's max_lsn (the usual case),
      or falls in a gap between runs, is put as is: one put. Otherwise (retransmit, gossip
      filling a hole) the runs it overlaps are read, merged with its new records
      (duplicates dropped) and rewritten as runs of at most RUN_RECORDS_MAX records;
    * GC and quarantine rewrite each run they take records from without them;
    * a run whose head or directory fails its CRC cannot be read at all (decode_run
      raises CorruptError): the scrubber quarantines every LSN the page index lists in
      its LSN range (the previous run's last, its own last] and peers refill them.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from typing import NamedTuple

from storage_node.errors import CorruptError
from storage_node.layout import BE64, LOG_KEY, REC_PREV_PG, U32, U64, range_of

RUN_HEAD = struct.Struct("<II")  # n, flags; then u32 CRC32 of head + directory
RUN_HEAD_SIZE = 12
RUN_CHAINED = 1  # flags bit 0: every record links to the one before it (prev_pg_lsn)
RUN_RECORDS_MAX = 4096  # records in a run written by a merge (an Append's run is its batch)


class Run(NamedTuple):
    """A decoded log value: LSNs ascending, record end offsets, and the value itself."""

    lsns: tuple
    ends: tuple
    base: int      # offset of the records area in ``value``
    flags: int
    value: bytes

    def record(self, i: int) -> bytes:
        """The bytes of the run's i-th record."""
        return self.value[self.base + (self.ends[i - 1] if i else 0):self.base + self.ends[i]]

    def span(self, i: int, j: int) -> bytes:
        """Records i..j-1, back to back."""
        return self.value[self.base + (self.ends[i - 1] if i else 0):self.base + self.ends[j - 1]]


def encode_run(directory: bytes, n: int, chained: bool, records: bytes) -> bytes:
    """A log value: head, CRC, directory (n LSNs u64 LE, n end offsets u32 LE), records."""
    head = RUN_HEAD.pack(n, RUN_CHAINED if chained else 0)
    return b"".join((head, U32.pack(zlib.crc32(directory, zlib.crc32(head))), directory, records))


def run_from_records(pairs) -> bytes:
    """A log value from [(lsn, record bytes)] with strictly ascending LSNs (merges, GC)."""
    n = len(pairs)
    ends = []
    off = 0
    chained = True
    prev = None
    for lsn, rec in pairs:
        off += len(rec)
        ends.append(off)
        if prev is not None and U64.unpack_from(rec, REC_PREV_PG)[0] != prev:
            chained = False
        prev = lsn
    directory = struct.pack(f"<{n}Q{n}I", *(lsn for lsn, _r in pairs), *ends)
    return encode_run(directory, n, chained, b"".join(rec for _l, rec in pairs))


def decode_run(value) -> Run:
    """Decode a log value; CorruptError if its head or directory fails the check (then
    nothing in it can be located: the scrubber quarantines the run's LSNs, invariant 13)."""
    size = len(value)
    if size < RUN_HEAD_SIZE:
        raise CorruptError(f"log run of {size} bytes is shorter than its head")
    n, flags = RUN_HEAD.unpack_from(value, 0)
    base = RUN_HEAD_SIZE + 12 * n
    if n == 0 or base > size:
        raise CorruptError(f"log run head says {n} records in {size} bytes")
    crc = zlib.crc32(value[RUN_HEAD_SIZE:base], zlib.crc32(value[:8]))
    if crc != U32.unpack_from(value, 8)[0]:
        raise CorruptError("log run directory failed its checksum")
    lsns = struct.unpack_from(f"<{n}Q", value, RUN_HEAD_SIZE)
    ends = struct.unpack_from(f"<{n}I", value, RUN_HEAD_SIZE + 8 * n)
    if base + ends[-1] != size:
        raise CorruptError("log run directory does not match its length")
    return Run(lsns, ends, base, flags, value)


def run_key_lsn(key) -> int:
    return BE64.unpack_from(key, 8)[0]


def runs_up(cur, prefix: bytes, after: int):
    """Yield (run, index of its first record with lsn > after) of a segment's runs that
    hold such records, ascending. The cursor must not be used by anything else while
    the generator is alive."""
    if not cur.set_range(prefix + BE64.pack(after + 1)):
        return
    while True:
        k = cur.key()
        if k[:8] != prefix:
            return
        run = decode_run(cur.value())
        lsns = run.lsns
        yield run, (bisect.bisect_right(lsns, after) if lsns[0] <= after else 0)
        if not cur.next():
            return


def records_up(cur, prefix: bytes, after: int):
    """Yield (lsn, run, index) of a segment's stored records with lsn > after, ascending."""
    for run, i in runs_up(cur, prefix, after):
        lsns = run.lsns
        for j in range(i, len(lsns)):
            yield lsns[j], run, j


def records_down(cur, prefix: bytes, upto: int):
    """Yield (lsn, run, index) of a segment's stored records with lsn <= upto, descending."""
    ok = cur.set_range(prefix + BE64.pack(upto)) or cur.last()
    while ok:
        k = cur.key()
        if k[:8] != prefix:
            if k[:8] < prefix:
                return
            ok = cur.prev()  # landed on the next segment: its predecessor may be ours
            continue
        run = decode_run(cur.value())
        lsns = run.lsns
        for i in range(bisect.bisect_right(lsns, upto) - 1, -1, -1):
            yield lsns[i], run, i
        ok = cur.prev()


def get_record(cur, prefix: bytes, lsn: int) -> bytes | None:
    """One stored record's bytes (None if not stored); CorruptError if its run is bad."""
    if not cur.set_range(prefix + BE64.pack(lsn)) or cur.key()[:8] != prefix:
        return None
    run = decode_run(cur.value())
    i = bisect.bisect_left(run.lsns, lsn)
    if i < len(run.lsns) and run.lsns[i] == lsn:
        return run.record(i)
    return None


def visible_down(cur, prefix: bytes, truncs, limit: int) -> int:
    """Highest stored record LSN <= limit that no range of ``truncs`` hides (0: none);
    a range is jumped over in one seek, whatever it hides."""
    walk = records_down(cur, prefix, limit)
    for lsn, _run, _i in walk:
        hidden = range_of(lsn, truncs)
        if hidden is None:
            return lsn
        walk.close()
        return visible_down(cur, prefix, truncs, hidden[0])
    return 0


class LogRuns:
    """Write-side edits of a segment's runs inside ``Store.apply_ops`` (mixin of Store)."""

    def _run_overlaps(self, ctx, prefix: bytes, first: int, last: int) -> bool:
        """True if a stored run of the segment holds LSNs inside [first, last]."""
        cur = ctx.log_cur
        if not cur.set_range(prefix + BE64.pack(first)):
            return False
        k = cur.key()
        # The first run whose last LSN is >= first: it overlaps unless it starts above last.
        return k[:8] == prefix and U64.unpack_from(cur.value(), RUN_HEAD_SIZE)[0] <= last

    def _merge_into_log(self, ctx, prefix: bytes, incoming: Run) -> int:
        """Store the records of ``incoming`` not stored yet: read the runs overlapping its
        LSN range, merge, and rewrite them as runs of at most RUN_RECORDS_MAX records (runs
        of a segment stay disjoint). Returns how many records were new."""
        records = {}
        for i, lsn in enumerate(incoming.lsns):
            records.setdefault(lsn, i)
        lo, hi = min(records), max(records)
        cur = ctx.log_cur
        old_keys = []
        have: dict[int, bytes] = {}
        if cur.set_range(prefix + BE64.pack(lo)):
            while True:
                k = cur.key()
                if k[:8] != prefix:
                    break
                run = decode_run(cur.value())
                if run.lsns[0] > hi:
                    break
                old_keys.append(bytes(k))
                for i, lsn in enumerate(run.lsns):
                    have[lsn] = run.record(i)
                if not cur.next():
                    break
        added = 0
        for lsn, i in records.items():
            if lsn not in have:
                have[lsn] = incoming.record(i)
                added += 1
        if not added:
            return 0
        for k in old_keys:
            ctx.txn.delete(k, db=self.db_log)
        self._put_runs(ctx, prefix, sorted(have.items()))
        return added

    def _put_runs(self, ctx, prefix: bytes, pairs: list) -> None:
        """Write [(lsn, record bytes)], ascending, as runs (their range must be free)."""
        for i in range(0, len(pairs), RUN_RECORDS_MAX):
            chunk = pairs[i:i + RUN_RECORDS_MAX]
            value = run_from_records(chunk)
            ctx.txn.put(prefix + BE64.pack(chunk[-1][0]), value, db=self.db_log)
            ctx.bytes_written += len(value) + LOG_KEY.size

    def _delete_records(self, ctx, prefix: bytes, lsns) -> list[tuple[int, bytes]]:
        """Remove records ``lsns`` from the segment's runs (GC, quarantine): each run that
        holds some is rewritten without them. Returns [(lsn, bytes)] of those removed."""
        wanted = sorted(set(lsns))
        removed = []
        cur = ctx.log_cur
        i = 0
        while i < len(wanted):
            if not cur.set_range(prefix + BE64.pack(wanted[i])):
                break
            k = cur.key()
            if k[:8] != prefix:
                break
            run_key = bytes(k)
            run = decode_run(cur.value())
            last = run.lsns[-1]
            dels = set()
            while i < len(wanted) and wanted[i] <= last:
                dels.add(wanted[i])
                i += 1
            keep = []
            for j, lsn in enumerate(run.lsns):
                if lsn in dels:
                    removed.append((lsn, run.record(j)))
                else:
                    keep.append((lsn, run.record(j)))
            if len(keep) == len(run.lsns):
                continue
            ctx.txn.delete(run_key, db=self.db_log)
            if keep:
                self._put_runs(ctx, prefix, keep)
        return removed
