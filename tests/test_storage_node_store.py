"""Fast in-process tests of storage_node/store.py and the modules it composes (no gRPC,
no subprocess).

They drive the Store's operations directly and compare every page it serves with the
reference materialiser applied to the oracle log (tests/storage_client.ChainBuilder).
"""

from __future__ import annotations

import os
import random

import pytest

from engine.format.redo import encode_record, p_init_page
from engine.format.volume import VolumeLayout
from storage_node import errors as E
from storage_node import layout, pageindex, plans
from storage_node import store as S
from tests.storage_client import ChainBuilder


@pytest.fixture
def seed():
    value = int(os.environ.get("AURORA_TEST_SEED", random.randrange(1 << 32)))
    print(f"seed={value} (replay with AURORA_TEST_SEED={value})")
    return value


@pytest.fixture
def store(tmp_path):
    st = S.Store(str(tmp_path / "sn-test"), "sn-test", map_size=1 << 30)
    yield st
    st.close()


def create(store: S.Store, chain: ChainBuilder) -> None:
    [created] = store.apply_ops([S.CreateVolumeOp(chain.volume, chain.layout.pg_count,
                                                  chain.layout.stripe_pages, chain.epoch)])
    assert created is True


def append(store: S.Store, chain: ChainBuilder, recs, epoch=None, source="writer", writer_vdl=0):
    """Append recs as one request (telling the writer's VDL); return {pg: scl} or raise."""
    info = store.volume(chain.volume)
    batches = [S.verify_and_prepare(info.layout, info.vol_id, pg, buf)
               for pg, buf in sorted(ChainBuilder.pack(recs).items())]
    [result] = store.apply_ops([S.AppendOp(chain.volume, chain.epoch if epoch is None else epoch,
                                           writer_vdl, batches, source)])
    if isinstance(result, Exception):
        raise result
    return result


def scls(store: S.Store, chain: ChainBuilder) -> dict[int, int]:
    return {pg: store.segment(chain.volume, pg).scl for pg in range(chain.layout.pg_count)}


def check_pages(store: S.Store, chain: ChainBuilder, read_point: int) -> int:
    """Every touched page read as of read_point equals the oracle; returns pages checked."""
    n = 0
    for page_id in chain.touched_pages():
        pg = chain.layout.pg_of(page_id)
        want = chain.oracle_page(page_id, read_point)
        rp = chain.pg_read_point(pg, read_point)
        if want is None:
            with pytest.raises(E.PageNotFoundError):
                store.read_page(chain.volume, pg, page_id, rp, chain.epoch)
            continue
        got, lsn, _scl = store.read_page(chain.volume, pg, page_id, rp, chain.epoch)
        assert got == want, f"page {page_id} as of {read_point} differs from the oracle"
        n += 1
    return n


def coalesce_all(store: S.Store, chain: ChainBuilder) -> int:
    n = 0
    for pg in range(chain.layout.pg_count):
        start = 0
        while start is not None:
            op, start = store.plan_coalesce(chain.volume, pg, start_page=start)
            if op:
                [k] = store.apply_ops([op])
                n += k
    return n


def test_in_order_append_acks_scl_and_reads_match_oracle(store, seed):
    """Scenario: records arrive in order; every PG's SCL is its last record and every page
    read (before and after coalescing into page versions) equals the reference."""
    chain = ChainBuilder("v", seed=seed)
    create(store, chain)
    for _ in range(5):
        recs = chain.next_records(60)
        acks = append(store, chain, recs)
        for pg, scl in acks.items():
            assert scl == chain.pg_scl(pg), f"seed={seed}"
    mid = chain.lsn
    assert check_pages(store, chain, chain.lsn) > 0
    assert coalesce_all(store, chain) > 0
    more = chain.next_records(40)
    append(store, chain, more)
    check_pages(store, chain, chain.lsn)
    # A read point between versions still sees the page as of that point.
    for pg in range(chain.layout.pg_count):
        assert store.segment(chain.volume, pg).n_versions > 0
    check_pages(store, chain, mid)


def test_scl_stops_at_hole_and_advances_when_filled(store, seed):
    """Scenario: a PG's records arrive out of order with a hole; the SCL stops right
    before the hole, retransmits change nothing, and filling the hole moves the SCL to the
    end of the chain (invariant 4)."""
    chain = ChainBuilder("v", seed=seed, pages=[1])  # one page -> one PG, one chain
    create(store, chain)
    recs = chain.next_records(10)
    pg = recs[0].pg
    rng = random.Random(seed)
    hole = rng.randrange(1, 9)
    later = recs[hole + 1:]
    rng.shuffle(later)
    assert append(store, chain, later)[pg] == 0  # nothing links to SCL 0 yet
    assert append(store, chain, recs[:hole])[pg] == recs[hole - 1].lsn
    assert append(store, chain, recs[:hole] + later)[pg] == recs[hole - 1].lsn  # idempotent
    assert store.segment("v", pg).n_records == 9
    with pytest.raises(E.ReadPointAboveSclError):
        store.read_page("v", pg, 1, recs[hole].lsn, 1)
    assert append(store, chain, [recs[hole]])[pg] == recs[-1].lsn
    assert store.segment("v", pg).n_records == 10
    check_pages(store, chain, chain.lsn)


def test_bad_batches_are_refused_whole(store):
    """Scenario: checksum, malformed and wrong-PG batches are refused by verify_and_prepare before
    anything is stored, and stale / ahead epochs by the append op; nothing is stored."""
    chain = ChainBuilder("v", seed=1)
    create(store, chain)
    layout = chain.layout
    good = encode_record(1, 0, 0, 0, 1, 1, 0, p_init_page(1))
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    with pytest.raises(E.BadChecksumError):
        S.verify_and_prepare(layout, 1, layout.pg_of(1), bytes(bad))
    with pytest.raises(E.MalformedError):
        S.verify_and_prepare(layout, 1, layout.pg_of(1), good[:-3])
    with pytest.raises(E.WrongPgError):
        S.verify_and_prepare(layout, 1, (layout.pg_of(1) + 1) % layout.pg_count, good)
    with pytest.raises(E.MalformedError):
        S.verify_and_prepare(layout, 1, 99, good)
    linked_forward = encode_record(6, 0, 6, 0, 1, 1, 0, p_init_page(1))  # PG backlink == own LSN
    with pytest.raises(E.MalformedError, match="lsn 6: a backlink is not below"):
        S.verify_and_prepare(layout, 1, layout.pg_of(1), good + linked_forward)
    recs = chain.next_records(5, pages=[1])
    # epoch 2 on a segment at epoch 1: the node missed a truncate.
    with pytest.raises(E.EpochAheadError):
        append(store, chain, recs, epoch=2)
    assert store.segment("v", layout.pg_of(1)).n_records == 0


def test_stale_epoch_after_truncate(store, seed):
    """Scenario: a Truncate at epoch 2 fences epoch-1 appends (STALE_EPOCH naming epoch 2),
    hides the truncated records from the SCL, reads and fetches, and a writer at epoch 2
    continues the chain from the truncation start."""
    chain = ChainBuilder("v", seed=seed)
    create(store, chain)
    append(store, chain, chain.next_records(80))
    vdl = chain.lsn
    tail = chain.next_records(30)
    append(store, chain, tail)
    coalesce_all(store, chain)  # versions above the truncation start must not survive
    start, end = vdl, chain.lsn + 100
    for pg in range(chain.layout.pg_count):
        [scl] = store.apply_ops([S.TruncateOp("v", pg, start, end, 2)])
        assert scl == chain.pg_scl(pg) or scl <= start
    chain.truncate(start, end)
    old_epoch = chain.epoch
    chain.epoch = 2
    with pytest.raises(E.StaleEpochError) as exc:
        append(store, chain, chain.next_records(1), epoch=old_epoch)
    assert exc.value.current_epoch == 2
    chain.records.pop()  # that record was refused; forget it in the oracle
    chain.truncate(start, end)  # recompute the builder's chain heads
    assert scls(store, chain) == {pg: chain.pg_scl(pg) for pg in range(chain.layout.pg_count)}
    check_pages(store, chain, vdl)
    for pg in range(chain.layout.pg_count):
        recs, scl, more, epoch, truncs = store.fetch_records("v", pg, 0, 0, 0, 0)
        assert not more and epoch == 2 and truncs == ((start, end, 2),)
        assert recs == b"".join(r.data for r in chain.visible_records(pg))
    append(store, chain, chain.next_records(50))
    assert scls(store, chain) == {pg: chain.pg_scl(pg) for pg in range(chain.layout.pg_count)}
    check_pages(store, chain, chain.lsn)


def test_gc_keeps_what_read_points_above_horizon_need(store, seed):
    """Scenario: after SetGcHorizon and a full GC pass, records and versions below the
    horizon are gone, reads below it are refused, and every read at or above it still
    equals the reference (invariant 12)."""
    chain = ChainBuilder("v", seed=seed)
    create(store, chain)
    append(store, chain, chain.next_records(200))
    horizon = chain.lsn
    # The writer's next append tells storage its VDL; GC never goes above it.
    append(store, chain, chain.next_records(100), writer_vdl=horizon)
    before = sum(store.segment("v", pg).n_records for pg in range(chain.layout.pg_count))
    store.apply_ops([S.SetGcHorizonOp("v", horizon, 1)])
    for pg in range(chain.layout.pg_count):
        start = 0
        while start is not None:
            op, start = store.plan_gc("v", pg, horizon, start)
            store.apply_ops([op])
        assert store.segment("v", pg).gc_done == min(horizon, store.segment("v", pg).scl)
    after = sum(store.segment("v", pg).n_records for pg in range(chain.layout.pg_count))
    assert after < before
    some_page = chain.touched_pages()[0]
    pg = chain.layout.pg_of(some_page)
    floor = chain.pg_read_point(pg, horizon)
    with pytest.raises(E.ReadPointBelowGcError):
        store.read_page("v", pg, some_page, floor - 1, 1)
    check_pages(store, chain, horizon)
    check_pages(store, chain, chain.lsn)


def test_scrub_quarantines_and_repair_clears(store, seed, tmp_path):
    """Scenario: a record's and a version's bytes rot on disk; the scrub finds both, they
    are quarantined (reads needing them fail CORRUPT rather than serve bad bytes), the
    version is rebuilt from the log with identical bytes and the record is repaired by a
    peer's copy (invariant 13)."""
    chain = ChainBuilder("v", seed=seed, pages=[1, 2])
    create(store, chain)
    append(store, chain, chain.next_records(40))
    coalesce_all(store, chain)
    append(store, chain, chain.next_records(10))
    pg = chain.layout.pg_of(1)
    info = store.volume("v")
    prefix = S.seg_prefix(info.vol_id, pg)
    victim = [r for r in chain.records if r.page_id == 1][-3]
    (vkey, good_version), = [(k, v) for k, v in _versions(store, prefix).items() if k[0] == 1][:1]
    with store.env.begin(write=True) as txn:  # simulate bit rot through LMDB itself
        run_key, run_value = _run_holding(txn, store, prefix, victim.lsn)
        at = run_value.index(victim.data) + len(victim.data) - 1
        rotten = bytearray(run_value)
        rotten[at] ^= 0x40  # the record's last byte: its run's directory stays good
        txn.put(run_key, bytes(rotten), db=store.db_log)
        page = bytearray(good_version)
        page[5000] ^= 0x01
        txn.put(S.page_key(prefix, *vkey), bytes(page), db=store.db_versions)
    bad_r, bad_runs, _last, done = store.scrub_records("v", pg, 0, 10_000)
    bad_v, _lastv, done_v = store.scrub_versions("v", pg, (0, 0), 10_000)
    assert bad_r == [victim.lsn] and bad_runs == [] and bad_v == [vkey] and done and done_v
    [found] = store.apply_ops([S.QuarantineOp("v", pg, bad_r, bad_v)])
    assert found == 2
    with pytest.raises(E.CorruptError):
        store.read_page("v", pg, 1, chain.lsn, 1)
    # Repair the record as a peer would (source=repair, no epoch) ...
    append(store, chain, [victim], epoch=0, source="repair")
    assert store.quarantined(("v", pg)) == (frozenset(), frozenset([vkey]))
    # ... and the version from the log (which needs that record if it lies below it).
    rebuilt = store.buildable_version("v", pg, *vkey)
    assert rebuilt == good_version  # invariant 14: identical bytes from the log
    store.apply_ops([S.PutVersionsOp("v", pg, store.segment("v", pg).generation,
                                     [(vkey[0], vkey[1], rebuilt)])])
    assert store.quarantined(("v", pg)) == (frozenset(), frozenset())
    check_pages(store, chain, chain.lsn)


def _run_holding(txn, store, prefix, lsn):
    """(key, value) of the log run that holds ``lsn``."""
    cur = txn.cursor(db=store.db_log)
    assert cur.set_range(S.log_key(prefix, lsn)) and cur.key()[:8] == prefix
    assert lsn in S.decode_run(cur.value()).lsns
    return bytes(cur.key()), bytes(cur.value())


def test_bad_run_directory_quarantines_its_records_and_peers_repair_them(store, seed):
    """Scenario: a byte of a log run's directory rots. Nothing in the run can be located,
    so the scrub reports the run; quarantine takes every LSN the page index lists in its
    range out of the readable set; reads of pages needing them fail CORRUPT (never bad
    bytes); the records fetched again from a peer repair them and reads equal the oracle
    (invariant 13)."""
    chain = ChainBuilder("v", seed=seed, pages=[1, 2, 3])
    create(store, chain)
    for _ in range(3):
        append(store, chain, chain.next_records(30))
    pg = chain.layout.pg_of(1)
    prefix = S.seg_prefix(store.volume("v").vol_id, pg)
    mine = [r for r in chain.records if chain.layout.pg_of(r.page_id) == pg]
    middle = mine[len(mine) // 2]
    with store.env.begin(write=True) as txn:
        run_key, run_value = _run_holding(txn, store, prefix, middle.lsn)
        rotten = bytearray(run_value)
        rotten[S.RUN_HEAD_SIZE + 3] ^= 0x10  # inside the LSN directory
        txn.put(run_key, bytes(rotten), db=store.db_log)
    in_run = S.decode_run(run_value).lsns
    bad_r, bad_runs, _last, done = store.scrub_records("v", pg, 0, 10_000)
    assert bad_r == [] and bad_runs == [in_run[-1]] and done
    [found] = store.apply_ops([S.QuarantineOp("v", pg, [], [], bad_runs)])
    assert found == 1
    assert store.quarantined(("v", pg))[0] == frozenset(in_run)
    with pytest.raises(E.CorruptError):
        store.read_page("v", pg, middle.page_id, chain.lsn, 1)
    lost = [r for r in mine if r.lsn in in_run]
    append(store, chain, lost, epoch=0, source="repair")
    assert store.quarantined(("v", pg)) == (frozenset(), frozenset())
    assert store.segment("v", pg).n_records == len(mine)
    check_pages(store, chain, chain.lsn)
    check_index(store, chain)


def _versions(store, prefix):
    out = {}
    with store.env.begin() as txn:
        cur = txn.cursor(db=store.db_versions)
        if cur.set_range(prefix):
            for k, v in cur.iternext():
                if k[:8] != prefix:
                    break
                out[layout.PAGE_LSN.unpack_from(k, 8)] = bytes(v)
    return out


def test_dropping_versions_and_rebuilding_gives_identical_bytes(tmp_path, seed):
    """Scenario: invariant 14 on a closed data dir: drop every page version of a segment,
    rebuild them from the log, and the bytes are identical to the ones dropped."""
    path = str(tmp_path / "sn")
    st = S.Store(path, "sn", map_size=1 << 30)
    chain = ChainBuilder("v", seed=seed)
    create(st, chain)
    for _ in range(4):
        append(st, chain, chain.next_records(50))
        coalesce_all(st, chain)
    st.close()
    for pg in range(chain.layout.pg_count):
        versions = S.list_page_versions(path, "v", pg)
        assert versions
        assert S.drop_page_versions(path, "v", pg) == len(versions)
        assert S.list_page_versions(path, "v", pg) == {}
        assert S.rebuild_page_versions(path, "v", pg, versions) == versions
        for (page_id, lsn), image in versions.items():
            assert image == chain.oracle_page(page_id, lsn)


# --- Timelines (backtrack) and clones: engine/writer/backtrack.py's storage side ---------------------


def replace_set(store: S.Store, chain: ChainBuilder, truncs, epoch: int, prev_vdl: int = 0):
    """Make ``truncs`` every segment's whole truncation set (Truncate with replace)."""
    for pg in range(chain.layout.pg_count):
        [result] = store.apply_ops([S.TruncateOp(chain.volume, pg, 0, 0, epoch, tuple(truncs),
                                                 time_us=epoch * 1000, prev_vdl=prev_vdl)])
        assert not isinstance(result, Exception), result
    chain.truncations = [(s, e) for s, e, _ in truncs]
    chain.lsn = max([chain.lsn] + [e for _s, e, _ in truncs])
    chain._rebuild_heads()
    chain.epoch = epoch


def test_a_newer_truncation_set_replaces_the_old_one_and_records_come_back(store, seed):
    """Scenario (backtrack back and forth): hide everything after P, write a new branch,
    then replace the set by one that hides only what follows Q > P on the OLD branch:
    the old records in (P, Q] become visible again (SCL walks through them, reads equal
    the oracle), the new branch is hidden but kept, and the history has every set."""
    chain = ChainBuilder("v", seed=seed)
    create(store, chain)
    append(store, chain, chain.next_records(120))
    coalesce_all(store, chain)
    old = list(chain.records)
    p_lsn, q_lsn = old[40].lsn, old[90].lsn
    e1 = chain.lsn + 50
    replace_set(store, chain, [(p_lsn, e1, 2)], 2, prev_vdl=chain.lsn)
    assert scls(store, chain) == {pg: chain.pg_scl(pg) for pg in range(chain.layout.pg_count)}, f"seed={seed}"
    check_pages(store, chain, chain.lsn)
    append(store, chain, chain.next_records(40))
    coalesce_all(store, chain)
    branch_end = chain.lsn
    e2 = chain.lsn + 50
    replace_set(store, chain, [(q_lsn, e2, 3)], 3, prev_vdl=branch_end)
    assert scls(store, chain) == {pg: chain.pg_scl(pg) for pg in range(chain.layout.pg_count)}, f"seed={seed}"
    assert max(chain.pg_scl(pg) for pg in range(chain.layout.pg_count)) == q_lsn
    check_pages(store, chain, q_lsn)
    check_pages(store, chain, p_lsn)
    append(store, chain, chain.next_records(30))
    check_pages(store, chain, chain.lsn)
    # The hidden branch is still stored: a set that uncovers it again could bring it back.
    n_records = sum(store.segment("v", pg).n_records for pg in range(chain.layout.pg_count))
    assert n_records == len(chain.records), f"seed={seed}: truncation must not delete records"
    assert [h[0] for h in store.history("v")] == [2, 3]
    assert store.history("v")[1][2:] == (branch_end, ((q_lsn, e2, 3),))
    # Gossip: an older set changes nothing, a newer one replaces ours whole.
    [r] = store.apply_ops([S.AdoptEpochOp("v", 0, 0, ((p_lsn, e1, 2),))])
    assert store.segment("v", 0).truncs == ((q_lsn, e2, 3),)
    [r] = store.apply_ops([S.AdoptEpochOp("v", 0, 0, ((q_lsn, e2, 3), (chain.lsn, chain.lsn + 9, 4)))])
    assert store.segment("v", 0).truncs == ((q_lsn, e2, 3), (chain.lsn, chain.lsn + 9, 4))
    # A writer_vdl inside a range belongs to a timeline left behind: lowered to its start.
    assert store.segment("v", 0).writer_vdl <= chain.lsn


def _clone_chain(parent: ChainBuilder, name: str, fork: int) -> ChainBuilder:
    """A builder for a clone: the parent's records up to the fork (its oracle), its own
    chain linking to the fork in every PG (a clone segment starts complete to the fork)."""
    import copy

    clone = copy.deepcopy(parent)
    clone.volume = name
    clone.records = [r for r in clone.records if r.lsn <= fork]
    clone.lsn = fork
    clone._rebuild_heads()
    for pg in range(clone.layout.pg_count):
        clone._last_pg[pg] = fork
    return clone


def test_a_clone_reads_its_parent_as_of_the_fork_and_writes_only_its_own(store, seed):
    """Scenario (fast clone): a clone created at F copies nothing; its pages are the
    parent's as of F plus its own records; parent writes after F never show in it and
    the reverse; parent GC stops at F; dropping the parent keeps the clone readable; a
    clone of the clone works."""
    parent = ChainBuilder("p", seed=seed)
    create(store, parent)
    append(store, parent, parent.next_records(150))
    coalesce_all(store, parent)
    fork = parent.lsn
    before = store.lmdb_bytes_written
    tails = tuple(parent.pg_read_point(pg, fork) for pg in range(parent.layout.pg_count))
    [created] = store.apply_ops([S.CreateVolumeOp("c", parent.layout.pg_count,
                                                  parent.layout.stripe_pages, 1, "p", fork, tails)])
    assert created is True
    assert store.lmdb_bytes_written - before < 4096, "a clone must copy no page or record"
    clone = _clone_chain(parent, "c", fork)
    check_pages(store, clone, fork)
    append(store, parent, parent.next_records(80), writer_vdl=fork)
    append(store, clone, clone.next_records(60))
    coalesce_all(store, clone)
    check_pages(store, clone, clone.lsn)
    check_pages(store, parent, parent.lsn)
    owned, shared = store.volume_bytes("c")
    assert owned > 0 and shared > 0
    # Parent GC: a horizon past the fork is capped at it.
    append(store, parent, parent.next_records(5), writer_vdl=parent.lsn)
    store.apply_ops([S.SetGcHorizonOp("p", parent.lsn, 1)])
    for pg in range(parent.layout.pg_count):
        start = 0
        while start is not None:
            op, start = store.plan_gc("p", pg, parent.lsn, start)
            store.apply_ops([op])
        assert store.segment("p", pg).gc_done <= fork, f"seed={seed}: parent GC passed the fork"
    check_pages(store, clone, clone.lsn)
    # A clone of the clone, then drop the middle one: both descendants still read.
    fork2 = clone.lsn
    tails2 = tuple(clone.pg_read_point(pg, fork2) for pg in range(parent.layout.pg_count))
    store.apply_ops([S.CreateVolumeOp("cc", parent.layout.pg_count, parent.layout.stripe_pages,
                                      1, "c", fork2, tails2)])
    grand = _clone_chain(clone, "cc", fork2)
    append(store, grand, grand.next_records(30))
    [dropped] = store.apply_ops([S.DropVolumeOp("c")])
    assert dropped is True
    check_pages(store, grand, grand.lsn)
    check_pages(store, clone, clone.lsn)
    with pytest.raises(E.UnknownVolumeError):
        append(store, clone, clone.next_records(1))


def index_of(store: S.Store, chain: ChainBuilder, pg: int) -> dict[int, list[tuple[int, ...]]]:
    """The page-index groups of a segment: {page_id: [group LSNs, in key order]}, after
    checking each row's shape (key LSN = the group's highest, LSNs strictly ascending)."""
    prefix = store._prefix(chain.volume, pg)
    out: dict[int, list] = {}
    with store.env.begin() as txn:
        cur = txn.cursor(db=store.db_pageidx)
        if cur.set_range(prefix):
            for k, v in cur.iternext():
                if k[:8] != prefix:
                    break
                page_id, last = layout.PAGE_LSN.unpack_from(k, 8)
                lsns = pageindex.group_lsns(pageindex.group_of(k, v))
                assert 1 <= len(lsns) <= S.IDX_GROUP_MAX and lsns[-1] == last
                assert list(lsns) == sorted(set(lsns)), "a group is strictly ascending"
                out.setdefault(page_id, []).append(lsns)
        grouped_max = max((g[-1] for groups in out.values() for g in groups), default=0)
        previous_last = grouped_max
        for last, delta in store._delta_rows(txn, prefix):  # then the deltas, as groups
            every = sorted(lsn for lsns in delta.values() for lsn in lsns)
            assert every[0] > previous_last, "deltas lie above every group and each other"
            assert every[-1] == last, "a delta's key is its highest LSN"
            previous_last = last
            for page_id, lsns in delta.items():
                assert list(lsns) == sorted(set(lsns)), "a delta's page list is ascending"
                out.setdefault(page_id, []).append(tuple(lsns))
    return out


def check_index(store: S.Store, chain: ChainBuilder) -> None:
    """Every stored record is in exactly one group of its page, groups of a page cover
    disjoint LSN ranges in key order, and nothing else is indexed."""
    for pg in range(chain.layout.pg_count):
        stored: dict[int, set] = {}
        with store.env.begin() as txn:
            prefix = store._prefix(chain.volume, pg)
            cur = txn.cursor(db=store.db_log)
            previous_last = 0
            if cur.set_range(prefix):
                for k, v in cur.iternext():
                    if k[:8] != prefix:
                        break
                    run = S.decode_run(v)
                    last = layout.BE64.unpack_from(k, 8)[0]
                    assert run.lsns[-1] == last, "a run's key is its last LSN"
                    assert list(run.lsns) == sorted(set(run.lsns)), "a run is strictly ascending"
                    assert run.lsns[0] > previous_last, "runs of a segment are disjoint"
                    previous_last = last
                    for i, lsn in enumerate(run.lsns):
                        rec = run.record(i)
                        assert S.verify_stored_record(lsn, rec)
                        stored.setdefault(layout.U32.unpack_from(rec, layout.REC_PAGE)[0], set()).add(lsn)
        index = index_of(store, chain, pg)
        assert set(index) == set(stored)
        for page_id, groups in index.items():
            for a, b in zip(groups, groups[1:]):
                assert a[-1] < b[0], f"page {page_id}: groups {a} and {b} overlap"
            flat = [lsn for g in groups for lsn in g]
            assert sorted(flat) == sorted(stored[page_id]), f"page {page_id}: index != log"


def test_index_deltas_fold_into_page_groups_and_survive_restart(tmp_path, seed):
    """Scenario: in-order appends write one page-index delta per segment per
    transaction, not one row per page; reads, commit lookups and dirty counts see them;
    the count survives a restart; a fold moves them into per-page groups (no delta
    left) and nothing read changes; a retransmit folds first and stays idempotent."""
    path = str(tmp_path / "sn")
    chain = ChainBuilder("v", seed=seed, pages=list(range(1, 16)))
    pgs = range(chain.layout.pg_count)
    expected = {("v", pg): 0 for pg in pgs}
    st = S.Store(path, "sn", map_size=1 << 30)
    try:
        create(st, chain)
        for _ in range(5):
            recs = chain.next_records(40)
            for pg in {chain.layout.pg_of(r.page_id) for r in recs}:
                expected[("v", pg)] += 1
            append(st, chain, recs)
        assert {k: st.deltas().get(k, 0) for k in expected} == expected
        check_pages(st, chain, chain.lsn)
        check_index(st, chain)
        counts_before = {pg: st.sweep_dirty("v", pg) for pg in pgs}
        assert sum(sum(c.values()) for c in counts_before.values()) == len(chain.records)
    finally:
        st.close()
    st = S.Store(path, "sn", map_size=1 << 30)
    try:
        assert {k: st.deltas().get(k, 0) for k in expected} == expected
        folded = st.apply_ops([S.FoldIndexOp("v", pg) for pg in pgs])
        assert folded == [expected[("v", pg)] for pg in pgs]
        assert all(n == 0 for n in st.deltas().values())
        with st.env.begin() as txn:
            assert txn.stat(st.db_pagedelta)["entries"] == 0
        check_index(st, chain)
        check_pages(st, chain, chain.lsn)
        assert {pg: st.sweep_dirty("v", pg) for pg in pgs} == counts_before
        append(st, chain, chain.next_records(30))       # a delta again ...
        append(st, chain, chain.records[10:50])           # ... and a retransmit folds it
        assert all(n == 0 for n in st.deltas().values())
        assert sum(st.segment("v", pg).n_records for pg in pgs) == len(chain.records)
        check_index(st, chain)
        check_pages(st, chain, chain.lsn)
    finally:
        st.close()


def test_coalescing_by_one_walk_over_the_runs_equals_page_by_page(store, seed, monkeypatch):
    """Scenario: a coalesce step with a long backlog builds its pages in one walk of the
    Cython materialiser over the runs; the versions are byte-identical to the page by
    page path's and to the oracle, first from no version and then from older versions."""
    chain = ChainBuilder("v", seed=seed, layout=VolumeLayout(pg_count=1, stripe_pages=64),
                         pages=list(range(1, 40)))
    create(store, chain)

    def plan(walk: bool):
        monkeypatch.setattr(plans, "WALK_COALESCE_MIN", 1 if walk else 1 << 40)
        walked = []
        original = S.Store._coalesce_by_walk

        def spy(self, *args):
            result = original(self, *args)
            walked.append(result is not None)
            return result

        monkeypatch.setattr(S.Store, "_coalesce_by_walk", spy)
        op, _next = store.plan_coalesce("v", 0, pages=list(range(1, 40)))
        monkeypatch.setattr(S.Store, "_coalesce_by_walk", original)
        assert walked == [walk]
        return sorted(op.versions)

    for round_ in range(2):
        for _ in range(12):
            append(store, chain, chain.next_records(256))
        by_walk, by_page = plan(True), plan(False)
        assert by_walk == by_page, f"round {round_}: the walk built different versions"
        for page_id, lsn, image in by_walk:
            assert image == chain.oracle_page(page_id, lsn), f"page {page_id} at {lsn}"
        [n] = store.apply_ops([S.PutVersionsOp("v", 0, store.segment("v", 0).generation, by_walk)])
        assert n == len(by_walk) > 0
    check_pages(store, chain, chain.lsn)


def test_page_index_groups_survive_disorder_retransmits_and_gc(store, seed):
    """Scenario: records arrive out of order, in requests of random sizes, several
    requests per transaction, with retransmits of what is already stored (holes filled
    inside a stored group's LSN range). After every transaction the page index lists
    each stored record exactly once in disjoint groups; reads equal the oracle; GC then
    removes records from the groups and both still hold."""
    rng = random.Random(seed)
    chain = ChainBuilder("v", seed=seed, pages=list(range(1, 9)))  # few pages: big groups
    create(store, chain)
    recs = chain.next_records(1500)
    info = store.volume("v")
    order = list(range(0, len(recs), 25))
    rng.shuffle(order)
    sent: list = []
    while order:
        ops = []
        for _ in range(rng.randint(1, 4)):
            if not order:
                break
            part = recs[order.pop():][:25]
            if sent and rng.random() < 0.4:
                part = part + rng.sample(sent, min(len(sent), rng.randint(1, 30)))  # retransmits
            sent.extend(part)
            part.sort(key=lambda r: r.lsn)
            batches = [S.verify_and_prepare(info.layout, info.vol_id, pg, buf)
                       for pg, buf in sorted(ChainBuilder.pack(part).items())]
            ops.append(S.AppendOp("v", chain.epoch, 0, batches))
        assert not any(isinstance(r, Exception) for r in store.apply_ops(ops))
        check_index(store, chain)
    assert scls(store, chain) == {pg: chain.pg_scl(pg) for pg in range(chain.layout.pg_count)}
    check_pages(store, chain, chain.lsn)
    check_pages(store, chain, recs[700].lsn)
    horizon = recs[1000].lsn
    append(store, chain, chain.next_records(50), writer_vdl=horizon)
    store.apply_ops([S.SetGcHorizonOp("v", horizon, chain.epoch)])
    for pg in range(chain.layout.pg_count):
        start = 0
        while start is not None:
            op, start = store.plan_gc("v", pg, horizon, start)
            store.apply_ops([op])
    check_index(store, chain)
    check_pages(store, chain, horizon)
    check_pages(store, chain, chain.lsn)


def _rewrite_as_old_format(st, fmt: int) -> None:
    """Rewrite a store's log (and, for format 1, its page index) as format ``fmt`` wrote it."""
    with st.env.begin(write=True) as txn:
        cur = txn.cursor(db=st.db_log)  # formats 1 and 2: one record per value, keyed by LSN
        runs = [(bytes(k[:8]), S.decode_run(v)) for k, v in cur]
        for k in [bytes(k) for k, _v in txn.cursor(db=st.db_log)]:
            txn.delete(k, db=st.db_log)
        for prefix, run in runs:
            for i, lsn in enumerate(run.lsns):
                txn.put(S.log_key(prefix, lsn), run.record(i), db=st.db_log)
        if fmt == 1:  # one empty pageidx row per record
            cur = txn.cursor(db=st.db_pageidx)
            rows = [(bytes(k), pageindex.group_lsns(pageindex.group_of(k, v))) for k, v in cur]
            for k, _lsns in rows:
                txn.delete(k, db=st.db_pageidx)
            for k, lsns in rows:
                for lsn in lsns:
                    txn.put(k[:12] + layout.BE64.pack(lsn), b"", db=st.db_pageidx)
        txn.put(b"format", layout.U32.pack(fmt), db=st.db_node)


@pytest.mark.parametrize("fmt", [1, 2])
def test_old_format_data_dir_is_upgraded_in_place(tmp_path, seed, fmt):
    """Scenario: a data dir written with layout format 1 (one empty pageidx row per
    record, one log value per record) or 2 (grouped pageidx rows, one log value per
    record) opens, is marked format 3, serves the same pages, and takes new appends
    (including retransmits that merge with its one-record runs)."""
    path = str(tmp_path / "sn-old")
    chain = ChainBuilder("v", seed=seed, pages=list(range(1, 9)))
    st = S.Store(path, "sn-old", map_size=1 << 30)
    create(st, chain)
    recs = chain.next_records(300)
    append(st, chain, recs)
    _rewrite_as_old_format(st, fmt)
    st.close()
    st = S.Store(path, "sn-old", map_size=1 << 30)
    try:
        with st.env.begin(db=st.db_node) as txn:
            assert layout.U32.unpack(txn.get(b"format"))[0] == S.FORMAT == 3
        check_index(st, chain)
        check_pages(st, chain, chain.lsn)
        append(st, chain, recs[100:140] + chain.next_records(200))
        check_index(st, chain)
        check_pages(st, chain, chain.lsn)
        check_pages(st, chain, recs[150].lsn)
    finally:
        st.close()


def test_unknown_format_is_refused(tmp_path):
    """Scenario: a data dir of a layout format this code does not know is not opened."""
    path = str(tmp_path / "sn-new")
    S.Store(path, "sn-new", map_size=1 << 30).close()
    st = S.Store(path, "sn-new", map_size=1 << 30)
    with st.env.begin(write=True) as txn:
        txn.put(b"format", layout.U32.pack(S.FORMAT + 1), db=st.db_node)
    st.close()
    with pytest.raises(RuntimeError, match="unknown layout format"):
        S.Store(path, "sn-new", map_size=1 << 30)
