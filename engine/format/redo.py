"""Redo log records and batches: the only thing the writer sends to storage (invariant 1).

A record changes exactly one page. Records are packed back to back into one buffer (a
batch); a batch travels as a single protobuf ``bytes`` field and the same bytes go to all
six segments of a protection group. All integers are little-endian.

Record header (HEADER_SIZE = 44 bytes), followed by ``payload_len`` payload bytes::

    OFFSET  SIZE  MEANING
    0       8     lsn              this record's LSN (volume-wide, > 0, strictly increasing)
    8       8     prev_volume_lsn  LSN of the previous record in the volume (0: none)
    16      8     prev_pg_lsn      LSN of the previous record in the same PG (segment chain)
    24      8     prev_page_lsn    LSN of the previous record for the same page (page chain)
    32      4     page_id          the page this record changes
    36      1     rtype            record type, one of RecordType
    37      1     flags            bit 0 FLAG_CPL: last record of its MTR (consistency point)
    38      2     payload_len      payload bytes that follow the header (<= PAYLOAD_MAX)
    40      4     checksum         CRC32 (zlib) of bytes [0, 40) and of the payload
    44      n     payload          type-specific, see below

Payloads (``u16`` etc. are little-endian unsigned integers)::

    type               PAYLOAD
    INIT_PAGE      1   u8 page_type                      page becomes empty of that type
    INSERT_CELL    2   u16 slot, u16 key_len, key, value  value = rest of the payload
    UPDATE_CELL    3   u16 slot, u16 key_len, key, value  replaces the cell at slot
    DELETE_CELL    4   u16 slot
    SET_SIBLING    5   u32 right_sibling                 0 = no right sibling
    SET_CHILD      6   u32 leftmost_child                internal pages only
    TRUNCATE_CELLS 7   u16 from_slot                      deletes slots [from_slot, count)
    INSERT_CELLS   8   u16 slot, u16 count, then count x (u16 key_len, u16 value_len,
                       key, value)                        bulk insert for split / merge
    SET_AUX        9   u8 index, u64 value               META page header word (index 0)
    COMMIT        10   u64 txn_id, u64 timestamp_us      META page only; always the CPL of
                                                         its transaction's MTR

The checksum covers the header with the checksum field left out, so a record's checksum can
be checked without copying it. How each payload changes a page is defined in
``engine/format/materialise_py.py`` (the reference) and its Cython twin.
"""

from __future__ import annotations

import enum
import struct
import zlib
from typing import Iterator, NamedTuple

from engine.errors import (
    BadLengthError,
    ChecksumError,
    TruncatedError,
    UnknownRecordTypeError,
)
from engine.format import page as pagefmt

HEADER = struct.Struct("<QQQQIBBHI")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 44
CHECKED_PREFIX = 40  # header bytes covered by the checksum (everything before it)

#: Largest payload a record may carry: anything that can change one page fits.
PAYLOAD_MAX = pagefmt.PAGE_SIZE - pagefmt.PAGE_HEADER_SIZE
#: Largest LSN; also "apply everything" for the materialiser.
LSN_MAX = (1 << 64) - 1

FLAG_CPL = 0x01
FLAGS_KNOWN = FLAG_CPL


class RecordType(enum.IntEnum):
    """Every page change the engine makes is one of these (see the payload table above)."""

    INIT_PAGE = 1
    INSERT_CELL = 2
    UPDATE_CELL = 3
    DELETE_CELL = 4
    SET_SIBLING = 5
    SET_CHILD = 6
    TRUNCATE_CELLS = 7
    INSERT_CELLS = 8
    SET_AUX = 9
    COMMIT = 10


RTYPE_MIN = 1
RTYPE_MAX = 10

COMMIT_PAYLOAD = struct.Struct("<QQ")


class Record(NamedTuple):
    """One decoded record. ``payload`` is a bytes copy; hot paths use offsets instead."""

    lsn: int
    prev_volume_lsn: int
    prev_pg_lsn: int
    prev_page_lsn: int
    page_id: int
    rtype: int
    flags: int
    payload: bytes

    @property
    def is_cpl(self) -> bool:
        """True if this record is the last of its MTR (a consistency point)."""
        return bool(self.flags & FLAG_CPL)

    def encode(self) -> bytes:
        """The packed bytes of this record, checksum included."""
        return encode_record(
            self.lsn, self.prev_volume_lsn, self.prev_pg_lsn, self.prev_page_lsn,
            self.page_id, self.rtype, self.flags, self.payload,
        )


def record_checksum(buf, offset: int, payload_len: int) -> int:
    """CRC32 of a record's header prefix and payload, as stored in its checksum field."""
    mv = memoryview(buf)
    crc = zlib.crc32(mv[offset:offset + CHECKED_PREFIX])
    start = offset + HEADER_SIZE
    return zlib.crc32(mv[start:start + payload_len], crc)


def encode_record(lsn: int, prev_volume_lsn: int, prev_pg_lsn: int, prev_page_lsn: int,
                  page_id: int, rtype: int, flags: int, payload: bytes) -> bytes:
    """Pack one record. Raises BadLengthError / UnknownRecordTypeError on impossible fields."""
    if not RTYPE_MIN <= rtype <= RTYPE_MAX:
        raise UnknownRecordTypeError(f"unknown record type {rtype}")
    if len(payload) > PAYLOAD_MAX:
        raise BadLengthError(f"payload of {len(payload)} bytes exceeds PAYLOAD_MAX {PAYLOAD_MAX}")
    if lsn <= 0:
        raise BadLengthError(f"lsn must be positive, got {lsn}")
    buf = bytearray(HEADER_SIZE + len(payload))
    HEADER.pack_into(buf, 0, lsn, prev_volume_lsn, prev_pg_lsn, prev_page_lsn,
                     page_id, rtype, flags, len(payload), 0)
    buf[HEADER_SIZE:] = payload
    struct.pack_into("<I", buf, CHECKED_PREFIX, record_checksum(buf, 0, len(payload)))
    return bytes(buf)


def with_flags(record_bytes: bytes, flags: int) -> bytes:
    """Return a copy of an encoded record with new flags and a fresh checksum."""
    buf = bytearray(record_bytes)
    buf[37] = flags
    payload_len = struct.unpack_from("<H", buf, 38)[0]
    struct.pack_into("<I", buf, CHECKED_PREFIX, record_checksum(buf, 0, payload_len))
    return bytes(buf)


class RecordRef(NamedTuple):
    """Where one record lies inside a batch buffer, plus its header fields."""

    offset: int
    size: int
    lsn: int
    prev_volume_lsn: int
    prev_pg_lsn: int
    prev_page_lsn: int
    page_id: int
    rtype: int
    flags: int


def read_header(buf, offset: int) -> RecordRef:
    """Decode and validate the header at ``offset``; verifies the record's checksum.

    Raises TruncatedError, BadLengthError, UnknownRecordTypeError or ChecksumError, with
    the same messages as the Cython twin's ``scan_batch``.
    """
    end = len(buf)
    if end - offset < HEADER_SIZE:
        raise TruncatedError(f"truncated record header at offset {offset}")
    (lsn, pv, ppg, ppage, page_id, rtype, flags, payload_len,
     checksum) = HEADER.unpack_from(buf, offset)
    if payload_len > PAYLOAD_MAX:
        raise BadLengthError(f"record at offset {offset}: payload_len {payload_len} > {PAYLOAD_MAX}")
    if end - offset - HEADER_SIZE < payload_len:
        raise TruncatedError(f"truncated record payload at offset {offset}")
    if checksum != record_checksum(buf, offset, payload_len):
        raise ChecksumError(f"record checksum mismatch at offset {offset} (lsn {lsn})")
    if not RTYPE_MIN <= rtype <= RTYPE_MAX:
        raise UnknownRecordTypeError(f"record at offset {offset}: unknown record type {rtype}")
    if lsn == 0:
        raise BadLengthError(f"record at offset {offset}: lsn 0")
    return RecordRef(offset, HEADER_SIZE + payload_len, lsn, pv, ppg, ppage,
                     page_id, rtype, flags)


def iter_batch(buf) -> Iterator[RecordRef]:
    """Yield a verified RecordRef for every record of a batch, in buffer order."""
    offset = 0
    end = len(buf)
    while offset < end:
        ref = read_header(buf, offset)
        yield ref
        offset += ref.size


def decode_batch(buf) -> list[Record]:
    """Decode every record of a batch (verifying checksums) into Record tuples."""
    out = []
    for ref in iter_batch(buf):
        start = ref.offset + HEADER_SIZE
        out.append(Record(ref.lsn, ref.prev_volume_lsn, ref.prev_pg_lsn, ref.prev_page_lsn,
                          ref.page_id, ref.rtype, ref.flags,
                          bytes(buf[start:ref.offset + ref.size])))
    return out


def commit_payload(txn_id: int, timestamp_us: int) -> bytes:
    """Payload of a COMMIT record."""
    return COMMIT_PAYLOAD.pack(txn_id, timestamp_us)


def parse_commit(payload: bytes) -> tuple[int, int]:
    """(txn_id, timestamp_us) of a COMMIT record's payload."""
    if len(payload) != COMMIT_PAYLOAD.size:
        raise BadLengthError(f"COMMIT payload must be {COMMIT_PAYLOAD.size} bytes, got {len(payload)}")
    return COMMIT_PAYLOAD.unpack(payload)


# --- Payload builders used by the engine -------------------------------------------------

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U16U16 = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_AUX = struct.Struct("<BQ")


def p_init_page(page_type: int) -> bytes:
    return _U8.pack(page_type)


def p_insert_cell(slot: int, key: bytes, value: bytes) -> bytes:
    return _U16U16.pack(slot, len(key)) + key + value


p_update_cell = p_insert_cell


def p_delete_cell(slot: int) -> bytes:
    return _U16.pack(slot)


def p_set_sibling(page_id: int) -> bytes:
    return _U32.pack(page_id)


p_set_child = p_set_sibling


def p_truncate_cells(from_slot: int) -> bytes:
    return _U16.pack(from_slot)


def p_insert_cells(slot: int, cells: list[tuple[bytes, bytes]]) -> bytes:
    parts = [_U16U16.pack(slot, len(cells))]
    for key, value in cells:
        parts.append(_U16U16.pack(len(key), len(value)))
        parts.append(key)
        parts.append(value)
    return b"".join(parts)


def p_set_aux(index: int, value: int) -> bytes:
    return _AUX.pack(index, value)
