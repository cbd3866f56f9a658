"""The materialiser, pure-Python reference: apply redo records to page images.

This module defines what every record type does to a page (the formats are in
engine/format/redo.py and engine/format/page.py). Its Cython twin, engine/format/_materialise_cy.pyx, must give
byte-identical pages and raise the same exception classes with the same messages; the
test suite checks that on random record streams (tests/test_materialise_equivalence.py).

Public functions (both implementations export exactly these):

    scan_batch(buf) -> list[tuple]
        Walk a batch, verify every record (length, checksum, type, lsn > 0) and return
        one (offset, size, lsn, prev_volume_lsn, prev_pg_lsn, prev_page_lsn, page_id,
        rtype, flags) tuple per record. Storage calls it once per incoming batch.

    scan_batch_run(buf) -> (bytes, dict, tuple)
        scan_batch's checks (same errors at the same point), returning instead what a
        storage node stores and checks for the batch, built in the same pass and without
        one tuple per record header: the batch's run directory (the n record LSNs as u64
        little-endian, then the n record end offsets within buf as u32 little-endian; a
        storage node keeps the batch as one LMDB value, see storage_node/store.py), the
        page index entries {page_id: [lsn, ...]} in batch order, and a summary (count,
        first_lsn, first_prev_pg_lsn, last_lsn, max_lsn, chained, bad_backlink_lsn,
        ascending). ``chained`` is True when every record after the first links to the
        one before it (prev_pg_lsn == the previous lsn): the batch is one piece of the
        segment chain. ``bad_backlink_lsn`` is the LSN of the first record with a
        backlink (volume, PG or page) not below its own LSN, else 0. ``ascending`` is
        True when every LSN is above the one before it.

    apply_to_pages(pages, buf, upto_lsn=LSN_MAX, verify_pages=True) -> dict
        pages maps page_id (an int) -> bytearray image (changed in place) or None (page
        not yet initialised). Records of buf are applied in buffer order to the pages named in
        the dict; records of other pages and records with lsn > upto_lsn are skipped
        (but still verified), and so are records at or below the LSN a page image had
        when the call began (they are already in it). Returns the dict, with pages created by INIT_PAGE filled in.
        Changed pages get a fresh page_lsn and checksum.

    apply(page, page_id, buf, upto_lsn=LSN_MAX, verify_pages=True) -> bytearray | None
        apply_to_pages for one page; also how a page's record chain is coalesced into a
        new base image.

Rules that make a page wrong are errors, never silently ignored:
  * every record walked is verified (TruncatedError, ChecksumError, BadLengthError,
    UnknownRecordTypeError), even if it is skipped;
  * an applied record must continue its page's chain: lsn > page_lsn and
    prev_page_lsn == page_lsn (PageOrderError); the first record of a page with no image
    must be INIT_PAGE;
  * an impossible slot, length or offset raises BadLengthError, a cell that does not fit
    PageFullError, a COMMIT or SET_AUX on a non-META page or a SET_CHILD on a non-INTERNAL
    page WrongPageTypeError;
  * a page image is checked when the call begins (type, length, checksum if verify_pages,
    page id, then the header layout invariants below), and every slot offset and cell
    length is checked when it is read, so a damaged page raises BadLengthError instead of
    being written outside its 8 KiB.

Page layout invariants (held by every page this module writes):

    (L1) 64 + 2 * cell_count <= content_start <= PAGE_SIZE    checked at call start
    (L2) frag_bytes <= PAGE_SIZE - content_start               checked at call start and
                                                               whenever frag_bytes grows
    (L3) every slot points at a cell inside [content_start, PAGE_SIZE)   checked on read
When an error is raised, pages already changed by earlier records of the same call stay
changed: callers that must not see partial work apply to copies.
"""

from __future__ import annotations

import struct
import zlib

from engine.format import page as pg
from engine.errors import (
    BadLengthError,
    ChecksumError,
    PageFullError,
    PageOrderError,
    TruncatedError,
    UnknownRecordTypeError,
    WrongPageTypeError,
)
from engine.format.redo import (
    CHECKED_PREFIX,
    HEADER,
    HEADER_SIZE,
    LSN_MAX,
    PAYLOAD_MAX,
    RTYPE_MAX,
    RTYPE_MIN,
    RecordType as RT,
)

IMPLEMENTATION = "python"

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_CELL = struct.Struct("<HH")
_AUX = struct.Struct("<BQ")
_COMMIT = struct.Struct("<QQ")

_SLOT0 = pg.PAGE_HEADER_SIZE
_PAGE_SIZE = pg.PAGE_SIZE


# --- Batch walking ----------------------------------------------------------------------


def _read_header(buf, offset: int) -> tuple:
    end = len(buf)
    if end - offset < HEADER_SIZE:
        raise TruncatedError(f"truncated record header at offset {offset}")
    (lsn, pv, ppg, ppage, page_id, rtype, flags, payload_len,
     checksum) = HEADER.unpack_from(buf, offset)
    if payload_len > PAYLOAD_MAX:
        raise BadLengthError(f"record at offset {offset}: payload_len {payload_len} > {PAYLOAD_MAX}")
    if end - offset - HEADER_SIZE < payload_len:
        raise TruncatedError(f"truncated record payload at offset {offset}")
    crc = zlib.crc32(buf[offset:offset + CHECKED_PREFIX])
    crc = zlib.crc32(buf[offset + HEADER_SIZE:offset + HEADER_SIZE + payload_len], crc)
    if checksum != crc:
        raise ChecksumError(f"record checksum mismatch at offset {offset} (lsn {lsn})")
    if not RTYPE_MIN <= rtype <= RTYPE_MAX:
        raise UnknownRecordTypeError(f"record at offset {offset}: unknown record type {rtype}")
    if lsn == 0:
        raise BadLengthError(f"record at offset {offset}: lsn 0")
    return (offset, HEADER_SIZE + payload_len, lsn, pv, ppg, ppage, page_id, rtype, flags)


def scan_batch(buf) -> list[tuple]:
    """Verify every record of ``buf`` and return their header tuples in order."""
    buf = memoryview(buf).cast("B")  # offsets count bytes, whatever the buffer's item type
    out = []
    offset = 0
    end = len(buf)
    while offset < end:
        ref = _read_header(buf, offset)
        out.append(ref)
        offset += ref[1]
    return out


def scan_batch_run(buf) -> tuple[bytes, dict, tuple]:
    """Verify a batch; return its run directory, page index entries and summary (module doc)."""
    view = memoryview(buf).cast("B")
    lsn_list = []
    ends = []
    pages: dict[int, list] = {}
    offset = 0
    end = len(view)
    count = first_lsn = first_prev = last_lsn = max_lsn = bad_backlink = 0
    chained = ascending = True
    while offset < end:
        _off, size, lsn, pv, ppg, ppage, page_id, _rtype, _flags = _read_header(view, offset)
        if count == 0:
            first_lsn, first_prev = lsn, ppg
        else:
            if ppg != last_lsn:
                chained = False
            if lsn <= last_lsn:
                ascending = False
        if not bad_backlink and (pv >= lsn or ppg >= lsn or ppage >= lsn):
            bad_backlink = lsn
        count += 1
        last_lsn = lsn
        if lsn > max_lsn:
            max_lsn = lsn
        offset += size
        lsn_list.append(lsn)
        ends.append(offset)
        lsns = pages.get(page_id)
        if lsns is None:
            pages[page_id] = [lsn]
        else:
            lsns.append(lsn)
    directory = struct.pack(f"<{count}Q{count}I", *lsn_list, *ends)
    return directory, pages, (count, first_lsn, first_prev, last_lsn, max_lsn, chained,
                              bad_backlink, ascending)


# --- Page primitives ---------------------------------------------------------------------


def _count(page) -> int:
    return _U16.unpack_from(page, pg.OFF_CELL_COUNT)[0]


def _cell_bounds(page, slot: int) -> tuple[int, int]:
    """(offset, size) of the cell in slot (< cell_count); BadLengthError if it breaks (L3)."""
    off = _U16.unpack_from(page, _SLOT0 + 2 * slot)[0]
    if off < _U16.unpack_from(page, pg.OFF_CONTENT_START)[0] or off + 4 > _PAGE_SIZE:
        raise BadLengthError(f"page {_page_id(page)}: slot {slot} points outside the cell content area")
    key_len, value_len = _CELL.unpack_from(page, off)
    size = 4 + key_len + value_len
    if off + size > _PAGE_SIZE:
        raise BadLengthError(f"page {_page_id(page)}: cell in slot {slot} runs past the page")
    return off, size


def _page_id(page) -> int:
    return _U32.unpack_from(page, pg.OFF_PAGE_ID)[0]


def _check_layout(page, page_id: int) -> None:
    """BadLengthError unless the page type is known and the header holds (L1) and (L2)."""
    ptype = page[pg.OFF_PAGE_TYPE]
    if ptype > pg.PAGE_TYPE_MAX:
        raise BadLengthError(f"page {page_id}: unknown page type {ptype}")
    count = _count(page)
    content_start = _U16.unpack_from(page, pg.OFF_CONTENT_START)[0]
    frag = _U16.unpack_from(page, pg.OFF_FRAG_BYTES)[0]
    if not (_SLOT0 + 2 * count <= content_start <= _PAGE_SIZE
            and frag <= _PAGE_SIZE - content_start):
        raise BadLengthError(
            f"page {page_id}: inconsistent header (cell_count {count}, "
            f"content_start {content_start}, frag_bytes {frag})")


def _compact(page, count: int) -> None:
    """Rewrite cells in slot order from the page end downward; zero the gap."""
    cells = []
    for slot in range(count):
        off, size = _cell_bounds(page, slot)
        cells.append(bytes(page[off:off + size]))
    slot_end = _SLOT0 + 2 * count
    total = sum(len(data) for data in cells)
    if total > _PAGE_SIZE - slot_end:  # only if cells overlap: a damaged page
        raise BadLengthError(
            f"page {_page_id(page)}: {total} bytes of cells overlap in {_PAGE_SIZE - slot_end} bytes")
    page[slot_end:_PAGE_SIZE] = bytes(_PAGE_SIZE - slot_end)
    pos = _PAGE_SIZE
    for slot, data in enumerate(cells):
        pos -= len(data)
        page[pos:pos + len(data)] = data
        _U16.pack_into(page, _SLOT0 + 2 * slot, pos)
    _U16.pack_into(page, pg.OFF_CONTENT_START, pos)
    _U16.pack_into(page, pg.OFF_FRAG_BYTES, 0)


def _reserve(page, count: int, need_bytes: int, new_slots: int) -> None:
    """Make room for ``need_bytes`` of cell data and ``new_slots`` more slots, or raise."""
    content_start = _U16.unpack_from(page, pg.OFF_CONTENT_START)[0]
    frag = _U16.unpack_from(page, pg.OFF_FRAG_BYTES)[0]
    slot_end_after = _SLOT0 + 2 * (count + new_slots)
    if content_start - slot_end_after >= need_bytes:
        return
    if content_start + frag - slot_end_after >= need_bytes:
        _compact(page, count)
        free_after = _U16.unpack_from(page, pg.OFF_CONTENT_START)[0] - slot_end_after
        if free_after < need_bytes:  # only if frag_bytes overstated the dead bytes
            raise BadLengthError(
                f"page {_page_id(page)}: frag_bytes {frag} overstated the dead bytes "
                f"({free_after} bytes free after compaction, {need_bytes} needed)")
        return
    raise PageFullError(
        f"page {_page_id(page)}: {need_bytes} bytes of cells and {new_slots} slots do not fit "
        f"({content_start + frag - _SLOT0 - 2 * count} bytes free)")


def _place_cell(page, data: bytes) -> int:
    """Copy a cell below content_start (room must be reserved); return its offset."""
    content_start = _U16.unpack_from(page, pg.OFF_CONTENT_START)[0]
    off = content_start - len(data)
    page[off:content_start] = data
    _U16.pack_into(page, pg.OFF_CONTENT_START, off)
    return off


def _kill_cell(page, slot: int) -> None:
    """Zero a cell's bytes and count them as fragmentation (the slot stays)."""
    off, size = _cell_bounds(page, slot)
    frag = _U16.unpack_from(page, pg.OFF_FRAG_BYTES)[0]
    area = _PAGE_SIZE - _U16.unpack_from(page, pg.OFF_CONTENT_START)[0]
    if frag + size > area:  # (L2) would break: this cell overlaps dead bytes
        raise BadLengthError(
            f"page {_page_id(page)}: cell in slot {slot} overlaps dead bytes "
            f"(frag_bytes {frag} + {size} > content area {area})")
    page[off:off + size] = bytes(size)
    _U16.pack_into(page, pg.OFF_FRAG_BYTES, frag + size)


def _insert_slots(page, slot: int, count: int, offsets: list[int]) -> None:
    """Open len(offsets) slots at ``slot`` (shifting the rest right) and fill them."""
    n = len(offsets)
    start = _SLOT0 + 2 * slot
    end = _SLOT0 + 2 * count
    page[start + 2 * n:end + 2 * n] = page[start:end]
    for i, off in enumerate(offsets):
        _U16.pack_into(page, start + 2 * i, off)
    _U16.pack_into(page, pg.OFF_CELL_COUNT, count + n)


def _remove_slots(page, slot: int, n: int, count: int) -> None:
    """Close n slots at ``slot`` (shifting the rest left) and zero the freed tail."""
    start = _SLOT0 + 2 * slot
    end = _SLOT0 + 2 * count
    page[start:end - 2 * n] = page[start + 2 * n:end]
    page[end - 2 * n:end] = bytes(2 * n)
    _U16.pack_into(page, pg.OFF_CELL_COUNT, count - n)


def _cell_bytes(key_len: int, key_value: bytes) -> bytes:
    return _CELL.pack(key_len, len(key_value) - key_len) + key_value


# --- Record application ------------------------------------------------------------------


def _bad(page_id: int, lsn: int, what: str) -> BadLengthError:
    return BadLengthError(f"record lsn {lsn} for page {page_id}: {what}")


def _apply_one(page: bytearray, page_id: int, lsn: int, rtype: int, payload) -> None:
    """Apply one verified record's payload to ``page`` (chain already checked)."""
    plen = len(payload)
    count = _count(page)
    ptype = page[pg.OFF_PAGE_TYPE]

    if rtype == RT.INIT_PAGE:
        if plen != 1:
            raise _bad(page_id, lsn, f"INIT_PAGE payload must be 1 byte, got {plen}")
        new_type = payload[0]
        if new_type > pg.PAGE_TYPE_MAX:
            raise _bad(page_id, lsn, f"unknown page type {new_type}")
        page[:] = bytes(_PAGE_SIZE)
        _U32.pack_into(page, pg.OFF_PAGE_ID, page_id)
        page[pg.OFF_PAGE_TYPE] = new_type
        _U16.pack_into(page, pg.OFF_CONTENT_START, _PAGE_SIZE)
        return

    if ptype == pg.PageType.FREE:
        raise WrongPageTypeError(f"record lsn {lsn}: page {page_id} is FREE; only INIT_PAGE applies")

    if rtype == RT.INSERT_CELL or rtype == RT.UPDATE_CELL:
        if plen < 4:
            raise _bad(page_id, lsn, f"cell payload of {plen} bytes is shorter than 4")
        slot, key_len = _CELL.unpack_from(payload, 0)
        if key_len > plen - 4:
            raise _bad(page_id, lsn, f"key_len {key_len} exceeds payload")
        data = _cell_bytes(key_len, bytes(payload[4:]))
        if rtype == RT.INSERT_CELL:
            if slot > count:
                raise _bad(page_id, lsn, f"insert slot {slot} > cell_count {count}")
            _reserve(page, count, len(data), 1)
            off = _place_cell(page, data)
            _insert_slots(page, slot, count, [off])
        else:
            if slot >= count:
                raise _bad(page_id, lsn, f"update slot {slot} >= cell_count {count}")
            _, old_size = _cell_bounds(page, slot)
            content_start = _U16.unpack_from(page, pg.OFF_CONTENT_START)[0]
            frag = _U16.unpack_from(page, pg.OFF_FRAG_BYTES)[0]
            if content_start + frag + old_size - _SLOT0 - 2 * count < len(data):
                raise PageFullError(
                    f"page {page_id}: {len(data)} bytes of cells and 0 slots do not fit "
                    f"({content_start + frag + old_size - _SLOT0 - 2 * count} bytes free)")
            # Replace = delete the old cell and slot, then insert at the same slot, so a
            # compaction in between never sees the dead cell.
            _kill_cell(page, slot)
            _remove_slots(page, slot, 1, count)
            _reserve(page, count - 1, len(data), 1)
            off = _place_cell(page, data)
            _insert_slots(page, slot, count - 1, [off])
        return

    if rtype == RT.DELETE_CELL:
        if plen != 2:
            raise _bad(page_id, lsn, f"DELETE_CELL payload must be 2 bytes, got {plen}")
        slot = _U16.unpack_from(payload, 0)[0]
        if slot >= count:
            raise _bad(page_id, lsn, f"delete slot {slot} >= cell_count {count}")
        _kill_cell(page, slot)
        _remove_slots(page, slot, 1, count)
        return

    if rtype == RT.SET_SIBLING or rtype == RT.SET_CHILD:
        if plen != 4:
            raise _bad(page_id, lsn, f"pointer payload must be 4 bytes, got {plen}")
        if rtype == RT.SET_CHILD and ptype != pg.PageType.INTERNAL:
            raise WrongPageTypeError(f"record lsn {lsn}: SET_CHILD on page {page_id} of type {ptype}, not INTERNAL")
        target = pg.OFF_RIGHT_SIBLING if rtype == RT.SET_SIBLING else pg.OFF_LEFTMOST_CHILD
        page[target:target + 4] = payload[0:4]
        return

    if rtype == RT.TRUNCATE_CELLS:
        if plen != 2:
            raise _bad(page_id, lsn, f"TRUNCATE_CELLS payload must be 2 bytes, got {plen}")
        start = _U16.unpack_from(payload, 0)[0]
        if start > count:
            raise _bad(page_id, lsn, f"truncate from slot {start} > cell_count {count}")
        for slot in range(start, count):
            _kill_cell(page, slot)
        _remove_slots(page, start, count - start, count)
        return

    if rtype == RT.INSERT_CELLS:
        if plen < 4:
            raise _bad(page_id, lsn, f"INSERT_CELLS payload of {plen} bytes is shorter than 4")
        slot, n = _CELL.unpack_from(payload, 0)
        if slot > count:
            raise _bad(page_id, lsn, f"insert slot {slot} > cell_count {count}")
        datas = []
        pos = 4
        for i in range(n):
            if plen - pos < 4:
                raise _bad(page_id, lsn, f"INSERT_CELLS cell {i} header runs past the payload")
            key_len, value_len = _CELL.unpack_from(payload, pos)
            size = 4 + key_len + value_len
            if plen - pos < size:
                raise _bad(page_id, lsn, f"INSERT_CELLS cell {i} runs past the payload")
            datas.append(bytes(payload[pos:pos + size]))
            pos += size
        if pos != plen:
            raise _bad(page_id, lsn, f"INSERT_CELLS has {plen - pos} trailing bytes")
        _reserve(page, count, pos - 4, n)
        offsets = [_place_cell(page, d) for d in datas]
        _insert_slots(page, slot, count, offsets)
        return

    if rtype == RT.SET_AUX:
        if plen != 9:
            raise _bad(page_id, lsn, f"SET_AUX payload must be 9 bytes, got {plen}")
        if ptype != pg.PageType.META:
            raise WrongPageTypeError(f"record lsn {lsn}: SET_AUX on page {page_id} of type {ptype}, not META")
        index, value = _AUX.unpack_from(payload, 0)
        if index >= pg.AUX_WORDS:
            raise _bad(page_id, lsn, f"SET_AUX index {index} >= {pg.AUX_WORDS}")
        _U64.pack_into(page, pg.OFF_AUX0 + 8 * index, value)
        return

    if rtype == RT.COMMIT:
        if plen != 16:
            raise _bad(page_id, lsn, f"COMMIT payload must be 16 bytes, got {plen}")
        if ptype != pg.PageType.META:
            raise WrongPageTypeError(f"record lsn {lsn}: COMMIT on page {page_id} of type {ptype}, not META")
        page[pg.OFF_AUX0 + 8:pg.OFF_AUX0 + 24] = payload[0:16]
        return

    raise UnknownRecordTypeError(f"record lsn {lsn}: unknown record type {rtype}")  # unreachable


def apply_to_pages(pages: dict, buf, upto_lsn: int = LSN_MAX, verify_pages: bool = True) -> dict:
    """Apply the records of ``buf`` to the pages named in ``pages`` (see module doc)."""
    mv = memoryview(buf).cast("B")  # offsets count bytes, whatever the buffer's item type
    changed = set()
    for page_id, image in pages.items():
        if not isinstance(page_id, int):
            raise TypeError(f"page ids must be ints, got {type(page_id).__name__}")
        if image is None:
            continue
        if not isinstance(image, bytearray):
            raise TypeError(f"page {page_id}: image must be a bytearray, not {type(image).__name__}")
        if len(image) != _PAGE_SIZE:
            raise BadLengthError(f"page {page_id}: image is {len(image)} bytes, not {_PAGE_SIZE}")
        if verify_pages and _U32.unpack_from(image, 0)[0] != pg.page_checksum(image):
            raise ChecksumError(f"page {page_id} checksum mismatch")
        if _page_id(image) != page_id:
            raise PageOrderError(f"page image holds page {_page_id(image)}, not {page_id}")
        _check_layout(image, page_id)
    # BEGIN LAB 3: walk the records of buf: skip those above upto_lsn, of other pages or already in the base image; a page without image starts at INIT_PAGE; check the page backlink (PageOrderError); _apply_one, stamp the page LSN, remember changed pages
    # Records at or below a base image's LSN are already in it and are skipped; every
    # later record must continue the page chain.
    base_lsns = {page_id: (0 if image is None else _U64.unpack_from(image, pg.OFF_PAGE_LSN)[0])
                 for page_id, image in pages.items()}
    offset = 0
    end = len(mv)
    while offset < end:
        (_, size, lsn, _pv, _ppg, prev_page_lsn, page_id, rtype,
         _flags) = _read_header(mv, offset)
        payload = mv[offset + HEADER_SIZE:offset + size]
        offset += size
        if lsn > upto_lsn or page_id not in pages or lsn <= base_lsns[page_id]:
            continue
        image = pages[page_id]
        if image is None:
            if rtype != RT.INIT_PAGE:
                raise PageOrderError(f"record lsn {lsn}: page {page_id} has no image and the record is not INIT_PAGE")
            image = bytearray(_PAGE_SIZE)
            pages[page_id] = image
        else:
            current = _U64.unpack_from(image, pg.OFF_PAGE_LSN)[0]
            if lsn <= current or prev_page_lsn != current:
                raise PageOrderError(
                    f"record lsn {lsn} (page backlink {prev_page_lsn}) does not follow page {page_id} at lsn {current}")
        _apply_one(image, page_id, lsn, rtype, payload)
        _U64.pack_into(image, pg.OFF_PAGE_LSN, lsn)
        changed.add(page_id)
    # END LAB 3
    for page_id in changed:
        pg.seal(pages[page_id])
    return pages


def apply(page, page_id: int, buf, upto_lsn: int = LSN_MAX, verify_pages: bool = True):
    """Apply the records of ``buf`` for ``page_id`` to ``page`` (bytearray, or None)."""
    if page is not None and not isinstance(page, bytearray):
        page = bytearray(page)
    return apply_to_pages({page_id: page}, buf, upto_lsn, verify_pages)[page_id]
