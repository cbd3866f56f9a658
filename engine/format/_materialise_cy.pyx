# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=False
"""The materialiser, Cython twin: apply redo records to page images at C speed.

This is a line-by-line transcription of engine/format/materialise_py.py, which is the reference:
when the two disagree, materialise_py.py is right and this file has a bug. Both export
exactly IMPLEMENTATION, scan_batch, scan_batch_run, apply_to_pages and apply (see materialise_py's module
doc for what they do); engine/materialiser.py picks one at import time. For every input
the two give byte-identical pages, and on bad input they raise the same exception class
(engine.errors) with the same message at the same point, leaving the same partial changes
behind. tests/test_materialise_equivalence.py checks that on random record streams.

How the code is laid out (mirroring the reference, function for function):

    _read_header      record header checks, in the reference's order
    _cell_bounds      slot -> (offset, size), enforcing layout invariant (L3)
    _check_layout     page type and invariants (L1), (L2) at call start
    _compact, _reserve, _kill_cell, _insert_slots, _remove_slots    page primitives
    _apply_one        one record's payload, per record type
    _apply_core       the walk: skip rules, chain check, INIT on a missing image, reseal

Bounds-check policy. Records and pages are untrusted input, and this code reads and writes
them through raw C pointers, so every offset and length that comes from input is checked
explicitly before it is used:

  * record headers: payload_len against PAYLOAD_MAX and against the bytes left in the
    buffer before the checksum is computed; every payload field is read only after the
    payload length has been checked to contain it (INSERT_CELLS: each cell header and
    cell body, one by one);
  * pages: the length, type and header invariants (L1) 64 + 2 * cell_count <=
    content_start <= PAGE_SIZE and (L2) frag_bytes <= PAGE_SIZE - content_start are
    checked when the call begins; every slot offset and cell length read from a page is
    checked against (L3) [content_start, PAGE_SIZE) before the cell is touched; every
    operation that moves content_start, cell_count or frag_bytes keeps (L1)/(L2) and
    checks it where a damaged page could break it (compaction, kill).
  * defence in depth: where an out-of-bounds access would need one of those invariants to
    be broken anyway (slot array writes, cell placement), the position is checked once
    more and a violation raises AssertionError ("materialiser invariant broken"), never
    a wild write. No valid or invalid input reaches those raises; the tests would show it.

Only raise paths build Python objects; the per-record loop works on C integers and
pointers. The buffer is any object with the buffer protocol (bytes, bytearray,
memoryview), held with PyObject_GetBuffer for the whole call; page images are bytearrays,
also held (which locks their size) while their pointers are in use.

CRC-32 is the zlib one (reflected polynomial 0xEDB88320, pre- and post-inverted, so
_crc32(b, _crc32(a)) == zlib.crc32(a + b)), table-driven slice-by-8, so the build needs no
zlib headers. _crc32 is exported for the tests only.
"""

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)

from engine.format import page as _pg
from engine.format import redo as _redo
from engine.errors import (
    BadLengthError,
    ChecksumError,
    PageFullError,
    PageOrderError,
    TruncatedError,
    UnknownRecordTypeError,
    WrongPageTypeError,
)
from engine.format.redo import LSN_MAX

__all__ = ["IMPLEMENTATION", "scan_batch", "scan_batch_run", "apply_to_pages", "apply"]

IMPLEMENTATION = "cython"

# --- Format constants (asserted against engine/format/page.py and engine/format/redo.py below) ---------

cdef enum:
    PAGE_SIZE = 8192
    SLOT0 = 64                # PAGE_HEADER_SIZE: the slot array starts here
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
    PAGE_TYPE_MAX = 3
    PT_FREE = 0
    PT_INTERNAL = 2
    PT_META = 3
    HEADER_SIZE = 44
    CHECKED_PREFIX = 40
    PAYLOAD_MAX = 8128
    RT_INIT_PAGE = 1
    RT_INSERT_CELL = 2
    RT_UPDATE_CELL = 3
    RT_DELETE_CELL = 4
    RT_SET_SIBLING = 5
    RT_SET_CHILD = 6
    RT_TRUNCATE_CELLS = 7
    RT_INSERT_CELLS = 8
    RT_SET_AUX = 9
    RT_COMMIT = 10
    RTYPE_MIN = 1
    RTYPE_MAX = 10

assert PAGE_SIZE == _pg.PAGE_SIZE and SLOT0 == _pg.PAGE_HEADER_SIZE
assert (OFF_PAGE_ID, OFF_PAGE_LSN, OFF_PAGE_TYPE, OFF_CELL_COUNT, OFF_CONTENT_START,
        OFF_FRAG_BYTES, OFF_RIGHT_SIBLING, OFF_LEFTMOST_CHILD, OFF_AUX0, AUX_WORDS) == (
    _pg.OFF_PAGE_ID, _pg.OFF_PAGE_LSN, _pg.OFF_PAGE_TYPE, _pg.OFF_CELL_COUNT,
    _pg.OFF_CONTENT_START, _pg.OFF_FRAG_BYTES, _pg.OFF_RIGHT_SIBLING,
    _pg.OFF_LEFTMOST_CHILD, _pg.OFF_AUX0, _pg.AUX_WORDS)
assert (PAGE_TYPE_MAX, PT_FREE, PT_INTERNAL, PT_META) == (
    _pg.PAGE_TYPE_MAX, _pg.PageType.FREE, _pg.PageType.INTERNAL, _pg.PageType.META)
assert (HEADER_SIZE, CHECKED_PREFIX, PAYLOAD_MAX) == (
    _redo.HEADER_SIZE, _redo.CHECKED_PREFIX, _redo.PAYLOAD_MAX)
assert (RTYPE_MIN, RTYPE_MAX) == (_redo.RTYPE_MIN, _redo.RTYPE_MAX)
assert (RT_INIT_PAGE, RT_INSERT_CELL, RT_UPDATE_CELL, RT_DELETE_CELL, RT_SET_SIBLING,
        RT_SET_CHILD, RT_TRUNCATE_CELLS, RT_INSERT_CELLS, RT_SET_AUX, RT_COMMIT) == tuple(
    _redo.RecordType)

cdef uint64_t C_LSN_MAX = 0xFFFFFFFFFFFFFFFFULL
assert LSN_MAX == 0xFFFFFFFFFFFFFFFF


# --- Little-endian loads and stores (compilers turn these into single moves) -------------

cdef inline uint16_t rd16(const uint8_t* p) noexcept nogil:
    return <uint16_t>(p[0] | (<uint16_t>p[1] << 8))


cdef inline uint32_t rd32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef inline uint64_t rd64(const uint8_t* p) noexcept nogil:
    return <uint64_t>rd32(p) | (<uint64_t>rd32(p + 4) << 32)


cdef inline void wr16(uint8_t* p, Py_ssize_t v) noexcept nogil:
    p[0] = <uint8_t>(v & 0xFF)
    p[1] = <uint8_t>((v >> 8) & 0xFF)


cdef inline void wr32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v & 0xFF)
    p[1] = <uint8_t>((v >> 8) & 0xFF)
    p[2] = <uint8_t>((v >> 16) & 0xFF)
    p[3] = <uint8_t>(v >> 24)


cdef inline void wr64(uint8_t* p, uint64_t v) noexcept nogil:
    wr32(p, <uint32_t>v)
    wr32(p + 4, <uint32_t>(v >> 32))


# --- CRC-32 (zlib) --------------------------------------------------------------------
#
# Two implementations of the same function, chosen once at import:
#   * slice-by-8 tables (portable C, about 1.4 cycles per byte);
#   * carry-less multiplication folding (x86-64 with PCLMULQDQ and SSE4.1, detected at run
#     time), the method of Gopal et al., "Fast CRC Computation for Generic Polynomials
#     Using PCLMULQDQ Instruction" (Intel, 2009), with the bit-reflected constants for
#     0xEDB88320 that zlib-ng and Chromium's zlib use. It folds 64-byte blocks of a whole
#     multiple of 16 bytes (at least 64); the tables finish the tail.
# The tests compare both with zlib.crc32 on random data (_crc32 with portable=True/False).

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <immintrin.h>
    #define AL_CLMUL_BUILT 1
    __attribute__((target("pclmul,sse4.1")))
    static uint32_t al_crc32_clmul(const unsigned char *buf, size_t len, uint32_t crc)
    {
        /* crc is the pre-inverted running value; len >= 64 and len % 16 == 0. */
        static const uint64_t __attribute__((aligned(16))) k1k2[2] = {0x0154442bd4ULL, 0x01c6e41596ULL};
        static const uint64_t __attribute__((aligned(16))) k3k4[2] = {0x01751997d0ULL, 0x00ccaa009eULL};
        static const uint64_t __attribute__((aligned(16))) k5k0[2] = {0x0163cd6124ULL, 0x0000000000ULL};
        static const uint64_t __attribute__((aligned(16))) poly[2] = {0x01db710641ULL, 0x01f7011641ULL};
        __m128i x0, x1, x2, x3, x4, x5, x6, x7, x8, y5, y6, y7, y8;

        x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
        x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
        x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
        x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
        x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
        x0 = _mm_load_si128((const __m128i *)k1k2);
        buf += 64;
        len -= 64;
        while (len >= 64) {            /* fold four 128-bit lanes in parallel */
            x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
            x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
            x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
            x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
            x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
            x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
            x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
            x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
            y5 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
            y6 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
            y7 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
            y8 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
            x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), y5);
            x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), y6);
            x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), y7);
            x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), y8);
            buf += 64;
            len -= 64;
        }
        x0 = _mm_load_si128((const __m128i *)k3k4);   /* fold the four lanes into one */
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x3), x5);
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x4), x5);
        while (len >= 16) {            /* single 16-byte folds */
            x2 = _mm_loadu_si128((const __m128i *)buf);
            x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
            x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
            x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
            buf += 16;
            len -= 16;
        }
        x2 = _mm_clmulepi64_si128(x1, x0, 0x10);      /* 128 -> 64 bits */
        x3 = _mm_set_epi32(0, ~0, 0, ~0);
        x1 = _mm_srli_si128(x1, 8);
        x1 = _mm_xor_si128(x1, x2);
        x0 = _mm_loadl_epi64((const __m128i *)k5k0);
        x2 = _mm_srli_si128(x1, 4);
        x1 = _mm_and_si128(x1, x3);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_xor_si128(x1, x2);
        x0 = _mm_load_si128((const __m128i *)poly);   /* Barrett reduction to 32 bits */
        x2 = _mm_and_si128(x1, x3);
        x2 = _mm_clmulepi64_si128(x2, x0, 0x10);
        x2 = _mm_and_si128(x2, x3);
        x2 = _mm_clmulepi64_si128(x2, x0, 0x00);
        x1 = _mm_xor_si128(x1, x2);
        return (uint32_t)_mm_extract_epi32(x1, 1);
    }
    static int al_clmul_supported(void)
    {
        __builtin_cpu_init();
        return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    }
    #else
    #define AL_CLMUL_BUILT 0
    static uint32_t al_crc32_clmul(const unsigned char *buf, size_t len, uint32_t crc)
    {
        (void)buf; (void)len; return crc;   /* never called: al_clmul_supported() is 0 */
    }
    static int al_clmul_supported(void) { return 0; }
    #endif
    """
    uint32_t al_crc32_clmul(const uint8_t* buf, size_t len, uint32_t crc) noexcept nogil
    int al_clmul_supported() noexcept nogil

cdef uint32_t CRC_TABLE[8][256]
cdef bint USE_CLMUL = al_clmul_supported() != 0
#: Which CRC-32 code this process uses ("clmul" or "slice-by-8"), for the tests and bench.
_CRC_METHOD = "clmul" if USE_CLMUL else "slice-by-8"


cdef void _crc_init() noexcept nogil:
    cdef uint32_t c
    cdef int i, k
    for i in range(256):
        c = <uint32_t>i
        for k in range(8):
            if c & 1:
                c = (c >> 1) ^ <uint32_t>0xEDB88320U
            else:
                c = c >> 1
        CRC_TABLE[0][i] = c
    for i in range(256):
        c = CRC_TABLE[0][i]
        for k in range(1, 8):
            c = CRC_TABLE[0][c & 0xFF] ^ (c >> 8)
            CRC_TABLE[k][i] = c


_crc_init()


cdef uint32_t crc32_slice8(uint32_t crc, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Advance a pre-inverted running CRC over p[:n] with the slice-by-8 tables."""
    cdef uint32_t one, two
    while n >= 8:
        one = rd32(p) ^ crc
        two = rd32(p + 4)
        crc = (CRC_TABLE[7][one & 0xFF] ^ CRC_TABLE[6][(one >> 8) & 0xFF]
               ^ CRC_TABLE[5][(one >> 16) & 0xFF] ^ CRC_TABLE[4][one >> 24]
               ^ CRC_TABLE[3][two & 0xFF] ^ CRC_TABLE[2][(two >> 8) & 0xFF]
               ^ CRC_TABLE[1][(two >> 16) & 0xFF] ^ CRC_TABLE[0][two >> 24])
        p += 8
        n -= 8
    while n > 0:
        crc = CRC_TABLE[0][(crc ^ p[0]) & 0xFF] ^ (crc >> 8)
        p += 1
        n -= 1
    return crc


cdef uint32_t crc32_update(uint32_t crc, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """zlib.crc32(p[:n], crc): chaining works as in zlib."""
    cdef Py_ssize_t chunk
    crc = ~crc
    if USE_CLMUL and n >= 64:
        chunk = n & ~(<Py_ssize_t>15)
        crc = al_crc32_clmul(p, <size_t>chunk, crc)
        p += chunk
        n -= chunk
    return ~crc32_slice8(crc, p, n)


cdef inline uint32_t page_checksum(const uint8_t* page) noexcept nogil:
    return crc32_update(0, page + 4, PAGE_SIZE - 4)


def _crc32(data, value=0, portable=False):
    """zlib.crc32(data, value) by this module's own CRC (for the tests); portable=True
    forces the slice-by-8 tables even where the carry-less multiply path is in use."""
    cdef Py_buffer view
    cdef uint32_t crc = <uint32_t>(value & 0xFFFFFFFF)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if portable:
            crc = ~crc32_slice8(~crc, <const uint8_t*>view.buf, view.len)
        else:
            crc = crc32_update(crc, <const uint8_t*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return crc


# --- Batch walking ----------------------------------------------------------------------

cdef struct RecHdr:
    Py_ssize_t size            # header + payload bytes
    uint64_t lsn
    uint64_t prev_volume_lsn
    uint64_t prev_pg_lsn
    uint64_t prev_page_lsn
    uint32_t page_id
    int rtype
    int flags


cdef int _read_header(const uint8_t* buf, Py_ssize_t end, Py_ssize_t offset,
                      RecHdr* h) except -1:
    """Decode and verify the record at ``offset`` (same checks, same order as the reference)."""
    cdef const uint8_t* p
    cdef Py_ssize_t payload_len
    cdef uint32_t crc
    cdef uint64_t lsn
    cdef int rtype
    if end - offset < HEADER_SIZE:
        raise TruncatedError(f"truncated record header at offset {offset}")
    p = buf + offset
    payload_len = rd16(p + 38)
    if payload_len > PAYLOAD_MAX:
        raise BadLengthError(
            f"record at offset {offset}: payload_len {payload_len} > {<int>PAYLOAD_MAX}")
    if end - offset - HEADER_SIZE < payload_len:
        raise TruncatedError(f"truncated record payload at offset {offset}")
    crc = crc32_update(0, p, CHECKED_PREFIX)
    crc = crc32_update(crc, p + HEADER_SIZE, payload_len)
    lsn = rd64(p)
    if rd32(p + CHECKED_PREFIX) != crc:
        raise ChecksumError(f"record checksum mismatch at offset {offset} (lsn {lsn})")
    rtype = p[36]
    if rtype < RTYPE_MIN or rtype > RTYPE_MAX:
        raise UnknownRecordTypeError(f"record at offset {offset}: unknown record type {rtype}")
    if lsn == 0:
        raise BadLengthError(f"record at offset {offset}: lsn 0")
    h.size = HEADER_SIZE + payload_len
    h.lsn = lsn
    h.prev_volume_lsn = rd64(p + 8)
    h.prev_pg_lsn = rd64(p + 16)
    h.prev_page_lsn = rd64(p + 24)
    h.page_id = rd32(p + 32)
    h.rtype = rtype
    h.flags = p[37]
    return 0


def scan_batch(buf):
    """Verify every record of ``buf`` and return their header tuples in order."""
    cdef Py_buffer view
    cdef RecHdr h
    cdef Py_ssize_t offset = 0
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        out = []
        while offset < view.len:
            _read_header(<const uint8_t*>view.buf, view.len, offset, &h)
            out.append((offset, h.size, h.lsn, h.prev_volume_lsn, h.prev_pg_lsn,
                        h.prev_page_lsn, h.page_id, h.rtype, h.flags))
            offset += h.size
        return out
    finally:
        PyBuffer_Release(&view)


def scan_batch_run(buf):
    """Verify a batch; return its run directory, page index entries and summary (see the
    reference). No per-record header tuple is built: the storage node's Append hot path
    needs only these three."""
    cdef Py_buffer view
    cdef RecHdr h
    cdef Py_ssize_t offset = 0
    cdef Py_ssize_t cap
    cdef uint8_t* dirp
    cdef uint8_t* endp
    cdef int i
    cdef dict pages = {}
    cdef Py_ssize_t count = 0
    cdef uint64_t first_lsn = 0, first_prev = 0, last_lsn = 0, max_lsn = 0, bad_backlink = 0
    cdef bint chained = True, ascending = True
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    cap = view.len // HEADER_SIZE + 1
    dirp = <uint8_t*>malloc(cap * 12)
    if dirp == NULL:
        PyBuffer_Release(&view)
        raise MemoryError()
    endp = dirp + cap * 8
    try:
        while offset < view.len:
            _read_header(<const uint8_t*>view.buf, view.len, offset, &h)
            if count == 0:
                first_lsn = h.lsn
                first_prev = h.prev_pg_lsn
            else:
                if h.prev_pg_lsn != last_lsn:
                    chained = False
                if h.lsn <= last_lsn:
                    ascending = False
            if bad_backlink == 0 and (h.prev_volume_lsn >= h.lsn or h.prev_pg_lsn >= h.lsn
                                      or h.prev_page_lsn >= h.lsn):
                bad_backlink = h.lsn
            wr64(dirp + 8 * count, h.lsn)
            offset += h.size
            wr32(endp + 4 * count, <uint32_t>offset)
            count += 1
            last_lsn = h.lsn
            if h.lsn > max_lsn:
                max_lsn = h.lsn
            lsn = h.lsn
            page = h.page_id
            lsns = pages.get(page)
            if lsns is None:
                pages[page] = [lsn]
            else:
                (<list>lsns).append(lsn)
        directory = PyBytes_FromStringAndSize(NULL, 12 * count)
        memcpy(PyBytes_AS_STRING(directory), dirp, 8 * count)
        memcpy(PyBytes_AS_STRING(directory) + 8 * count, endp, 4 * count)
        return directory, pages, (count, first_lsn, first_prev, last_lsn, max_lsn, chained,
                                  bad_backlink, ascending)
    finally:
        free(dirp)
        PyBuffer_Release(&view)


# --- Page primitives ---------------------------------------------------------------------

cdef inline uint32_t _page_id(const uint8_t* page) noexcept nogil:
    return rd32(page + OFF_PAGE_ID)


cdef int _broken(const uint8_t* page, str what) except -1:
    """Defence in depth: an invariant the checks above guarantee does not hold."""
    raise AssertionError(f"materialiser invariant broken on page {_page_id(page)}: {what}")


cdef int _cell_bounds(const uint8_t* page, Py_ssize_t slot, Py_ssize_t* off_out,
                      Py_ssize_t* size_out) except -1:
    """(offset, size) of the cell in slot (< cell_count); BadLengthError if it breaks (L3)."""
    cdef Py_ssize_t pos = SLOT0 + 2 * slot
    cdef Py_ssize_t off, size
    if slot < 0 or pos + 2 > PAGE_SIZE:  # (L1) and slot < cell_count exclude this
        _broken(page, f"slot {slot} outside the page")
    off = rd16(page + pos)
    if off < rd16(page + OFF_CONTENT_START) or off + 4 > PAGE_SIZE:
        raise BadLengthError(
            f"page {_page_id(page)}: slot {slot} points outside the cell content area")
    size = 4 + <Py_ssize_t>rd16(page + off) + <Py_ssize_t>rd16(page + off + 2)
    if off + size > PAGE_SIZE:
        raise BadLengthError(f"page {_page_id(page)}: cell in slot {slot} runs past the page")
    off_out[0] = off
    size_out[0] = size
    return 0


cdef int _check_layout(const uint8_t* page, object page_id) except -1:
    """BadLengthError unless the page type is known and the header holds (L1) and (L2)."""
    cdef int ptype = page[OFF_PAGE_TYPE]
    cdef Py_ssize_t count, content_start, frag
    if ptype > PAGE_TYPE_MAX:
        raise BadLengthError(f"page {page_id}: unknown page type {ptype}")
    count = rd16(page + OFF_CELL_COUNT)
    content_start = rd16(page + OFF_CONTENT_START)
    frag = rd16(page + OFF_FRAG_BYTES)
    if not (SLOT0 + 2 * count <= content_start <= PAGE_SIZE
            and frag <= PAGE_SIZE - content_start):
        raise BadLengthError(
            f"page {page_id}: inconsistent header (cell_count {count}, "
            f"content_start {content_start}, frag_bytes {frag})")
    return 0


cdef int _compact(uint8_t* page, Py_ssize_t count, uint8_t* scratch) except -1:
    """Rewrite cells in slot order from the page end downward; zero the gap."""
    cdef Py_ssize_t slot, off, size, pos
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t slot_end = SLOT0 + 2 * count
    for slot in range(count):              # every slot is checked before anything moves
        _cell_bounds(page, slot, &off, &size)
        total += size
    if total > PAGE_SIZE - slot_end:  # only if cells overlap: a damaged page
        raise BadLengthError(
            f"page {_page_id(page)}: {total} bytes of cells overlap in "
            f"{PAGE_SIZE - slot_end} bytes")
    # Cells may overlap on a damaged page, so copy them all out before writing any back.
    pos = PAGE_SIZE
    for slot in range(count):
        _cell_bounds(page, slot, &off, &size)   # unchanged page: cannot raise here
        pos -= size
        memcpy(scratch + pos, page + off, size)
        wr16(page + SLOT0 + 2 * slot, pos)     # slot array lies below every cell (L1, L3)
    memset(page + slot_end, 0, pos - slot_end)
    memcpy(page + pos, scratch + pos, PAGE_SIZE - pos)
    wr16(page + OFF_CONTENT_START, pos)
    wr16(page + OFF_FRAG_BYTES, 0)
    return 0


cdef int _reserve(uint8_t* page, Py_ssize_t count, Py_ssize_t need_bytes,
                  Py_ssize_t new_slots, uint8_t* scratch) except -1:
    """Make room for ``need_bytes`` of cell data and ``new_slots`` more slots, or raise."""
    cdef Py_ssize_t content_start = rd16(page + OFF_CONTENT_START)
    cdef Py_ssize_t frag = rd16(page + OFF_FRAG_BYTES)
    cdef Py_ssize_t slot_end_after = SLOT0 + 2 * (count + new_slots)
    cdef Py_ssize_t free_after
    if content_start - slot_end_after >= need_bytes:
        return 0
    if content_start + frag - slot_end_after >= need_bytes:
        _compact(page, count, scratch)
        free_after = rd16(page + OFF_CONTENT_START) - slot_end_after
        if free_after < need_bytes:  # only if frag_bytes overstated the dead bytes
            raise BadLengthError(
                f"page {_page_id(page)}: frag_bytes {frag} overstated the dead bytes "
                f"({free_after} bytes free after compaction, {need_bytes} needed)")
        return 0
    raise PageFullError(
        f"page {_page_id(page)}: {need_bytes} bytes of cells and {new_slots} slots do not fit "
        f"({content_start + frag - SLOT0 - 2 * count} bytes free)")


cdef Py_ssize_t _place_space(uint8_t* page, Py_ssize_t size, Py_ssize_t slot_end_after) except -1:
    """Take ``size`` bytes below content_start (reserved by _reserve); return their offset."""
    cdef Py_ssize_t off = rd16(page + OFF_CONTENT_START) - size
    if off < slot_end_after:  # _reserve made room: cannot happen
        _broken(page, f"cell of {size} bytes placed at {off}, below the slots")
    wr16(page + OFF_CONTENT_START, off)
    return off


cdef int _kill_cell(uint8_t* page, Py_ssize_t slot) except -1:
    """Zero a cell's bytes and count them as fragmentation (the slot stays)."""
    cdef Py_ssize_t off, size, frag, area
    _cell_bounds(page, slot, &off, &size)
    frag = rd16(page + OFF_FRAG_BYTES)
    area = PAGE_SIZE - rd16(page + OFF_CONTENT_START)
    if frag + size > area:  # (L2) would break: this cell overlaps dead bytes
        raise BadLengthError(
            f"page {_page_id(page)}: cell in slot {slot} overlaps dead bytes "
            f"(frag_bytes {frag} + {size} > content area {area})")
    memset(page + off, 0, size)
    wr16(page + OFF_FRAG_BYTES, frag + size)
    return 0


cdef int _open_slots(uint8_t* page, Py_ssize_t slot, Py_ssize_t count,
                     Py_ssize_t n) except -1:
    """Open n slots at ``slot`` (shifting the rest right); the caller fills them."""
    cdef Py_ssize_t start = SLOT0 + 2 * slot
    cdef Py_ssize_t end = SLOT0 + 2 * count
    if slot < 0 or slot > count or end + 2 * n > rd16(page + OFF_CONTENT_START):
        _broken(page, f"opening {n} slots at {slot} of {count}")
    memmove(page + start + 2 * n, page + start, end - start)
    wr16(page + OFF_CELL_COUNT, count + n)
    return 0


cdef int _remove_slots(uint8_t* page, Py_ssize_t slot, Py_ssize_t n,
                       Py_ssize_t count) except -1:
    """Close n slots at ``slot`` (shifting the rest left) and zero the freed tail."""
    cdef Py_ssize_t start = SLOT0 + 2 * slot
    cdef Py_ssize_t end = SLOT0 + 2 * count
    if slot < 0 or n < 0 or slot + n > count or end > PAGE_SIZE:
        _broken(page, f"removing {n} slots at {slot} of {count}")
    memmove(page + start, page + start + 2 * n, end - start - 2 * n)
    memset(page + end - 2 * n, 0, 2 * n)
    wr16(page + OFF_CELL_COUNT, count - n)
    return 0


# --- Record application ------------------------------------------------------------------

cdef object _bad(uint32_t page_id, uint64_t lsn, str what):
    return BadLengthError(f"record lsn {lsn} for page {page_id}: {what}")


cdef int _insert_cell(uint8_t* page, Py_ssize_t slot, Py_ssize_t count,
                      const uint8_t* payload, Py_ssize_t plen, Py_ssize_t key_len,
                      uint8_t* scratch) except -1:
    """Reserve, place the cell (key_len, value_len, payload[4:]) and open its slot."""
    cdef Py_ssize_t off
    _reserve(page, count, plen, 1, scratch)
    off = _place_space(page, plen, SLOT0 + 2 * (count + 1))
    wr16(page + off, key_len)
    wr16(page + off + 2, plen - 4 - key_len)
    memcpy(page + off + 4, payload + 4, plen - 4)
    _open_slots(page, slot, count, 1)
    wr16(page + SLOT0 + 2 * slot, off)
    return 0


cdef int _apply_one(uint8_t* page, uint32_t page_id, uint64_t lsn, int rtype,
                    const uint8_t* payload, Py_ssize_t plen, uint8_t* scratch) except -1:
    """Apply one verified record's payload to ``page`` (chain already checked)."""
    cdef Py_ssize_t count = rd16(page + OFF_CELL_COUNT)
    cdef int ptype = page[OFF_PAGE_TYPE]
    cdef Py_ssize_t slot, key_len, old_off, old_size, content_start, frag, free
    cdef Py_ssize_t n, i, pos, size, off, start
    cdef int new_type, index

    if rtype == RT_INIT_PAGE:
        if plen != 1:
            raise _bad(page_id, lsn, f"INIT_PAGE payload must be 1 byte, got {plen}")
        new_type = payload[0]
        if new_type > PAGE_TYPE_MAX:
            raise _bad(page_id, lsn, f"unknown page type {new_type}")
        memset(page, 0, PAGE_SIZE)
        wr32(page + OFF_PAGE_ID, page_id)
        page[OFF_PAGE_TYPE] = <uint8_t>new_type
        wr16(page + OFF_CONTENT_START, PAGE_SIZE)
        return 0

    if ptype == PT_FREE:
        raise WrongPageTypeError(
            f"record lsn {lsn}: page {page_id} is FREE; only INIT_PAGE applies")

    if rtype == RT_INSERT_CELL or rtype == RT_UPDATE_CELL:
        if plen < 4:
            raise _bad(page_id, lsn, f"cell payload of {plen} bytes is shorter than 4")
        slot = rd16(payload)
        key_len = rd16(payload + 2)
        if key_len > plen - 4:
            raise _bad(page_id, lsn, f"key_len {key_len} exceeds payload")
        # The cell is (key_len, value_len, key, value): exactly plen bytes.
        if rtype == RT_INSERT_CELL:
            if slot > count:
                raise _bad(page_id, lsn, f"insert slot {slot} > cell_count {count}")
            _insert_cell(page, slot, count, payload, plen, key_len, scratch)
        else:
            if slot >= count:
                raise _bad(page_id, lsn, f"update slot {slot} >= cell_count {count}")
            _cell_bounds(page, slot, &old_off, &old_size)
            content_start = rd16(page + OFF_CONTENT_START)
            frag = rd16(page + OFF_FRAG_BYTES)
            free = content_start + frag + old_size - SLOT0 - 2 * count
            if free < plen:
                raise PageFullError(
                    f"page {page_id}: {plen} bytes of cells and 0 slots do not fit "
                    f"({free} bytes free)")
            # Replace = delete the old cell and slot, then insert at the same slot, so a
            # compaction in between never sees the dead cell.
            _kill_cell(page, slot)
            _remove_slots(page, slot, 1, count)
            _insert_cell(page, slot, count - 1, payload, plen, key_len, scratch)
        return 0

    if rtype == RT_DELETE_CELL:
        if plen != 2:
            raise _bad(page_id, lsn, f"DELETE_CELL payload must be 2 bytes, got {plen}")
        slot = rd16(payload)
        if slot >= count:
            raise _bad(page_id, lsn, f"delete slot {slot} >= cell_count {count}")
        _kill_cell(page, slot)
        _remove_slots(page, slot, 1, count)
        return 0

    if rtype == RT_SET_SIBLING or rtype == RT_SET_CHILD:
        if plen != 4:
            raise _bad(page_id, lsn, f"pointer payload must be 4 bytes, got {plen}")
        if rtype == RT_SET_CHILD and ptype != PT_INTERNAL:
            raise WrongPageTypeError(
                f"record lsn {lsn}: SET_CHILD on page {page_id} of type {ptype}, not INTERNAL")
        if rtype == RT_SET_SIBLING:
            memcpy(page + OFF_RIGHT_SIBLING, payload, 4)
        else:
            memcpy(page + OFF_LEFTMOST_CHILD, payload, 4)
        return 0

    if rtype == RT_TRUNCATE_CELLS:
        if plen != 2:
            raise _bad(page_id, lsn, f"TRUNCATE_CELLS payload must be 2 bytes, got {plen}")
        start = rd16(payload)
        if start > count:
            raise _bad(page_id, lsn, f"truncate from slot {start} > cell_count {count}")
        for slot in range(start, count):
            _kill_cell(page, slot)
        _remove_slots(page, start, count - start, count)
        return 0

    if rtype == RT_INSERT_CELLS:
        if plen < 4:
            raise _bad(page_id, lsn, f"INSERT_CELLS payload of {plen} bytes is shorter than 4")
        slot = rd16(payload)
        n = rd16(payload + 2)
        if slot > count:
            raise _bad(page_id, lsn, f"insert slot {slot} > cell_count {count}")
        pos = 4
        for i in range(n):
            if plen - pos < 4:
                raise _bad(page_id, lsn, f"INSERT_CELLS cell {i} header runs past the payload")
            size = 4 + <Py_ssize_t>rd16(payload + pos) + <Py_ssize_t>rd16(payload + pos + 2)
            if plen - pos < size:
                raise _bad(page_id, lsn, f"INSERT_CELLS cell {i} runs past the payload")
            pos += size
        if pos != plen:
            raise _bad(page_id, lsn, f"INSERT_CELLS has {plen - pos} trailing bytes")
        # n <= plen / 4 here: every cell took at least its 4-byte header from the payload.
        _reserve(page, count, pos - 4, n, scratch)
        _open_slots(page, slot, count, n)
        pos = 4
        for i in range(n):
            size = 4 + <Py_ssize_t>rd16(payload + pos) + <Py_ssize_t>rd16(payload + pos + 2)
            off = _place_space(page, size, SLOT0 + 2 * (count + n))
            memcpy(page + off, payload + pos, size)
            wr16(page + SLOT0 + 2 * (slot + i), off)
            pos += size
        return 0

    if rtype == RT_SET_AUX:
        if plen != 9:
            raise _bad(page_id, lsn, f"SET_AUX payload must be 9 bytes, got {plen}")
        if ptype != PT_META:
            raise WrongPageTypeError(
                f"record lsn {lsn}: SET_AUX on page {page_id} of type {ptype}, not META")
        index = payload[0]
        if index >= AUX_WORDS:
            raise _bad(page_id, lsn, f"SET_AUX index {index} >= {<int>AUX_WORDS}")
        memcpy(page + OFF_AUX0 + 8 * index, payload + 1, 8)
        return 0

    if rtype == RT_COMMIT:
        if plen != 16:
            raise _bad(page_id, lsn, f"COMMIT payload must be 16 bytes, got {plen}")
        if ptype != PT_META:
            raise WrongPageTypeError(
                f"record lsn {lsn}: COMMIT on page {page_id} of type {ptype}, not META")
        memcpy(page + OFF_AUX0 + 8, payload, 16)
        return 0

    raise UnknownRecordTypeError(f"record lsn {lsn}: unknown record type {rtype}")  # unreachable


# --- The walk ----------------------------------------------------------------------------

cdef struct PageRef:
    uint8_t* data          # the image's bytes; NULL while the page has no image
    uint64_t base_lsn      # page_lsn when the call began (0: no image)
    uint32_t page_id
    bint changed
    bint has_view          # views[i] holds the image's buffer and must be released


cdef inline Py_ssize_t _lookup(const int32_t* table, uint32_t mask, const PageRef* refs,
                               uint32_t page_id) noexcept nogil:
    """Index of page_id in refs, or -1 (open addressing, linear probing)."""
    cdef uint32_t h = (page_id * <uint32_t>2654435761u) & mask
    cdef int32_t i
    while True:
        i = table[h]
        if i < 0:
            return -1
        if refs[i].page_id == page_id:
            return i
        h = (h + 1) & mask


cdef object _apply_core(object pages, const uint8_t* buf, Py_ssize_t end, object upto_lsn,
                        bint verify_pages):
    cdef Py_ssize_t n = len(pages)
    cdef Py_ssize_t i, idx, offset, payload_off, nrefs = 0
    cdef uint32_t cap = 8, mask, h
    cdef PageRef* refs = NULL
    cdef PageRef* ref
    cdef Py_buffer* views = NULL
    cdef int32_t* table = NULL
    cdef RecHdr hdr
    cdef uint8_t* data
    cdef uint64_t upto = 0, current
    cdef bint skip_all = False
    cdef uint8_t scratch[PAGE_SIZE]

    while cap < 2 * n:
        cap <<= 1
    mask = cap - 1
    refs = <PageRef*>malloc((n + 1) * sizeof(PageRef))
    views = <Py_buffer*>malloc((n + 1) * sizeof(Py_buffer))
    table = <int32_t*>malloc(cap * sizeof(int32_t))
    if refs == NULL or views == NULL or table == NULL:
        free(refs)
        free(views)
        free(table)
        raise MemoryError()
    memset(table, 0xFF, cap * sizeof(int32_t))   # every entry -1: empty
    keys = []
    try:
        # Check every page image before walking any record (reference order).
        for key, image in pages.items():
            if not isinstance(key, int):
                raise TypeError(f"page ids must be ints, got {type(key).__name__}")
            if nrefs >= n:
                raise RuntimeError("pages changed size during apply_to_pages")
            ref = &refs[nrefs]
            ref.data = NULL
            ref.base_lsn = 0
            ref.page_id = 0
            ref.changed = False
            ref.has_view = False
            keys.append(key)
            nrefs += 1
            if image is not None:
                if not isinstance(image, bytearray):
                    raise TypeError(
                        f"page {key}: image must be a bytearray, not {type(image).__name__}")
                PyObject_GetBuffer(image, &views[nrefs - 1], PyBUF_WRITABLE)
                ref.has_view = True
                data = <uint8_t*>views[nrefs - 1].buf
                if views[nrefs - 1].len != PAGE_SIZE:
                    raise BadLengthError(
                        f"page {key}: image is {len(image)} bytes, not {<int>PAGE_SIZE}")
                if verify_pages and rd32(data) != page_checksum(data):
                    raise ChecksumError(f"page {key} checksum mismatch")
                if _page_id(data) != key:
                    raise PageOrderError(f"page image holds page {_page_id(data)}, not {key}")
                _check_layout(data, key)
                ref.data = data
                ref.base_lsn = rd64(data + OFF_PAGE_LSN)
            if 0 <= key <= 0xFFFFFFFF:  # else no record can name it (page_id is a u32)
                ref.page_id = <uint32_t>key
                h = (ref.page_id * <uint32_t>2654435761u) & mask
                while table[h] >= 0:
                    h = (h + 1) & mask
                table[h] = <int32_t>(nrefs - 1)

        if upto_lsn < 0:
            skip_all = True
        elif upto_lsn >= LSN_MAX:
            upto = C_LSN_MAX
        else:
            upto = <uint64_t>int(upto_lsn)

        offset = 0
        while offset < end:
            _read_header(buf, end, offset, &hdr)
            payload_off = offset + HEADER_SIZE
            offset += hdr.size
            if skip_all or hdr.lsn > upto:
                continue
            idx = _lookup(table, mask, refs, hdr.page_id)
            if idx < 0:
                continue
            ref = &refs[idx]
            if hdr.lsn <= ref.base_lsn:
                continue
            if ref.data == NULL:
                if hdr.rtype != RT_INIT_PAGE:
                    raise PageOrderError(
                        f"record lsn {hdr.lsn}: page {hdr.page_id} has no image and the "
                        f"record is not INIT_PAGE")
                image = bytearray(PAGE_SIZE)
                pages[keys[idx]] = image
                PyObject_GetBuffer(image, &views[idx], PyBUF_WRITABLE)
                ref.has_view = True
                ref.data = <uint8_t*>views[idx].buf
            else:
                current = rd64(ref.data + OFF_PAGE_LSN)
                if hdr.lsn <= current or hdr.prev_page_lsn != current:
                    raise PageOrderError(
                        f"record lsn {hdr.lsn} (page backlink {hdr.prev_page_lsn}) does not "
                        f"follow page {hdr.page_id} at lsn {current}")
            _apply_one(ref.data, hdr.page_id, hdr.lsn, hdr.rtype, buf + payload_off,
                       hdr.size - HEADER_SIZE, scratch)
            wr64(ref.data + OFF_PAGE_LSN, hdr.lsn)
            ref.changed = True
        for i in range(nrefs):
            if refs[i].changed:
                wr32(refs[i].data, page_checksum(refs[i].data))
        return pages
    finally:
        for i in range(nrefs):
            if refs[i].has_view:
                PyBuffer_Release(&views[i])
        free(refs)
        free(views)
        free(table)


def apply_to_pages(pages, buf, upto_lsn=LSN_MAX, verify_pages=True):
    """Apply the records of ``buf`` to the pages named in ``pages`` (see materialise_py)."""
    cdef Py_buffer view
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        return _apply_core(pages, <const uint8_t*>view.buf, view.len, upto_lsn,
                           bool(verify_pages))
    finally:
        PyBuffer_Release(&view)


def apply(page, page_id, buf, upto_lsn=LSN_MAX, verify_pages=True):
    """Apply the records of ``buf`` for ``page_id`` to ``page`` (bytearray, or None)."""
    if page is not None and not isinstance(page, bytearray):
        page = bytearray(page)
    return apply_to_pages({page_id: page}, buf, upto_lsn, verify_pages)[page_id]
