"""Lab 6 grading tests: clones and backtrack (storage_node/reads.py's clone reads,
engine/writer/backtrack.py's time -> LSN and new truncation sets; docs/clones.md). A clone
is read in-process on one node's Store; a backtrack's new truncation set (``cut_timeline``,
what ``write_backtrack`` writes) is tested without I/O on docs/clones.md's worked example
and on seeded histories of backtracks back and forth; backtrack also runs on a real
cluster."""

from __future__ import annotations

import random

import pytest

from engine.writer.backtrack import CommitClock, cut_timeline, hidden
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


def visible(commits, truncs):
    return [c for c in commits if not hidden(c, truncs)]


def test_cut_timeline_replays_the_worked_example_of_docs_clones():
    """docs/clones.md, "Timelines": LAL 100; commits 110 120 130; back to 120; commit 340;
    back to 130 (visible only on the timeline of epoch 2); back to 340 (timeline of e4)."""
    lal = 100
    e2 = ((0, 100, 2),)
    history = [e2]
    new_epoch, end, e3 = cut_timeline(e2, 120, epoch=2, every_set=history + [e2], vdl=130,
                                      lal=lal, max_lsn=130, next_lsn=131)
    assert (new_epoch, end, e3) == (3, 230, ((0, 100, 2), (120, 230, 3)))
    assert visible([110, 120, 130], e3) == [110, 120]
    e4 = e3 + ((120, 330, 4),)              # the reopening recovery adds (VDL, end] e4
    history += [e3, e4]
    new_epoch, end, e5 = cut_timeline(e2, 130, epoch=4, every_set=history, vdl=340, lal=lal,
                                      max_lsn=340, next_lsn=341)
    assert (new_epoch, end, e5) == (5, 440, ((0, 100, 2), (130, 440, 5)))
    assert visible([110, 120, 130, 340], e5) == [110, 120, 130]
    e6 = e5 + ((130, 540, 6),)
    history += [e5, e6]
    new_epoch, end, e7 = cut_timeline(e4, 340, epoch=6, every_set=history, vdl=130, lal=lal,
                                      max_lsn=340, next_lsn=541)
    assert (new_epoch, end) == (7, 640)
    assert e7 == ((0, 100, 2), (120, 230, 3), (120, 330, 4), (340, 640, 7))
    assert visible([110, 120, 130, 340], e7) == [110, 120, 340]


def test_backtracks_back_and_forth_keep_exactly_the_timeline_up_to_the_target(seed):
    """A seeded history: commits, then backtracks to a commit of the current timeline or
    of an older one (forward again). After each: every commit visible on the target's
    timeline at or below the target stays visible, every LSN ever allocated above it is
    hidden, and the next LSN allocated (above end) is visible; the epoch grows by one."""
    rng = random.Random(seed)
    lal, epoch, lsn = 100, 2, 100
    current = ((0, 100, 2),)
    timelines = []                          # (set, its commits) of every ended timeline
    commits = []                            # commits on the current timeline
    history = [current]
    for step in range(12):
        for _ in range(rng.randint(1, 6)):
            lsn += rng.randint(1, 5)
            commits.append(lsn)
        timelines.append((current, list(commits)))
        truncs, on_it = rng.choice(timelines)
        target = rng.choice(on_it)
        new_epoch, end, new_set = cut_timeline(truncs, target, epoch=epoch, every_set=history,
                                               vdl=commits[-1], lal=lal, max_lsn=lsn,
                                               next_lsn=lsn + 1)
        where = f"seed {seed}, step {step}, back to {target}"
        assert new_epoch == epoch + 1 and end >= lsn, where
        kept = [c for c in on_it if c <= target]
        assert visible(on_it, new_set) == kept, where
        allocated = [c for _s, cs in timelines for c in cs]
        assert not [c for c in allocated if c > target and not hidden(c, new_set)], where
        assert not hidden(end + 1, new_set), where
        epoch, lsn, current, commits = new_epoch, end, new_set, kept
        history.append(new_set)


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
