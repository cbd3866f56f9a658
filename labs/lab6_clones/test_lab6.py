"""Lab 6 grading tests: clones and backtrack (storage_node/reads.py's clone reads,
engine/writer/backtrack.py's time -> LSN and new truncation sets; docs/clones.md). A clone
is read in-process on one node's Store; backtrack runs on a real cluster, back and forth."""

from __future__ import annotations

import pytest

from engine.writer.backtrack import CommitClock, hidden
from labs.support import Chain, cells
from storage_node import errors as E
from storage_node import store as S


@pytest.fixture
def store(tmp_path):
    st = S.Store(str(tmp_path / "sn-lab"), "sn-lab", map_size=1 << 28)
    yield st
    st.close()


def create(store, chain, parent=None, fork=0):
    tails = tuple(parent.pg_tail(pg, fork) for pg in range(chain.layout.pg_count)) if parent else ()
    [created] = store.apply_ops([S.CreateVolumeOp(chain.volume, chain.layout.pg_count,
                                                  chain.layout.stripe_pages, chain.epoch,
                                                  parent.volume if parent else "", fork, tails)])
    assert created is True, created


def append(store, chain, recs):
    info = store.volume(chain.volume)
    batches = [S.verify_and_prepare(info.layout, info.vol_id, pg, buf)
               for pg, buf in sorted(Chain.pack(recs).items())]
    [result] = store.apply_ops([S.AppendOp(chain.volume, chain.epoch, 0, batches, "writer")])
    if isinstance(result, Exception):
        raise result


def check_pages(store, chain, read_point):
    """Every page of the chain read from the store as of read_point holds the cells the
    records say; returns the number of pages read."""
    n = 0
    for page_id in sorted({r.page_id for r in chain.records}):
        pg = chain.layout.pg_of(page_id)
        rp = chain.pg_tail(pg, read_point)
        want = chain.expected_cells(page_id, read_point)
        if want is None:
            with pytest.raises(E.PageNotFoundError):
                store.read_page(chain.volume, pg, page_id, rp, chain.epoch)
            continue
        got, _lsn, _scl = store.read_page(chain.volume, pg, page_id, rp, chain.epoch)
        assert cells(got) == want, f"{chain.volume} page {page_id} as of {read_point}"
        n += 1
    return n


@pytest.mark.given
def test_a_commit_clock_keeps_its_samples():
    clock = CommitClock()
    clock.add(1_000_000, 10)
    clock.add(2_000_000, 20)
    assert list(clock.lsns) == [10, 20]


def test_hidden_means_inside_a_range_start_exclusive_end_inclusive():
    truncs = ((100, 200, 2), (300, 450, 3))
    assert [hidden(lsn, truncs) for lsn in (100, 101, 200, 201, 300, 450, 451)] == \
        [False, True, True, False, False, True, False]
    assert hidden(5, ()) is False


def test_time_to_lsn_is_the_newest_commit_at_or_before_the_time():
    clock = CommitClock()
    for t_s, lsn in ((1, 10), (2, 20), (3, 35), (5, 50)):
        clock.add(t_s * 1_000_000, lsn)
    assert clock.at_or_before(500_000) is None
    assert clock.at_or_before(1_000_000) == 10
    assert clock.at_or_before(2_500_000) == 20
    assert clock.at_or_before(4_999_999) == 35
    assert clock.at_or_before(9_000_000) == 50


def test_a_clone_reads_its_parent_as_of_the_fork(store, seed):
    """A clone made at F copies nothing; its pages are the parent's as of F plus its own
    records; the parent's writes after F never show in it."""
    parent = Chain("p", seed=seed)
    create(store, parent)
    append(store, parent, parent.next_records(120))
    fork = parent.lsn
    before = store.lmdb_bytes_written
    clone = parent.fork("c", fork)
    create(store, clone, parent, fork)
    assert store.lmdb_bytes_written - before < 4096, "a clone must copy no page or record"
    assert check_pages(store, clone, fork) > 0
    append(store, parent, parent.next_records(60))           # the parent moves on
    assert check_pages(store, clone, fork) > 0
    append(store, clone, clone.next_records(50))             # the clone's own writes
    check_pages(store, clone, clone.lsn)
    check_pages(store, parent, parent.lsn)


def test_a_clone_of_a_clone(store, seed):
    parent = Chain("p", seed=seed)
    create(store, parent)
    append(store, parent, parent.next_records(80))
    clone = parent.fork("c", parent.lsn)
    create(store, clone, parent, parent.lsn)
    append(store, clone, clone.next_records(40))
    grand = clone.fork("cc", clone.lsn)
    create(store, grand, clone, clone.lsn)
    append(store, grand, grand.next_records(30))
    assert check_pages(store, grand, grand.lsn) > 0


@pytest.mark.processes
def test_real_cluster_backtrack_back_and_forth(cluster):
    """Backtrack to L1, write on the new timeline, then backtrack to L2 > L1 of the OLD
    timeline: its records come back (the new set replaces the old one), the new timeline's
    write is hidden; an as-of read sees the past without moving anything."""
    l1 = cluster.put("a", "1")
    l2 = cluster.put("a", "2")
    cluster.put("a", "3")
    assert cluster.get("a", "--as-of-lsn", str(l1)) == "1"
    cluster.run("backtrack", "--to-lsn", str(l1))
    assert cluster.get("a") == "1"
    cluster.put("b", "on-the-new-timeline")
    assert cluster.get("b") == "on-the-new-timeline"
    cluster.run("backtrack", "--to-lsn", str(l2))
    assert cluster.get("a") == "2"
    missing = cluster.run("get", "b", check=False)
    assert missing.returncode != 0 or missing.stdout.strip() != "on-the-new-timeline"
    after = cluster.put("c", "after")
    assert after > l2 and cluster.get("c") == "after"
