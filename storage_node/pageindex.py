"""The page index: which LSNs belong to which page, in ``pageidx`` groups and ``pagedelta`` rows.

The value formats of page-index groups (format 2) and page-index deltas (format 3), and a
mixin of ``storage_node.store.Store`` that writes them inside a write transaction (flush,
fold, merge, unindex) and reads a page's LSNs back. It changes when the way a page's
records are found changes.

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
"""

from __future__ import annotations

import struct

from storage_node.layout import BE32, BE64, IDX_KEY, LOG_KEY, U32

IDX_GROUP_MAX = 512  # LSNs in one page-index group (a 4 KiB value at most)
FOLD_DELTAS_MAX = 16  # page-index deltas one FoldIndexOp folds


def group_of(key: bytes, value) -> bytes:
    """The LSNs of a page-index row, packed u64 BE (a format-1 row holds its key's LSN)."""
    return bytes(value) if value else bytes(key[12:20])


def group_lsns(group: bytes) -> tuple:
    """The LSNs of a packed group as ints, ascending."""
    return struct.unpack(f">{len(group) >> 3}Q", group)


def pack_lsns(lsns) -> bytes:
    return struct.pack(f">{len(lsns)}Q", *lsns)


# --- Page-index deltas: one row per segment per write transaction --------------------------


def encode_delta(pages: dict) -> bytes:
    """A pagedelta value from {page_id: [lsn, ...] ascending} (see "page-index deltas")."""
    head = [len(pages)]
    lsns: list = []
    for page_id, page_lsns in pages.items():
        head += (page_id, len(page_lsns))
        lsns += page_lsns
    return struct.pack(f"<{len(head)}I{len(lsns)}Q", *head, *lsns)


def delta_sections(value):
    """Yield (page_id, offset of its LSNs, count) of a pagedelta value."""
    n = U32.unpack_from(value, 0)[0]
    head = struct.unpack_from(f"<{2 * n}I", value, 4)
    off = 4 + 8 * n
    for i in range(0, 2 * n, 2):
        yield head[i], off, head[i + 1]
        off += 8 * head[i + 1]


def delta_page_lsns(value, page_id: int) -> tuple:
    """The LSNs a pagedelta value lists for one page (ascending; () if none)."""
    for pid, off, count in delta_sections(value):
        if pid == page_id:
            return struct.unpack_from(f"<{count}Q", value, off)
    return ()


def decode_delta(value) -> dict:
    """{page_id: (lsn, ...)} of a pagedelta value."""
    return {pid: struct.unpack_from(f"<{count}Q", value, off)
            for pid, off, count in delta_sections(value)}


class PageIndex:
    """Page-index writes inside ``Store.apply_ops`` and page-index reads (mixin of Store)."""

    def _flush_index(self, ctx) -> None:
        """Write the page-index groups of the appends run so far in this transaction."""
        for key, (prefix, floor, pages, order) in ctx.idx_pending.items():
            if order[0]:  # the usual case: one delta row, not one row per page
                value = encode_delta(pages)
                ctx.txn.put(prefix + BE64.pack(order[1]), value, db=self.db_pagedelta)
                ctx.bytes_written += len(value) + LOG_KEY.size
                ctx.deltas[key] = ctx.deltas.get(key, self._deltas.get(key, 0)) + 1
            else:  # a retransmit or hole fill: merge into the page rows, deltas folded first
                self._fold_deltas(ctx, key, prefix)
                self._put_index(ctx, prefix, floor, pages)
        ctx.idx_pending.clear()

    def _fold_deltas(self, ctx, key: tuple, prefix: bytes, limit: int = 0) -> int:
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

    def _put_index(self, ctx, prefix: bytes, floor: int, pages: dict,
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
            base = prefix + BE32.pack(page_id)
            if lsns[0] <= floor:  # may overlap stored groups: merge them in
                merged = set(lsns)
                old = []
                if cur.set_range(base + BE64.pack(lsns[0])):
                    for k, v in cur.iternext():
                        if k[:12] != base:
                            break
                        group = group_of(k, v)
                        if BE64.unpack_from(group)[0] > lsns[-1]:
                            break  # groups are disjoint and ordered: no later one overlaps
                        old.append(bytes(k))
                        merged.update(group_lsns(group))
                for k in old:
                    ctx.txn.delete(k, db=self.db_pageidx)
                lsns = sorted(merged)
            for i in range(0, len(lsns), IDX_GROUP_MAX):
                chunk = lsns[i:i + IDX_GROUP_MAX]
                puts.append((base + BE64.pack(chunk[-1]), pack_lsns(chunk)))
        cur.putmulti(puts)
        ctx.bytes_written += len(puts) * IDX_KEY.size

    def _unindex(self, ctx, prefix: bytes, page_id: int, dels: set) -> None:
        """Remove LSNs ``dels`` of one page from its page-index groups (GC)."""
        cur = ctx.idx_cur
        base = prefix + BE32.pack(page_id)
        lo, hi = min(dels), max(dels)
        rows = []
        if cur.set_range(base + BE64.pack(lo)):
            for k, v in cur.iternext():
                if k[:12] != base:
                    break
                group = group_of(k, v)
                if BE64.unpack_from(group)[0] > hi:
                    break
                rows.append((bytes(k), group_lsns(group)))
        for k, lsns in rows:
            keep = [lsn for lsn in lsns if lsn not in dels]
            if len(keep) == len(lsns):
                continue
            ctx.txn.delete(k, db=self.db_pageidx)
            if keep:
                ctx.txn.put(base + BE64.pack(keep[-1]), pack_lsns(keep), db=self.db_pageidx)

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
            out.extend(lsn for lsn in group_lsns(group_of(k, cur.value())) if low < lsn <= high)
            ok = cur.next()
        for _last, delta in self._delta_rows(txn, prefix):
            for lsns in delta.values():
                out.extend(lsn for lsn in lsns if low < lsn <= high)
        return sorted(set(out))

    def _page_lsns(self, txn, prefix: bytes, page_id: int, after: int, upto: int) -> list[int]:
        """The LSNs in (after, upto] the page index lists for a page, ascending: its
        groups, then the segment's deltas (whose LSNs are above every group's)."""
        out: list[int] = []
        if after >= upto:
            return out
        cur = txn.cursor(db=self.db_pageidx)
        base = prefix + BE32.pack(page_id)
        if cur.set_range(base + BE64.pack(after + 1)):
            for k, v in cur.iternext():
                if k[:12] != base:
                    break
                lsns = group_lsns(group_of(k, v))
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
        if not cur.set_range(prefix + BE64.pack(after + 1)):
            return out
        for k, v in cur.iternext():  # deltas cover disjoint, ascending LSN ranges
            if k[:8] != prefix:
                break
            lsns = delta_page_lsns(v, page_id)
            out.extend(lsn for lsn in lsns if after < lsn <= upto)
            if BE64.unpack_from(k, 8)[0] >= upto:
                break
        return out

    def _delta_rows(self, txn, prefix: bytes):
        """Yield (last lsn, {page_id: lsns}) of each page-index delta of a segment, ascending."""
        cur = txn.cursor(db=self.db_pagedelta)
        if cur.set_range(prefix):
            for k, v in cur.iternext():
                if k[:8] != prefix:
                    return
                yield BE64.unpack_from(k, 8)[0], decode_delta(v)
