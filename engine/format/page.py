"""The page format: fixed-size slotted pages for B+tree leaves, internal nodes and the meta page.

Pages are PAGE_SIZE = 8192 bytes (8 KiB: big enough for a useful
fan-out, small enough that the materialiser's copy-on-apply stays cheap). Pages are never
written by the writer (invariant 1): storage builds them by applying redo records, and the
writer's buffer pool changes its cached copies with the very same apply code.

Page header (PAGE_HEADER_SIZE = 64 bytes); integers are little-endian::

    OFFSET  SIZE  MEANING
    0       4     checksum       CRC32 (zlib) of bytes [4, PAGE_SIZE)
    4       4     page_id
    8       8     page_lsn       LSN of the last record applied to this page
    16      1     page_type      PageType: FREE 0, LEAF 1, INTERNAL 2, META 3
    17      1     reserved       always 0
    18      2     cell_count     number of slots in the slot array
    20      2     content_start  lowest offset of the cell content area (PAGE_SIZE if empty)
    22      2     frag_bytes     dead bytes inside the content area (deleted/replaced cells)
    24      4     right_sibling  LEAF: next leaf in key order; 0 = none
    28      4     leftmost_child INTERNAL: child holding keys < the first cell's key
    32      8     aux0           META: next_page_id (the allocator's high-water mark)
    40      8     aux1           META: txn_id of the last COMMIT applied
    48      8     aux2           META: timestamp_us of the last COMMIT applied
    56      8     aux3           reserved (0)
    64      2*n   slot array     u16 offset of each cell, in key order

Cell (at the offset its slot names; cells are packed downward from the end of the page)::

    OFFSET  SIZE     MEANING
    0       2        key_len
    2       2        value_len
    4       key_len  key bytes
    4+k     val_len  value bytes (INTERNAL: 4-byte u32 child page id; META: u32 root page)

Free space lies between the end of the slot array and content_start. A change that does
not fit there but would fit counting frag_bytes first compacts the page: cells are
rewritten in slot order from the end of the page downward, the gap is zeroed and
frag_bytes becomes 0. Deleted cells are zeroed at once. These rules are exact, so two
implementations (materialise_py and the Cython twin) produce byte-identical pages
(invariant 14).

B+tree layout: a LEAF holds (key, value) cells sorted by key and links to its right
sibling. An INTERNAL page holds leftmost_child plus (separator key, child) cells sorted by
key: child i holds keys >= key i and < key i+1. Page 0 is the META page: its cells are the
table catalog (table name -> root page id) and aux0 is the page allocator's high-water mark.
"""

from __future__ import annotations

import enum
import struct
import zlib

PAGE_SIZE = 8192
PAGE_HEADER_SIZE = 64
SLOT_SIZE = 2
CELL_HEADER_SIZE = 4

HEADER = struct.Struct("<IIQBBHHHIIQQQQ")
assert HEADER.size == PAGE_HEADER_SIZE

#: Page 0 of every volume is the META page.
META_PAGE_ID = 0
#: right_sibling / leftmost_child value meaning "none" (page 0 is META, never a child).
NO_PAGE = 0

# Field offsets (for struct.unpack_from on a single field).
OFF_CHECKSUM = 0
OFF_PAGE_ID = 4
OFF_PAGE_LSN = 8
OFF_PAGE_TYPE = 16
OFF_CELL_COUNT = 18
OFF_CONTENT_START = 20
OFF_FRAG_BYTES = 22
OFF_RIGHT_SIBLING = 24
OFF_LEFTMOST_CHILD = 28
OFF_AUX0 = 32
AUX_WORDS = 4

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_CELL = struct.Struct("<HH")


class PageType(enum.IntEnum):
    """What a page holds."""

    FREE = 0
    LEAF = 1
    INTERNAL = 2
    META = 3


PAGE_TYPE_MAX = 3


def page_checksum(page) -> int:
    """CRC32 of everything after the checksum field."""
    return zlib.crc32(memoryview(page)[4:PAGE_SIZE])


def verify_checksum(page) -> bool:
    """True if the page's stored checksum matches its bytes."""
    return _U32.unpack_from(page, 0)[0] == page_checksum(page)


def seal(page: bytearray) -> bytearray:
    """Store a fresh checksum in ``page`` and return it."""
    _U32.pack_into(page, 0, page_checksum(page))
    return page


def page_id(page) -> int:
    return _U32.unpack_from(page, OFF_PAGE_ID)[0]


def page_lsn(page) -> int:
    return _U64.unpack_from(page, OFF_PAGE_LSN)[0]


def page_type(page) -> int:
    return page[OFF_PAGE_TYPE]


def cell_count(page) -> int:
    return _U16.unpack_from(page, OFF_CELL_COUNT)[0]


def right_sibling(page) -> int:
    return _U32.unpack_from(page, OFF_RIGHT_SIBLING)[0]


def leftmost_child(page) -> int:
    return _U32.unpack_from(page, OFF_LEFTMOST_CHILD)[0]


def aux(page, index: int) -> int:
    return _U64.unpack_from(page, OFF_AUX0 + 8 * index)[0]


def cell_size(key_len: int, value_len: int) -> int:
    """Bytes a cell takes in the content area (its slot not included)."""
    return CELL_HEADER_SIZE + key_len + value_len


def free_bytes(page) -> int:
    """Bytes available for new cells and slots, counting what compaction would reclaim."""
    content_start = _U16.unpack_from(page, OFF_CONTENT_START)[0]
    frag = _U16.unpack_from(page, OFF_FRAG_BYTES)[0]
    return content_start - PAGE_HEADER_SIZE - SLOT_SIZE * cell_count(page) + frag


def used_bytes(page) -> int:
    """Bytes the cells and slots occupy (PAGE_SIZE - header - free)."""
    return PAGE_SIZE - PAGE_HEADER_SIZE - free_bytes(page)


def cell_offset(page, slot: int) -> int:
    return _U16.unpack_from(page, PAGE_HEADER_SIZE + SLOT_SIZE * slot)[0]


def cell(page, slot: int) -> tuple[bytes, bytes]:
    """(key, value) of the cell in ``slot``."""
    off = cell_offset(page, slot)
    key_len, value_len = _CELL.unpack_from(page, off)
    start = off + CELL_HEADER_SIZE
    return bytes(page[start:start + key_len]), bytes(page[start + key_len:start + key_len + value_len])


def key_at(page, slot: int) -> bytes:
    off = cell_offset(page, slot)
    key_len = _U16.unpack_from(page, off)[0]
    return bytes(page[off + CELL_HEADER_SIZE:off + CELL_HEADER_SIZE + key_len])


def cells(page) -> list[tuple[bytes, bytes]]:
    """Every (key, value) in slot order."""
    return [cell(page, i) for i in range(cell_count(page))]


def search(page, key: bytes) -> tuple[bool, int]:
    """Binary search by key: (found, slot). If not found, slot is where key would go."""
    lo, hi = 0, cell_count(page)
    while lo < hi:
        mid = (lo + hi) // 2
        k = key_at(page, mid)
        if k < key:
            lo = mid + 1
        elif k > key:
            hi = mid
        else:
            return True, mid
    return False, lo


def child_for(page, key: bytes) -> int:
    """INTERNAL page: the child page that covers ``key``."""
    found, slot = search(page, key)
    if found:
        return _U32.unpack(cell(page, slot)[1])[0]
    if slot == 0:
        return leftmost_child(page)
    return _U32.unpack(cell(page, slot - 1)[1])[0]


def describe(page) -> dict:
    """A dict of the header fields, for debugging and docs."""
    (checksum, pid, lsn, ptype, _r, count, content_start, frag, sib, child,
     a0, a1, a2, a3) = HEADER.unpack_from(page, 0)
    return {
        "checksum": checksum, "page_id": pid, "page_lsn": lsn, "page_type": ptype,
        "cell_count": count, "content_start": content_start, "frag_bytes": frag,
        "right_sibling": sib, "leftmost_child": child, "aux": [a0, a1, a2, a3],
    }
