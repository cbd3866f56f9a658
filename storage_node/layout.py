"""The LMDB layout of a storage node: its databases, key encodings and row encodings.

This module owns the bytes of every key and every metadata row (``node``, ``volumes``,
``segments``, ``history`` and ``quarantine``) and the truncation-set helpers that read the
ranges kept in a ``segments`` row. The value formats of the ``log`` database (log runs) are
in storage_node/runs.py, those of ``pageidx`` and ``pagedelta`` in storage_node/pageindex.py.
It changes when the on-disk layout changes (then FORMAT changes too, and
storage_node/upgrade.py learns to upgrade the old one).

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
                                                        (a clone only; none otherwise)
                                                  +0 4  pg_pages       growth (optional: a
                                                  +4 4  stripe_width   row without is 0, 0)
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
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from engine.format import page as pagefmt
from engine.format.volume import VolumeLayout

FORMAT = 3  # 3: one log value per run of records; 2: grouped page index rows. Format 1
#              and 2 dirs open and are upgraded in place; older code refuses 3.
MAX_DBS = 16  # named databases (the table above has 9)
PAGE_SIZE = pagefmt.PAGE_SIZE

SEG = struct.Struct(">II")
BE64 = struct.Struct(">Q")
BE32 = struct.Struct(">I")
LOG_KEY = struct.Struct(">8sQ")
IDX_KEY = struct.Struct(">8sIQ")
PAGE_LSN = struct.Struct(">IQ")
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
VOLUME = struct.Struct("<IIIQ")
VOLUME_CLONE = struct.Struct("<IQBI")
GROWTH = struct.Struct("<II")      # volumes row, optional tail: pg_pages, stripe_width
HISTORY = struct.Struct("<QQI")
META = struct.Struct("<QQQQQQQQQQQI")
TRUNC = struct.Struct("<QQQ")
# Record header fields read straight from stored bytes (see engine/format/redo.py).
REC_PREV_VOL = 8
REC_PREV_PG = 16
REC_PAGE = 32
REC_TYPE = 36
REC_FLAGS = 37
RTYPE_COMMIT = 10  # engine.format.redo.RecordType.COMMIT; its payload is u64 txn_id, u64 timestamp_us

KIND_RECORD = b"R"
KIND_VERSION = b"V"
KIND_RUN = b"S"  # a suspect only (never a quarantine row): a log run whose directory is bad


def seg_prefix(vol_id: int, pg: int) -> bytes:
    """The 8-byte key prefix of a segment."""
    return SEG.pack(vol_id, pg)


def log_key(prefix: bytes, lsn: int) -> bytes:
    return prefix + BE64.pack(lsn)


def page_key(prefix: bytes, page_id: int, lsn: int) -> bytes:
    """Key of a pageidx or versions row."""
    return prefix + PAGE_LSN.pack(page_id, lsn)


def trunc_epoch(truncs) -> int:
    """The epoch a truncation set was recorded at: the highest of its ranges'."""
    return max((t[2] for t in truncs), default=0)


def unpack_truncs(buf, offset: int) -> tuple:
    n = U32.unpack_from(buf, offset)[0]
    return tuple(TRUNC.unpack_from(buf, offset + 4 + i * TRUNC.size) for i in range(n))


def lowest_difference(old, new) -> int | None:
    """The lowest LSN whose visibility may differ between two truncation sets (the start
    of the lowest range in one but not the other); None if they hide the same LSNs."""
    a = {(s, e) for s, e, _ in old}
    b = {(s, e) for s, e, _ in new}
    diff = a ^ b
    return min(s for s, _e in diff) if diff else None


def overlaps_truncation(first: int, last: int, truncs) -> bool:
    """True if a truncation range hides any LSN in [first, last]."""
    for start, end, _epoch in truncs:
        if start < last and end >= first:
            return True
    return False


def range_of(lsn: int, truncs):
    """The (start, end, epoch) range hiding ``lsn``, or None."""
    for t in truncs:
        if t[0] < lsn <= t[1]:
            return t
    return None


def in_truncation(lsn: int, truncs) -> bool:
    for start, end, _epoch in truncs:
        if start < lsn <= end:
            return True
    return False


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
        return (VOLUME.pack(self.vol_id, self.layout.pg_count, self.layout.stripe_pages,
                             self.created_epoch)
                + VOLUME_CLONE.pack(self.parent_id, self.fork_lsn, int(self.dropped),
                                     len(self.inherited))
                + b"".join(TRUNC.pack(*t) for t in self.inherited)
                + b"".join(U64.pack(t) for t in self.fork_tails)
                + (GROWTH.pack(self.layout.pg_pages, self.layout.stripe_width)
                   if self.layout.grows else b""))

    @classmethod
    def decode(cls, name: str, value: bytes) -> "VolumeInfo":
        vol_id, pg_count, stripe, created = VOLUME.unpack_from(value, 0)
        parent_id = fork_lsn = dropped = pg_pages = width = 0
        inherited: tuple = ()
        tails: tuple = ()
        if len(value) > VOLUME.size:
            parent_id, fork_lsn, dropped, n = VOLUME_CLONE.unpack_from(value, VOLUME.size)
            inherited = unpack_truncs(value, VOLUME.size + VOLUME_CLONE.size - 4)
            off = VOLUME.size + VOLUME_CLONE.size + n * TRUNC.size
            # A clone has one fork tail per PG; rows written before growth end here.
            n_tails = pg_count if parent_id else 0
            n_tails = min(n_tails, (len(value) - off) // 8)
            tails = tuple(U64.unpack_from(value, off + 8 * i)[0] for i in range(n_tails))
            off += 8 * n_tails
            if len(value) - off >= GROWTH.size:
                pg_pages, width = GROWTH.unpack_from(value, off)
        return cls(name, vol_id, VolumeLayout(pg_count, stripe, pg_pages, width), created,
                   parent_id, fork_lsn, bool(dropped), inherited, tails)


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
        head = META.pack(self.scl, self.volume_epoch, self.membership_epoch, self.writer_vdl,
                          self.gc_horizon, self.max_lsn, self.gc_done, self.log_floor,
                          self.n_records, self.n_versions, self.generation, len(self.truncs))
        return head + b"".join(TRUNC.pack(*t) for t in self.truncs)

    @classmethod
    def decode(cls, buf: bytes) -> "SegMeta":
        fields = META.unpack_from(buf, 0)
        n = fields[-1]
        truncs = tuple(TRUNC.unpack_from(buf, META.size + i * TRUNC.size) for i in range(n))
        assert len(buf) == META.size + n * TRUNC.size, "segments row has a bad length"
        return cls(*fields[:-1], truncs=truncs)

    def copy(self) -> "SegMeta":
        return replace(self)

