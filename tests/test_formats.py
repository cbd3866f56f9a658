"""Unit tests of the on-disk and on-wire formats: engine/format/redo.py, engine/format/page.py, and how
engine/materialiser.py picks its implementation.

These run against whichever materialiser is active (engine.materialiser), so
``AURORA_LITE_PURE_PYTHON=1 pytest tests/test_formats.py`` covers the pure-Python twin and a
plain run covers the compiled one when it is built. The two are compared with each other in
tests/test_materialise_equivalence.py.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import pytest

from engine.format import materialise_py
from engine import materialiser
from engine.format import page as pg
from engine.format import redo
from engine.errors import (
    BadLengthError,
    ChecksumError,
    TruncatedError,
    UnknownRecordTypeError,
)
from engine.format.redo import RecordType as RT

SCANNERS = [pytest.param(redo, id="redo.read_header"),
            pytest.param(materialise_py, id="materialise_py"),
            pytest.param(materialiser, id=f"materialiser[{materialiser.IMPLEMENTATION}]")]


def scan(module, buf):
    """Walk a batch with redo.iter_batch or a materialiser's scan_batch, as tuples."""
    if module is redo:
        return [tuple(ref) for ref in redo.iter_batch(buf)]
    return module.scan_batch(buf)


def rec(lsn=7, page_id=3, rtype=RT.INSERT_CELL, payload=b"\x00\x00\x01\x00kv",
        prev=(6, 5, 4), flags=0) -> bytes:
    return redo.encode_record(lsn, *prev, page_id, rtype, flags, payload)


def reseal(buf: bytearray, offset: int = 0) -> bytes:
    """Recompute the checksum of the record at offset after a hand edit."""
    plen = struct.unpack_from("<H", buf, offset + 38)[0]
    struct.pack_into("<I", buf, offset + redo.CHECKED_PREFIX,
                     redo.record_checksum(buf, offset, plen))
    return bytes(buf)


def fresh_page(page_id=9, ptype=pg.PageType.LEAF, lsn=1) -> bytearray:
    """A page made the only way pages are made: by applying INIT_PAGE."""
    return materialiser.apply(None, page_id, redo.encode_record(
        lsn, 0, 0, 0, page_id, RT.INIT_PAGE, 0, redo.p_init_page(ptype)))


def page_with(cells, ptype=pg.PageType.LEAF, page_id=9, leftmost_child=0) -> bytearray:
    """A page holding ``cells`` (inserted in order at the end), built by redo records."""
    records = [redo.encode_record(1, 0, 0, 0, page_id, RT.INIT_PAGE, 0, redo.p_init_page(ptype))]
    lsn = 1
    if leftmost_child:
        records.append(redo.encode_record(lsn + 1, lsn, 0, lsn, page_id, RT.SET_CHILD, 0,
                                          redo.p_set_child(leftmost_child)))
        lsn += 1
    for slot, (key, value) in enumerate(cells):
        records.append(redo.encode_record(lsn + 1, lsn, 0, lsn, page_id, RT.INSERT_CELL, 0,
                                          redo.p_insert_cell(slot, key, value)))
        lsn += 1
    return materialiser.apply(None, page_id, b"".join(records))


# --- Redo records ----------------------------------------------------------------------


def test_header_layout_constants():
    """Scenario: the record header is 44 bytes and the checksum covers its first 40."""
    assert redo.HEADER_SIZE == redo.HEADER.size == 44
    assert redo.CHECKED_PREFIX == 40
    assert redo.PAYLOAD_MAX == pg.PAGE_SIZE - pg.PAGE_HEADER_SIZE
    assert [int(t) for t in RT] == list(range(redo.RTYPE_MIN, redo.RTYPE_MAX + 1))


def test_encode_decode_round_trip():
    """Scenario: records of every type, packed into one batch, decode to the same fields."""
    records = [
        redo.Record(1, 0, 0, 0, 0, RT.INIT_PAGE, 0, redo.p_init_page(pg.PageType.META)),
        redo.Record(2, 1, 0, 1, 0, RT.SET_AUX, 0, redo.p_set_aux(0, 2**64 - 1)),
        redo.Record(5, 2, 2, 0, 4, RT.INSERT_CELL, 0, redo.p_insert_cell(0, b"k", b"v" * 300)),
        redo.Record(9, 5, 5, 5, 4, RT.UPDATE_CELL, 0, redo.p_update_cell(0, b"k", b"")),
        redo.Record(10, 9, 9, 9, 4, RT.DELETE_CELL, 0, redo.p_delete_cell(0)),
        redo.Record(11, 10, 10, 10, 4, RT.SET_SIBLING, 0, redo.p_set_sibling(7)),
        redo.Record(12, 11, 11, 0, 8, RT.SET_CHILD, 0, redo.p_set_child(4)),
        redo.Record(13, 12, 12, 11, 4, RT.TRUNCATE_CELLS, 0, redo.p_truncate_cells(0)),
        redo.Record(14, 13, 13, 13, 4, RT.INSERT_CELLS, 0,
                    redo.p_insert_cells(0, [(b"a", b"1"), (b"bb", b"")])),
        redo.Record(2**64 - 1, 14, 14, 2, 0, RT.COMMIT, redo.FLAG_CPL,
                    redo.commit_payload(77, 1_700_000_000_000_000)),
    ]
    buf = b"".join(r.encode() for r in records)
    assert redo.decode_batch(buf) == records
    assert redo.decode_batch(memoryview(buf)) == records
    assert [r.is_cpl for r in records] == [False] * 9 + [True]
    refs = list(redo.iter_batch(buf))
    assert [ref.offset for ref in refs] == [sum(len(r.encode()) for r in records[:i])
                                            for i in range(len(records))]
    assert [ref.size for ref in refs] == [redo.HEADER_SIZE + len(r.payload) for r in records]
    assert redo.decode_batch(b"") == []


def test_encoded_layout_matches_the_table():
    """Scenario: the packed bytes follow the OFFSET / SIZE table of engine/format/redo.py."""
    payload = redo.p_insert_cell(2, b"key", b"value")
    buf = redo.encode_record(0x0102030405060708, 11, 12, 13, 0xA0B0C0D0, RT.INSERT_CELL,
                             redo.FLAG_CPL, payload)
    assert struct.unpack_from("<QQQQIBBHI", buf) == (
        0x0102030405060708, 11, 12, 13, 0xA0B0C0D0, 2, 1, len(payload),
        zlib.crc32(payload, zlib.crc32(buf[:40])))
    assert buf[44:] == payload == b"\x02\x00\x03\x00keyvalue"
    assert redo.p_insert_cells(1, [(b"ab", b"xyz")]) == b"\x01\x00\x01\x00\x02\x00\x03\x00abxyz"
    assert redo.p_set_aux(3, 5) == b"\x03" + (5).to_bytes(8, "little")


def test_with_flags_reseals():
    """Scenario: with_flags sets the CPL flag and keeps the record's checksum valid."""
    plain = rec()
    tagged = redo.with_flags(plain, redo.FLAG_CPL)
    assert tagged[37] == redo.FLAG_CPL and tagged[:37] == plain[:37]
    (record,) = redo.decode_batch(tagged)
    assert record.is_cpl


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(rtype=0), UnknownRecordTypeError, "unknown record type 0"),
    (dict(rtype=11), UnknownRecordTypeError, "unknown record type 11"),
    (dict(payload=bytes(redo.PAYLOAD_MAX + 1)), BadLengthError,
     f"payload of {redo.PAYLOAD_MAX + 1} bytes exceeds PAYLOAD_MAX {redo.PAYLOAD_MAX}"),
    (dict(lsn=0), BadLengthError, "lsn must be positive, got 0"),
])
def test_encode_refuses_impossible_fields(kwargs, error, message):
    """Scenario: encode_record refuses an unknown type, an oversize payload and lsn 0."""
    with pytest.raises(error) as info:
        rec(**kwargs)
    assert str(info.value) == message


def test_commit_payload_round_trip():
    """Scenario: a COMMIT payload carries txn id and timestamp; a wrong size is refused."""
    assert redo.parse_commit(redo.commit_payload(5, 2**64 - 1)) == (5, 2**64 - 1)
    with pytest.raises(BadLengthError, match="COMMIT payload must be 16 bytes, got 15"):
        redo.parse_commit(bytes(15))


def test_checksum_covers_every_byte_but_its_own():
    """Scenario: flipping any byte of a record outside payload_len is a ChecksumError."""
    good = rec(payload=redo.p_insert_cell(0, b"key", b"value"))
    assert redo.record_checksum(good, 0, len(good) - 44) == struct.unpack_from("<I", good, 40)[0]
    for pos in range(len(good)):
        if pos in (38, 39):  # payload_len: a length error comes first (next test)
            continue
        bad = bytearray(good)
        bad[pos] ^= 0x10
        with pytest.raises(ChecksumError) as info:
            redo.read_header(bytes(bad), 0)
        lsn = struct.unpack_from("<Q", bad, 0)[0]
        assert str(info.value) == f"record checksum mismatch at offset 0 (lsn {lsn})"


@pytest.mark.parametrize("module", SCANNERS)
def test_every_read_header_error(module):
    """Scenario: each check of read_header / scan_batch fires with its exact message, for a
    bad record behind a good one (so offsets are not 0), in the documented order."""
    good = rec(lsn=1, prev=(0, 0, 0))
    off = len(good)
    second = rec(lsn=2)

    def check(buf, error, message):
        with pytest.raises(error) as info:
            scan(module, buf)
        assert str(info.value) == message

    check(good + second[:43], TruncatedError, f"truncated record header at offset {off}")
    check(good + b"\x00", TruncatedError, f"truncated record header at offset {off}")
    check(good + second[:-1], TruncatedError, f"truncated record payload at offset {off}")
    too_long = bytearray(second)
    struct.pack_into("<H", too_long, 38, redo.PAYLOAD_MAX + 1)
    check(good + bytes(too_long), BadLengthError,
          f"record at offset {off}: payload_len {redo.PAYLOAD_MAX + 1} > {redo.PAYLOAD_MAX}")
    # payload_len is checked before the checksum: a huge one is BadLength even if truncated
    struct.pack_into("<H", too_long, 38, 0xFFFF)
    check(good + bytes(too_long), BadLengthError,
          f"record at offset {off}: payload_len 65535 > {redo.PAYLOAD_MAX}")
    flipped = bytearray(second)
    flipped[46] ^= 1  # a payload byte
    check(good + bytes(flipped), ChecksumError, f"record checksum mismatch at offset {off} (lsn 2)")
    unknown = bytearray(second)
    unknown[36] = 200
    check(good + reseal(unknown), UnknownRecordTypeError,
          f"record at offset {off}: unknown record type 200")
    # the checksum is checked before the type: an unknown type with a bad checksum is a ChecksumError
    unknown[40] ^= 1
    check(good + bytes(unknown), ChecksumError, f"record checksum mismatch at offset {off} (lsn 2)")
    zero = bytearray(second)
    struct.pack_into("<Q", zero, 0, 0)
    check(good + reseal(zero), BadLengthError, f"record at offset {off}: lsn 0")


@pytest.mark.parametrize("module", SCANNERS)
def test_scan_returns_header_tuples(module):
    """Scenario: scanning a valid batch gives one (offset, size, lsn, backlinks, page_id,
    rtype, flags) tuple per record, from bytes, bytearray or memoryview alike."""
    a = rec(lsn=1, page_id=2, prev=(0, 0, 0), flags=redo.FLAG_CPL)
    b = rec(lsn=2**64 - 1, page_id=2**32 - 1, rtype=RT.DELETE_CELL, payload=b"\x00\x00",
            prev=(1, 1, 1))
    expected = [(0, len(a), 1, 0, 0, 0, 2, RT.INSERT_CELL, 1),
                (len(a), len(b), 2**64 - 1, 1, 1, 1, 2**32 - 1, RT.DELETE_CELL, 0)]
    for buf in (a + b, bytearray(a + b), memoryview(a + b)):
        assert scan(module, buf) == expected
    assert scan(module, b"") == []


# --- Pages -----------------------------------------------------------------------------


def test_page_layout_constants():
    """Scenario: the page header is 64 bytes and its field offsets match the table."""
    assert pg.PAGE_SIZE == 8192 and pg.HEADER.size == pg.PAGE_HEADER_SIZE == 64
    assert (pg.OFF_PAGE_ID, pg.OFF_PAGE_LSN, pg.OFF_PAGE_TYPE, pg.OFF_CELL_COUNT,
            pg.OFF_CONTENT_START, pg.OFF_FRAG_BYTES, pg.OFF_RIGHT_SIBLING,
            pg.OFF_LEFTMOST_CHILD, pg.OFF_AUX0) == (4, 8, 16, 18, 20, 22, 24, 28, 32)
    assert pg.cell_size(3, 5) == 12


@pytest.mark.parametrize("ptype", list(pg.PageType))
def test_page_header_after_init(ptype):
    """Scenario: INIT_PAGE leaves an empty page of its type: every header field as the
    table says, a valid checksum, and all 8128 bytes after the header free."""
    page = fresh_page(page_id=42, ptype=ptype, lsn=17)
    assert len(page) == pg.PAGE_SIZE
    d = pg.describe(page)
    assert d == {"checksum": pg.page_checksum(page), "page_id": 42, "page_lsn": 17,
                 "page_type": ptype, "cell_count": 0, "content_start": pg.PAGE_SIZE,
                 "frag_bytes": 0, "right_sibling": 0, "leftmost_child": 0, "aux": [0] * 4}
    assert (pg.page_id(page), pg.page_lsn(page), pg.page_type(page), pg.cell_count(page)) == (
        42, 17, ptype, 0)
    assert pg.right_sibling(page) == pg.leftmost_child(page) == pg.NO_PAGE
    assert all(pg.aux(page, i) == 0 for i in range(pg.AUX_WORDS))
    assert pg.free_bytes(page) == pg.PAGE_SIZE - pg.PAGE_HEADER_SIZE
    assert pg.used_bytes(page) == 0
    assert page[4:] == d["page_id"].to_bytes(4, "little") + (17).to_bytes(8, "little") + \
        bytes([ptype, 0]) + b"\x00\x00" + (8192).to_bytes(2, "little") + bytes(pg.PAGE_SIZE - 22)
    assert pg.cells(page) == []


def test_page_checksum_seal_and_verify():
    """Scenario: the page checksum is zlib CRC-32 of bytes [4, 8192); seal() stores it and
    verify_checksum() notices any changed byte."""
    page = fresh_page()
    assert pg.page_checksum(page) == zlib.crc32(bytes(page[4:]))
    assert pg.verify_checksum(page)
    page[100] ^= 1
    assert not pg.verify_checksum(page)
    assert pg.seal(page) is page and pg.verify_checksum(page)
    page[0] ^= 1
    assert not pg.verify_checksum(page)


def test_cells_and_free_space_accounting():
    """Scenario: cells come back in slot order, packed down from the page end; a delete
    keeps its bytes counted as free (frag_bytes) and used_bytes + free_bytes is constant."""
    cells = [(b"apple", b"1"), (b"banana", b"22"), (b"cherry", b"")]
    page = page_with(cells)
    assert pg.cells(page) == cells
    assert [pg.cell(page, i) for i in range(3)] == cells
    assert [pg.key_at(page, i) for i in range(3)] == [k for k, _ in cells]
    sizes = [pg.cell_size(len(k), len(v)) for k, v in cells]
    assert [pg.cell_offset(page, i) for i in range(3)] == [
        pg.PAGE_SIZE - sum(sizes[:i + 1]) for i in range(3)]
    assert pg.used_bytes(page) == sum(sizes) + 2 * 3
    delete = redo.encode_record(10, 4, 0, pg.page_lsn(page), 9, RT.DELETE_CELL, 0,
                                redo.p_delete_cell(1))
    page = materialiser.apply(page, 9, delete)
    assert pg.cells(page) == [cells[0], cells[2]]
    assert pg.describe(page)["frag_bytes"] == sizes[1]
    assert pg.used_bytes(page) == sizes[0] + sizes[2] + 2 * 2
    assert pg.used_bytes(page) + pg.free_bytes(page) == pg.PAGE_SIZE - pg.PAGE_HEADER_SIZE


def test_search():
    """Scenario: binary search finds every key's slot, and for a missing key the slot
    where it would be inserted (before, between and after the keys; empty page)."""
    assert pg.search(fresh_page(), b"x") == (False, 0)
    keys = [b"b", b"d", b"f", b"h", b"j"]
    page = page_with([(k, b"v") for k in keys])
    for slot, key in enumerate(keys):
        assert pg.search(page, key) == (True, slot)
    assert pg.search(page, b"a") == (False, 0)
    assert pg.search(page, b"c") == (False, 1)
    assert pg.search(page, b"dd") == (False, 2)
    assert pg.search(page, b"i") == (False, 4)
    assert pg.search(page, b"z") == (False, 5)
    assert pg.search(page, b"") == (False, 0)


def test_child_for():
    """Scenario: on an INTERNAL page, keys below the first separator go to the leftmost
    child, a separator's own key and keys up to the next separator go to its child."""
    u32 = struct.Struct("<I").pack
    page = page_with([(b"g", u32(20)), (b"p", u32(30))], ptype=pg.PageType.INTERNAL,
                     leftmost_child=10)
    assert pg.leftmost_child(page) == 10
    assert [pg.child_for(page, k) for k in (b"", b"a", b"f", b"fz")] == [10] * 4
    assert [pg.child_for(page, k) for k in (b"g", b"ga", b"o", b"ozz")] == [20] * 4
    assert [pg.child_for(page, k) for k in (b"p", b"q", b"\xff" * 8)] == [30] * 3
    only_child = page_with([], ptype=pg.PageType.INTERNAL, leftmost_child=5)
    assert pg.child_for(only_child, b"anything") == 5


# --- Choosing the implementation -------------------------------------------------------


def _implementation_in_subprocess(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("AURORA_LITE_PURE_PYTHON", None)
    if env_value is not None:
        env["AURORA_LITE_PURE_PYTHON"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", "import engine.materialiser as m; print(m.IMPLEMENTATION)"],
        env=env, capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def test_pure_python_override():
    """Scenario: AURORA_LITE_PURE_PYTHON=1 makes engine.materialiser use the reference."""
    assert _implementation_in_subprocess("1") == "python"


def test_default_choice_prefers_the_extension():
    """Scenario: without the override (or with it set to 0) the compiled twin is chosen
    when it is built, and the reference otherwise."""
    try:
        import engine.format._materialise_cy  # noqa: F401
        expected = "cython"
    except ImportError:
        expected = "python"
    assert _implementation_in_subprocess(None) == expected
    assert _implementation_in_subprocess("0") == expected


def test_active_implementation_matches_environment():
    """Scenario: this test process uses the implementation its environment asks for."""
    forced = os.environ.get("AURORA_LITE_PURE_PYTHON", "") not in ("", "0")
    if forced:
        assert materialiser.IMPLEMENTATION == "python"
        assert materialiser.apply is materialise_py.apply
    else:
        assert materialiser.IMPLEMENTATION in ("python", "cython")
