"""B+tree tables on slotted pages, changed only through redo records.

Layout (engine/format/page.py has the byte formats)::

    page 0  META      catalog cells: table name (UTF-8) -> u32 root page id
                      aux0 = next_page_id (allocator high-water mark), aux1/aux2 = last COMMIT
    INTERNAL          leftmost_child + cells (separator key -> u32 child), sorted by key:
                      child of cell i holds keys >= key i and < key i+1
    LEAF              cells (key -> value) sorted by key, right_sibling = next leaf

             META: "users" -> 7
                        |
                 [7: INTERNAL  lm=3 | "m"->9 ]
                   /                    \\
        [3: LEAF a..l] --right_sibling--> [9: LEAF m..z] --> 0

Reads (``get``, ``scan``) take a page source with ``async load(page_id)`` (the database's
read view over the buffer pool). Writes (``create_table``, ``put``, ``delete``) take an
MtrPlan (engine/db/mtr.py) and express every change as a planned redo record; the MTR emits
them later. Nothing here touches a page's bytes directly.

A write changes one leaf if the cell fits (``engine.format.page.free_bytes`` is checked first, so
a record never raises PageFullError when applied). Otherwise the page splits, in this
record order::

    new page      SET_AUX(META, next_page_id + 1), INIT_PAGE, INSERT_CELLS(right half),
                  SET_SIBLING(old right sibling)                 (leaf)
                  SET_CHILD(child of the middle cell), INSERT_CELLS  (internal)
    split page    TRUNCATE_CELLS(first changed slot), INSERT_CELLS(rest of the left half),
                  SET_SIBLING(new page)                          (leaf)
    parent        INSERT_CELL(separator -> new page), splitting in turn if it is full
    root split    new root: INIT_PAGE, SET_CHILD(old root), INSERT_CELL(separator -> new);
                  catalog: UPDATE_CELL(table -> new root) on META

Split point: the one that best balances the two halves' bytes. With every cell (slot
included) at most a quarter of a page's cell area, each half of an overflowing page is
below 7/8 of a page, so one split per level always makes room (asserted).

Size limits: KEY_MAX = 512 and VALUE_MAX = 1500 bytes, so a leaf cell plus its slot is at
most 2018 bytes <= (8192 - 64) / 4: a leaf holds >= 4 cells, an internal page >= 15
(separator 512 + child 4 + cell header 4 + slot 2 = 522 bytes). Larger keys or values raise
TooLargeError. Table names are 1..TABLE_NAME_MAX = 64 UTF-8 bytes; the catalog lives in the
META page alone, so about a hundred tables fit (TooLargeError past that).

Deliberately absent: pages are never merged or freed. A delete removes the cell and may
leave a leaf under-full or empty; empty leaves stay linked (scans step over them) and
separators stay in their parents. Removing an empty leaf needs its left sibling, which can
sit under another parent, to relink the leaf chain; that is not cheap, so it is not done.
There is no DROP TABLE.
"""

from __future__ import annotations

import struct
from typing import Protocol

from engine.format import page as pagefmt
from engine.errors import TableExistsError, TableNotFound, TooLargeError
from engine.db.mtr import MtrPlan
from engine.format.page import PageType
from engine.format.redo import (
    RecordType as RT,
    p_delete_cell,
    p_init_page,
    p_insert_cell,
    p_insert_cells,
    p_set_aux,
    p_set_child,
    p_set_sibling,
    p_truncate_cells,
    p_update_cell,
)

KEY_MAX = 512           # bytes in a key
VALUE_MAX = 1500        # bytes in a value
TABLE_NAME_MAX = 64     # UTF-8 bytes in a table name
CELL_AREA_BYTES = pagefmt.PAGE_SIZE - pagefmt.PAGE_HEADER_SIZE   # room for slots + cells
LEAF_FOOTPRINT_MAX = pagefmt.SLOT_SIZE + pagefmt.cell_size(KEY_MAX, VALUE_MAX)
INTERNAL_FOOTPRINT_MAX = pagefmt.SLOT_SIZE + pagefmt.cell_size(KEY_MAX, 4)
# A quarter page per cell: any overflowing page splits into two halves that fit, and the
# fan-out is >= 4 for leaves and >= 15 for internal pages.
assert 4 * LEAF_FOOTPRINT_MAX <= CELL_AREA_BYTES
assert 4 * INTERNAL_FOOTPRINT_MAX <= CELL_AREA_BYTES
assert 4 * (pagefmt.SLOT_SIZE + pagefmt.cell_size(TABLE_NAME_MAX, 4)) <= CELL_AREA_BYTES
#: Highest page id the u32 pointers can name.
PAGE_ID_MAX = (1 << 32) - 1

_U32 = struct.Struct("<I")


class PageSource(Protocol):
    """Where reads get pages: a read view over the buffer pool, or an MtrPlan."""

    async def load(self, page_id: int) -> bytearray | None: ...


# --- Checks ------------------------------------------------------------------------------


def check_key(key) -> bytes:
    """``key`` as bytes; TooLargeError past KEY_MAX, TypeError if not bytes-like."""
    if isinstance(key, str):
        raise TypeError("keys are bytes, not str")
    key = bytes(key)
    if len(key) > KEY_MAX:
        raise TooLargeError(f"key of {len(key)} bytes exceeds KEY_MAX = {KEY_MAX} bytes")
    return key


def check_value(value) -> bytes:
    """``value`` as bytes; TooLargeError past VALUE_MAX, TypeError if not bytes-like."""
    if isinstance(value, str):
        raise TypeError("values are bytes, not str")
    value = bytes(value)
    if len(value) > VALUE_MAX:
        raise TooLargeError(f"value of {len(value)} bytes exceeds VALUE_MAX = {VALUE_MAX} bytes")
    return value


def table_key(name: str) -> bytes:
    """A table name as its catalog key; TooLargeError past TABLE_NAME_MAX."""
    if not isinstance(name, str):
        raise TypeError("table names are str")
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= TABLE_NAME_MAX:
        raise TooLargeError(
            f"table name of {len(raw)} bytes: must be 1..TABLE_NAME_MAX = {TABLE_NAME_MAX} UTF-8 bytes")
    return raw


def _footprint(key: bytes, value: bytes) -> int:
    """Bytes a cell takes in a page, its slot included."""
    return pagefmt.SLOT_SIZE + pagefmt.cell_size(len(key), len(value))


def _u32(value: int) -> bytes:
    return _U32.pack(value)


# --- Catalog (META page cells) -----------------------------------------------------------


def catalog_root(meta, name: bytes) -> int | None:
    """Root page id of table ``name`` (catalog key), or None."""
    assert pagefmt.page_type(meta) == PageType.META
    found, slot = pagefmt.search(meta, name)
    if not found:
        return None
    return _U32.unpack(pagefmt.cell(meta, slot)[1])[0]


def table_names(meta) -> list[str]:
    return [k.decode("utf-8") for k, _ in pagefmt.cells(meta)]


def _root_or_raise(meta, name: bytes) -> int:
    root = catalog_root(meta, name)
    if root is None:
        raise TableNotFound(f"no table named {name.decode('utf-8')!r}")
    return root


# --- Reads -------------------------------------------------------------------------------


async def _load(src: PageSource, page_id: int) -> bytearray:
    page = await src.load(page_id)
    assert page is not None, f"B+tree points at page {page_id}, which storage does not have"
    return page


async def _leaf_for(src: PageSource, root: int, key: bytes) -> bytearray:
    page = await _load(src, root)
    while pagefmt.page_type(page) == PageType.INTERNAL:
        page = await _load(src, pagefmt.child_for(page, key))
    assert pagefmt.page_type(page) == PageType.LEAF, f"page {pagefmt.page_id(page)} is not a B+tree page"
    return page


async def get(src: PageSource, root: int, key: bytes) -> bytes | None:
    """The value of ``key`` in the tree rooted at ``root``, or None."""
    leaf = await _leaf_for(src, root, key)
    found, slot = pagefmt.search(leaf, key)
    return pagefmt.cell(leaf, slot)[1] if found else None


async def scan(src: PageSource, root: int, start: bytes | None, end: bytes | None,
               limit: int) -> list[tuple[bytes, bytes]]:
    """Up to ``limit`` (key, value) with start <= key < end, in key order (None: unbounded)."""
    out: list[tuple[bytes, bytes]] = []
    if limit <= 0:
        return out
    leaf = await _leaf_for(src, root, start if start is not None else b"")
    slot = pagefmt.search(leaf, start)[1] if start is not None else 0
    while True:
        for i in range(slot, pagefmt.cell_count(leaf)):
            key, value = pagefmt.cell(leaf, i)
            if end is not None and key >= end:
                return out
            out.append((key, value))
            if len(out) >= limit:
                return out
        sibling = pagefmt.right_sibling(leaf)
        if sibling == pagefmt.NO_PAGE:
            return out
        leaf = await _load(src, sibling)
        assert pagefmt.page_type(leaf) == PageType.LEAF
        slot = 0


# --- Writes (planned into an MTR) --------------------------------------------------------


def _allocate_page(plan: MtrPlan) -> int:
    """A never-used page id from META aux0 (planned SET_AUX)."""
    meta = plan.page(pagefmt.META_PAGE_ID)
    page_id = pagefmt.aux(meta, 0)
    assert page_id >= 1, "META aux0 (next_page_id) must start at 1"
    if page_id > PAGE_ID_MAX:
        raise TooLargeError("volume full: page ids are u32")
    limit = plan.page_limit()
    if limit is not None and page_id >= limit:
        # Growth's maximum PG count (engine/format/volume.py): refused while planning, so
        # nothing of this MTR was applied or shipped; everything committed stays.
        raise TooLargeError(f"volume full: it has reached its maximum size ({limit} pages, "
                            f"{limit * pagefmt.PAGE_SIZE // (1024 * 1024)} MiB: the maximum PG "
                            f"count); nothing of this request was written")
    plan.change(pagefmt.META_PAGE_ID, RT.SET_AUX, p_set_aux(0, page_id + 1))
    return page_id


async def create_table(plan: MtrPlan, name: bytes) -> int:
    """Plan a new empty table (an empty root leaf plus a catalog cell); returns the root."""
    meta = plan.page(pagefmt.META_PAGE_ID)
    found, slot = pagefmt.search(meta, name)
    if found:
        raise TableExistsError(f"table {name.decode('utf-8')!r} already exists")
    if pagefmt.free_bytes(meta) < _footprint(name, b"\0" * 4):
        raise TooLargeError("catalog full: the META page holds no more tables")
    root = _allocate_page(plan)
    plan.change(root, RT.INIT_PAGE, p_init_page(PageType.LEAF))
    plan.change(pagefmt.META_PAGE_ID, RT.INSERT_CELL, p_insert_cell(slot, name, _u32(root)))
    plan.catalog_changed = True
    return root


async def _descend(plan: MtrPlan, name: bytes, key: bytes) -> tuple[list[int], int]:
    """(ids of the internal pages from the root down, leaf id) for ``key``; all pinned."""
    page_id = _root_or_raise(plan.page(pagefmt.META_PAGE_ID), name)
    path: list[int] = []
    page = await _load(plan, page_id)
    while pagefmt.page_type(page) == PageType.INTERNAL:
        path.append(page_id)
        page_id = pagefmt.child_for(page, key)
        page = await _load(plan, page_id)
    assert pagefmt.page_type(page) == PageType.LEAF
    return path, page_id


async def put(plan: MtrPlan, name: bytes, key: bytes, value: bytes) -> None:
    """Plan insert-or-update of ``key`` in table ``name`` (sizes already checked)."""
    path, leaf_id = await _descend(plan, name, key)
    leaf = plan.page(leaf_id)
    found, slot = pagefmt.search(leaf, key)
    if found:
        old_value = pagefmt.cell(leaf, slot)[1]
        if old_value == value:
            return
        if pagefmt.free_bytes(leaf) + pagefmt.cell_size(len(key), len(old_value)) >= \
                pagefmt.cell_size(len(key), len(value)):
            plan.change(leaf_id, RT.UPDATE_CELL, p_update_cell(slot, key, value))
            return
        target = pagefmt.cells(leaf)
        target[slot] = (key, value)
    else:
        if pagefmt.free_bytes(leaf) >= _footprint(key, value):
            plan.change(leaf_id, RT.INSERT_CELL, p_insert_cell(slot, key, value))
            return
        target = pagefmt.cells(leaf)
        target.insert(slot, (key, value))
    _split_leaf(plan, name, path, leaf_id, target)


async def delete(plan: MtrPlan, name: bytes, key: bytes) -> bool:
    """Plan removal of ``key`` from table ``name``; False (and no record) if absent."""
    _path, leaf_id = await _descend(plan, name, key)
    found, slot = pagefmt.search(plan.page(leaf_id), key)
    if found:
        plan.change(leaf_id, RT.DELETE_CELL, p_delete_cell(slot))
    return found


def _split_point(footprints: list[int], internal: bool) -> int:
    """Index m that best balances the halves: leaf [:m] | [m:], internal [:m] | m | [m+1:]."""
    n = len(footprints)
    total = sum(footprints)
    best_m, best = -1, None
    left = 0
    for m in range(1, n - 1 if internal else n):
        left += footprints[m - 1]
        right = total - left - (footprints[m] if internal else 0)
        worst = max(left, right)
        if best is None or worst < best:
            best_m, best = m, worst
    assert best is not None and best <= CELL_AREA_BYTES, (
        f"split of {n} cells ({total} bytes) leaves a half of {best} bytes")
    return best_m


def _rewrite(plan: MtrPlan, page_id: int, target: list[tuple[bytes, bytes]]) -> None:
    """Plan records that make the page's cells equal ``target``: truncate where the two
    first differ, then bulk-insert the rest."""
    current = pagefmt.cells(plan.page(page_id))
    same = 0
    limit = min(len(current), len(target))
    while same < limit and current[same] == target[same]:
        same += 1
    if same < len(current):
        plan.change(page_id, RT.TRUNCATE_CELLS, p_truncate_cells(same))
    if same < len(target):
        rest = target[same:]
        assert pagefmt.free_bytes(plan.page(page_id)) >= sum(_footprint(k, v) for k, v in rest)
        plan.change(page_id, RT.INSERT_CELLS, p_insert_cells(same, rest))


def _split_leaf(plan: MtrPlan, name: bytes, path: list[int], leaf_id: int,
                target: list[tuple[bytes, bytes]]) -> None:
    """Plan the split of a leaf whose new contents ``target`` do not fit in one page."""
    m = _split_point([_footprint(k, v) for k, v in target], internal=False)
    left, right = target[:m], target[m:]
    old_sibling = pagefmt.right_sibling(plan.page(leaf_id))
    new_id = _allocate_page(plan)
    plan.change(new_id, RT.INIT_PAGE, p_init_page(PageType.LEAF))
    plan.change(new_id, RT.INSERT_CELLS, p_insert_cells(0, right))
    if old_sibling != pagefmt.NO_PAGE:
        plan.change(new_id, RT.SET_SIBLING, p_set_sibling(old_sibling))
    _rewrite(plan, leaf_id, left)
    plan.change(leaf_id, RT.SET_SIBLING, p_set_sibling(new_id))
    _insert_separator(plan, name, path, leaf_id, right[0][0], new_id)


def _insert_separator(plan: MtrPlan, name: bytes, path: list[int], split_id: int,
                      sep: bytes, new_id: int) -> None:
    """Plan adding (sep -> new_id) to the parent of ``split_id`` (path[-1]), splitting
    upward as needed; a split root gets a new root and a catalog update."""
    child = _u32(new_id)
    if not path:
        root_id = _allocate_page(plan)
        plan.change(root_id, RT.INIT_PAGE, p_init_page(PageType.INTERNAL))
        plan.change(root_id, RT.SET_CHILD, p_set_child(split_id))
        plan.change(root_id, RT.INSERT_CELL, p_insert_cell(0, sep, child))
        meta = plan.page(pagefmt.META_PAGE_ID)
        found, slot = pagefmt.search(meta, name)
        assert found and _U32.unpack(pagefmt.cell(meta, slot)[1])[0] == split_id
        plan.change(pagefmt.META_PAGE_ID, RT.UPDATE_CELL, p_update_cell(slot, name, _u32(root_id)))
        plan.catalog_changed = True
        return
    parent_id = path[-1]
    parent = plan.page(parent_id)
    found, slot = pagefmt.search(parent, sep)
    assert not found, f"separator already in page {parent_id}"
    if pagefmt.free_bytes(parent) >= _footprint(sep, child):
        plan.change(parent_id, RT.INSERT_CELL, p_insert_cell(slot, sep, child))
        return
    target = pagefmt.cells(parent)
    target.insert(slot, (sep, child))
    m = _split_point([_footprint(k, v) for k, v in target], internal=True)
    left, (mid_key, mid_child), right = target[:m], target[m], target[m + 1:]
    sibling_id = _allocate_page(plan)
    plan.change(sibling_id, RT.INIT_PAGE, p_init_page(PageType.INTERNAL))
    plan.change(sibling_id, RT.SET_CHILD, p_set_child(_U32.unpack(mid_child)[0]))
    if right:
        plan.change(sibling_id, RT.INSERT_CELLS, p_insert_cells(0, right))
    _rewrite(plan, parent_id, left)
    _insert_separator(plan, name, path[:-1], parent_id, mid_key, sibling_id)


# --- Introspection (tests, docs) ---------------------------------------------------------


async def height(src: PageSource, root: int) -> int:
    """Levels from the root to the leaves (1 = the root is a leaf)."""
    levels = 1
    page = await _load(src, root)
    while pagefmt.page_type(page) == PageType.INTERNAL:
        levels += 1
        page = await _load(src, pagefmt.leftmost_child(page))
    return levels
