"""The Cython materialiser is the pure-Python reference, byte for byte and error for error.

engine/format/materialise_py.py defines what every record does to a page; engine/format/_materialise_cy.pyx
must give identical pages and raise the same exception class with the same message at the
same point, leaving the same partial changes behind (invariant 14: pages are a cache of log
application, so two appliers must agree exactly).

How: ``StreamBuilder`` runs a small B+tree (a META page with a catalog, one INTERNAL root,
LEAF pages) driven by a seeded RNG and writes the redo records such a tree would ship:
INIT_PAGE, INSERT_CELL at the sorted slot, UPDATE_CELL with values of varying sizes (so
pages fragment and compact), DELETE_CELL, leaf splits (INIT + INSERT_CELLS of the upper
half + TRUNCATE_CELLS + SET_SIBLING + separator insert), merges (INSERT_CELLS into the
neighbour, separator delete, re-INIT of the emptied page as FREE, SET_CHILD when the
leftmost leaf goes), SET_AUX and COMMIT on META. It keeps a model of every page, so the
tests also check the applied pages against what the tree believes. Hypothesis draws the
seed, the number of operations (which it shrinks: a shorter run is a prefix of the longer
one) and where to cut or corrupt the stream.

Set AURORA_LITE_HYPOTHESIS_EXAMPLES to run more examples (default 150 per test). On a
failure hypothesis prints the falsifying seed and a reproduction blob (print_blob).
"""

from __future__ import annotations

import bisect
import os
import random
import struct
import zlib
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine.format import materialise_py as py
from engine.format import page as pg
from engine.format import redo
from engine.errors import (
    BadLengthError,
    ChecksumError,
    FormatError,
    PageFullError,
    PageOrderError,
    TruncatedError,
    UnknownRecordTypeError,
    WrongPageTypeError,
)
from engine.format.redo import LSN_MAX, RecordType as RT

cy = pytest.importorskip(
    "engine.format._materialise_cy",
    reason="Cython materialiser not built (python setup.py build_ext --inplace)",
)

IMPLS = [py, cy]
EXAMPLES = int(os.environ.get("AURORA_LITE_HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

CELL_ROOM = pg.PAGE_SIZE - pg.PAGE_HEADER_SIZE  # bytes for cells + slots in an empty page


def footprint(key: bytes, value: bytes) -> int:
    """Bytes a cell takes in a page, its slot included."""
    return pg.SLOT_SIZE + pg.CELL_HEADER_SIZE + len(key) + len(value)


# --- A B+tree that writes redo records --------------------------------------------------


class ModelPage:
    """What the tree believes one page holds."""

    def __init__(self, ptype: int):
        self.ptype = ptype
        self.cells: list[tuple[bytes, bytes]] = []
        self.right_sibling = 0
        self.leftmost_child = 0
        self.aux = [0, 0, 0, 0]

    def free(self) -> int:
        """Bytes free for cells and slots once the page is compacted."""
        return CELL_ROOM - sum(footprint(k, v) for k, v in self.cells)

    def keys(self) -> list[bytes]:
        return [k for k, _ in self.cells]


class StreamBuilder:
    """Runs a two-level B+tree from a seed and records every page change as redo."""

    META = pg.META_PAGE_ID

    def __init__(self, seed: int, lsn_base: int = 1):
        self.rng = random.Random(seed)
        self.lsn = lsn_base - 1          # next record gets lsn + step
        self.prev_volume_lsn = 0
        self.pg_lsn: dict[int, int] = {}
        self.page_lsn: dict[int, int] = {}
        self.model: dict[int, ModelPage] = {}
        self.records: list[tuple[int, int, bytes]] = []   # (lsn, page_id, record bytes)
        self.events: Counter = Counter()
        self.free_pages: list[int] = []
        self.next_page_id = 1
        self.value_counter = 0
        self.txn_id = 0
        self._bootstrap()

    # -- record emission

    def emit(self, page_id: int, rtype: int, payload: bytes, cpl: bool = False) -> None:
        step = self.rng.choice((1, 1, 1, 2, 7))
        lsn = self.lsn + step
        pgno = page_id % 3  # three protection groups
        rec = redo.encode_record(
            lsn, self.prev_volume_lsn, self.pg_lsn.get(pgno, 0), self.page_lsn.get(page_id, 0),
            page_id, rtype, redo.FLAG_CPL if cpl else 0, payload)
        self.records.append((lsn, page_id, rec))
        self.lsn = self.prev_volume_lsn = lsn
        self.pg_lsn[pgno] = lsn
        self.page_lsn[page_id] = lsn
        self.events[RT(rtype).name] += 1

    def init_page(self, page_id: int, ptype: int) -> ModelPage:
        self.emit(page_id, RT.INIT_PAGE, redo.p_init_page(ptype))
        page = self.model[page_id] = ModelPage(ptype)
        return page

    def buf(self, records=None) -> bytes:
        return b"".join(r for _, _, r in (self.records if records is None else records))

    # -- tree helpers

    def _bootstrap(self) -> None:
        meta = self.init_page(self.META, pg.PageType.META)
        self.root = self.alloc()
        root = self.init_page(self.root, pg.PageType.INTERNAL)
        leaf = self.alloc()
        self.init_page(leaf, pg.PageType.LEAF)
        self.emit(self.root, RT.SET_CHILD, redo.p_set_child(leaf))
        root.leftmost_child = leaf
        name, value = b"table", _U32.pack(self.root)
        self.emit(self.META, RT.INSERT_CELL, redo.p_insert_cell(0, name, value), cpl=True)
        meta.cells.insert(0, (name, value))

    def alloc(self) -> int:
        if self.free_pages and self.rng.random() < 0.7:
            self.events["page reused"] += 1
            return self.free_pages.pop(self.rng.randrange(len(self.free_pages)))
        page_id = self.next_page_id
        self.next_page_id += 1
        self.emit(self.META, RT.SET_AUX, redo.p_set_aux(0, self.next_page_id))
        self.model[self.META].aux[0] = self.next_page_id
        return page_id

    def leaves(self) -> list[int]:
        """Leaf ids in key order: the root's leftmost child, then one per separator."""
        root = self.model[self.root]
        return [root.leftmost_child] + [_U32.unpack(v)[0] for _, v in root.cells]

    def leaf_for(self, key: bytes) -> int:
        root = self.model[self.root]
        i = bisect.bisect_right(root.keys(), key)
        return root.leftmost_child if i == 0 else _U32.unpack(root.cells[i - 1][1])[0]

    def new_key(self) -> bytes:
        # A small alphabet, so keys repeat (-> updates) and sort in interesting ways.
        return bytes(self.rng.choice(b"abcdefgh") for _ in range(self.rng.randint(1, 10)))

    def new_value(self, size: int | None = None) -> bytes:
        if size is None:
            r = self.rng.random()
            if r < 0.45:
                size = self.rng.randint(0, 60)
            elif r < 0.85:
                size = self.rng.randint(60, 250)
            else:
                size = self.rng.randint(250, 1500)
        self.value_counter += 1
        stamp = self.value_counter.to_bytes(4, "little")
        return (stamp * (size // 4 + 1))[:size]

    # -- operations (each keeps the tree valid)

    def op_insert(self) -> None:
        key, value = self.new_key(), self.new_value()
        leaf_id = self.leaf_for(key)
        leaf = self.model[leaf_id]
        if key in leaf.keys():
            return self.op_update(leaf_id, leaf.keys().index(key))
        if footprint(key, value) > leaf.free() and len(leaf.cells) >= 2:
            self.split(leaf_id)
            leaf_id = self.leaf_for(key)
            leaf = self.model[leaf_id]
        if footprint(key, value) > leaf.free():
            room = leaf.free() - footprint(key, b"")
            if room < 0:
                return
            value = self.new_value(room)    # exactly fills the page: the boundary case
            self.events["exact fit"] += 1
        slot = bisect.bisect_left(leaf.keys(), key)
        self.emit(leaf_id, RT.INSERT_CELL, redo.p_insert_cell(slot, key, value))
        leaf.cells.insert(slot, (key, value))

    def op_update(self, leaf_id: int | None = None, slot: int | None = None) -> None:
        if leaf_id is None:
            candidates = [i for i in self.leaves() if self.model[i].cells]
            if not candidates:
                return
            leaf_id = self.rng.choice(candidates)
            slot = self.rng.randrange(len(self.model[leaf_id].cells))
        leaf = self.model[leaf_id]
        key, old = leaf.cells[slot]
        value = self.new_value()
        if len(value) > leaf.free() + len(old):
            value = self.new_value(leaf.free() + len(old))
            self.events["exact fit"] += 1
        self.emit(leaf_id, RT.UPDATE_CELL, redo.p_update_cell(slot, key, value))
        leaf.cells[slot] = (key, value)

    def op_delete(self) -> None:
        candidates = [i for i in self.leaves() if self.model[i].cells]
        if not candidates:
            return
        leaf_id = self.rng.choice(candidates)
        leaf = self.model[leaf_id]
        slot = self.rng.randrange(len(leaf.cells))
        self.emit(leaf_id, RT.DELETE_CELL, redo.p_delete_cell(slot))
        del leaf.cells[slot]

    def split(self, leaf_id: int) -> None:
        leaf = self.model[leaf_id]
        n = len(leaf.cells)
        m = max(1, min(n - 1, n // 2 + self.rng.randint(-2, 2)))
        sep = leaf.cells[m][0]
        root = self.model[self.root]
        if footprint(sep, b"1234") > root.free():
            return
        new_id = self.alloc()
        new = self.init_page(new_id, pg.PageType.LEAF)
        upper = leaf.cells[m:]
        self.emit(new_id, RT.INSERT_CELLS, redo.p_insert_cells(0, upper))
        new.cells = list(upper)
        if leaf.right_sibling:
            self.emit(new_id, RT.SET_SIBLING, redo.p_set_sibling(leaf.right_sibling))
            new.right_sibling = leaf.right_sibling
        self.emit(leaf_id, RT.TRUNCATE_CELLS, redo.p_truncate_cells(m))
        del leaf.cells[m:]
        self.emit(leaf_id, RT.SET_SIBLING, redo.p_set_sibling(new_id))
        leaf.right_sibling = new_id
        slot = bisect.bisect_left(root.keys(), sep)
        self.emit(self.root, RT.INSERT_CELL, redo.p_insert_cell(slot, sep, _U32.pack(new_id)),
                  cpl=True)
        root.cells.insert(slot, (sep, _U32.pack(new_id)))
        self.events["split"] += 1

    def op_split(self) -> None:
        candidates = [i for i in self.leaves() if len(self.model[i].cells) >= 2]
        if candidates:
            self.split(self.rng.choice(candidates))

    def op_merge(self) -> None:
        leaves = self.leaves()
        if len(leaves) < 2:
            return
        i = self.rng.randrange(len(leaves) - 1)
        left_id, right_id = leaves[i], leaves[i + 1]
        left, right = self.model[left_id], self.model[right_id]
        if CELL_ROOM - left.free() + CELL_ROOM - right.free() > CELL_ROOM:
            return
        root = self.model[self.root]
        if i == 0 and self.rng.random() < 0.5:
            # The leftmost leaf goes: its cells move to the front of its right neighbour,
            # which becomes the root's leftmost child.
            self.emit(right_id, RT.INSERT_CELLS, redo.p_insert_cells(0, left.cells))
            right.cells[0:0] = left.cells
            self.emit(self.root, RT.SET_CHILD, redo.p_set_child(right_id))
            root.leftmost_child = right_id
            self.emit(self.root, RT.DELETE_CELL, redo.p_delete_cell(0))
            del root.cells[0]
            gone_id, gone = left_id, left
        else:
            self.emit(left_id, RT.INSERT_CELLS, redo.p_insert_cells(len(left.cells), right.cells))
            left.cells.extend(right.cells)
            self.emit(left_id, RT.SET_SIBLING, redo.p_set_sibling(right.right_sibling))
            left.right_sibling = right.right_sibling
            self.emit(self.root, RT.DELETE_CELL, redo.p_delete_cell(i))
            del root.cells[i]
            gone_id, gone = right_id, right
        if gone.cells and self.rng.random() < 0.5:
            self.emit(gone_id, RT.TRUNCATE_CELLS, redo.p_truncate_cells(0))
        self.init_page(gone_id, pg.PageType.FREE)
        self.free_pages.append(gone_id)
        self.events["merge"] += 1

    def op_commit(self) -> None:
        self.txn_id += self.rng.randint(1, 1000)
        ts = self.rng.getrandbits(64)
        self.emit(self.META, RT.COMMIT, redo.commit_payload(self.txn_id, ts), cpl=True)
        self.model[self.META].aux[1:3] = [self.txn_id, ts]

    def op_set_aux(self) -> None:
        index, value = self.rng.choice((1, 2, 3)), self.rng.getrandbits(64)
        self.emit(self.META, RT.SET_AUX, redo.p_set_aux(index, value))
        self.model[self.META].aux[index] = value

    def op_catalog(self) -> None:
        meta = self.model[self.META]
        name, value = self.new_key(), _U32.pack(self.rng.getrandbits(32))
        keys = meta.keys()
        if name in keys:
            slot = keys.index(name)
            self.emit(self.META, RT.UPDATE_CELL, redo.p_update_cell(slot, name, value))
            meta.cells[slot] = (name, value)
        elif footprint(name, value) <= meta.free():
            slot = bisect.bisect_left(keys, name)
            self.emit(self.META, RT.INSERT_CELL, redo.p_insert_cell(slot, name, value))
            meta.cells.insert(slot, (name, value))

    OPS = (("op_insert", 40), ("op_update", 22), ("op_delete", 12), ("op_split", 3),
           ("op_merge", 5), ("op_commit", 6), ("op_set_aux", 3), ("op_catalog", 2))

    def run(self, n_ops: int) -> "StreamBuilder":
        names = [name for name, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        for _ in range(n_ops):
            getattr(self, self.rng.choices(names, weights)[0])()
        return self

    # -- expectations

    def check_page(self, page_id: int, image) -> None:
        """Assert that an applied page holds exactly what the model says."""
        model = self.model[page_id]
        assert image is not None, f"page {page_id} missing"
        assert pg.verify_checksum(image)
        d = pg.describe(image)
        assert (d["page_id"], d["page_type"], d["page_lsn"]) == (
            page_id, model.ptype, self.page_lsn[page_id])
        assert pg.cells(image) == model.cells
        assert d["right_sibling"] == model.right_sibling
        assert d["leftmost_child"] == model.leftmost_child
        assert d["aux"] == model.aux
        assert pg.free_bytes(image) == model.free()


# --- Running both implementations -------------------------------------------------------


def copy_pages(pages: dict) -> dict:
    return {k: (None if v is None else bytearray(v)) for k, v in pages.items()}


def frozen(pages: dict) -> dict:
    return {k: (None if v is None else bytes(v)) for k, v in pages.items()}


def outcome(impl, pages: dict, buf, upto_lsn=LSN_MAX, verify_pages=True):
    """(error class and message or None, every page afterwards) of one apply_to_pages call.

    Only engine.errors.FormatError is caught: anything else (IndexError, struct.error, an
    AssertionError from the Cython invariant checks) fails the test, as it should.
    """
    pages = copy_pages(pages)
    try:
        result = impl.apply_to_pages(pages, buf, upto_lsn, verify_pages)
        assert result is pages
        err = None
    except FormatError as exc:
        err = (type(exc), str(exc))
    return err, frozen(pages)


def same_outcome(pages: dict, buf, upto_lsn=LSN_MAX, verify_pages=True):
    """Run both implementations; assert they agree exactly; return the outcome."""
    expected = outcome(py, pages, buf, upto_lsn, verify_pages)
    got = outcome(cy, pages, buf, upto_lsn, verify_pages)
    assert got[0] == expected[0], f"python raised {expected[0]}, cython {got[0]}"
    assert got[1] == expected[1], "pages differ after the same records"
    return expected


def all_none(builder: StreamBuilder) -> dict:
    return {page_id: None for page_id in builder.model}


def reseal(record: bytearray) -> bytes:
    """Give a hand-edited record a correct checksum (so only the edit is wrong)."""
    plen = _U16.unpack_from(record, 38)[0]
    struct.pack_into("<I", record, redo.CHECKED_PREFIX, redo.record_checksum(record, 0, plen))
    return bytes(record)


def stream_strategy(max_ops: int = 250):
    return st.builds(
        lambda seed, n_ops, base: StreamBuilder(seed, base).run(n_ops),
        st.integers(0, 2**64 - 1),
        st.one_of(st.integers(1, max_ops), st.integers(max_ops // 2, max_ops)),  # fill pages
        st.sampled_from([1, 1, 1, 2**40, 2**64 - 2**20]),
    )


# --- The build is what it claims to be ---------------------------------------------------


def test_extension_is_the_compiled_twin():
    """Scenario: the imported extension is real Cython code, not a re-export of the reference."""
    assert cy.IMPLEMENTATION == "cython" and py.IMPLEMENTATION == "python"
    assert cy.__file__.endswith((".so", ".pyd"))
    for name in ("scan_batch", "scan_batch_run", "apply_to_pages", "apply"):
        assert getattr(cy, name) is not getattr(py, name)
    assert sorted(cy.__all__) == sorted(["IMPLEMENTATION", "scan_batch", "scan_batch_run",
                                         "apply_to_pages", "apply"])


@SETTINGS
@given(st.binary(max_size=20000), st.integers(0, 2**32 - 1), st.booleans())
def test_crc32_equals_zlib(data, start, portable):
    """Scenario: the extension's own CRC-32 (both code paths) equals zlib.crc32, chaining included."""
    assert cy._crc32(data, start, portable) == zlib.crc32(data, start)
    half = len(data) // 2
    assert cy._crc32(data[half:], cy._crc32(data[:half], 0, portable), portable) == zlib.crc32(data)


def test_generator_exercises_every_path():
    """Scenario: over a few fixed seeds the stream generator splits, merges, reuses FREE
    pages, fills pages to the exact byte, compacts pages, and uses every record type."""
    events: Counter = Counter()
    compactions = 0
    for seed in range(6):
        b = StreamBuilder(seed).run(400)
        events.update(b.events)
        pages = all_none(b)
        for _, page_id, rec in b.records:
            image = pages[page_id]
            before = None if image is None else pg.describe(image)
            pages[page_id] = cy.apply(image, page_id, rec)
            after = pg.describe(pages[page_id])
            if before and before["frag_bytes"] and not after["frag_bytes"] and \
                    rec[36] in (RT.INSERT_CELL, RT.UPDATE_CELL, RT.INSERT_CELLS):
                compactions += 1
        for page_id in b.model:
            b.check_page(page_id, pages[page_id])
    for rt in RT:
        assert events[rt.name] > 0, f"no {rt.name} records (events {events})"
    for what in ("split", "merge", "page reused", "exact fit"):
        assert events[what] > 0, f"generator never did a {what}: {events}"
    assert compactions > 0, "no record compacted a page"


# --- Valid streams: identical pages, and the pages the tree expects ----------------------


@SETTINGS
@given(stream_strategy())
def test_apply_each_page_matches_reference_and_model(b):
    """Scenario: every page of a valid B+tree stream, materialised alone with apply(), is
    byte-identical in both implementations and holds the cells the tree expects."""
    buf = b.buf()
    for page_id in b.model:
        expected = py.apply(None, page_id, buf)
        got = cy.apply(None, page_id, buf)
        assert type(got) is bytearray
        assert got == expected
        b.check_page(page_id, got)
    assert cy.scan_batch(buf) == py.scan_batch(buf)
    assert cy.scan_batch(memoryview(bytearray(buf))) == py.scan_batch(buf)
    refs = py.scan_batch(buf)
    directory, pages, summary = same_items(buf)
    assert summary == summary_of(refs)
    assert same_items(memoryview(bytearray(buf))) == (directory, pages, summary)
    n = len(refs)
    assert directory == struct.pack(f"<{n}Q{n}I", *(r[2] for r in refs),
                                    *(r[0] + r[1] for r in refs))
    assert pages == {p: [r[2] for r in refs if r[6] == p] for p in {r[6] for r in refs}}


def summary_of(refs) -> tuple:
    """scan_batch_run's summary, computed the slow way from scan_batch's header tuples."""
    if not refs:
        return (0, 0, 0, 0, 0, True, 0, True)
    chained = all(refs[i][4] == refs[i - 1][2] for i in range(1, len(refs)))
    ascending = all(refs[i][2] > refs[i - 1][2] for i in range(1, len(refs)))
    bad = next((r[2] for r in refs if max(r[3], r[4], r[5]) >= r[2]), 0)
    return (len(refs), refs[0][2], refs[0][4], refs[-1][2], max(r[2] for r in refs), chained, bad,
            ascending)


def same_items(buf):
    """scan_batch_run of both twins: equal results, or the same error class and message
    (raised again here)."""
    results = []
    for impl in IMPLS:
        try:
            results.append(("ok", impl.scan_batch_run(buf)))
        except FormatError as exc:
            results.append(("err", (type(exc), str(exc))))
    assert results[0] == results[1]
    if results[0][0] == "err":
        cls, msg = results[0][1]
        raise cls(msg)
    return results[0][1]


def test_scan_batch_run_empty_and_errors_match():
    """Scenario: an empty batch gives empty results; a corrupt one the same error as
    scan_batch, in both twins."""
    assert same_items(b"") == (b"", {}, (0, 0, 0, 0, 0, True, 0, True))
    rec = bytearray(redo.encode_record(5, 4, 3, 2, 9, RT.INIT_PAGE, 0,
                                       redo.p_init_page(pg.PageType.LEAF)))
    assert same_items(bytes(rec)) == (struct.pack("<QI", 5, len(rec)), {9: [5]},
                                      (1, 5, 3, 5, 5, True, 0, True))
    rec[-1] ^= 1
    with pytest.raises(ChecksumError):
        same_items(bytes(rec))
    with pytest.raises(ChecksumError):
        py.scan_batch(bytes(rec))


def test_scan_batch_run_summary_chain_and_backlinks():
    """Scenario: the summary says whether a batch is one piece of the segment chain, its
    first/last/max LSN, and the first record whose backlink is not below its own LSN."""
    def rec(lsn, prev_vol, prev_pg, prev_page, page_id=9):
        return redo.encode_record(lsn, prev_vol, prev_pg, prev_page, page_id, RT.INIT_PAGE, 0,
                                  redo.p_init_page(pg.PageType.LEAF))
    chain = rec(10, 9, 8, 0) + rec(11, 10, 10, 10, 4) + rec(12, 11, 11, 11)
    assert same_items(chain)[2] == (3, 10, 8, 12, 12, True, 0, True)
    hole = rec(10, 9, 8, 0) + rec(12, 11, 11, 10)  # 12 links to 11, not to 10
    assert same_items(hole)[2] == (2, 10, 8, 12, 12, False, 0, True)
    backwards = rec(12, 11, 11, 0) + rec(10, 9, 8, 0)
    assert same_items(backwards)[2] == (2, 12, 11, 10, 12, False, 0, False)
    bad = rec(10, 9, 8, 0) + rec(11, 10, 10, 11) + rec(12, 12, 11, 0)  # page link 11 >= 11
    directory, pages, summary = same_items(bad)
    assert summary == (3, 10, 8, 12, 12, True, 11, True)
    assert summary == summary_of(py.scan_batch(bad))
    assert pages == {9: [10, 11, 12]} and len(directory) == 3 * 12


@SETTINGS
@given(stream_strategy(), st.randoms(use_true_random=False))
def test_apply_to_pages_matches_reference(b, rnd):
    """Scenario: one apply_to_pages over every page (plus ids the stream never names, in a
    random dict order) gives byte-identical pages, the model's cells, and leaves absent
    pages None."""
    buf = b.buf()
    ids = list(b.model) + [b.next_page_id + 5, 2**32 - 1]
    rnd.shuffle(ids)
    pages = {page_id: None for page_id in ids}
    err, result = same_outcome(pages, buf)
    assert err is None
    assert list(result) == ids
    for page_id in b.model:
        b.check_page(page_id, result[page_id])
    assert result[b.next_page_id + 5] is None and result[2**32 - 1] is None


@SETTINGS
@given(stream_strategy(), st.data())
def test_cut_points(b, data):
    """Scenario: applying up to a cut LSN (0, just below or at a record, past the end,
    LSN_MAX, negative) agrees across implementations and equals applying only the records
    at or below the cut."""
    lsns = [lsn for lsn, _, _ in b.records]
    i = data.draw(st.integers(0, len(lsns) - 1), label="record index")
    upto = data.draw(st.sampled_from(
        [lsns[i], lsns[i] - 1, 0, -1, lsns[-1] + 1, LSN_MAX, LSN_MAX + 10]), label="upto_lsn")
    err, cut = same_outcome(all_none(b), b.buf(), upto)
    assert err is None
    prefix = [r for r in b.records if r[0] <= upto]
    err, expected = same_outcome(all_none(b), b.buf(prefix))
    assert err is None and cut == expected
    for page_id in b.model:
        assert cy.apply(None, page_id, b.buf(), upto) == cut[page_id]


@SETTINGS
@given(stream_strategy(), st.data())
def test_coalescing_in_two_pieces(b, data):
    """Scenario: a base image made from the records up to k, then the rest of the stream
    (the whole stream again, or only the suffix), equals applying everything at once; the
    base can come from either implementation and the rest go through the other."""
    lsns = [lsn for lsn, _, _ in b.records]
    k = data.draw(st.integers(0, len(lsns) - 1), label="k")
    whole = b.buf()
    err, full = same_outcome(all_none(b), whole)
    assert err is None
    for first, second in ((py, cy), (cy, py), (cy, cy)):
        base = first.apply_to_pages(all_none(b), whole, lsns[k])
        suffix = b.buf(b.records[k + 1:])
        for rest in (whole, suffix):
            pages = second.apply_to_pages(copy_pages(base), rest)
            assert frozen(pages) == full
        for page_id in b.model:  # the same for one page at a time, with a bytes base
            image = base[page_id]
            again = second.apply(None if image is None else bytes(image), page_id, suffix)
            assert again == full[page_id]


# --- Corrupt input: same error, same message, same partial pages -------------------------


@SETTINGS
@given(stream_strategy(120), st.data())
def test_flipped_byte(b, data):
    """Scenario: one flipped bit anywhere in the batch gives the same error (or the same
    pages) in both, for apply_to_pages and for apply."""
    buf = bytearray(b.buf())
    pos = data.draw(st.integers(0, len(buf) - 1), label="offset")
    buf[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    err, _ = same_outcome(all_none(b), bytes(buf))
    assert err is not None and err[0] in (ChecksumError, BadLengthError, TruncatedError)
    with pytest.raises(err[0]):
        same_items(bytes(buf))
    page_id = data.draw(st.sampled_from(sorted(b.model)), label="page")
    same_outcome({page_id: None}, bytes(buf))


@SETTINGS
@given(stream_strategy(120), st.data())
def test_truncated_batch(b, data):
    """Scenario: a batch cut at any offset raises TruncatedError in both (or, on a record
    boundary, applies the same prefix)."""
    buf = b.buf()
    cut = data.draw(st.integers(0, len(buf) - 1), label="cut")
    err, _ = same_outcome(all_none(b), buf[:cut])
    if err is None:
        same_items(buf[:cut])
    else:
        with pytest.raises(err[0]):
            same_items(buf[:cut])
    ends = set()
    pos = 0
    for _, _, rec in b.records:
        pos += len(rec)
        ends.add(pos)
    assert (err is None) == (cut == 0 or cut in ends)
    if err is not None:
        assert err[0] is TruncatedError


def _edit_record(b: StreamBuilder, index: int, edit) -> bytes:
    """The batch with record ``index`` replaced by edit(bytearray(record)) (resealed)."""
    records = list(b.records)
    lsn, page_id, rec = records[index]
    records[index] = (lsn, page_id, reseal(edit(bytearray(rec))))
    return b.buf(records)


@SETTINGS
@given(stream_strategy(120), st.data())
def test_unknown_record_type(b, data):
    """Scenario: a record whose type byte is unknown but whose checksum is right raises
    UnknownRecordTypeError with the same message in both."""
    index = data.draw(st.integers(0, len(b.records) - 1), label="record")
    rtype = data.draw(st.sampled_from([0, 11, 12, 127, 128, 255]), label="rtype")

    def edit(rec):
        rec[36] = rtype
        return rec
    err, _ = same_outcome(all_none(b), _edit_record(b, index, edit))
    assert err[0] is UnknownRecordTypeError


def _payload_edit(data, rec: bytearray) -> bytearray:
    """Make one record's payload wrong in a way the materialiser must notice (or not)."""
    header, payload = rec[:redo.HEADER_SIZE], bytearray(rec[redo.HEADER_SIZE:])
    kind = data.draw(st.sampled_from(
        ["u16", "grow", "shrink", "random", "count", "cell_len", "big_slot"]), label="edit")
    if kind == "u16" and len(payload) >= 2:          # slot, key_len, count, index, ...
        at = data.draw(st.integers(0, min(len(payload), 12) - 2), label="at")
        _U16.pack_into(payload, at, data.draw(st.integers(0, 0xFFFF), label="value"))
    elif kind == "grow":
        payload += bytes(data.draw(st.integers(1, 9), label="grow"))
    elif kind == "shrink" and payload:
        del payload[data.draw(st.integers(0, len(payload) - 1), label="new len"):]
    elif kind == "random":
        payload = bytearray(data.draw(st.binary(max_size=40), label="payload"))
    elif kind == "count" and len(payload) >= 4:       # INSERT_CELLS count, key_len
        _U16.pack_into(payload, 2, _U16.unpack_from(payload, 2)[0] + data.draw(
            st.sampled_from([1, -1, 100]), label="delta") & 0xFFFF)
    elif kind == "cell_len" and len(payload) >= 8:    # INSERT_CELLS first cell's lengths
        _U16.pack_into(payload, data.draw(st.sampled_from([4, 6]), label="field"),
                       data.draw(st.integers(0, 0xFFFF), label="value"))
    elif kind == "big_slot" and len(payload) >= 2:
        _U16.pack_into(payload, 0, data.draw(st.sampled_from([0xFFFF, 4064, 4065]), label="slot"))
    if len(payload) > redo.PAYLOAD_MAX:
        del payload[redo.PAYLOAD_MAX:]
    _U16.pack_into(header, 38, len(payload))
    return header + payload


@SETTINGS
@given(stream_strategy(120), st.data())
def test_impossible_payloads(b, data):
    """Scenario: slots past cell_count, key lengths past the payload, wrong payload sizes,
    INSERT_CELLS counts and cell lengths that do not add up, SET_AUX indexes and page types
    out of range (all with correct checksums) give the same error in both, at the same
    record, with the same pages changed before it."""
    index = data.draw(st.integers(0, len(b.records) - 1), label="record")
    buf = _edit_record(b, index, lambda rec: _payload_edit(data, rec))
    same_outcome(all_none(b), buf)
    page_id = b.records[index][1]
    same_outcome({page_id: None}, buf)


@SETTINGS
@given(stream_strategy(150), st.data())
def test_cell_that_does_not_fit(b, data):
    """Scenario: an INSERT_CELL or UPDATE_CELL one byte too big for a page's free space
    raises the same PageFullError in both; one that fits exactly applies identically."""
    page_id = data.draw(st.sampled_from(sorted(b.model)), label="page")
    model = b.model[page_id]
    assume(model.ptype != pg.PageType.FREE)
    key = b"\xff" * 3                                  # sorts last: slot = len(cells)
    assume(key not in model.keys())
    over = data.draw(st.sampled_from([0, 1]), label="bytes over")
    if model.cells and data.draw(st.booleans(), label="update"):
        slot = data.draw(st.integers(0, len(model.cells) - 1), label="slot")
        ukey, old = model.cells[slot]
        size = model.free() + len(old) + over
        b.emit(page_id, RT.UPDATE_CELL, redo.p_update_cell(slot, ukey, b"u" * size))
    else:
        size = model.free() - footprint(key, b"") + over
        assume(size >= 0)
        b.emit(page_id, RT.INSERT_CELL, redo.p_insert_cell(len(model.cells), key, b"i" * size))
    err, pages = same_outcome(all_none(b), b.buf())
    if over:
        assert err is not None and err[0] is PageFullError
    else:
        assert err is None
        assert pg.free_bytes(pages[page_id]) == 0


@SETTINGS
@given(stream_strategy(120), st.data())
def test_wrong_backlinks_and_targets(b, data):
    """Scenario: a record whose page backlink, LSN or page id is wrong (checksum right)
    raises the same PageOrderError / WrongPageTypeError / BadLengthError in both."""
    index = data.draw(st.integers(0, len(b.records) - 1), label="record")
    kind = data.draw(st.sampled_from(["backlink", "lsn", "page"]), label="edit")
    other_page = data.draw(st.sampled_from(sorted(b.model)), label="other page")

    def edit(rec):
        lsn, _, _, prev_page = struct.unpack_from("<QQQQ", rec, 0)
        if kind == "backlink":
            struct.pack_into("<Q", rec, 24, (prev_page + data.draw(
                st.sampled_from([1, -1, 2**63]), label="delta")) % 2**64)
        elif kind == "lsn":
            struct.pack_into("<Q", rec, 0, max(1, prev_page))   # not above its predecessor
        else:
            struct.pack_into("<I", rec, 32, other_page)
        return rec
    buf = _edit_record(b, index, edit)
    err, _ = same_outcome(all_none(b), buf)
    first_of_page = struct.unpack_from("<Q", b.records[index][2], 24)[0] == 0
    if kind == "backlink" and not first_of_page:  # a page's first record has no backlink
        assert err is not None and err[0] is PageOrderError


@SETTINGS
@given(stream_strategy(150), st.data())
def test_corrupted_page_image(b, data):
    """Scenario: a base image with a flipped byte raises ChecksumError in both when pages
    are verified; with verification off, or resealed after the damage (a wrong header
    field, slot offset or cell length), both raise the same error or give the same bytes."""
    lsns = [lsn for lsn, _, _ in b.records]
    k = data.draw(st.integers(0, len(lsns) - 1), label="k")
    base = py.apply_to_pages(all_none(b), b.buf(), lsns[k])
    present = sorted(p for p, image in base.items() if image is not None)
    page_id = data.draw(st.sampled_from(present), label="page")
    image = base[page_id]
    kind = data.draw(st.sampled_from(["flip", "header", "slot", "cell"]), label="damage")
    count = pg.cell_count(image)
    if kind == "flip":
        pos = data.draw(st.integers(0, pg.PAGE_SIZE - 1), label="offset")
        image[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        err, _ = same_outcome(base, b.buf(), verify_pages=True)
        assert err == (ChecksumError, f"page {page_id} checksum mismatch")
    elif kind == "header":
        field = data.draw(st.sampled_from([pg.OFF_CELL_COUNT, pg.OFF_CONTENT_START,
                                           pg.OFF_FRAG_BYTES, pg.OFF_PAGE_TYPE]), label="field")
        if field == pg.OFF_PAGE_TYPE:
            image[field] = data.draw(st.integers(0, 255), label="value")
        else:
            _U16.pack_into(image, field, data.draw(st.integers(0, 0xFFFF), label="value"))
    elif kind == "slot" and count:
        slot = data.draw(st.integers(0, count - 1), label="slot")
        _U16.pack_into(image, pg.PAGE_HEADER_SIZE + 2 * slot,
                       data.draw(st.integers(0, 0xFFFF), label="offset"))
    elif kind == "cell" and count:
        off = pg.cell_offset(image, data.draw(st.integers(0, count - 1), label="slot"))
        _U16.pack_into(image, off + data.draw(st.sampled_from([0, 2]), label="field"),
                       data.draw(st.integers(0, 0xFFFF), label="length"))
    same_outcome(base, b.buf(), verify_pages=False)
    pg.seal(image)
    same_outcome(base, b.buf(), verify_pages=True)
    same_outcome({page_id: base[page_id]}, b.buf(), verify_pages=True)


@SETTINGS
@given(st.integers(0, 2**64 - 1), st.integers(1, 60), st.data())
def test_random_records_on_live_pages(seed, n_ops, data):
    """Scenario: records with valid checksums and chains but random types and payloads
    (mostly nonsense: overlapping and overflowing cells, bad slots) hit a page built by a
    valid stream; both implementations fail identically or give identical bytes."""
    b = StreamBuilder(seed).run(n_ops)
    page_id = data.draw(st.sampled_from(sorted(b.model)), label="page")
    valid_end = b.records[-1][0]
    for _ in range(data.draw(st.integers(1, 8), label="records")):
        rtype = data.draw(st.integers(1, 10), label="rtype")
        payload = data.draw(st.one_of(
            st.binary(max_size=24),
            st.builds(lambda s, k, tail: _U16.pack(s) + _U16.pack(k) + tail,
                      st.integers(0, 70), st.integers(0, 40), st.binary(max_size=60)),
        ), label="payload")
        b.emit(page_id, rtype, payload)
    same_outcome(all_none(b), b.buf())
    base = py.apply_to_pages(all_none(b), b.buf(), valid_end)
    same_outcome(base, b.buf(), verify_pages=False)


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes(buf):
    """Scenario: arbitrary bytes as a batch: scan_batch and apply_to_pages agree."""
    results = []
    for impl in IMPLS:
        try:
            results.append(("ok", impl.scan_batch(buf)))
        except FormatError as exc:
            results.append((type(exc), str(exc)))
    assert results[0] == results[1]
    same_outcome({0: None, 1: None}, buf)


# --- Contract edges ------------------------------------------------------------------------


def _small_stream() -> StreamBuilder:
    return StreamBuilder(7).run(40)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.IMPLEMENTATION)
def test_apply_converts_and_changes_in_place(impl):
    """Scenario: apply() turns a bytes base into a new bytearray, changes a bytearray base
    in place, and accepts bytes, bytearray and memoryview batches."""
    b = _small_stream()
    buf = b.buf()
    lsns = [lsn for lsn, pid, _ in b.records if pid == b.root]
    base = py.apply(None, b.root, buf, lsns[0])
    full = py.apply(None, b.root, buf)
    out = impl.apply(bytes(base), b.root, buf)
    assert type(out) is bytearray and out == full
    mutable = bytearray(base)
    assert impl.apply(mutable, b.root, memoryview(buf)) is mutable and mutable == full
    assert impl.apply(None, b.root, bytearray(buf)) == full
    assert impl.apply(None, 999, buf) is None


def test_bad_page_dicts_raise_alike():
    """Scenario: a non-int page id, a non-bytearray image, a short image, a checksum
    mismatch and an image of another page raise the same errors in both."""
    b = _small_stream()
    buf = b.buf()
    good = py.apply(None, b.root, buf)
    cases = [
        {"x": None},
        {b.root: bytes(good)},
        {b.root: bytearray(100)},
        {b.root: bytearray(good[:-1]) + b"\x01"},
        {b.root + 1: bytearray(good)},
    ]
    for pages in cases:
        errors = []
        for impl in IMPLS:
            with pytest.raises(Exception) as info:
                impl.apply_to_pages(dict(pages), buf)
            errors.append((info.type, str(info.value)))
        assert errors[0] == errors[1], pages.keys()
    assert errors[0][0] is PageOrderError


def test_messages_format_large_lsns():
    """Scenario: LSNs above 2**63 appear in messages as the same unsigned decimal."""
    b = StreamBuilder(3, lsn_base=2**64 - 100).run(5)
    lsn = b.records[-1][0] + 1
    bad = redo.encode_record(lsn, 0, 0, 12345, b.root, RT.DELETE_CELL, 0, redo.p_delete_cell(0))
    err, _ = same_outcome(all_none(b), b.buf() + bad)
    assert err[0] is PageOrderError and str(lsn) in err[1]


def test_wrong_page_type_errors():
    """Scenario: COMMIT / SET_AUX on a leaf, SET_CHILD on a leaf and any change to a FREE
    page raise the same WrongPageTypeError in both."""
    b = StreamBuilder(11).run(3)
    leaf = b.leaves()[0]
    for rtype, payload in ((RT.COMMIT, redo.commit_payload(1, 2)), (RT.SET_AUX, redo.p_set_aux(1, 5)),
                           (RT.SET_CHILD, redo.p_set_child(9))):
        c = StreamBuilder(11).run(3)
        c.emit(leaf, rtype, payload)
        err, _ = same_outcome(all_none(c), c.buf())
        assert err[0] is WrongPageTypeError, err
    c = StreamBuilder(11).run(3)
    c.init_page(leaf, pg.PageType.FREE)
    c.emit(leaf, RT.SET_SIBLING, redo.p_set_sibling(3))
    err, _ = same_outcome(all_none(c), c.buf())
    assert err == (WrongPageTypeError, f"record lsn {c.records[-1][0]}: page {leaf} is FREE; only INIT_PAGE applies")
