"""The materialiser, timed: Cython twin against the pure-Python reference, on the same bytes.

Run:  pytest bench/bench_materialise.py --benchmark-only
(bench/ is not part of the default ``pytest`` run.) Each input is benchmarked with both
implementations in one group; bench/conftest.py prints the speedup (python median /
cython median) per group at the end, and each cython result carries it in extra_info
(``--benchmark-json`` keeps it).

Inputs (records are realistic B+tree leaf traffic: inserts, updates and some deletes of
20-100 byte cells, keys kept sorted, so slots shift and pages fragment and compact):

    chain-N           N records for one page applied to no image: INIT_PAGE, then N-1
                      changes; one seal at the end (what coalescing a new page costs)
    chain-N-on-base   N changes applied to a 60-cell base image (passed as bytes, so each
                      call copies it): page checksum verified first, resealed at the end
    batch-10000x1000  apply_to_pages: 10,000 records over 1,000 pages with base images,
                      10 per page, interleaved as a storage node receives them

The design goal is Cython >= 30x faster than Python on 100-record chains.
"""

from __future__ import annotations

import bisect
import random

import pytest

from engine.format import materialise_py
from engine.format import page as pg
from engine.format import redo
from engine.format.redo import RecordType as RT

cy = pytest.importorskip("engine.format._materialise_cy", reason="Cython materialiser not built")

IMPLS = [pytest.param(materialise_py, id="python"), pytest.param(cy, id="cython")]
CHAIN_LENGTHS = [1, 10, 100, 1000]
PAGE_ID = 7

#: group -> {implementation: median seconds}; read by bench/conftest.py's summary.
MEDIANS: dict[str, dict[str, float]] = {}


class PageWriter:
    """Writes realistic leaf-page records for one page, keeping a model of its keys."""

    FULL_BYTES = 7000  # above this many used bytes, delete instead of inserting

    def __init__(self, rng: random.Random, page_id: int, lsn_source):
        self.rng = rng
        self.page_id = page_id
        self.next_lsn = lsn_source
        self.last_lsn = 0
        self.cells: list[tuple[bytes, int]] = []   # (key, cell size), sorted by key
        self.used = 0

    def record(self, rtype: int, payload: bytes) -> bytes:
        lsn = self.next_lsn()
        rec = redo.encode_record(lsn, lsn - 1, lsn - 1, self.last_lsn, self.page_id, rtype, 0,
                                 payload)
        self.last_lsn = lsn
        return rec

    def init(self) -> bytes:
        self.cells, self.used = [], 0
        return self.record(RT.INIT_PAGE, redo.p_init_page(pg.PageType.LEAF))

    def _value(self, key: bytes) -> bytes:
        cell = self.rng.randint(20, 100)                # whole cell: 4 + key + value
        return self.rng.randbytes(max(0, cell - 4 - len(key)))

    def change(self) -> bytes:
        """One insert (60%), update (30%) or delete (10%, or whenever the page is full)."""
        r = self.rng.random()
        if self.cells and (r < 0.1 or self.used > self.FULL_BYTES):
            slot = self.rng.randrange(len(self.cells))
            self.used -= self.cells.pop(slot)[1] + 2
            return self.record(RT.DELETE_CELL, redo.p_delete_cell(slot))
        if self.cells and r < 0.4:
            slot = self.rng.randrange(len(self.cells))
            key, old = self.cells[slot]
            value = self._value(key)
            self.cells[slot] = (key, 4 + len(key) + len(value))
            self.used += self.cells[slot][1] - old
            return self.record(RT.UPDATE_CELL, redo.p_update_cell(slot, key, value))
        key = self.rng.randbytes(self.rng.randint(8, 16))
        slot = bisect.bisect_left([k for k, _ in self.cells], key)
        value = self._value(key)
        self.cells.insert(slot, (key, 4 + len(key) + len(value)))
        self.used += 4 + len(key) + len(value) + 2
        return self.record(RT.INSERT_CELL, redo.p_insert_cell(slot, key, value))


def _lsns(start: int = 1):
    counter = iter(range(start, 2**63))
    return lambda: next(counter)


def chain(n: int, seed: int = 1) -> bytes:
    """INIT_PAGE and n - 1 changes for PAGE_ID."""
    w = PageWriter(random.Random(seed), PAGE_ID, _lsns())
    return b"".join([w.init()] + [w.change() for _ in range(n - 1)])


def base_and_chain(n: int, seed: int = 2) -> tuple[bytes, bytes]:
    """A sealed 60-cell base image of PAGE_ID and n further changes to it."""
    rng = random.Random(seed)
    w = PageWriter(rng, PAGE_ID, _lsns())
    setup = [w.init()]
    while len(w.cells) < 60:
        setup.append(w.change())
    base = bytes(cy.apply(None, PAGE_ID, b"".join(setup)))
    return base, b"".join(w.change() for _ in range(n))


def batch(records: int = 10_000, pages: int = 1_000, seed: int = 3):
    """Base images for ``pages`` pages (20 cells each) and ``records`` changes over them."""
    rng = random.Random(seed)
    lsn = _lsns()
    writers = [PageWriter(rng, page_id, lsn) for page_id in range(1, pages + 1)]
    bases = {}
    for w in writers:
        setup = [w.init()] + [w.change() for _ in range(20)]
        bases[w.page_id] = bytes(cy.apply(None, w.page_id, b"".join(setup)))
    order = [w for w in writers for _ in range(records // pages)]
    rng.shuffle(order)
    return bases, b"".join(w.change() for w in order)


def _record(benchmark, group: str, impl) -> None:
    """Remember this median; on the second implementation store the speedup."""
    median = benchmark.stats.stats.median
    seen = MEDIANS.setdefault(group, {})
    seen[impl.IMPLEMENTATION] = median
    benchmark.extra_info["median_us"] = round(median * 1e6, 3)
    if "python" in seen and "cython" in seen:
        benchmark.extra_info["speedup_vs_python"] = round(seen["python"] / seen["cython"], 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", CHAIN_LENGTHS)
def test_chain(benchmark, impl, n):
    """Scenario: n records of one page (INIT first) applied to no image."""
    buf = chain(n)
    assert impl.apply(None, PAGE_ID, buf) == materialise_py.apply(None, PAGE_ID, buf)
    benchmark.group = f"chain-{n}"
    benchmark.extra_info["records"] = n
    benchmark(impl.apply, None, PAGE_ID, buf)
    _record(benchmark, benchmark.group, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", CHAIN_LENGTHS)
def test_chain_on_base(benchmark, impl, n):
    """Scenario: n records applied to a verified 60-cell base image, resealed."""
    base, buf = base_and_chain(n)
    assert impl.apply(base, PAGE_ID, buf) == materialise_py.apply(base, PAGE_ID, buf)
    benchmark.group = f"chain-{n}-on-base"
    benchmark.extra_info["records"] = n
    benchmark(impl.apply, base, PAGE_ID, buf)
    _record(benchmark, benchmark.group, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_over_many_pages(benchmark, impl):
    """Scenario: one apply_to_pages of 10,000 records over 1,000 base images."""
    bases, buf = batch()

    def fresh():
        return ({pid: bytearray(image) for pid, image in bases.items()}, buf), {}

    expected = materialise_py.apply_to_pages(fresh()[0][0], buf)
    assert impl.apply_to_pages(fresh()[0][0], buf) == expected
    benchmark.group = "batch-10000x1000"
    benchmark.extra_info["records"] = 10_000
    rounds = 10 if impl is materialise_py else 50
    benchmark.pedantic(impl.apply_to_pages, setup=fresh, rounds=rounds, warmup_rounds=1)
    _record(benchmark, benchmark.group, impl)
