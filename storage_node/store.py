"""The durable state of a storage node: one LMDB environment holding many segments.

A *segment* is one protection group's (PG's) copy on this node: the PG's redo log records,
the page versions materialised from them, and a little metadata. A node holds the
segments of several volumes (one per PG of each volume). The store owns every durable
state transition; it does no networking and imports no grpc. The rpc layer
(storage_node/service.py) and the background tasks call it; every write goes through
``Store.apply_ops``, which runs a list of operations in ONE LMDB write transaction (the
group commit of storage_node/commit.py) and returns after the sync commit (invariant 3).

This module is the facade: ``Store`` opens the environment, loads the in-memory mirrors
of the metadata (volumes, segments, quarantine, dirty counts) and composes one mixin per
concern. Each concern has its own module, which says at its top what it implements:

    storage_node/layout.py      the LMDB layout table: keys, metadata rows, FORMAT,
                                truncation-set helpers
    storage_node/runs.py        log runs: one ``log`` value per stored batch, cursor walks
    storage_node/pageindex.py   the page index: per-page groups and per-transaction deltas
    storage_node/ops.py         the write operations (AppendOp, ...) and verification of
                                incoming and stored bytes
    storage_node/writes.py      ``apply_ops`` and what each op does to LMDB
    storage_node/chain.py       the SCL walk (invariant 4) and truncation-set changes
    storage_node/reads.py       page materialisation (ReadPage), record and state reads
    storage_node/plans.py       background plans: coalesce, GC (invariant 12), scrub
    storage_node/timetravel.py  COMMIT lookup by time, timelines, a clone's shared bytes
    storage_node/upgrade.py     opening data dirs of older layout formats

Names callers use are re-exported here (``from storage_node.store import Store, AppendOp``).
The functions at the end work on a STOPPED node's data dir (tests, operators).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Iterable

import lmdb

from engine import materialiser
from storage_node.chain import Chain
from storage_node.errors import (
    EpochAheadError, MalformedError, StaleEpochError, StaleMembershipError, UnknownSegmentError,
    UnknownVolumeError)
from storage_node.layout import (
    BE64, FORMAT, KIND_RECORD, KIND_RUN, KIND_VERSION, MAX_DBS, PAGE_LSN, PAGE_SIZE, SEG, U32,
    SegMeta, VolumeInfo, lowest_difference, log_key, page_key, seg_prefix)
from storage_node.ops import (
    AdoptEpochOp, AdoptMembershipOp, AppendOp, HydrateOp, BatchScan, CreateVolumeOp, DropVolumeOp, FoldIndexOp, GcStepOp,
    PutVersionsOp, QuarantineOp, SetGcHorizonOp, TruncateOp, VerifiedBatch, verify_and_prepare,
    verify_stored_page, verify_stored_record)
from storage_node.pageindex import (
    FOLD_DELTAS_MAX, IDX_GROUP_MAX, PageIndex, decode_delta, delta_page_lsns, encode_delta)
from storage_node.plans import Plans
from storage_node.reads import FETCH_BYTES_DEFAULT, FETCH_BYTES_MAX, STATE_RECORDS_MAX, Reads
from storage_node.runs import (
    RUN_CHAINED, RUN_HEAD_SIZE, RUN_RECORDS_MAX, LogRuns, Run, decode_run, encode_run,
    records_up, run_from_records)
from storage_node.timetravel import TimeTravelReads
from storage_node.upgrade import upgrade_in_place
from storage_node.writes import Writes

__all__ = [
    "Store", "DEFAULT_MAP_SIZE", "SUSPECTS_MAX",
    # re-exported for callers of this module
    "FORMAT", "KIND_RECORD", "KIND_RUN", "KIND_VERSION", "PAGE_SIZE", "SegMeta", "VolumeInfo",
    "lowest_difference", "log_key", "page_key", "seg_prefix",
    "AdoptEpochOp", "AdoptMembershipOp", "AppendOp", "HydrateOp", "BatchScan", "CreateVolumeOp", "DropVolumeOp", "FoldIndexOp",
    "GcStepOp", "PutVersionsOp", "QuarantineOp", "SetGcHorizonOp", "TruncateOp",
    "VerifiedBatch", "verify_and_prepare", "verify_stored_page", "verify_stored_record",
    "FOLD_DELTAS_MAX", "IDX_GROUP_MAX", "decode_delta", "delta_page_lsns", "encode_delta",
    "FETCH_BYTES_DEFAULT", "FETCH_BYTES_MAX", "STATE_RECORDS_MAX",
    "RUN_CHAINED", "RUN_HEAD_SIZE", "RUN_RECORDS_MAX", "Run", "decode_run", "encode_run",
    "run_from_records",
    "list_page_versions", "list_records", "drop_page_versions", "rebuild_page_versions",
]

DEFAULT_MAP_SIZE = 16 << 30  # sparse on Linux: the file grows only as pages are used
SUSPECTS_MAX = 4096  # bad bytes reported by reads and not yet taken by the scrubber

log = logging.getLogger(__name__)


class Store(Writes, Chain, LogRuns, PageIndex, Reads, Plans, TimeTravelReads):
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
        #: A random id made when this data dir was created (NodeStatus.incarnation): a node
        #: that comes back with another one was wiped (docs/membership.md).
        self.incarnation = ""
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
                txn.put(b"format", U32.pack(FORMAT))
                txn.put(b"next_vol_id", U32.pack(1))
            elif self.node_id and stored.decode() != self.node_id:
                raise RuntimeError(
                    f"data dir {self.path} belongs to node {stored.decode()!r}, not {self.node_id!r}")
            incarnation = txn.get(b"incarnation")
            if incarnation is None:   # a new data dir (or one from before membership epochs)
                incarnation = os.urandom(8).hex().encode()
                txn.put(b"incarnation", incarnation)
            self.incarnation = bytes(incarnation).decode()
            upgrade_in_place(txn, self.db_log, self.path, self.log)

    def _load(self) -> None:
        with self.env.begin() as txn:
            for name, value in txn.cursor(db=self.db_volumes):
                info = VolumeInfo.decode(name.decode(), value)
                self._volumes[info.name] = info
                self._by_id[info.vol_id] = info
            for key, value in txn.cursor(db=self.db_segments):
                vol_id, pg = SEG.unpack(key)
                seg = (self._by_id[vol_id].name, pg)
                self._segs[seg] = SegMeta.decode(value)
                self._quar_records[seg] = frozenset()
                self._quar_versions[seg] = frozenset()
                self._dirty[seg] = {}
                self.needs_sweep.add(seg)
            for key in txn.cursor(db=self.db_pagedelta).iternext(keys=True, values=False):
                seg = (self._by_id[SEG.unpack(key[:8])[0]].name, SEG.unpack(key[:8])[1])
                self._deltas[seg] = self._deltas.get(seg, 0) + 1
            for key, _value in txn.cursor(db=self.db_quarantine):
                vol_id, pg = SEG.unpack(key[:8])
                seg = (self._by_id[vol_id].name, pg)
                if key[8:9] == KIND_RECORD:
                    self._quar_records[seg] |= {BE64.unpack(key[9:17])[0]}
                else:
                    self._quar_versions[seg] |= {PAGE_LSN.unpack(key[9:21])}
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
        if (volume, pg) not in self._segs:
            raise UnknownSegmentError(f"PG {pg} of volume {volume!r} is not placed on this node")
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


    # Epoch rules (invariant 9, invariant 16) ----------------------------------------------

    @staticmethod
    def _check_membership(m: SegMeta, membership_epoch: int, what: str, key: tuple) -> None:
        """Invariant 16: a request with a membership epoch below the segment's is refused
        (STALE_MEMBERSHIP); 0 means the caller has no membership view (a peer, a tool)."""
        if membership_epoch and membership_epoch < m.membership_epoch:
            raise StaleMembershipError(
                f"{what}: membership epoch {membership_epoch} of {key[0]}/{key[1]} is stale; the "
                f"segment is at membership epoch {m.membership_epoch} (the PG changed members: "
                f"fetch its membership from the control plane)", m.membership_epoch)

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
                    out[PAGE_LSN.unpack_from(k, 8)] = bytes(v)
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
            for lsn, run, i in records_up(txn.cursor(db=store.db_log), prefix, 0):
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
        pgs = sorted(p for v, p in store._segs if v == volume) if pg is None else [pg]
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
