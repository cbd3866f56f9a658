"""The durable state of a storage node: one LMDB environment holding many segments.

A *segment* is one protection group's (PG's) copy on this node: the PG's redo log records,
the page versions materialised from them, and a little metadata. A node holds the
segments of several volumes (one per PG of each volume). This module owns every durable
state transition; it does no networking and imports no grpc. The rpc layer
(storage_node/service.py) and the background tasks call it; every write goes through
``Store.apply_ops``, which runs a list of operations in ONE LMDB write transaction (the
group commit of storage_node/commit.py) and returns after the sync commit (invariant 3).

LMDB layout (one environment, ``sync=True``; named databases). Keys are big-endian so
LMDB's byte order is numeric order: a cursor walks a segment's log in LSN order and a
page's versions in LSN order. Values are little-endian like the record and page formats.
``seg`` below is the 8-byte segment prefix ``vol_id u32 BE | pg u32 BE``::

    DB          KEY: OFFSET SIZE MEANING          VALUE: OFFSET SIZE MEANING
    node        0  n  b"node_id"                  0  n  node id (utf-8); refuse another
                0  n  b"format"                   0  4  u32 layout version (FORMAT = 3)
                0  n  b"next_vol_id"              0  4  u32 next volume id to assign
    volumes     0  n  volume name (utf-8)         0  4  vol_id
                                                  4  4  pg_count       layout
                                                  8  4  stripe_pages   layout
                                                  12 8  created_epoch
                                                  20 4  parent vol_id  0: not a clone
                                                  24 8  fork_lsn       clone: parent as of it
                                                  32 1  dropped        1: no writer may open it
                                                  33 4  n_inherited    (rows of 20 bytes from
                                                  37 24*n the parent's  older nodes: not a
                                                        truncation      clone)
                                                        ranges
                                                  37+24n 8*pg_count fork_tails: per PG, the
                                                        parent segment's last record <= fork
                                                        at the fork (start, end, epoch)
    segments    0  8  seg                         0  8  scl            invariant 4
                                                  8  8  volume_epoch   invariant 9
                                                  16 8  membership_epoch
                                                  24 8  writer_vdl     highest seen in Appends
                                                  32 8  gc_horizon     PGMRPL, invariant 12
                                                  40 8  max_lsn        highest LSN stored
                                                  48 8  gc_done        horizon GC finished at
                                                  56 8  log_floor      records < it may be GC'd
                                                  64 8  n_records      log entries stored
                                                  72 8  n_versions     page versions stored
                                                  80 8  generation     bumped by truncation
                                                  88 4  n_trunc
                                                  92 24*n truncation ranges: start u64
                                                        (exclusive), end u64 (inclusive),
                                                        epoch u64 that recorded it
    log         0  8  seg                         a run: records of the segment, LSNs
                8  8  last_lsn: the run's highest ascending (see "log runs" below)
                      LSN
    pageidx     0  8  seg                         0  8n a group: the LSNs (u64 BE,
                8  4  page_id                           strictly ascending, n <= 512) of
                12 8  last_lsn: the group's highest     some of the page's records; 0
                      LSN                               bytes (format 1 rows) = the key's
                                                        LSN alone. See "page index" below.
    pagedelta   0  8  seg                         0  4  n pages   one write transaction's
                8  8  last_lsn: the highest LSN   4  8n page_id u32, count u32 per page
                      it lists                    4+8n  the LSNs (u64), page by page,
                                                        each page's ascending. See below.
    versions    0  8  seg                         0  8192 page image as of lsn (own CRC32;
                8  4  page_id                           page_lsn == lsn)
                12 8  lsn
    history     0  4  vol_id BE                   0  8  time_us   when the truncation set
                4  8  epoch BE                    8  8  prev_vdl  changed; VDL of the timeline
                                                                  it ended (0: none)
                                                  16 4  n
                                                  20 24*n the whole truncation set from then
                                                        on (start, end, epoch): a timeline
    quarantine  0  8  seg                         0  8  u64 unix time it was found bad
                8  1  b"R": a log record          (invariant 13: removed from the
                9  8  lsn                          readable set until repaired)
                8  1  b"V": a page version
                9  4  page_id
                13 8  lsn

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

The page index (format 2). One row per page per write transaction, not one per record:
LMDB puts dominate the append path (py-lmdb gives the GIL up and takes it back around
every put), and a batch of N records touches far fewer than N pages. Its rules:

    * a group holds LSNs of one page, ascending, each stored in ``log`` (or quarantined);
      its key carries its highest LSN, so ``set_range(seg|page|after+1)`` lands on the
      first group that can hold an LSN above ``after``;
    * the groups of one page cover disjoint LSN ranges [first, last], and every record of
      the page is in exactly one group. So a range walk stops at the first group whose
      first LSN is above its upper bound. An append whose LSNs are all above the
      segment's max_lsn (the usual case) cannot overlap any stored group and is put
      directly; otherwise (retransmit, gossip filling a hole, repair) the overlapping
      groups are read, merged with the new LSNs (duplicates dropped) and rewritten;
    * GC rewrites the groups it deletes LSNs from; truncation and quarantine leave the
      index alone (the record's bytes are what is hidden or missing).

Page-index deltas (format 3). Even one row per page is ~60 puts per transaction when a
transaction touches ~60 pages (measured: 2-5 ms of an 8 ms write transaction, the
largest phase). So a transaction whose batches of a segment are all ascending, each
above the ones before and above the segment's max_lsn (the usual case), writes ONE
``pagedelta`` row for the segment instead: its pages' new LSNs. Rules:

    * every delta LSN is above every LSN in the segment's groups, and deltas cover
      disjoint ascending ranges; so a page's LSNs are its groups' followed by the
      deltas' (``_page_lsns``);
    * a fold (``_fold_deltas``) moves all of a segment's deltas into one new group per
      page and deletes them. The coalescer folds a segment once it has
      index_fold_deltas deltas while appends are heavy, or any when idle
      (``FoldIndexOp``). Any path that edits groups (a retransmit or hole fill merging
      into them, GC removing LSNs) folds first, in the same transaction.

    Example: page 7 gets LSNs 10, 14 in one transaction and 20 in the next: rows
    (7, 14) = [10, 14] and (7, 20) = [20]. A retransmit of 12 overlaps [10, 14] and
    rewrites it as (7, 14) = [10, 12, 14]. A read of (11, 15] seeks (7, 12), finds
    (7, 14), takes 12 and 14, and stops at (7, 20) (first LSN 20 > 15).

State transitions and the functions that make them (all inside ``apply_ops``):

    CreateVolumeOp   volumes + one segments row per PG          _op_create_volume
    AppendOp         a log run (or a merge with the runs it      _op_append
                     overlaps) + a pagedelta row (or pageidx
                     rows), SCL walk, max_lsn,
                     writer_vdl; repairs clear quarantine rows
    TruncateOp       a truncation range + epoch, or (backtrack,   _op_truncate
                     recovery) a whole new truncation set that
                     replaces the old one plus a history row;
                     SCL recomputed from the lowest changed
                     LSN; writer_vdl lowered out of any range
                     (or set to a backtrack's target)
    DropVolumeOp     mark a volume dropped (clones keep reading   _op_drop_volume
                     its segments; nothing is deleted)
    AdoptEpochOp     a higher epoch (fencing) and a peer's       _op_adopt_epoch
                     truncation set if its epoch is higher
                     (gossip; replaces, never merges)
    SetGcHorizonOp   gc_horizon = max(old, new)                  _op_set_gc_horizon
    PutVersionsOp    versions rows from the coalescer / repair   _op_put_versions
    GcStepOp         delete records and versions no read point   _op_gc_step
                     >= horizon needs (invariant 12)
    FoldIndexOp      a segment's pagedelta rows into pageidx     _op_fold_index
    QuarantineOp     move bad bytes out of log / versions into   _op_quarantine
                     quarantine (invariant 13); a run with a bad
                     directory: every LSN indexed in its range

The SCL rule (invariant 4): starting from the persisted SCL, look at the next stored record
above it that is not inside a truncation range (a chained run that links to the SCL and
no range touches is taken whole, in one step). If its ``prev_pg_lsn`` equals the SCL, the
SCL moves to its LSN and the walk repeats; otherwise there is a hole and the SCL stays
until the missing record arrives (retransmit or gossip). Example: SCL 10, stored 14 (prev
12) and 16 (prev 14): the next record 14 does not link to 10, so SCL stays 10; when 12
(prev 10) arrives the walk goes 12, 14, 16 and SCL becomes 16.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import os
import struct
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Iterable, NamedTuple

import lmdb

from engine import materialiser
from engine.format import page as pagefmt
from engine.errors import ChecksumError, FormatError, InvariantViolation, PageOrderError
from engine.format.redo import HEADER_SIZE, LSN_MAX
from engine.format.volume import VolumeLayout
from storage_node.errors import (
    BadChecksumError,
    CorruptError,
    EpochAheadError,
    MalformedError,
    PageNotFoundError,
    ReadPointAboveSclError,
    ReadPointBelowGcError,
    StaleEpochError,
    StorageError,
    UnknownVolumeError,
    WrongPgError,
)

FORMAT = 3  # 3: one log value per run of records; 2: grouped page index rows. Format 1
#              and 2 dirs open and are upgraded in place; older code refuses 3.
IDX_GROUP_MAX = 512  # LSNs in one page-index group (a 4 KiB value at most)
FOLD_DELTAS_MAX = 16  # page-index deltas one FoldIndexOp folds
DEFAULT_MAP_SIZE = 16 << 30  # sparse on Linux: the file grows only as pages are used
MAX_DBS = 16
PAGE_SIZE = pagefmt.PAGE_SIZE

#: Upper bounds on one answer (TigerBeetle style: every batch has a limit).
FETCH_BYTES_DEFAULT = 4 << 20
FETCH_BYTES_MAX = 16 << 20
STATE_RECORDS_MAX = 65536
READ_VERSION_FALLBACKS = 3
SUSPECTS_MAX = 4096

_SEG = struct.Struct(">II")
_BE64 = struct.Struct(">Q")
_BE32 = struct.Struct(">I")
_LOG_KEY = struct.Struct(">8sQ")
_IDX_KEY = struct.Struct(">8sIQ")
_PAGE_LSN = struct.Struct(">IQ")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_VOLUME = struct.Struct("<IIIQ")
_VOLUME_CLONE = struct.Struct("<IQBI")
_HISTORY = struct.Struct("<QQI")
_META = struct.Struct("<QQQQQQQQQQQI")
_TRUNC = struct.Struct("<QQQ")
# Record header fields read straight from stored bytes (see engine/format/redo.py).
_REC_PREV_VOL = 8
_REC_PREV_PG = 16
_REC_PAGE = 32
_REC_TYPE = 36
_REC_FLAGS = 37
_RTYPE_COMMIT = 10  # engine.format.redo.RecordType.COMMIT; its payload is u64 txn_id, u64 timestamp_us

KIND_RECORD = b"R"
KIND_VERSION = b"V"
KIND_RUN = b"S"  # a suspect only (never a quarantine row): a log run whose directory is bad

log = logging.getLogger(__name__)


def _be64(n: int) -> bytes:
    return _BE64.pack(n)


def seg_prefix(vol_id: int, pg: int) -> bytes:
    """The 8-byte key prefix of a segment."""
    return _SEG.pack(vol_id, pg)


def log_key(prefix: bytes, lsn: int) -> bytes:
    return prefix + _BE64.pack(lsn)


def page_key(prefix: bytes, page_id: int, lsn: int) -> bytes:
    """Key of a pageidx or versions row."""
    return prefix + _PAGE_LSN.pack(page_id, lsn)


def _first_lsn_of(batch) -> int:
    return batch.scan.first_lsn


def _trunc_epoch(truncs) -> int:
    """The epoch a truncation set was recorded at: the highest of its ranges'."""
    return max((t[2] for t in truncs), default=0)


def _unpack_truncs(buf, offset: int) -> tuple:
    n = _U32.unpack_from(buf, offset)[0]
    return tuple(_TRUNC.unpack_from(buf, offset + 4 + i * _TRUNC.size) for i in range(n))


def lowest_difference(old, new) -> int | None:
    """The lowest LSN whose visibility may differ between two truncation sets (the start
    of the lowest range in one but not the other); None if they hide the same LSNs."""
    a = {(s, e) for s, e, _ in old}
    b = {(s, e) for s, e, _ in new}
    diff = a ^ b
    return min(s for s, _e in diff) if diff else None


def _overlaps_truncation(first: int, last: int, truncs) -> bool:
    """True if a truncation range hides any LSN in [first, last]."""
    for start, end, _epoch in truncs:
        if start < last and end >= first:
            return True
    return False


def _range_of(lsn: int, truncs):
    """The (start, end, epoch) range hiding ``lsn``, or None."""
    for t in truncs:
        if t[0] < lsn <= t[1]:
            return t
    return None


def _group_of(key: bytes, value) -> bytes:
    """The LSNs of a page-index row, packed u64 BE (a format-1 row holds its key's LSN)."""
    return bytes(value) if value else bytes(key[12:20])


def _group_lsns(group: bytes) -> tuple:
    """The LSNs of a packed group as ints, ascending."""
    return struct.unpack(f">{len(group) >> 3}Q", group)


def _pack_lsns(lsns) -> bytes:
    return struct.pack(f">{len(lsns)}Q", *lsns)


def _in_truncation(lsn: int, truncs) -> bool:
    for start, end, _epoch in truncs:
        if start < lsn <= end:
            return True
    return False


# --- Log runs: one LMDB value per stored batch (format 3) -----------------------------------

_RUN_HEAD = struct.Struct("<II")  # n, flags; then u32 CRC32 of head + directory
RUN_HEAD_SIZE = 12
RUN_CHAINED = 1  # flags bit 0: every record links to the one before it (prev_pg_lsn)
RUN_RECORDS_MAX = 4096  # records in a run written by a merge (an Append's run is its batch)
WALK_COALESCE_MIN = 1024  # records a coalesce step needs before it walks the runs whole
WALK_APPLY_BYTES = 1 << 20  # records handed to the materialiser per call by that walk


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
    head = _RUN_HEAD.pack(n, RUN_CHAINED if chained else 0)
    return b"".join((head, _U32.pack(zlib.crc32(directory, zlib.crc32(head))), directory, records))


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
        if prev is not None and _U64.unpack_from(rec, _REC_PREV_PG)[0] != prev:
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
    n, flags = _RUN_HEAD.unpack_from(value, 0)
    base = RUN_HEAD_SIZE + 12 * n
    if n == 0 or base > size:
        raise CorruptError(f"log run head says {n} records in {size} bytes")
    crc = zlib.crc32(value[RUN_HEAD_SIZE:base], zlib.crc32(value[:8]))
    if crc != _U32.unpack_from(value, 8)[0]:
        raise CorruptError("log run directory failed its checksum")
    lsns = struct.unpack_from(f"<{n}Q", value, RUN_HEAD_SIZE)
    ends = struct.unpack_from(f"<{n}I", value, RUN_HEAD_SIZE + 8 * n)
    if base + ends[-1] != size:
        raise CorruptError("log run directory does not match its length")
    return Run(lsns, ends, base, flags, value)


def _run_key_lsn(key) -> int:
    return _BE64.unpack_from(key, 8)[0]


def _runs_up(cur, prefix: bytes, after: int):
    """Yield (run, index of its first record with lsn > after) of a segment's runs that
    hold such records, ascending. The cursor must not be used by anything else while
    the generator is alive."""
    if not cur.set_range(prefix + _BE64.pack(after + 1)):
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


def _records_up(cur, prefix: bytes, after: int):
    """Yield (lsn, run, index) of a segment's stored records with lsn > after, ascending."""
    for run, i in _runs_up(cur, prefix, after):
        lsns = run.lsns
        for j in range(i, len(lsns)):
            yield lsns[j], run, j


def _records_down(cur, prefix: bytes, upto: int):
    """Yield (lsn, run, index) of a segment's stored records with lsn <= upto, descending."""
    ok = cur.set_range(prefix + _BE64.pack(upto)) or cur.last()
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


# --- Page-index deltas: one row per segment per write transaction --------------------------


def encode_delta(pages: dict) -> bytes:
    """A pagedelta value from {page_id: [lsn, ...] ascending} (see "page-index deltas")."""
    head = [len(pages)]
    lsns: list = []
    for page_id, page_lsns in pages.items():
        head += (page_id, len(page_lsns))
        lsns += page_lsns
    return struct.pack(f"<{len(head)}I{len(lsns)}Q", *head, *lsns)


def _delta_sections(value):
    """Yield (page_id, offset of its LSNs, count) of a pagedelta value."""
    n = _U32.unpack_from(value, 0)[0]
    head = struct.unpack_from(f"<{2 * n}I", value, 4)
    off = 4 + 8 * n
    for i in range(0, 2 * n, 2):
        yield head[i], off, head[i + 1]
        off += 8 * head[i + 1]


def delta_page_lsns(value, page_id: int) -> tuple:
    """The LSNs a pagedelta value lists for one page (ascending; () if none)."""
    for pid, off, count in _delta_sections(value):
        if pid == page_id:
            return struct.unpack_from(f"<{count}Q", value, off)
    return ()


def decode_delta(value) -> dict:
    """{page_id: (lsn, ...)} of a pagedelta value."""
    return {pid: struct.unpack_from(f"<{count}Q", value, off)
            for pid, off, count in _delta_sections(value)}


# --- In-memory images of the metadata rows -------------------------------------------------


@dataclass(frozen=True)
class VolumeInfo:
    """A volume this node stores: its id in keys and its layout."""

    name: str
    vol_id: int
    layout: VolumeLayout
    created_epoch: int
    parent_id: int = 0          # vol_id of the parent (0: not a clone)
    fork_lsn: int = 0           # a clone reads its parent as of this LSN
    dropped: bool = False
    inherited: tuple = ()       # the parent's truncation set at the fork
    fork_tails: tuple = ()      # per PG: the parent segment's last record <= fork_lsn

    def encode(self) -> bytes:
        return (_VOLUME.pack(self.vol_id, self.layout.pg_count, self.layout.stripe_pages,
                             self.created_epoch)
                + _VOLUME_CLONE.pack(self.parent_id, self.fork_lsn, int(self.dropped),
                                     len(self.inherited))
                + b"".join(_TRUNC.pack(*t) for t in self.inherited)
                + b"".join(_U64.pack(t) for t in self.fork_tails))

    @classmethod
    def decode(cls, name: str, value: bytes) -> "VolumeInfo":
        vol_id, pg_count, stripe, created = _VOLUME.unpack_from(value, 0)
        parent_id = fork_lsn = dropped = 0
        inherited: tuple = ()
        tails: tuple = ()
        if len(value) > _VOLUME.size:
            parent_id, fork_lsn, dropped, n = _VOLUME_CLONE.unpack_from(value, _VOLUME.size)
            inherited = _unpack_truncs(value, _VOLUME.size + _VOLUME_CLONE.size - 4)
            off = _VOLUME.size + _VOLUME_CLONE.size + n * _TRUNC.size
            tails = tuple(_U64.unpack_from(value, off + 8 * i)[0]
                          for i in range((len(value) - off) // 8))
        return cls(name, vol_id, VolumeLayout(pg_count, stripe), created, parent_id, fork_lsn,
                   bool(dropped), inherited, tails)


@dataclass
class SegMeta:
    """The ``segments`` row of one segment (see the layout table)."""

    scl: int = 0
    volume_epoch: int = 0
    membership_epoch: int = 0
    writer_vdl: int = 0
    gc_horizon: int = 0
    max_lsn: int = 0
    gc_done: int = 0
    log_floor: int = 0
    n_records: int = 0
    n_versions: int = 0
    generation: int = 0
    truncs: tuple = ()  # ((start, end, epoch), ...): records in (start, end] are hidden

    def encode(self) -> bytes:
        head = _META.pack(self.scl, self.volume_epoch, self.membership_epoch, self.writer_vdl,
                          self.gc_horizon, self.max_lsn, self.gc_done, self.log_floor,
                          self.n_records, self.n_versions, self.generation, len(self.truncs))
        return head + b"".join(_TRUNC.pack(*t) for t in self.truncs)

    @classmethod
    def decode(cls, buf: bytes) -> "SegMeta":
        fields = _META.unpack_from(buf, 0)
        n = fields[-1]
        truncs = tuple(_TRUNC.unpack_from(buf, _META.size + i * _TRUNC.size) for i in range(n))
        assert len(buf) == _META.size + n * _TRUNC.size, "segments row has a bad length"
        return cls(*fields[:-1], truncs=truncs)

    def copy(self) -> "SegMeta":
        return replace(self)


# --- Operations: what a write transaction can do --------------------------------------------


class BatchScan(NamedTuple):
    """What one pass over a verified batch tells (engine.materialiser.scan_batch_run)."""

    count: int             # records
    first_lsn: int
    first_prev_pg_lsn: int  # the segment-chain backlink of the first record
    last_lsn: int
    max_lsn: int
    chained: bool          # every record links to the one before it: one piece of the chain
    bad_backlink_lsn: int  # first record with a backlink not below its LSN (0: none)
    ascending: bool        # every LSN above the one before it


class VerifiedBatch(NamedTuple):
    """One PG batch of an Append, verified and ready to store (verify_and_prepare)."""

    pg: int
    membership_epoch: int
    buf: bytes
    run: bytes             # the batch as one ``log`` value (head, directory, records)
    pages: dict            # {page_id: [lsn, ...]} in batch order, for ``pageidx``
    scan: BatchScan

    def lsns(self) -> list[int]:
        """Every record LSN of the batch, ascending."""
        return sorted(lsn for lsns in self.pages.values() for lsn in lsns)


@dataclass
class AppendOp:
    """Store verified batches of one volume. ``epoch`` 0 = from a peer (gossip/repair)."""

    volume: str
    epoch: int
    writer_vdl: int
    batches: list  # [VerifiedBatch]
    source: str = "writer"  # writer | gossip | repair


@dataclass
class CreateVolumeOp:
    volume: str
    pg_count: int
    stripe_pages: int
    epoch: int
    parent: str = ""     # a clone of this volume ...
    fork_lsn: int = 0    # ... as of this LSN (a CPL <= the parent's VDL)
    fork_tails: tuple = ()  # per PG: the parent's last record <= fork_lsn (the creator
    #                        learns them from a read quorum; a reading node must hold them)


@dataclass
class DropVolumeOp:
    volume: str


@dataclass
class TruncateOp:
    """Add one range (start, end] under ``epoch``; or, when ``replace`` is not None, make
    ``replace`` (ranges (start, end, epoch)) the segment's whole truncation set and write a
    history row (time_us, prev_vdl). ``start_lsn``/``end_lsn`` are then unused."""

    volume: str
    pg: int
    start_lsn: int
    end_lsn: int
    epoch: int
    replace: tuple | None = None
    time_us: int = 0
    prev_vdl: int = 0
    set_writer_vdl: int = 0  # backtrack: the target is durable and the new lowest VDL


@dataclass
class AdoptEpochOp:
    """Adopt a higher epoch (fence) and/or truncation ranges learned from a peer."""

    volume: str
    pg: int
    epoch: int
    truncs: tuple = ()
    reject_stale: bool = False  # True for SegmentState(fence=true) from a writer


@dataclass
class SetGcHorizonOp:
    volume: str
    horizon: int
    epoch: int


@dataclass
class PutVersionsOp:
    """Page versions built by the coalescer, GC or a repair. Dropped if a truncation
    happened since they were planned (``generation`` changed)."""

    volume: str
    pg: int
    generation: int
    versions: list  # [(page_id, lsn, bytes)]
    clears: list = field(default_factory=list)  # quarantined (page_id, lsn) this repairs


@dataclass
class GcStepOp:
    volume: str
    pg: int
    generation: int
    put_versions: list  # [(page_id, lsn, bytes)]
    delete_records: list  # [(page_id, lsn)]
    delete_versions: list  # [(page_id, lsn)]
    done_horizon: int = 0  # when > 0: the pass is complete up to this horizon
    log_floor: int = 0


@dataclass
class FoldIndexOp:
    """Fold a segment's oldest page-index deltas into its per-page groups (background;
    ``max_deltas`` bounds the transaction: a fold's puts hold up the appends behind it)."""

    volume: str
    pg: int
    max_deltas: int = FOLD_DELTAS_MAX


@dataclass
class QuarantineOp:
    volume: str
    pg: int
    records: list  # [lsn]
    versions: list  # [(page_id, lsn)]
    runs: list = field(default_factory=list)  # [last lsn] of log runs with a bad directory


# --- Verification of incoming bytes (before anything is stored) ------------------------------


def verify_and_prepare(layout: VolumeLayout, vol_id: int, pg: int, buf: bytes,
                       membership_epoch: int = 0) -> VerifiedBatch:
    """Verify a PG batch and build what the write transaction stores, in one pass over
    the records (the Append hot path, run on the event loop while the writer thread waits
    for its fsync, so the transaction itself puts one value and joins index lists).

    Raises BadChecksumError, MalformedError or WrongPgError: the caller rejects the whole
    request and stores nothing of it.
    """
    if not 0 <= pg < layout.pg_count:
        raise MalformedError(f"pg {pg} out of range (volume has {layout.pg_count} PGs)")
    try:
        directory, pages, summary = materialiser.scan_batch_run(buf)
    except ChecksumError as exc:
        raise BadChecksumError(f"pg {pg}: {exc}") from None
    except FormatError as exc:
        raise MalformedError(f"pg {pg}: {exc}") from None
    scan = BatchScan(*summary)
    stripe = layout.stripe_pages
    count = layout.pg_count
    # Per distinct page, not per record: a batch touches few pages many times.
    for page_id, lsns in pages.items():
        if (page_id // stripe) % count != pg:
            raise WrongPgError(
                f"record lsn {lsns[0]}: page {page_id} belongs to pg {layout.pg_of(page_id)}, "
                f"not to the batch's pg {pg}")
    if scan.bad_backlink_lsn:
        raise MalformedError(
            f"record lsn {scan.bad_backlink_lsn}: a backlink is not below its own LSN")
    run = encode_run(directory, scan.count, scan.chained, buf) if scan.count else b""
    return VerifiedBatch(pg, membership_epoch, buf, run, pages, scan)


def verify_stored_record(key_lsn: int, value) -> bool:
    """True if a stored log value is exactly one intact record with the key's LSN."""
    try:
        refs = materialiser.scan_batch(value)
    except FormatError:
        return False
    return len(refs) == 1 and refs[0][2] == key_lsn and refs[0][1] == len(value)


def verify_stored_page(page_id: int, lsn: int, value) -> bool:
    """True if a stored page version is intact and is the page it claims to be."""
    return (len(value) == PAGE_SIZE and pagefmt.verify_checksum(value)
            and pagefmt.page_id(value) == page_id and pagefmt.page_lsn(value) == lsn)


# --- The store -----------------------------------------------------------------------------


class _Txn:
    """Per-write-transaction scratch state: cursors, metadata copies, post-commit work."""

    def __init__(self, store: "Store", txn) -> None:
        self.store = store
        self.txn = txn
        self.log_cur = txn.cursor(db=store.db_log)
        self.idx_cur = txn.cursor(db=store.db_pageidx)
        self.metas: dict[tuple, SegMeta] = {}
        #: Page-index groups to write at the end of the transaction, per segment:
        #: {key: (prefix, max_lsn before this txn, {page_id: [lsn]}, order)}, where
        #: order = [every batch so far ascending and above the ones before, highest LSN].
        self.idx_pending: dict[tuple, tuple] = {}
        self.new_volumes: dict[str, VolumeInfo] = {}
        self.dirty: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.reset_dirty: set = set()
        self.quar_add: list = []  # (key, kind, item)
        self.quar_del: list = []
        self.bytes_written = 0
        self.repairs = 0
        self.deltas: dict[tuple, int] = {}  # segment -> page-index deltas after this txn

    def meta(self, key: tuple) -> SegMeta:
        m = self.metas.get(key)
        if m is None:
            m = self.store._segs[key].copy()
            self.metas[key] = m
        return m


class Store:
    """A node's LMDB environment and every durable state transition on it.

    Threading: ``apply_ops`` must only ever be called from one thread at a time (the group
    committer's executor thread): it owns the in-memory mirrors. Read methods may run in
    any thread; each opens its own read transaction and takes the metadata from it, so a
    read sees one consistent snapshot.
    """

    def __init__(self, path: str, node_id: str = "", *, map_size: int = DEFAULT_MAP_SIZE,
                 readonly: bool = False, logger: logging.LoggerAdapter | logging.Logger | None = None) -> None:
        self.path = path
        self.node_id = node_id
        self.log = logger or log
        os.makedirs(path, exist_ok=True)
        # sync=True: a commit returns only once the data is on disk (invariant 3).
        self.env = lmdb.open(path, map_size=map_size, max_dbs=MAX_DBS, sync=True,
                             metasync=True, readahead=False, readonly=readonly)
        self.db_node = self.env.open_db(b"node")
        self.db_volumes = self.env.open_db(b"volumes")
        self.db_segments = self.env.open_db(b"segments")
        self.db_log = self.env.open_db(b"log")
        self.db_pageidx = self.env.open_db(b"pageidx")
        self.db_pagedelta = self.env.open_db(b"pagedelta")
        self.db_versions = self.env.open_db(b"versions")
        self.db_quarantine = self.env.open_db(b"quarantine")
        self.db_history = self.env.open_db(b"history")
        self._volumes: dict[str, VolumeInfo] = {}
        self._by_id: dict[int, VolumeInfo] = {}
        self._segs: dict[tuple, SegMeta] = {}
        self._quar_records: dict[tuple, frozenset] = {}
        self._quar_versions: dict[tuple, frozenset] = {}
        self._dirty_lock = threading.Lock()
        self._dirty: dict[tuple, dict[int, int]] = {}
        #: Page-index deltas stored per segment (background.py folds them, FoldIndexOp).
        self._deltas: dict[tuple, int] = {}
        #: Segments whose dirty counts must be rebuilt from LMDB (startup, truncation).
        self.needs_sweep: set = set()
        #: (key, kind, item) of bad bytes a read stumbled on, for the scrubber to quarantine
        #: (appended by read threads, drained by background.py; deque ops are atomic).
        self.suspects: collections.deque = collections.deque(maxlen=SUSPECTS_MAX)
        #: Quarantined versions (key, page_id, lsn) the local log cannot rebuild (GC'd):
        #: gossip refetches these pages from a peer.
        self._peer_pages: set = set()
        self.lmdb_bytes_written = 0
        self.write_txns = 0
        self.scrub_repairs = 0
        if not readonly:
            self._init_node()
        self._load()

    # -- opening ------------------------------------------------------------------------

    def _init_node(self) -> None:
        with self.env.begin(write=True, db=self.db_node) as txn:
            stored = txn.get(b"node_id")
            if stored is None:
                txn.put(b"node_id", self.node_id.encode())
                txn.put(b"format", _U32.pack(FORMAT))
                txn.put(b"next_vol_id", _U32.pack(1))
            elif self.node_id and stored.decode() != self.node_id:
                raise RuntimeError(
                    f"data dir {self.path} belongs to node {stored.decode()!r}, not {self.node_id!r}")
            fmt = _U32.unpack(txn.get(b"format"))[0]
            if fmt in (1, 2):
                # Format 1 wrote one empty pageidx row per record: each is a valid group of
                # one (_group_of). Formats 1 and 2 kept one record per log value under its
                # LSN: that key is the last LSN of a run of one, so only values change.
                # Recording the new format makes older code refuse this dir from now on.
                cur = txn.cursor(db=self.db_log)
                rows = 0
                for k, v in cur.iternext():
                    cur.put(k, run_from_records([(_run_key_lsn(k), bytes(v))]))
                    rows += 1
                txn.put(b"format", _U32.pack(FORMAT))
                self.log.info("data dir %s: layout format %d upgraded to %d (%d log records)",
                              self.path, fmt, FORMAT, rows)
            elif fmt != FORMAT:
                raise RuntimeError(f"data dir {self.path}: unknown layout format {fmt}")

    def _load(self) -> None:
        with self.env.begin() as txn:
            for name, value in txn.cursor(db=self.db_volumes):
                info = VolumeInfo.decode(name.decode(), value)
                self._volumes[info.name] = info
                self._by_id[info.vol_id] = info
            for key, value in txn.cursor(db=self.db_segments):
                vol_id, pg = _SEG.unpack(key)
                seg = (self._by_id[vol_id].name, pg)
                self._segs[seg] = SegMeta.decode(value)
                self._quar_records[seg] = frozenset()
                self._quar_versions[seg] = frozenset()
                self._dirty[seg] = {}
                self.needs_sweep.add(seg)
            for key in txn.cursor(db=self.db_pagedelta).iternext(keys=True, values=False):
                seg = (self._by_id[_SEG.unpack(key[:8])[0]].name, _SEG.unpack(key[:8])[1])
                self._deltas[seg] = self._deltas.get(seg, 0) + 1
            for key, _value in txn.cursor(db=self.db_quarantine):
                vol_id, pg = _SEG.unpack(key[:8])
                seg = (self._by_id[vol_id].name, pg)
                if key[8:9] == KIND_RECORD:
                    self._quar_records[seg] |= {_BE64.unpack(key[9:17])[0]}
                else:
                    self._quar_versions[seg] |= {_PAGE_LSN.unpack(key[9:21])}
        if self._segs:
            self.log.info("opened %s: %d volumes, %d segments, %d quarantined items",
                          self.path, len(self._volumes), len(self._segs),
                          sum(len(s) for s in self._quar_records.values())
                          + sum(len(s) for s in self._quar_versions.values()))

    def close(self) -> None:
        self.env.close()

    # -- lookups (any thread) -------------------------------------------------------------

    def volume(self, name: str) -> VolumeInfo:
        """The volume's info; UnknownVolumeError if this node does not store it."""
        info = self._volumes.get(name)
        if info is None:
            raise UnknownVolumeError(f"unknown volume {name!r}")
        return info

    def volumes(self) -> list[VolumeInfo]:
        return list(self._volumes.values())

    def segment_keys(self) -> list[tuple]:
        return list(self._segs.keys())

    def segment(self, volume: str, pg: int) -> SegMeta:
        """A copy of the segment's committed metadata (raises like ``_prefix``)."""
        self._prefix(volume, pg)
        return self._segs[(volume, pg)].copy()

    def quarantined(self, key: tuple) -> tuple[frozenset, frozenset]:
        """(record LSNs, (page_id, lsn) versions) currently quarantined in a segment."""
        return self._quar_records.get(key, frozenset()), self._quar_versions.get(key, frozenset())

    def deltas(self) -> dict[tuple, int]:
        """Page-index deltas stored per segment (folded by the background, FoldIndexOp)."""
        return dict(self._deltas)

    def segments(self) -> list[tuple[tuple, SegMeta]]:
        """[((volume, pg), SegMeta)] of every segment (committed state; do not modify)."""
        return list(self._segs.items())

    def needs_peer_page(self, key: tuple, page_id: int, lsn: int) -> bool:
        """True if a quarantined page version must come from a peer (log GC'd below it)."""
        return (key, page_id, lsn) in self._peer_pages

    def mark_needs_peer_page(self, key: tuple, page_id: int, lsn: int) -> None:
        self._peer_pages.add((key, page_id, lsn))

    def _prefix(self, volume: str, pg: int) -> bytes:
        info = self.volume(volume)
        if not 0 <= pg < info.layout.pg_count:
            raise MalformedError(f"volume {volume!r} has no pg {pg} (pg_count {info.layout.pg_count})")
        return seg_prefix(info.vol_id, pg)

    def _read_meta(self, txn, prefix: bytes) -> SegMeta:
        return SegMeta.decode(txn.get(prefix, db=self.db_segments))

    # -- dirty page counts (coalescer triggers) -------------------------------------------

    def take_dirty(self, threshold: int, max_pages: int) -> list[tuple[tuple, list[int]]]:
        """Segments and pages with at least ``threshold`` complete records not yet in a
        page version; their counts are reset (the coalescer is about to fold them)."""
        out = []
        budget = max_pages
        with self._dirty_lock:
            for key, pages in self._dirty.items():
                if budget <= 0:
                    break
                chosen = [p for p, n in pages.items() if n >= threshold][:budget]
                if chosen:
                    for p in chosen:
                        del pages[p]
                    out.append((key, chosen))
                    budget -= len(chosen)
        return out

    def set_dirty(self, key: tuple, counts: dict[int, int]) -> None:
        with self._dirty_lock:
            self._dirty[key] = dict(counts)

    def dirty_total(self) -> int:
        with self._dirty_lock:
            return sum(sum(p.values()) for p in self._dirty.values())

    # -- the write path -------------------------------------------------------------------

    def apply_ops(self, ops: list) -> list:
        """Run ``ops`` in one LMDB write transaction, commit with sync, return per-op results.

        A result is the op's return value or the StorageError that refused it; a refused
        op changed nothing (every op validates before it writes). Any other exception
        aborts the whole transaction and propagates: nothing of it is stored.
        """
        results: list = [None] * len(ops)
        with self.env.begin(write=True) as txn:
            ctx = _Txn(self, txn)
            for i, op in enumerate(ops):
                if ctx.idx_pending and type(op) is not AppendOp:
                    self._flush_index(ctx)  # GC and others see the index complete
                try:
                    results[i] = self._dispatch[type(op)](self, ctx, op)
                except StorageError as exc:
                    results[i] = exc
            self._flush_index(ctx)
            for key, m in ctx.metas.items():
                prefix = seg_prefix(self._vol_of(ctx, key[0]).vol_id, key[1])
                value = m.encode()
                txn.put(prefix, value, db=self.db_segments)
                ctx.bytes_written += len(prefix) + len(value)
            for i, op in enumerate(ops):  # acks carry the SCL after the whole commit
                if isinstance(op, AppendOp) and isinstance(results[i], dict):
                    results[i] = {pg: ctx.metas[(op.volume, pg)].scl for pg in results[i]}
        # Committed and synced: publish the new state to the in-memory mirrors.
        self._publish(ctx)
        return results

    def _vol_of(self, ctx: _Txn, name: str) -> VolumeInfo:
        info = ctx.new_volumes.get(name) or self._volumes.get(name)
        if info is None:
            raise UnknownVolumeError(f"unknown volume {name!r}")
        return info

    def _publish(self, ctx: _Txn) -> None:
        if ctx.new_volumes:
            volumes = dict(self._volumes)
            by_id = dict(self._by_id)
            for info in ctx.new_volumes.values():
                volumes[info.name] = info
                by_id[info.vol_id] = info
            self._volumes, self._by_id = volumes, by_id
        new_keys = [k for k in ctx.metas if k not in self._segs]
        if new_keys:
            segs = dict(self._segs)
            segs.update(ctx.metas)
            qr = dict(self._quar_records)
            qv = dict(self._quar_versions)
            for k in new_keys:
                qr[k] = frozenset()
                qv[k] = frozenset()
            self._quar_records, self._quar_versions = qr, qv
            self._segs = segs
        else:
            self._segs.update(ctx.metas)
        for key, kind, item in ctx.quar_add:
            if kind == KIND_RECORD:
                self._quar_records[key] = self._quar_records[key] | {item}
            else:
                self._quar_versions[key] = self._quar_versions[key] | {item}
        for key, kind, item in ctx.quar_del:
            if kind == KIND_RECORD:
                self._quar_records[key] = self._quar_records[key] - {item}
            else:
                self._quar_versions[key] = self._quar_versions[key] - {item}
                self._peer_pages.discard((key, item[0], item[1]))
        with self._dirty_lock:
            for key in ctx.reset_dirty:
                self._dirty[key] = {}
            for key, pages in ctx.dirty.items():
                target = self._dirty.setdefault(key, {})
                for p, n in pages.items():
                    target[p] = target.get(p, 0) + n
        self.needs_sweep |= ctx.reset_dirty
        self._deltas.update(ctx.deltas)
        self.lmdb_bytes_written += ctx.bytes_written
        self.write_txns += 1
        self.scrub_repairs += ctx.repairs

    # Epoch rules (invariant 9) --------------------------------------------------------------

    @staticmethod
    def _check_epoch(m: SegMeta, epoch: int, what: str, key: tuple) -> None:
        if epoch < m.volume_epoch:
            raise StaleEpochError(
                f"{what}: volume epoch {epoch} is stale; segment {key[0]}/{key[1]} is at epoch "
                f"{m.volume_epoch}", m.volume_epoch)
        if epoch > m.volume_epoch:
            raise EpochAheadError(
                f"{what}: volume epoch {epoch} is ahead of segment {key[0]}/{key[1]} "
                f"(epoch {m.volume_epoch}); send it the Truncate of epoch {epoch} first")

    # Ops --------------------------------------------------------------------------------------

    def _op_create_volume(self, ctx: _Txn, op: CreateVolumeOp):
        if op.pg_count < 1 or op.stripe_pages < 1:
            raise MalformedError(f"CreateVolume {op.volume!r}: pg_count and stripe_pages must be >= 1")
        if not op.volume:
            raise MalformedError("CreateVolume: empty volume name")
        parent = None
        if op.parent:
            parent = self._vol_of(ctx, op.parent)
            if parent.layout != VolumeLayout(op.pg_count, op.stripe_pages):
                raise MalformedError(
                    f"CreateVolume {op.volume!r}: a clone has its parent's layout {parent.layout}")
        existing = ctx.new_volumes.get(op.volume) or self._volumes.get(op.volume)
        if existing is not None:
            if existing.layout != VolumeLayout(op.pg_count, op.stripe_pages):
                raise MalformedError(
                    f"CreateVolume {op.volume!r}: exists with layout {existing.layout}, "
                    f"asked for pg_count={op.pg_count} stripe_pages={op.stripe_pages}")
            if parent is not None and (existing.parent_id, existing.fork_lsn) != (
                    parent.vol_id, op.fork_lsn):
                raise MalformedError(
                    f"CreateVolume {op.volume!r}: a volume of that name already exists "
                    f"(not a clone of {op.parent!r} at LSN {op.fork_lsn})")
            return False
        inherited: tuple = ()
        if parent is not None:
            if op.fork_lsn < 1:
                raise MalformedError(f"CreateVolume {op.volume!r}: a clone needs a fork LSN >= 1")
            if len(op.fork_tails) != op.pg_count or any(t > op.fork_lsn for t in op.fork_tails):
                raise MalformedError(f"CreateVolume {op.volume!r}: a clone needs one fork tail "
                                     f"<= the fork LSN per PG ({op.pg_count})")
            metas = [ctx.meta((parent.name, pg)) for pg in range(parent.layout.pg_count)]
            horizon = max(m.gc_horizon for m in metas)
            if horizon > op.fork_lsn:
                raise ReadPointBelowGcError(
                    f"CreateVolume {op.volume!r}: fork LSN {op.fork_lsn} is below the GC horizon "
                    f"{horizon} of {parent.name!r}; pages as of it may be gone")
            # The parent's set at the fork: every PG holds the same set once gossip settles;
            # take the newest this node has, restricted to what lies at or below the fork.
            newest = max((m.truncs for m in metas), key=_trunc_epoch)
            inherited = tuple(t for t in newest if t[0] < op.fork_lsn)
        txn = ctx.txn
        vol_id = _U32.unpack(txn.get(b"next_vol_id", db=self.db_node))[0]
        txn.put(b"next_vol_id", _U32.pack(vol_id + 1), db=self.db_node)
        info = VolumeInfo(op.volume, vol_id, VolumeLayout(op.pg_count, op.stripe_pages), op.epoch,
                          parent.vol_id if parent else 0, op.fork_lsn if parent else 0, False,
                          tuple(sorted(set(inherited))),
                          tuple(op.fork_tails) if parent else ())
        txn.put(op.volume.encode(), info.encode(), db=self.db_volumes)
        ctx.new_volumes[op.volume] = info
        fork = info.fork_lsn
        for pg in range(op.pg_count):
            # A clone's segments start complete up to the fork: its first records link to it.
            ctx.metas[(op.volume, pg)] = SegMeta(scl=fork, volume_epoch=op.epoch, writer_vdl=fork,
                                                 max_lsn=fork, log_floor=fork)
        if parent is not None:
            self.log.info("created volume %r: a clone of %r as of LSN %d, %d PGs, epoch %d",
                          op.volume, parent.name, fork, op.pg_count, op.epoch)
        else:
            self.log.info("created volume %r: %d PGs of stripe %d at epoch %d",
                          op.volume, op.pg_count, op.stripe_pages, op.epoch)
        return True

    def _op_drop_volume(self, ctx: _Txn, op: DropVolumeOp):
        info = self._vol_of(ctx, op.volume)
        if info.dropped:
            return False
        info = replace(info, dropped=True)
        ctx.txn.put(op.volume.encode(), info.encode(), db=self.db_volumes)
        ctx.new_volumes[op.volume] = info
        self.log.info("volume %r dropped (its segments stay while clones read them)", op.volume)
        return True

    def _op_append(self, ctx: _Txn, op: AppendOp):
        info = self._vol_of(ctx, op.volume)
        if info.dropped and op.epoch:
            raise UnknownVolumeError(f"volume {op.volume!r} was dropped")
        # Validate everything before writing anything: a refused request stores nothing.
        for pg, membership_epoch, *_rest in op.batches:
            if not 0 <= pg < info.layout.pg_count:
                raise MalformedError(f"volume {op.volume!r} has no pg {pg}")
            m = ctx.meta((op.volume, pg))
            if op.epoch:
                self._check_epoch(m, op.epoch, "Append", (op.volume, pg))
                if membership_epoch and membership_epoch < m.membership_epoch:
                    raise StaleEpochError(
                        f"Append: membership epoch {membership_epoch} of {op.volume}/{pg} is "
                        f"stale (segment at {m.membership_epoch})", m.volume_epoch)
        touched: dict[int, list] = {}
        for batch in op.batches:
            pg, membership_epoch, buf, run, pages, scan = batch
            key = (op.volume, pg)
            m = ctx.meta(key)
            new = touched.setdefault(pg, [])
            if not scan.count:
                continue
            new.append(batch)
            prefix = seg_prefix(info.vol_id, pg)
            if scan.ascending and (scan.first_lsn > m.max_lsn or not self._run_overlaps(
                    ctx, prefix, scan.first_lsn, scan.last_lsn)):
                # The usual case: above everything stored, or in a gap between runs.
                ctx.txn.put(prefix + _BE64.pack(scan.last_lsn), run, db=self.db_log)
                added = scan.count
                ctx.bytes_written += len(run) + _LOG_KEY.size
            else:  # a retransmit, or gossip/repair filling holes among stored records
                added = self._merge_into_log(ctx, prefix, decode_run(run))
            pending = ctx.idx_pending.get(key)
            if pending is None:
                pending = ctx.idx_pending[key] = (seg_prefix(info.vol_id, pg), m.max_lsn, {},
                                                  [True, m.max_lsn])
            index = pending[2]
            order = pending[3]
            if not scan.ascending or scan.first_lsn <= order[1]:
                order[0] = False
            order[1] = max(order[1], scan.max_lsn)
            for page_id, lsns in pages.items():
                have = index.get(page_id)
                if have is None:
                    index[page_id] = list(lsns)
                else:
                    have.extend(lsns)
            m.n_records += added
            quarantined = self._quar_records.get(key)
            if quarantined:
                prefix = seg_prefix(info.vol_id, pg)
                for lsn in batch.lsns():
                    if lsn in quarantined:
                        ctx.txn.delete(prefix + KIND_RECORD + _BE64.pack(lsn), db=self.db_quarantine)
                        ctx.quar_del.append((key, KIND_RECORD, lsn))
                        ctx.repairs += 1
                        self.log.warning("repaired quarantined record %s/%d lsn %d (%s)",
                                         op.volume, pg, lsn, op.source)
            if scan.max_lsn > m.max_lsn:
                m.max_lsn = scan.max_lsn
            if membership_epoch > m.membership_epoch:
                m.membership_epoch = membership_epoch
            if op.writer_vdl > m.writer_vdl:
                m.writer_vdl = op.writer_vdl
        for pg, new in touched.items():
            self._advance_scl(ctx, (op.volume, pg), seg_prefix(info.vol_id, pg), new)
        return {pg: 0 for pg in touched}

    def _run_overlaps(self, ctx: _Txn, prefix: bytes, first: int, last: int) -> bool:
        """True if a stored run of the segment holds LSNs inside [first, last]."""
        cur = ctx.log_cur
        if not cur.set_range(prefix + _BE64.pack(first)):
            return False
        k = cur.key()
        # The first run whose last LSN is >= first: it overlaps unless it starts above last.
        return k[:8] == prefix and _U64.unpack_from(cur.value(), RUN_HEAD_SIZE)[0] <= last

    def _merge_into_log(self, ctx: _Txn, prefix: bytes, incoming: Run) -> int:
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
        if cur.set_range(prefix + _BE64.pack(lo)):
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

    def _put_runs(self, ctx: _Txn, prefix: bytes, pairs: list) -> None:
        """Write [(lsn, record bytes)], ascending, as runs (their range must be free)."""
        for i in range(0, len(pairs), RUN_RECORDS_MAX):
            chunk = pairs[i:i + RUN_RECORDS_MAX]
            value = run_from_records(chunk)
            ctx.txn.put(prefix + _BE64.pack(chunk[-1][0]), value, db=self.db_log)
            ctx.bytes_written += len(value) + _LOG_KEY.size

    def _delete_records(self, ctx: _Txn, prefix: bytes, lsns) -> list[tuple[int, bytes]]:
        """Remove records ``lsns`` from the segment's runs (GC, quarantine): each run that
        holds some is rewritten without them. Returns [(lsn, bytes)] of those removed."""
        wanted = sorted(set(lsns))
        removed = []
        cur = ctx.log_cur
        i = 0
        while i < len(wanted):
            if not cur.set_range(prefix + _BE64.pack(wanted[i])):
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

    def _flush_index(self, ctx: _Txn) -> None:
        """Write the page-index groups of the appends run so far in this transaction."""
        for key, (prefix, floor, pages, order) in ctx.idx_pending.items():
            if order[0]:  # the usual case: one delta row, not one row per page
                value = encode_delta(pages)
                ctx.txn.put(prefix + _BE64.pack(order[1]), value, db=self.db_pagedelta)
                ctx.bytes_written += len(value) + _LOG_KEY.size
                ctx.deltas[key] = ctx.deltas.get(key, self._deltas.get(key, 0)) + 1
            else:  # a retransmit or hole fill: merge into the page rows, deltas folded first
                self._fold_deltas(ctx, key, prefix)
                self._put_index(ctx, prefix, floor, pages)
        ctx.idx_pending.clear()

    def _fold_deltas(self, ctx: _Txn, key: tuple, prefix: bytes, limit: int = 0) -> int:
        """Move the page-index deltas of a segment (the oldest ``limit``; all if 0) into
        its per-page groups (one group per page for all of them); returns how many were
        folded. Delta LSNs lie above every grouped LSN, so nothing is read back or
        merged, and the deltas left lie above the new groups."""
        cur = ctx.txn.cursor(db=self.db_pagedelta)
        pages: dict[int, list] = {}
        folded = 0
        while ((not limit or folded < limit) and cur.set_range(prefix)
               and cur.key()[:8] == prefix):  # ascending: lists stay sorted
            for page_id, lsns in decode_delta(cur.value()).items():
                have = pages.get(page_id)
                if have is None:
                    pages[page_id] = list(lsns)
                else:
                    have.extend(lsns)
            cur.delete()
            folded += 1
        if folded:
            self._put_index(ctx, prefix, 0, pages, ordered=True)
            ctx.deltas[key] = ctx.deltas.get(key, self._deltas.get(key, 0)) - folded
        return folded

    def _op_fold_index(self, ctx: _Txn, op: "FoldIndexOp"):
        info = self._vol_of(ctx, op.volume)
        ctx.meta((op.volume, op.pg))  # the segment must exist
        return self._fold_deltas(ctx, (op.volume, op.pg), seg_prefix(info.vol_id, op.pg),
                                 op.max_deltas)

    def _put_index(self, ctx: _Txn, prefix: bytes, floor: int, pages: dict,
                   ordered: bool = False) -> None:
        """Write one page-index group per page (see "The page index" in the module doc).

        ``floor``: the segment's max_lsn before this transaction; LSNs above it cannot be
        in any stored group, so a page whose new LSNs are all above it needs no read.
        ``ordered``: the batches came in ascending order, each above the ones before and
        above ``floor``, so every page's list is already strictly ascending (the usual
        case: no sort and no merge).
        """
        cur = ctx.idx_cur
        puts = []
        for page_id, lsns in pages.items():
            if not ordered:
                lsns = sorted(set(lsns))
            base = prefix + _BE32.pack(page_id)
            if lsns[0] <= floor:  # may overlap stored groups: merge them in
                merged = set(lsns)
                old = []
                if cur.set_range(base + _BE64.pack(lsns[0])):
                    for k, v in cur.iternext():
                        if k[:12] != base:
                            break
                        group = _group_of(k, v)
                        if _BE64.unpack_from(group)[0] > lsns[-1]:
                            break  # groups are disjoint and ordered: no later one overlaps
                        old.append(bytes(k))
                        merged.update(_group_lsns(group))
                for k in old:
                    ctx.txn.delete(k, db=self.db_pageidx)
                lsns = sorted(merged)
            for i in range(0, len(lsns), IDX_GROUP_MAX):
                chunk = lsns[i:i + IDX_GROUP_MAX]
                puts.append((base + _BE64.pack(chunk[-1]), _pack_lsns(chunk)))
        cur.putmulti(puts)
        ctx.bytes_written += len(puts) * _IDX_KEY.size

    def _unindex(self, ctx: _Txn, prefix: bytes, page_id: int, dels: set) -> None:
        """Remove LSNs ``dels`` of one page from its page-index groups (GC)."""
        cur = ctx.idx_cur
        base = prefix + _BE32.pack(page_id)
        lo, hi = min(dels), max(dels)
        rows = []
        if cur.set_range(base + _BE64.pack(lo)):
            for k, v in cur.iternext():
                if k[:12] != base:
                    break
                group = _group_of(k, v)
                if _BE64.unpack_from(group)[0] > hi:
                    break
                rows.append((bytes(k), _group_lsns(group)))
        for k, lsns in rows:
            keep = [lsn for lsn in lsns if lsn not in dels]
            if len(keep) == len(lsns):
                continue
            ctx.txn.delete(k, db=self.db_pageidx)
            if keep:
                ctx.txn.put(base + _BE64.pack(keep[-1]), _pack_lsns(keep), db=self.db_pageidx)

    def _advance_scl(self, ctx: _Txn, key: tuple, prefix: bytes, new: list = ()) -> None:
        """Follow the segment backlink chain from the SCL as far as it goes (invariant 4).

        ``new``: VerifiedBatches just stored. Fast path: a batch that is one piece of the
        chain (scan.chained) and links to the SCL moves the SCL to its last record with no
        LMDB read and no per-record work, unless a truncation range covers part of it.
        Then, and for anything else (holes, out-of-order batches, retransmits), the walk
        follows the stored log with a cursor; one seek tells whether anything stored
        earlier lies beyond.
        """
        m = ctx.meta(key)
        scl = m.scl
        truncs = m.truncs
        dirty = ctx.dirty[key]
        if new:
            if len(new) > 1:
                new.sort(key=_first_lsn_of)
            for batch in new:
                scan = batch.scan
                if not scan.chained or scan.first_prev_pg_lsn != scl:
                    break  # a hole, a retransmit or a stored record in between: the walk decides
                if truncs and _overlaps_truncation(scan.first_lsn, scan.last_lsn, truncs):
                    break
                scl = scan.last_lsn
                for page_id, lsns in batch.pages.items():
                    dirty[page_id] += len(lsns)
        by_last = {batch.scan.last_lsn: batch for batch in new}
        cur = ctx.log_cur
        after = scl  # walked past: the SCL, or the end of a truncation range jumped over
        ok = cur.set_range(prefix + _BE64.pack(scl + 1))
        while ok:
            k = cur.key()
            if k[:8] != prefix:
                break
            try:
                run = decode_run(cur.value())
            except CorruptError as exc:
                self.log.error("segment %s/%d: SCL walk stops at a bad log run (%s)", key[0],
                               key[1], exc)
                self.suspects.append((key, KIND_RUN, _run_key_lsn(k)))
                break
            lsns = run.lsns
            value = run.value
            i = bisect.bisect_right(lsns, after) if lsns[0] <= after else 0
            if (i == 0 and run.flags & RUN_CHAINED
                    and _U64.unpack_from(value, run.base + _REC_PREV_PG)[0] == scl
                    and not (truncs and _overlaps_truncation(lsns[0], lsns[-1], truncs))):
                # One piece of the chain linking to the SCL: take the whole run at once.
                scl = after = lsns[-1]
                batch = by_last.get(scl)
                if batch is not None and batch.scan.count == len(lsns):
                    for page_id, page_lsns in batch.pages.items():
                        dirty[page_id] += len(page_lsns)
                else:
                    base = run.base
                    dirty[_U32.unpack_from(value, base + _REC_PAGE)[0]] += 1
                    for end in run.ends[:-1]:
                        dirty[_U32.unpack_from(value, base + end + _REC_PAGE)[0]] += 1
                ok = cur.next()
                continue
            stop = jumped = False
            for j in range(i, len(lsns)):
                lsn = lsns[j]
                hidden = truncs and _range_of(lsn, truncs)
                if hidden:  # jump over the whole range: a deep backtrack hides many records
                    if hidden[1] >= LSN_MAX:
                        stop = True
                    else:
                        after = hidden[1]
                        ok = cur.set_range(prefix + _BE64.pack(after + 1))
                        jumped = True
                    break
                off = run.base + (run.ends[j - 1] if j else 0)
                if _U64.unpack_from(value, off + _REC_PREV_PG)[0] != scl:
                    stop = True  # a hole: the record linking to the SCL is missing
                    break
                scl = after = lsn
                dirty[_U32.unpack_from(value, off + _REC_PAGE)[0]] += 1
            if stop:
                break
            if not jumped:
                ok = cur.next()
        if scl < m.scl:  # not an assert: it must hold under python -O too
            raise InvariantViolation(4, f"segment {key[0]}/{key[1]}: the SCL walk ended at {scl}, "
                                        f"below the SCL {m.scl} it started from")
        m.scl = scl

    def _chain_point_at_or_below(self, ctx: _Txn, key: tuple, prefix: bytes, limit: int) -> int:
        """Highest visible record LSN <= limit (the chain point a truncation falls back to)."""
        m = ctx.meta(key)
        found = self._visible_down(ctx.log_cur, prefix, m.truncs, limit)
        quarantined = [q for q in self._quar_records.get(key, ()) if q <= limit
                       and not _in_truncation(q, m.truncs)]
        if quarantined:
            found = max(found, max(quarantined))
        if found == 0 and m.log_floor <= limit:
            found = m.log_floor
        return found

    def _add_truncation(self, ctx: _Txn, key: tuple, prefix: bytes, start: int, end: int,
                        epoch: int) -> bool:
        m = ctx.meta(key)
        if (start, end, epoch) in m.truncs:
            return False
        return self._change_truncations(ctx, key, prefix, m.truncs + ((start, end, epoch),))

    def _change_truncations(self, ctx: _Txn, key: tuple, prefix: bytes, truncs) -> bool:
        """Make ``truncs`` the segment's truncation set: recompute the SCL from below the
        lowest LSN whose visibility changed and lower writer_vdl out of any range (a VDL
        inside a range belongs to a timeline that is no longer current). Page versions
        stay (see below). Cost: independent of how many records the new set hides or
        uncovers, apart from the SCL walk through uncovered ones."""
        m = ctx.meta(key)
        truncs = tuple(sorted(set(truncs), key=lambda t: (t[2], t[0])))
        low = lowest_difference(m.truncs, truncs)
        m.truncs = truncs
        m.volume_epoch = max(m.volume_epoch, _trunc_epoch(truncs))
        if low is None:
            return False
        m.generation += 1
        if m.scl > low:
            m.scl = self._chain_point_at_or_below(ctx, key, prefix, low)
        self._advance_scl(ctx, key, prefix)
        for start, end, _epoch in truncs:
            if start < m.writer_vdl <= end:
                m.writer_vdl = start
        # Page versions stay: reads, coalescing and GC skip a version whose LSN a range
        # hides, and a version at a visible LSN is right on every timeline where that LSN
        # is visible (timelines share their history up to any LSN they both show: each
        # is an older one cut at its target, plus LSNs above everything allocated before).
        # Dropping them would cost time in proportion to what a backtrack hides.
        for item in self._quar_versions.get(key, ()):
            if item[1] > low:
                ctx.txn.delete(prefix + KIND_VERSION + _PAGE_LSN.pack(*item), db=self.db_quarantine)
                ctx.quar_del.append((key, KIND_VERSION, item))
        ctx.reset_dirty.add(key)
        self.log.info("segment %s/%d: truncation set %s at epoch %d (changed above %d); SCL now "
                      "%d", key[0], key[1], [(t[0], t[1]) for t in truncs], _trunc_epoch(truncs),
                      low, m.scl)
        return True

    def _op_truncate(self, ctx: _Txn, op: TruncateOp):
        info = self._vol_of(ctx, op.volume)
        if not 0 <= op.pg < info.layout.pg_count:
            raise MalformedError(f"volume {op.volume!r} has no pg {op.pg}")
        key = (op.volume, op.pg)
        m = ctx.meta(key)
        if op.epoch < m.volume_epoch:
            raise StaleEpochError(
                f"Truncate: epoch {op.epoch} is stale; segment {op.volume}/{op.pg} is at epoch "
                f"{m.volume_epoch}", m.volume_epoch)
        prefix = seg_prefix(info.vol_id, op.pg)
        if op.replace is None:
            if op.end_lsn <= op.start_lsn:
                raise MalformedError(f"Truncate: empty range ({op.start_lsn}, {op.end_lsn}]")
            self._add_truncation(ctx, key, prefix, op.start_lsn, op.end_lsn, op.epoch)
        else:
            for start, end, epoch in op.replace:
                if end <= start or epoch > op.epoch:
                    raise MalformedError(
                        f"Truncate: bad range ({start}, {end}] of epoch {epoch} in a set of "
                        f"epoch {op.epoch}")
            if _trunc_epoch(op.replace) != op.epoch:
                raise MalformedError(f"Truncate: a new truncation set must hold a range of its "
                                     f"epoch {op.epoch}")
            if op.epoch > _trunc_epoch(m.truncs) or set(op.replace) != set(m.truncs):
                self._change_truncations(ctx, key, prefix, op.replace)
            if op.set_writer_vdl:
                # A backtrack target is a commit at or below the VDL of its timeline, so
                # everything visible at or below it is durable: recovery starts there
                # instead of re-walking (and re-appending) what a forward backtrack uncovered.
                m.writer_vdl = op.set_writer_vdl
            hist_key = _BE32.pack(info.vol_id) + _BE64.pack(op.epoch)
            ctx.txn.put(hist_key, _HISTORY.pack(op.time_us, op.prev_vdl, len(op.replace))
                        + b"".join(_TRUNC.pack(*t) for t in sorted(op.replace)),
                        db=self.db_history)
        m.volume_epoch = max(m.volume_epoch, op.epoch)
        return m.scl

    def _op_adopt_epoch(self, ctx: _Txn, op: AdoptEpochOp):
        info = self._vol_of(ctx, op.volume)
        if not 0 <= op.pg < info.layout.pg_count:
            raise MalformedError(f"volume {op.volume!r} has no pg {op.pg}")
        key = (op.volume, op.pg)
        m = ctx.meta(key)
        if op.reject_stale and op.epoch < m.volume_epoch:
            raise StaleEpochError(
                f"SegmentState(fence): epoch {op.epoch} is stale; segment {op.volume}/{op.pg} "
                f"is at epoch {m.volume_epoch}", m.volume_epoch)
        if op.epoch < m.volume_epoch and not op.truncs:
            return m.volume_epoch
        prefix = seg_prefix(info.vol_id, op.pg)
        if op.truncs:
            # A peer's set: a newer one replaces ours whole (a backtrack may have removed a
            # range); one of the same epoch can only add ranges (older single-range adds).
            theirs, ours = _trunc_epoch(op.truncs), _trunc_epoch(m.truncs)
            if theirs > ours:
                self._change_truncations(ctx, key, prefix, op.truncs)
            elif theirs == ours and not set(op.truncs) <= set(m.truncs):
                self._change_truncations(ctx, key, prefix, tuple(set(m.truncs) | set(op.truncs)))
        if op.epoch > m.volume_epoch:
            self.log.info("segment %s/%d: adopting epoch %d (was %d)", op.volume, op.pg,
                          op.epoch, m.volume_epoch)
            m.volume_epoch = op.epoch
        return m.volume_epoch

    def _op_set_gc_horizon(self, ctx: _Txn, op: SetGcHorizonOp):
        info = self._vol_of(ctx, op.volume)
        metas = [ctx.meta((op.volume, pg)) for pg in range(info.layout.pg_count)]
        top = max(m.volume_epoch for m in metas)
        if op.epoch < top:
            raise StaleEpochError(
                f"SetGcHorizon: epoch {op.epoch} is stale; volume {op.volume!r} is at epoch {top}", top)
        for m in metas:
            if op.horizon > m.gc_horizon:
                m.gc_horizon = op.horizon
        return max(m.gc_horizon for m in metas)

    def _put_version(self, ctx: _Txn, key: tuple, prefix: bytes, m: SegMeta, page_id: int,
                     lsn: int, image: bytes) -> bool:
        assert verify_stored_page(page_id, lsn, image), "a page version must verify before it is stored"
        if _in_truncation(lsn, m.truncs):
            return False
        added = ctx.txn.put(prefix + _PAGE_LSN.pack(page_id, lsn), image, db=self.db_versions,
                            overwrite=False)
        if added:
            m.n_versions += 1
            ctx.bytes_written += 20 + len(image)
        if (page_id, lsn) in self._quar_versions.get(key, ()):
            ctx.txn.delete(prefix + KIND_VERSION + _PAGE_LSN.pack(page_id, lsn), db=self.db_quarantine)
            ctx.quar_del.append((key, KIND_VERSION, (page_id, lsn)))
            ctx.repairs += 1
        return added

    def _op_put_versions(self, ctx: _Txn, op: PutVersionsOp):
        info = self._vol_of(ctx, op.volume)
        key = (op.volume, op.pg)
        m = ctx.meta(key)
        if m.generation != op.generation:
            return 0  # a truncation happened since the plan: the versions may be wrong
        prefix = seg_prefix(info.vol_id, op.pg)
        n = 0
        for page_id, lsn, image in op.versions:
            n += self._put_version(ctx, key, prefix, m, page_id, lsn, image)
        for page_id, lsn in op.clears:
            if (page_id, lsn) in self._quar_versions.get(key, ()) and \
                    (key, KIND_VERSION, (page_id, lsn)) not in ctx.quar_del:
                ctx.txn.delete(prefix + KIND_VERSION + _PAGE_LSN.pack(page_id, lsn), db=self.db_quarantine)
                ctx.quar_del.append((key, KIND_VERSION, (page_id, lsn)))
                ctx.repairs += 1
        return n

    def _op_gc_step(self, ctx: _Txn, op: GcStepOp):
        info = self._vol_of(ctx, op.volume)
        key = (op.volume, op.pg)
        m = ctx.meta(key)
        if m.generation != op.generation:
            return 0
        prefix = seg_prefix(info.vol_id, op.pg)
        self._fold_deltas(ctx, key, prefix)  # _unindex edits page groups only
        for page_id, lsn, image in op.put_versions:
            self._put_version(ctx, key, prefix, m, page_id, lsn, image)
        removed = 0
        unindex: dict[int, set] = {}
        gone = self._delete_records(ctx, prefix, [lsn for _page_id, lsn in op.delete_records])
        m.n_records -= len(gone)
        removed += len(gone)
        for page_id, lsn in op.delete_records:
            unindex.setdefault(page_id, set()).add(lsn)
        for page_id, dels in unindex.items():
            self._unindex(ctx, prefix, page_id, dels)
        for page_id, lsn in op.delete_versions:
            if ctx.txn.delete(prefix + _PAGE_LSN.pack(page_id, lsn), db=self.db_versions):
                m.n_versions -= 1
                removed += 1
        if op.log_floor > m.log_floor:
            m.log_floor = op.log_floor
        if op.done_horizon > m.gc_done:
            m.gc_done = op.done_horizon
        return removed

    def _op_quarantine(self, ctx: _Txn, op: QuarantineOp):
        info = self._vol_of(ctx, op.volume)
        key = (op.volume, op.pg)
        m = ctx.meta(key)
        prefix = seg_prefix(info.vol_id, op.pg)
        now = _U64.pack(int(time.time()))
        found = 0
        records = set(op.records)
        cur = ctx.log_cur
        for run_last in op.runs:
            # A run whose directory is bad: none of its records can be located, so every
            # LSN the page index lists in its range is quarantined and refetched.
            k = prefix + _BE64.pack(run_last)
            value = ctx.txn.get(k, db=self.db_log)
            if value is None:
                continue
            try:
                decode_run(value)
                continue  # rewritten meanwhile
            except CorruptError:
                pass
            low = 0
            if cur.set_key(k) and cur.prev() and cur.key()[:8] == prefix:
                low = _run_key_lsn(cur.key())
            already = self._quar_records.get(key, frozenset())
            lost = [lsn for lsn in self._indexed_lsns(ctx.txn, prefix, low, run_last)
                    if lsn not in already]
            ctx.txn.delete(k, db=self.db_log)
            m.n_records -= len(lost)
            for lsn in lost:
                records.discard(lsn)
                self._quarantine_record(ctx, key, prefix, lsn, now)
            found += 1
            self.log.error("scrub: log run %s/%d (%d, %d] failed its directory checksum; its %d "
                           "records are quarantined, will refetch from a peer", op.volume, op.pg,
                           low, run_last, len(lost))
        bad = []
        for lsn in sorted(records):
            try:
                rec = self._get_record(cur, prefix, lsn)
            except CorruptError:
                continue  # its run is bad: a runs entry handles it
            if rec is not None and not verify_stored_record(lsn, rec):
                bad.append(lsn)
        gone = self._delete_records(ctx, prefix, bad)
        m.n_records -= len(gone)
        for lsn, _rec in gone:
            self._quarantine_record(ctx, key, prefix, lsn, now)
            found += 1
            self.log.error("scrub: record %s/%d lsn %d failed its checksum; quarantined, "
                           "will refetch from a peer", op.volume, op.pg, lsn)
        for page_id, lsn in op.versions:
            vk = prefix + _PAGE_LSN.pack(page_id, lsn)
            value = ctx.txn.get(vk, db=self.db_versions)
            if value is None or verify_stored_page(page_id, lsn, value):
                continue
            ctx.txn.delete(vk, db=self.db_versions)
            m.n_versions -= 1
            ctx.txn.put(prefix + KIND_VERSION + _PAGE_LSN.pack(page_id, lsn), now, db=self.db_quarantine)
            ctx.quar_add.append((key, KIND_VERSION, (page_id, lsn)))
            found += 1
            self.log.error("scrub: page version %s/%d page %d lsn %d failed its checksum; "
                           "quarantined, will rebuild", op.volume, op.pg, page_id, lsn)
        return found

    def _quarantine_record(self, ctx: _Txn, key: tuple, prefix: bytes, lsn: int, now: bytes) -> None:
        ctx.txn.put(prefix + KIND_RECORD + _BE64.pack(lsn), now, db=self.db_quarantine)
        ctx.quar_add.append((key, KIND_RECORD, lsn))

    def _indexed_lsns(self, txn, prefix: bytes, low: int, high: int) -> list[int]:
        """Every LSN in (low, high] the segment's page index lists (all pages: slow, for
        the rare loss of a run directory)."""
        out = []
        cur = txn.cursor(db=self.db_pageidx)
        ok = cur.set_range(prefix)
        while ok:
            k = cur.key()
            if k[:8] != prefix:
                break
            out.extend(lsn for lsn in _group_lsns(_group_of(k, cur.value())) if low < lsn <= high)
            ok = cur.next()
        for _last, delta in self._delta_rows(txn, prefix):
            for lsns in delta.values():
                out.extend(lsn for lsn in lsns if low < lsn <= high)
        return sorted(set(out))

    @staticmethod
    def _get_record(cur, prefix: bytes, lsn: int) -> bytes | None:
        """One stored record's bytes (None if not stored); CorruptError if its run is bad."""
        if not cur.set_range(prefix + _BE64.pack(lsn)) or cur.key()[:8] != prefix:
            return None
        run = decode_run(cur.value())
        i = bisect.bisect_left(run.lsns, lsn)
        if i < len(run.lsns) and run.lsns[i] == lsn:
            return run.record(i)
        return None

    _dispatch = {
        CreateVolumeOp: _op_create_volume,
        AppendOp: _op_append,
        TruncateOp: _op_truncate,
        DropVolumeOp: _op_drop_volume,
        AdoptEpochOp: _op_adopt_epoch,
        SetGcHorizonOp: _op_set_gc_horizon,
        PutVersionsOp: _op_put_versions,
        GcStepOp: _op_gc_step,
        QuarantineOp: _op_quarantine,
        FoldIndexOp: _op_fold_index,
    }

    # -- the read path (any thread) ---------------------------------------------------------

    def read_page(self, volume: str, pg: int, page_id: int, read_point: int,
                  epoch: int, min_scl: int = 0) -> tuple[bytes, int, int]:
        """(page bytes, page_lsn, scl): the page as of ``read_point`` (invariant 8).

        Newest materialised version <= read point plus the page's later records up to it,
        applied with engine.materialiser. Refuses read points above the SCL or below the GC
        horizon; never uses records under a truncation range; never serves bytes that fail
        their checksum (invariant 13).

        ``min_scl`` (ReadPageRequest.min_scl): the caller knows the PG has no record in
        (min_scl, read_point], so SCL >= min_scl suffices; the page is then built as of
        min(read_point, SCL), which is the same page.
        """
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        info = self._volumes[volume]
        if info.layout.pg_of(page_id) != pg:
            raise WrongPgError(f"page {page_id} belongs to pg {info.layout.pg_of(page_id)}, not {pg}")
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            self._check_epoch(m, epoch, "ReadPage", key)
            required = min_scl if 0 < min_scl < read_point else read_point
            if required > m.scl:
                raise ReadPointAboveSclError(
                    f"read point {read_point} (min_scl {min_scl}) is above the SCL {m.scl} of "
                    f"segment {volume}/{pg}")
            read_point = min(read_point, m.scl)
            if read_point < m.gc_horizon:
                # The horizon is a volume LSN; this PG's last record at or below it (kept by
                # GC as the chain anchor) is the lowest read point whose pages survive.
                floor = self._visible_at_or_below(txn, prefix, m, min(m.gc_horizon, m.scl))
                if read_point < floor:
                    raise ReadPointBelowGcError(
                        f"read point {read_point} is below the GC horizon {m.gc_horizon} of "
                        f"segment {volume}/{pg} (its last record at or below it is {floor})")
            image = self._build_page(txn, key, prefix, m, page_id, read_point)
        return bytes(image), pagefmt.page_lsn(image), m.scl

    def _visible_at_or_below(self, txn, prefix: bytes, m: SegMeta, limit: int) -> int:
        """Highest stored, visible record LSN <= limit in a segment (0 if none)."""
        return self._visible_down(txn.cursor(db=self.db_log), prefix, m.truncs, limit)

    @staticmethod
    def _visible_down(cur, prefix: bytes, truncs, limit: int) -> int:
        """Highest stored record LSN <= limit that no range of ``truncs`` hides (0: none);
        a range is jumped over in one seek, whatever it hides."""
        walk = _records_down(cur, prefix, limit)
        for lsn, _run, _i in walk:
            hidden = _range_of(lsn, truncs)
            if hidden is None:
                return lsn
            walk.close()
            return Store._visible_down(cur, prefix, truncs, hidden[0])
        return 0

    def _page_versions_desc(self, txn, prefix: bytes, page_id: int, upto: int, truncs, limit: int):
        """Up to ``limit`` (lsn, bytes) versions of a page with lsn <= upto, newest first."""
        cur = txn.cursor(db=self.db_versions)
        base = prefix + _BE32.pack(page_id)
        out = []
        if upto < LSN_MAX:
            positioned = cur.set_range(prefix + _PAGE_LSN.pack(page_id, upto + 1))
        else:
            positioned = page_id < 0xFFFFFFFF and cur.set_range(prefix + _BE32.pack(page_id + 1))
        ok = cur.prev() if positioned else cur.last()
        while ok and len(out) < limit:
            k = cur.key()
            if k[:12] != base:
                break
            lsn = _BE64.unpack_from(k, 12)[0]
            if not _in_truncation(lsn, truncs):
                out.append((lsn, cur.value()))
            ok = cur.prev()
        return out

    def _page_records(self, txn, key: tuple, prefix: bytes, page_id: int, after: int, upto: int,
                      truncs, fetched: dict | None = None) -> tuple[bytes, int]:
        """The page's visible records in (after, upto], packed, and how many.

        ``fetched``: {lsn: record bytes} already read for many pages at once in one walk
        over the runs (coalescing, GC: _records_by_lsn); otherwise the page's own are read.
        CorruptError if one is missing (quarantined) or in a run that fails its check."""
        lsns = self._page_lsns(txn, prefix, page_id, after, upto)
        if truncs:
            lsns = [lsn for lsn in lsns if not _in_truncation(lsn, truncs)]
        if not lsns:
            return b"", 0
        if fetched is None:
            fetched = self._records_by_lsn(txn, key, prefix, lsns)
        parts = [fetched.get(lsn) for lsn in lsns]
        if None in parts:
            lsn = lsns[parts.index(None)]
            raise CorruptError(
                f"record {key[0]}/{key[1]} lsn {lsn} of page {page_id} is quarantined or in a "
                f"log run that failed its checksum, and not repaired yet")
        return b"".join(parts), len(parts)

    def _records_by_lsn(self, txn, key: tuple, prefix: bytes, lsns: list[int]) -> dict[int, bytes]:
        """{lsn: record bytes} of the stored ones among ``lsns`` (ascending): one seek and
        one decode per run that holds any of them, not one per record. A run that fails
        its check is reported to the scrubber and its records are left out."""
        cur = txn.cursor(db=self.db_log)
        out: dict[int, bytes] = {}
        run = None
        run_last = -1
        i = 0
        for lsn in lsns:
            if lsn > run_last:  # the next run that can hold it
                if not cur.set_range(prefix + _BE64.pack(lsn)) or cur.key()[:8] != prefix:
                    break
                run_last = _run_key_lsn(cur.key())
                try:
                    run = decode_run(cur.value())
                except CorruptError:
                    self.suspects.append((key, KIND_RUN, run_last))
                    run = None
                i = 0
            if run is None:
                continue
            i = bisect.bisect_left(run.lsns, lsn, i)
            if i < len(run.lsns) and run.lsns[i] == lsn:
                out[lsn] = run.record(i)
        return out

    def _page_lsns(self, txn, prefix: bytes, page_id: int, after: int, upto: int) -> list[int]:
        """The LSNs in (after, upto] the page index lists for a page, ascending: its
        groups, then the segment's deltas (whose LSNs are above every group's)."""
        out: list[int] = []
        if after >= upto:
            return out
        cur = txn.cursor(db=self.db_pageidx)
        base = prefix + _BE32.pack(page_id)
        if cur.set_range(base + _BE64.pack(after + 1)):
            for k, v in cur.iternext():
                if k[:12] != base:
                    break
                lsns = _group_lsns(_group_of(k, v))
                if lsns[0] > upto:
                    return out  # deltas lie above this group: none can be <= upto
                if lsns[0] > after and lsns[-1] <= upto:
                    out.extend(lsns)
                else:
                    out.extend(lsn for lsn in lsns if after < lsn <= upto)
        out.extend(self._delta_lsns(txn, prefix, page_id, after, upto))
        return out

    def _delta_lsns(self, txn, prefix: bytes, page_id: int, after: int, upto: int) -> list[int]:
        """A page's LSNs in (after, upto] listed by the segment's page-index deltas."""
        out: list[int] = []
        cur = txn.cursor(db=self.db_pagedelta)
        if not cur.set_range(prefix + _BE64.pack(after + 1)):
            return out
        for k, v in cur.iternext():  # deltas cover disjoint, ascending LSN ranges
            if k[:8] != prefix:
                break
            lsns = delta_page_lsns(v, page_id)
            out.extend(lsn for lsn in lsns if after < lsn <= upto)
            if _BE64.unpack_from(k, 8)[0] >= upto:
                break
        return out

    def _delta_rows(self, txn, prefix: bytes):
        """Yield (last lsn, {page_id: lsns}) of each page-index delta of a segment, ascending."""
        cur = txn.cursor(db=self.db_pagedelta)
        if cur.set_range(prefix):
            for k, v in cur.iternext():
                if k[:8] != prefix:
                    return
                yield _BE64.unpack_from(k, 8)[0], decode_delta(v)

    def _clone_base(self, txn, volume: str, page_id: int) -> bytearray | None:
        """A clone's page as of its fork: the parent's page as of fork_lsn, built from the
        parent's segment on this node under the parent's truncation set at the fork; None
        if the page did not exist then. Recursive for a clone of a clone."""
        info = self._volumes[volume]
        parent = self._by_id[info.parent_id]
        pg = parent.layout.pg_of(page_id)
        pkey = (parent.name, pg)
        pprefix = seg_prefix(parent.vol_id, pg)
        pm = self._read_meta(txn, pprefix)
        if pm.scl < info.fork_tails[pg]:
            raise ReadPointAboveSclError(
                f"clone {volume!r}: segment {parent.name}/{pg} of its parent is complete only to "
                f"{pm.scl}, below its last record {info.fork_tails[pg]} at the fork "
                f"{info.fork_lsn}; gossip will fill it")
        # Versions above the lowest LSN where the parent's set now differs from the one the
        # clone inherited were built for another timeline of the parent: not for us.
        low = lowest_difference(pm.truncs, info.inherited)
        cap = info.fork_lsn if low is None else min(info.fork_lsn, low)
        view = replace(pm, truncs=info.inherited)
        try:
            return self._build_page(txn, pkey, pprefix, view, page_id, info.fork_lsn,
                                    version_cap=cap)
        except PageNotFoundError:
            return None

    def _build_page(self, txn, key: tuple, prefix: bytes, m: SegMeta, page_id: int,
                    read_point: int, version_cap: int | None = None) -> bytearray:
        """Materialise a page as of read_point from the newest good version plus records
        (a clone's page with no version of its own starts from its parent's, _clone_base)."""
        vupto = read_point if version_cap is None else min(read_point, version_cap)
        candidates = self._page_versions_desc(txn, prefix, page_id, vupto, m.truncs,
                                              READ_VERSION_FALLBACKS)
        clone = self._volumes[key[0]].parent_id != 0
        quarantined = [v for v in self._quar_versions.get(key, ()) if v[0] == page_id
                       and v[1] <= read_point]
        for base_lsn, base in candidates + [(0, None)]:
            if base is not None and not verify_stored_page(page_id, base_lsn, base):
                self.suspects.append((key, KIND_VERSION, (page_id, base_lsn)))
                continue  # never serve it; fall back to an older version
            records, n = self._page_records(txn, key, prefix, page_id, base_lsn, read_point, m.truncs)
            if base is None and clone:
                base = self._clone_base(txn, key[0], page_id)
                if base is None and n == 0:
                    raise PageNotFoundError(
                        f"page {page_id} has no INIT_PAGE at or below read point {read_point}")
            try:
                image = materialiser.apply(None if base is None else bytearray(base), page_id,
                                           records, upto_lsn=read_point)
            except ChecksumError as exc:
                self.log.error("read of %s/%d page %d: stored record failed its checksum: %s",
                               key[0], key[1], page_id, exc)
                self._suspect_records(txn, prefix, key, records)
                raise CorruptError(f"page {page_id}: a stored record failed its checksum") from None
            except PageOrderError as exc:
                if base is None and not candidates and not quarantined and m.log_floor == 0:
                    raise PageNotFoundError(
                        f"page {page_id} has no INIT_PAGE at or below read point {read_point}") from None
                self.log.warning("read of %s/%d page %d from base %d failed: %s",
                                 key[0], key[1], page_id, base_lsn, exc)
                continue
            if image is None:
                if candidates or quarantined:
                    continue
                raise PageNotFoundError(
                    f"page {page_id} has no INIT_PAGE at or below read point {read_point}")
            assert pagefmt.verify_checksum(image), "materialised page must carry a valid checksum"
            assert pagefmt.page_lsn(image) <= read_point
            return image
        raise CorruptError(
            f"page {page_id} of {key[0]}/{key[1]} cannot be built as of {read_point}: its stored "
            f"versions failed their checksums and the log below them is gone; awaiting repair")

    def _suspect_records(self, txn, prefix: bytes, key: tuple, records: bytes) -> None:
        off = 0
        # Walk record by record with the header's own length; report the bad ones.
        while off + HEADER_SIZE <= len(records):
            lsn = _U64.unpack_from(records, off)[0]
            size = HEADER_SIZE + struct.unpack_from("<H", records, off + 38)[0]
            if not verify_stored_record(lsn, records[off:off + size]):
                self.suspects.append((key, KIND_RECORD, lsn))
            off += size

    def fetch_records(self, volume: str, pg: int, after_lsn: int, upto_lsn: int,
                      max_bytes: int, epoch: int):
        """Chain-complete, visible records in (after_lsn, upto_lsn], packed.

        Returns (records, scl, more, volume_epoch, truncs). ``upto_lsn`` 0 means the SCL;
        it is capped at the SCL. Stops before a quarantined record (never served) and when
        ``max_bytes`` is reached (``more`` is then True). ``epoch`` 0 = a peer (unfenced).
        """
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        max_bytes = min(max_bytes or FETCH_BYTES_DEFAULT, FETCH_BYTES_MAX)
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            if epoch:
                self._check_epoch(m, epoch, "FetchRecords", key)
            upto = m.scl if upto_lsn == 0 else min(upto_lsn, m.scl)
            bad = [q for q in self._quar_records.get(key, ()) if after_lsn < q <= upto]
            if bad:
                upto = min(bad) - 1
            parts = []
            total = 0
            more = False
            cur = txn.cursor(db=self.db_log)
            if upto > after_lsn:
                try:
                    for lsn, run, i in _records_up(cur, prefix, after_lsn):
                        if lsn > upto:
                            break
                        if m.truncs and _in_truncation(lsn, m.truncs):
                            continue
                        v = run.record(i)
                        if total + len(v) > max_bytes and parts:
                            more = True
                            break
                        if not verify_stored_record(lsn, v):
                            self.suspects.append((key, KIND_RECORD, lsn))
                            break  # never serve bad bytes (invariant 13)
                        parts.append(v)
                        total += len(v)
                except CorruptError:
                    self.suspects.append((key, KIND_RUN, _run_key_lsn(cur.key())))
                    # serve what came before the bad run; the rest after its repair
        return b"".join(parts), m.scl, more, m.volume_epoch, m.truncs

    def segment_state(self, volume: str, pg: int, records_since: int = 0,
                      include_records: bool = False, limit: int = STATE_RECORDS_MAX,
                      tail_bound: int = 0):
        """(SegMeta, [(lsn, prev_volume_lsn, flags)], more, tail_lsn) of a segment, read in
        one snapshot. ``tail_lsn`` is the highest chain-complete, untruncated LSN <=
        tail_bound (0 if tail_bound is 0): recovery stamps the first new record's PG
        backlink with it."""
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        records = []
        more = False
        tail = 0
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            if tail_bound:
                bound = min(tail_bound, m.scl)
                tail = self._visible_at_or_below(txn, prefix, m, bound)
                lost = [q for q in self._quar_records.get(key, ())
                        if q <= bound and not _in_truncation(q, m.truncs)]
                tail = max([tail] + lost)
                if tail == 0 and m.log_floor <= bound:
                    tail = m.log_floor
            if include_records:
                cur = txn.cursor(db=self.db_log)
                for lsn, run, i in _records_up(cur, prefix, records_since):
                    if lsn > m.scl:
                        break
                    if m.truncs and _in_truncation(lsn, m.truncs):
                        continue
                    if len(records) >= limit:
                        more = True
                        break
                    off = run.base + (run.ends[i - 1] if i else 0)
                    records.append((lsn, _U64.unpack_from(run.value, off + _REC_PREV_VOL)[0],
                                    run.value[off + _REC_FLAGS]))
        return m, records, more, tail

    def next_stored_above(self, volume: str, pg: int, lsn: int) -> int:
        """The lowest stored, visible LSN > lsn (0 if none): where the hole above the SCL
        ends (gossip fetches only the hole)."""
        prefix = self._prefix(volume, pg)
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            for found, _run, _i in _records_up(txn.cursor(db=self.db_log), prefix, lsn):
                if not _in_truncation(found, m.truncs):
                    return found
        return 0

    # -- background planning (read phase; the write phase is an op) -------------------------

    def _pages_from(self, txn, prefix: bytes, start_page: int, max_pages: int) -> list[int]:
        """Distinct page ids >= start_page having records or versions, ascending."""
        pages: set[int] = set()
        for db in (self.db_pageidx, self.db_versions):
            cur = txn.cursor(db=db)
            page = start_page
            found = 0
            while found < max_pages and page <= 0xFFFFFFFF:
                if not cur.set_range(prefix + _PAGE_LSN.pack(page, 0)):
                    break
                k = cur.key()
                if k[:8] != prefix:
                    break
                page = _PAGE_LSN.unpack_from(k, 8)[0]
                pages.add(page)
                found += 1
                page += 1
        for _last, delta in self._delta_rows(txn, prefix):
            pages.update(p for p in delta if p >= start_page)
        return sorted(pages)[:max_pages]

    def _backlogs(self, txn, prefix, m, pages, upto) -> dict[int, tuple]:
        """Per page: (LSN and bytes of its newest visible version <= upto, or (0, None);
        the visible LSNs in (that version, upto] the page index lists)."""
        out = {}
        for page_id in pages:
            newest = self._page_versions_desc(txn, prefix, page_id, upto, m.truncs, 1)
            base_lsn, base = newest[0] if newest else (0, None)
            lsns = self._page_lsns(txn, prefix, page_id, base_lsn, upto)
            if m.truncs:
                lsns = [lsn for lsn in lsns if not _in_truncation(lsn, m.truncs)]
            out[page_id] = (base_lsn, base, lsns)
        return out

    def _fetch_for_pages(self, txn, key, prefix, backlogs: dict) -> dict[int, bytes]:
        """The records of ``backlogs`` (``_backlogs``), read in ONE walk over the runs: a
        page's records are spread over many runs, and the pages of one coalesce or GC
        step share them."""
        wanted = sorted(lsn for _base_lsn, _base, lsns in backlogs.values() for lsn in lsns)
        return self._records_by_lsn(txn, key, prefix, wanted)

    def _materialise_upto(self, txn, key, prefix, m, page_id, upto, min_records=1, fetched=None):
        """(lsn, bytes, n) of a new version of page as of its last visible record <= upto,
        built from its newest good version; None if nothing new or not buildable."""
        candidates = self._page_versions_desc(txn, prefix, page_id, upto, m.truncs, 1)
        base_lsn, base = candidates[0] if candidates else (0, None)
        if base is not None and not verify_stored_page(page_id, base_lsn, base):
            self.suspects.append((key, KIND_VERSION, (page_id, base_lsn)))
            return None
        try:
            records, n = self._page_records(txn, key, prefix, page_id, base_lsn, upto, m.truncs,
                                            fetched)
        except CorruptError:
            return None
        if n < min_records or n == 0:
            return None
        try:
            if base is None and self._volumes[key[0]].parent_id:
                start = self._clone_base(txn, key[0], page_id)
            else:
                start = None if base is None else bytearray(base)
            image = materialiser.apply(start, page_id, records, upto_lsn=upto)
        except (FormatError, StorageError) as exc:
            self.log.warning("coalesce %s/%d page %d: %s", key[0], key[1], page_id, exc)
            return None
        if image is None:
            return None
        return pagefmt.page_lsn(image), bytes(image), n

    def _coalesce_by_walk(self, txn, key, m, backlogs: dict, min_records) -> list | None:
        """New versions as of the SCL of ``pages``, built in ONE pass of the Cython
        materialiser over the runs that hold their records (``apply_to_pages`` per run:
        records of other pages are skipped, records at or below a page's version are
        already in it), not record by record in Python. For the busy case: many pages
        with long backlogs. Returns None where the per-page path must decide instead
        (a truncation set, quarantined records, a clone, a small backlog, a bad byte, a
        walk much longer than the records needed)."""
        if m.truncs or self._quar_records.get(key) or self._volumes[key[0]].parent_id:
            return None
        upto = m.scl
        prefix = seg_prefix(self._volumes[key[0]].vol_id, key[1])
        images: dict[int, bytearray | None] = {}
        low = upto
        needed = 0
        for page_id, (base_lsn, base, lsns) in backlogs.items():
            if base is not None and not verify_stored_page(page_id, base_lsn, base):
                return None
            if len(lsns) < max(1, min_records):
                continue
            images[page_id] = None if base is None else bytearray(base)
            low = min(low, lsns[0] - 1)
            needed += len(lsns)
        if needed < WALK_COALESCE_MIN:
            return None
        starts = {p: (0 if image is None else pagefmt.page_lsn(image)) for p, image in images.items()}
        walked = 0
        spans: list = []
        span_bytes = 0
        verify = True  # the base images once; after that they are our own
        try:
            for run, i in _runs_up(txn.cursor(db=self.db_log), prefix, low):
                if run.lsns[i] > upto:
                    break
                j = bisect.bisect_right(run.lsns, upto)
                spans.append(run.span(i, j))
                span_bytes += len(spans[-1])
                walked += j - i
                if walked > 8 * needed + 4096:
                    return None  # mostly other pages' records: the per-page path is cheaper
                last = j < len(run.lsns)
                if span_bytes >= WALK_APPLY_BYTES or last:
                    materialiser.apply_to_pages(images, b"".join(spans), upto, verify)
                    spans, span_bytes, verify = [], 0, False
                if last:
                    break
            if spans:
                materialiser.apply_to_pages(images, b"".join(spans), upto, verify)
        except (FormatError, StorageError):
            return None
        return [(p, pagefmt.page_lsn(image), bytes(image)) for p, image in images.items()
                if image is not None and pagefmt.page_lsn(image) > starts[p]]

    def plan_coalesce(self, volume: str, pg: int, pages: Iterable[int] | None = None,
                      start_page: int = 0, max_pages: int = 16, min_records: int = 1):
        """Build new page versions as of the SCL for ``pages`` (or the next ``max_pages``
        pages from ``start_page``). Returns (PutVersionsOp or None, next_page or None)."""
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        qv = self._quar_versions.get(key, ())
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            next_page = None
            if pages is None:
                pages = self._pages_from(txn, prefix, start_page, max_pages + 1)
                if len(pages) > max_pages:
                    next_page = pages[max_pages]
                    pages = pages[:max_pages]
            versions = []
            pages = [p for p in pages if not any(v[0] == p for v in qv)]  # repaired first
            backlogs = self._backlogs(txn, prefix, m, pages, m.scl)
            walked = self._coalesce_by_walk(txn, key, m, backlogs, min_records)
            if walked is not None:
                op = PutVersionsOp(volume, pg, m.generation, walked) if walked else None
                return op, next_page
            fetched = self._fetch_for_pages(txn, key, prefix, backlogs)
            for page_id in pages:
                built = self._materialise_upto(txn, key, prefix, m, page_id, m.scl, min_records,
                                               fetched)
                if built is not None:
                    versions.append((page_id, built[0], built[1]))
        op = PutVersionsOp(volume, pg, m.generation, versions) if versions else None
        return op, next_page

    def sweep_dirty(self, volume: str, pg: int) -> dict[int, int]:
        """Count, per page, the complete visible records above its newest version."""
        prefix = self._prefix(volume, pg)
        counts: dict[int, int] = {}
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            newest: dict[int, int] = {}
            cur = txn.cursor(db=self.db_versions)
            if cur.set_range(prefix):
                for k in cur.iternext(keys=True, values=False):
                    if k[:8] != prefix:
                        break
                    page_id, lsn = _PAGE_LSN.unpack_from(k, 8)
                    if lsn <= m.scl and not _in_truncation(lsn, m.truncs):
                        newest[page_id] = lsn
            cur = txn.cursor(db=self.db_pageidx)
            if cur.set_range(prefix):
                for k, v in cur.iternext():
                    if k[:8] != prefix:
                        break
                    page_id = _BE32.unpack_from(k, 8)[0]
                    floor = newest.get(page_id, 0)
                    n = sum(1 for lsn in _group_lsns(_group_of(k, v))
                            if floor < lsn <= m.scl and not _in_truncation(lsn, m.truncs))
                    if n:
                        counts[page_id] = counts.get(page_id, 0) + n
            for _last, delta in self._delta_rows(txn, prefix):
                for page_id, lsns in delta.items():
                    floor = newest.get(page_id, 0)
                    n = sum(1 for lsn in lsns
                            if floor < lsn <= m.scl and not _in_truncation(lsn, m.truncs))
                    if n:
                        counts[page_id] = counts.get(page_id, 0) + n
        return counts

    def _gc_cap(self, volume: str, m: SegMeta, horizon: int) -> int:
        """Lower a GC horizon so GC keeps what other read points may need (invariant 12):
        never into a truncation range that reaches above it (a backtrack may make those
        records visible again) and never past a live clone's fork or the lowest LSN where
        our set differs from the one that clone inherited."""
        info = self._volumes[volume]
        for child in self._volumes.values():
            if child.parent_id == info.vol_id:
                horizon = min(horizon, child.fork_lsn)
                low = lowest_difference(m.truncs, child.inherited)
                if low is not None:
                    horizon = min(horizon, low)
        for _ in range(len(m.truncs) + 1):
            capped = min([horizon] + [t[0] for t in m.truncs if t[0] < horizon <= t[1]])
            if capped == horizon:
                break
            horizon = capped
        return horizon

    def plan_gc(self, volume: str, pg: int, horizon: int, start_page: int, max_pages: int = 16):
        """One bounded GC step below ``horizon`` (<= SCL) for pages from ``start_page``.

        Invariant 12: for each page keep the newest version <= horizon (building it first if
        the page has later records <= horizon) and everything above it; delete older
        versions and the records they cover. The segment's newest record <= horizon (the
        chain anchor) is always kept so that SCL bookkeeping never loses its footing.
        Returns (GcStepOp, next_page or None).
        """
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        qr, qv = self.quarantined(key)
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            # Never above the writer's last reported VDL: recovery walks the volume chain
            # upward from the highest writer_vdl a read quorum reports, through the
            # records above it, so those records must survive GC even if a (stale)
            # horizon says otherwise, or recovery would truncate acknowledged commits.
            horizon = self._gc_cap(volume, m, min(horizon, m.scl, m.writer_vdl))
            anchor = self._visible_at_or_below(txn, prefix, m, horizon)
            pages = self._pages_from(txn, prefix, start_page, max_pages + 1)
            next_page = pages[max_pages] if len(pages) > max_pages else None
            op = GcStepOp(volume, pg, m.generation, [], [], [], log_floor=anchor)
            fetched = self._fetch_for_pages(
                txn, key, prefix, self._backlogs(txn, prefix, m, pages[:max_pages], horizon))
            for page_id in pages[:max_pages]:
                if any(v[0] == page_id for v in qv):
                    continue
                recs = [lsn for lsn in self._page_lsns(txn, prefix, page_id, 0, horizon)
                        if not _in_truncation(lsn, m.truncs)]
                if any(r in qr for r in recs):
                    continue
                versions = [lsn for lsn, _b in self._page_versions_desc(
                    txn, prefix, page_id, horizon, m.truncs, 1 << 30)]
                keep = versions[0] if versions else 0
                if recs and recs[-1] > keep:
                    built = self._materialise_upto(txn, key, prefix, m, page_id, horizon,
                                                   fetched=fetched)
                    if built is None:
                        continue
                    keep = built[0]
                    op.put_versions.append((page_id, built[0], built[1]))
                if not keep:
                    continue
                op.delete_records.extend((page_id, r) for r in recs if r <= keep and r != anchor)
                op.delete_versions.extend((page_id, v) for v in versions if v < keep)
        if next_page is None:
            op.done_horizon = horizon
        return op, next_page

    def scrub_records(self, volume: str, pg: int, after_lsn: int, max_items: int):
        """Verify the stored records above ``after_lsn``, whole runs at a time, until at
        least ``max_items`` are checked. Returns (bad lsns, [last lsn of each run whose
        directory is bad], last lsn checked, done)."""
        prefix = self._prefix(volume, pg)
        bad = []
        bad_runs = []
        last = after_lsn
        n = 0
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db_log)
            ok = cur.set_range(prefix + _BE64.pack(after_lsn + 1))
            while ok:
                k = cur.key()
                if k[:8] != prefix:
                    return bad, bad_runs, last, True
                if n >= max_items:
                    return bad, bad_runs, last, False
                run_last = _run_key_lsn(k)
                try:
                    run = decode_run(cur.value())
                except CorruptError:
                    bad_runs.append(run_last)
                    n += 1
                    last = run_last
                    ok = cur.next()
                    continue
                lsns = run.lsns
                start = bisect.bisect_right(lsns, after_lsn) if lsns[0] <= after_lsn else 0
                try:  # one pass over the whole span; record by record only if it fails
                    refs = materialiser.scan_batch(run.span(start, len(lsns)))
                    good = [ref[2] for ref in refs] == list(lsns[start:])
                except FormatError:
                    good = False
                if not good:
                    bad.extend(lsns[i] for i in range(start, len(lsns))
                               if not verify_stored_record(lsns[i], run.record(i)))
                n += len(lsns) - start
                last = run_last
                ok = cur.next()
        return bad, bad_runs, last, True

    def scrub_versions(self, volume: str, pg: int, after: tuple, max_items: int):
        """Verify up to ``max_items`` page versions after key (page_id, lsn).
        Returns (bad [(page_id, lsn)], last (page_id, lsn), done)."""
        prefix = self._prefix(volume, pg)
        bad = []
        last = after
        n = 0
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db_versions)
            start = prefix + _PAGE_LSN.pack(*after)
            if cur.set_range(start):
                for k, v in cur.iternext():
                    if k == start:
                        continue
                    if k[:8] != prefix:
                        return bad, last, True
                    if n >= max_items:
                        return bad, last, False
                    last = _PAGE_LSN.unpack_from(k, 8)
                    if not verify_stored_page(last[0], last[1], v):
                        bad.append(last)
                    n += 1
        return bad, last, True

    def take_suspects(self) -> list:
        """Bad bytes the read path stumbled on since the last call (for the scrubber)."""
        out = []
        while self.suspects:
            out.append(self.suspects.popleft())
        return out

    def find_commit(self, volume: str, *, upto_lsn: int, max_time_us: int = 0,
                    after_lsn: int = 0, truncs=None, forward: bool = False) -> tuple[int, int]:
        """(lsn, timestamp_us) of a COMMIT record visible under ``truncs`` (default: the
        segment's own set) in (after_lsn, upto_lsn]: the newest one with timestamp <=
        max_time_us (0: any), or with ``forward`` the oldest one. (0, 0) if none.

        COMMIT records all change the META page, so they live in its PG; this walks that
        page's index (a linear walk: a real system would keep a time index). A clone
        continues in its parent (under the set it inherited) below the fork.
        """
        info = self.volume(volume)
        in_parent = info.parent_id and after_lsn < info.fork_lsn
        if forward and in_parent:
            found = self.find_commit(self._by_id[info.parent_id].name,
                                     upto_lsn=min(upto_lsn, info.fork_lsn), after_lsn=after_lsn,
                                     truncs=info.inherited, forward=True)
            if found[0]:
                return found
        found = self._find_commit_own(info, upto_lsn, max_time_us, after_lsn, truncs, forward)
        if found[0] or forward or not in_parent:
            return found
        return self.find_commit(self._by_id[info.parent_id].name,
                                upto_lsn=min(upto_lsn, info.fork_lsn), max_time_us=max_time_us,
                                after_lsn=after_lsn, truncs=info.inherited)

    def _find_commit_own(self, info: VolumeInfo, upto_lsn: int, max_time_us: int,
                         after_lsn: int, truncs, forward: bool) -> tuple[int, int]:
        pg = info.layout.pg_of(pagefmt.META_PAGE_ID)
        prefix = seg_prefix(info.vol_id, pg)
        base = prefix + _BE32.pack(pagefmt.META_PAGE_ID)
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            if truncs is None:
                truncs = m.truncs
                upto = min(upto_lsn, m.scl)
            else:  # another timeline: its records may lie above this timeline's SCL
                upto = min(upto_lsn, m.max_lsn)
            cur = txn.cursor(db=self.db_pageidx)
            log_cur = txn.cursor(db=self.db_log)
            # The META page's LSNs in page-index deltas: above all of its groups' LSNs.
            in_deltas = self._delta_lsns(txn, prefix, pagefmt.META_PAGE_ID, 0, LSN_MAX)
            low, high = after_lsn, upto
            while low < high:
                jumped = False
                if forward:
                    walk = itertools.chain(self._meta_lsns_up(cur, base, low),
                                           (lsn for lsn in in_deltas if lsn > low))
                else:
                    walk = itertools.chain((lsn for lsn in reversed(in_deltas) if lsn <= high),
                                           self._meta_lsns_down(cur, base, high))
                for lsn in walk:
                    if lsn <= low or lsn > high:
                        if forward and lsn > high or not forward and lsn <= low:
                            break
                        continue
                    hidden = _range_of(lsn, truncs)
                    if hidden is not None:  # skip the whole range in one seek
                        if forward:
                            low = hidden[1]
                        else:
                            high = hidden[0]
                        jumped = True
                        break
                    rec = self._get_record(log_cur, prefix, lsn)
                    if rec is not None and rec[_REC_TYPE] == _RTYPE_COMMIT:
                        ts = _U64.unpack_from(rec, HEADER_SIZE + 8)[0]
                        if forward or not max_time_us or ts <= max_time_us:
                            return lsn, ts
                if not jumped:
                    break
        return 0, 0

    @staticmethod
    def _meta_lsns_down(cur, base: bytes, high: int):
        """The META page's indexed LSNs <= high, newest first (page-index groups)."""
        positioned = cur.set_range(base + _BE64.pack(high))
        ok = positioned and cur.key()[:12] == base
        if not ok:
            ok = cur.prev() if positioned else cur.last()
        while ok:
            k = cur.key()
            if k[:12] != base:
                return
            for lsn in reversed(_group_lsns(_group_of(k, cur.value()))):
                if lsn <= high:
                    yield lsn
            ok = cur.prev()

    @staticmethod
    def _meta_lsns_up(cur, base: bytes, low: int):
        """The META page's indexed LSNs > low, oldest first."""
        ok = cur.set_range(base + _BE64.pack(low + 1))
        while ok:
            k = cur.key()
            if k[:12] != base:
                return
            for lsn in _group_lsns(_group_of(k, cur.value())):
                if lsn > low:
                    yield lsn
            ok = cur.next()

    def history(self, volume: str) -> list[tuple[int, int, int, tuple]]:
        """[(epoch, time_us, prev_vdl, truncation set)] of every truncation set this node
        recorded for the volume, oldest first (the timelines; see the module docstring)."""
        info = self.volume(volume)
        out = []
        base = _BE32.pack(info.vol_id)
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db_history)
            if cur.set_range(base):
                for k, v in cur.iternext():
                    if k[:4] != base:
                        break
                    time_us, prev_vdl, n = _HISTORY.unpack_from(v, 0)
                    truncs = tuple(_TRUNC.unpack_from(v, _HISTORY.size + i * _TRUNC.size)
                                   for i in range(n))
                    out.append((_BE64.unpack_from(k, 4)[0], time_us, prev_vdl, truncs))
        return out

    def volume_bytes(self, volume: str) -> tuple[int, int]:
        """(owned, shared) bytes: the log and versions stored in this volume's own segments,
        and those of its ancestors' segments at or below the fork that it reads."""
        info = self.volume(volume)
        with self.env.begin() as txn:
            owned = self._segment_bytes(txn, info.vol_id, LSN_MAX)
            shared = 0
            child = info
            while child.parent_id:
                parent = self._by_id[child.parent_id]
                shared += self._segment_bytes(txn, parent.vol_id, child.fork_lsn)
                child = parent
        return owned, shared

    def _segment_bytes(self, txn, vol_id: int, upto: int) -> int:
        total = 0
        vol = _BE32.pack(vol_id)
        cur = txn.cursor(db=self.db_log)
        if cur.set_range(vol):
            for k, v in cur.iternext():
                if k[:4] != vol:
                    break
                if _run_key_lsn(k) <= upto:
                    total += len(k) + len(v)
                    continue
                try:
                    run = decode_run(v)
                except CorruptError:
                    continue
                below = bisect.bisect_right(run.lsns, upto)
                if below:  # the records at or below upto, and their share of the rest
                    total += run.ends[below - 1] + (len(k) + run.base) * below // len(run.lsns)
        cur = txn.cursor(db=self.db_versions)
        if cur.set_range(vol):
            for k, v in cur.iternext():
                if k[:4] != vol:
                    break
                if _BE64.unpack_from(k, 12)[0] <= upto:
                    total += len(k) + len(v)
        return total

    def buildable_version(self, volume: str, pg: int, page_id: int, lsn: int):
        """Rebuild a quarantined page version from the local log if it still can be.

        Returns the version bytes (identical to the lost ones, invariant 14) or None if the
        records below it were garbage-collected (then a peer must provide the page).
        """
        key = (volume, pg)
        prefix = self._prefix(volume, pg)
        with self.env.begin() as txn:
            m = self._read_meta(txn, prefix)
            built = self._materialise_upto(txn, key, prefix, m, page_id, lsn)
            # A base version at lsn itself would be the bad one (it is deleted, so not here).
        if built is None or built[0] != lsn:
            return None
        return built[1]


# --- Maintenance on a STOPPED node's data dir (tests, operators) ---------------------------


def list_page_versions(path: str, volume: str, pg: int) -> dict[tuple[int, int], bytes]:
    """Every stored page version of a segment: {(page_id, lsn): bytes}. Node must be stopped."""
    store = Store(path, readonly=True)
    try:
        prefix = store._prefix(volume, pg)
        out = {}
        with store.env.begin() as txn:
            cur = txn.cursor(db=store.db_versions)
            if cur.set_range(prefix):
                for k, v in cur.iternext():
                    if k[:8] != prefix:
                        break
                    out[_PAGE_LSN.unpack_from(k, 8)] = bytes(v)
        return out
    finally:
        store.close()


def list_records(path: str, volume: str, pg: int) -> dict[int, bytes]:
    """Every stored log record of a segment: {lsn: bytes}. Node must be stopped."""
    store = Store(path, readonly=True)
    try:
        prefix = store._prefix(volume, pg)
        out = {}
        with store.env.begin() as txn:
            for lsn, run, i in _records_up(txn.cursor(db=store.db_log), prefix, 0):
                out[lsn] = run.record(i)
        return out
    finally:
        store.close()


def drop_page_versions(path: str, volume: str, pg: int | None = None) -> int:
    """Delete every materialised page version of a volume's segment(s) (all PGs if ``pg``
    is None) in a STOPPED node's data dir; return how many were deleted.

    Page versions are only a cache of log application (invariant 14): the node rebuilds
    them from the log after restart (coalescer) and reads stay byte-identical.
    """
    store = Store(path)
    try:
        info = store.volume(volume)
        pgs = range(info.layout.pg_count) if pg is None else [pg]
        deleted = 0
        with store.env.begin(write=True) as txn:
            for p in pgs:
                prefix = seg_prefix(info.vol_id, p)
                cur = txn.cursor(db=store.db_versions)
                while cur.set_range(prefix) and cur.key()[:8] == prefix:
                    cur.delete()
                    deleted += 1
                m = SegMeta.decode(txn.get(prefix, db=store.db_segments))
                m.n_versions = 0
                txn.put(prefix, m.encode(), db=store.db_segments)
        return deleted
    finally:
        store.close()


def rebuild_page_versions(path: str, volume: str, pg: int, keys: Iterable[tuple[int, int]]) -> dict:
    """Materialise the page versions ``keys`` [(page_id, lsn)] from a STOPPED node's log,
    without storing them: {(page_id, lsn): bytes or None}. Used to check invariant 14."""
    store = Store(path, readonly=True)
    try:
        prefix = store._prefix(volume, pg)
        key = (volume, pg)
        out = {}
        with store.env.begin() as txn:
            m = store._read_meta(txn, prefix)
            for page_id, lsn in keys:
                records, _n = store._page_records(txn, key, prefix, page_id, 0, lsn, m.truncs)
                image = materialiser.apply(None, page_id, records, upto_lsn=lsn)
                out[(page_id, lsn)] = None if image is None else bytes(image)
        return out
    finally:
        store.close()
