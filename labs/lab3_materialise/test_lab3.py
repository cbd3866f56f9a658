"""Lab 3 grading tests: materialisation (engine/format/materialise_py.py, the pure-Python
twin): a page version is a function of the log (invariant 14). The oracle is the records
themselves (labs/support.Chain.expected_cells), not a materialiser. The grader runs these
with AURORA_LITE_PURE_PYTHON=1, so the real cluster of the last test (storage nodes
building pages for reads, coalescing in the background) runs your twin too."""

from __future__ import annotations

import pytest

from engine.errors import PageOrderError
from engine.format import materialise_py as mat
from engine.format import page as pagefmt
from engine.format import redo
from engine.format.redo import RecordType as RT
from labs.support import Chain, cells


def one_page_chain(seed, n=80, page_id=5):
    chain = Chain(seed=seed, pages=[page_id])
    chain.next_records(n, pages=[page_id])
    return chain, page_id


@pytest.mark.given
def test_records_scan_in_order():
    chain, page_id = one_page_chain(1, n=10)
    lsns = [ref[2] for ref in mat.scan_batch(chain.page_log(page_id))]
    assert lsns == [r.lsn for r in chain.records]


def test_a_page_is_built_from_its_log(seed):
    chain, page_id = one_page_chain(seed)
    image = mat.apply(None, page_id, chain.page_log(page_id))
    assert cells(image) == chain.expected_cells(page_id)
    assert pagefmt.page_lsn(image) == chain.records[-1].lsn
    assert pagefmt.verify_checksum(image)


def test_a_page_as_of_a_read_point(seed):
    chain, page_id = one_page_chain(seed)
    for rec in chain.records[::7]:
        image = mat.apply(None, page_id, chain.page_log(page_id), upto_lsn=rec.lsn)
        assert cells(image) == chain.expected_cells(page_id, rec.lsn)
        assert pagefmt.page_lsn(image) == rec.lsn


def test_coalescing_onto_a_base_version_skips_what_it_holds(seed):
    """A stored version at LSN b plus the whole log gives the newest page: records at or
    below b are already in the base and are skipped."""
    chain, page_id = one_page_chain(seed)
    log = chain.page_log(page_id)
    middle = chain.records[len(chain.records) // 2].lsn
    base = mat.apply(None, page_id, log, upto_lsn=middle)
    newest = mat.apply(bytearray(base), page_id, log)
    assert bytes(newest) == bytes(mat.apply(None, page_id, log))
    assert cells(newest) == chain.expected_cells(page_id)


def test_many_pages_from_one_interleaved_log(seed):
    chain = Chain(seed=seed, pages=[1, 2, 3, 9])
    chain.next_records(150)
    log = b"".join(r.data for r in chain.records)
    pages = mat.apply_to_pages({1: None, 3: None, 9: None}, log)
    assert set(pages) == {1, 3, 9}, "only the pages asked for"
    for page_id in (1, 3, 9):
        assert cells(pages[page_id]) == chain.expected_cells(page_id)


def test_a_record_that_does_not_follow_the_page_is_refused(seed):
    chain, page_id = one_page_chain(seed, n=6)
    recs = chain.records
    with pytest.raises(PageOrderError):
        mat.apply(None, page_id, b"".join(r.data for r in recs[1:]))    # no INIT_PAGE first
    skipped = recs[:2] + recs[3:]                                       # a hole in the page chain
    with pytest.raises(PageOrderError):
        mat.apply(None, page_id, b"".join(r.data for r in skipped))


def test_records_of_an_unknown_page_leave_the_image_alone(seed):
    chain, page_id = one_page_chain(seed, n=10)
    other = redo.encode_record(chain.lsn + 1, chain.lsn, 0, 0, page_id + 1, RT.INIT_PAGE, 0,
                               redo.p_init_page(pagefmt.PageType.LEAF))
    image = mat.apply(None, page_id, chain.page_log(page_id) + other)
    assert pagefmt.page_lsn(image) == chain.records[-1].lsn


def test_cost_each_changed_page_is_sealed_once_per_call(seed, monkeypatch):
    """Cost: the page checksum is computed once per changed page, not once per record."""
    chain = Chain(seed=seed, pages=[1, 2])
    chain.next_records(100)
    calls = []
    real_seal = pagefmt.seal
    monkeypatch.setattr(pagefmt, "seal", lambda page: calls.append(1) or real_seal(page))
    mat.apply_to_pages({1: None, 2: None}, b"".join(r.data for r in chain.records))
    assert len(calls) == 2, f"{len(calls)} page checksums for 2 pages"


def test_the_cython_twin_agrees_byte_for_byte(seed):
    """Your twin and the compiled one give identical bytes (skipped if not compiled)."""
    cy = pytest.importorskip("engine.format._materialise_cy")
    chain = Chain(seed=seed, pages=[1, 2, 3])
    chain.next_records(120)
    log = b"".join(r.data for r in chain.records)
    ours = mat.apply_to_pages({1: None, 2: None, 3: None}, log)
    theirs = cy.apply_to_pages({1: None, 2: None, 3: None}, log)
    assert {k: bytes(v) for k, v in ours.items()} == {k: bytes(v) for k, v in theirs.items()}


@pytest.mark.processes
def test_real_cluster_reads_pages_storage_built(cluster):
    """Storage builds every page a replica or an as-of read asks for with your twin."""
    from engine import materialiser

    assert materialiser.IMPLEMENTATION == "python", "grade lab 3 with `aurora-lite lab grade 3`"
    first = cluster.put("fruit", "apple")
    for i in range(20):
        cluster.put(f"k{i:02d}", f"value-{i}")
    cluster.put("fruit", "banana")
    assert cluster.get("fruit", "--as-of-lsn", str(first)) == "apple"
    assert cluster.get("fruit") == "banana"
    for i in (0, 7, 19):
        assert cluster.get(f"k{i:02d}", "--endpoint", "reader") == f"value-{i}"
