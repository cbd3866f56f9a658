"""Membership epochs and hydration on one storage node's store, in-process (no gRPC):
fast companions of tests/test_membership_cluster.py (docs/membership.md).

- invariant 16: an Append (or read) with a membership epoch below the segment's is
  refused with STALE_MEMBERSHIP and stores nothing; 0 is never refused; a higher one is
  adopted; SetMembership refuses going back;
- hydration: a peer whose log below its GC horizon is gone serves every page as of its
  anchor (FetchPageVersions' store half); an empty store that installs them, then the log
  above the anchor, serves every page exactly as the reference does, reaches the peer's
  SCL, and refuses reads below the anchor.
"""

from __future__ import annotations

import os
import random

import pytest

from storage_node import errors as E
from storage_node import store as S
from tests.storage_client import ChainBuilder
from tests.test_storage_node_store import append, check_pages, create


@pytest.fixture
def seed():
    value = int(os.environ.get("AURORA_TEST_SEED", random.randrange(1 << 32)))
    print(f"seed={value} (replay with AURORA_TEST_SEED={value})")
    return value


def open_store(tmp_path, name):
    return S.Store(str(tmp_path / name), name, map_size=1 << 30)


def append_with_membership(store, chain, recs, membership_epoch):
    info = store.volume(chain.volume)
    batches = [S.verify_and_prepare(info.layout, info.vol_id, pg, buf, membership_epoch)
               for pg, buf in sorted(ChainBuilder.pack(recs).items())]
    [result] = store.apply_ops([S.AppendOp(chain.volume, chain.epoch, 0, batches)])
    if isinstance(result, Exception):
        raise result
    return result


def test_stale_membership_epoch_refused_and_higher_adopted(tmp_path, seed):
    st = open_store(tmp_path, "sn1")
    try:
        chain = ChainBuilder("v", seed=seed)
        create(st, chain)
        recs = chain.next_records(20)
        acks = append_with_membership(st, chain, recs, 3)
        pgs = sorted(acks)
        assert all(st.segment("v", pg).membership_epoch == 3 for pg in pgs)
        before = {pg: st.segment("v", pg).scl for pg in pgs}
        with pytest.raises(E.StaleMembershipError) as info:
            append_with_membership(st, chain, chain.next_records(5), 2)
        assert info.value.code == "STALE_MEMBERSHIP"
        assert info.value.metadata["aurora-current-membership-epoch"] == "3"
        assert {pg: st.segment("v", pg).scl for pg in pgs} == before, "a refusal stores nothing"
        pg = pgs[0]
        page = next(p for p in chain.touched_pages() if chain.layout.pg_of(p) == pg)
        with pytest.raises(E.StaleMembershipError):
            st.read_page("v", pg, page, before[pg], chain.epoch, membership_epoch=2)
        st.read_page("v", pg, page, before[pg], chain.epoch, membership_epoch=0)
        st.read_page("v", pg, page, before[pg], chain.epoch, membership_epoch=3)
        [epoch] = st.apply_ops([S.AdoptMembershipOp("v", pg, 5)])
        assert epoch == 5
        [refused] = st.apply_ops([S.AdoptMembershipOp("v", pg, 4)])
        assert isinstance(refused, E.StaleMembershipError)
    finally:
        st.close()


def gc_everything(st, chain, horizon):
    st.apply_ops([S.SetGcHorizonOp(chain.volume, horizon, chain.epoch)])
    for pg in range(chain.layout.pg_count):
        start = 0
        while start is not None:
            op, start = st.plan_gc(chain.volume, pg, horizon, start)
            st.apply_ops([op])


def test_hydration_after_the_peer_collected_its_log(tmp_path, seed):
    peer, fresh = open_store(tmp_path, "sn1"), open_store(tmp_path, "sn4")
    try:
        chain = ChainBuilder("v", seed=seed)
        create(peer, chain)
        append(peer, chain, chain.next_records(300))
        horizon = chain.lsn
        append(peer, chain, chain.next_records(100), writer_vdl=horizon)
        gc_everything(peer, chain, horizon)
        create(fresh, chain)
        hydrated = 0
        for pg in range(chain.layout.pg_count):
            m = peer.segment("v", pg)
            if m.log_floor == 0:
                continue   # nothing collected in this PG: gossip alone would do
            # Gossip alone cannot link: the peer has nothing that links to SCL 0 any more.
            records, *_ = peer.fetch_records("v", pg, 0, 0, 0, 0)
            assert not records or int.from_bytes(records[16:24], "little") != 0, (
                f"seed={seed}: PG {pg}'s first record still links to 0")
            # FetchPageVersions, in small chunks to exercise `more`.
            as_of, first, after, versions = 0, True, 0, []
            while True:
                _m, as_of, pages, more = peer.hydration_pages("v", pg, as_of, after, first, 20000)
                first = False
                versions += pages
                if pages:
                    after = pages[-1][0]
                if not more:
                    break
            assert versions, f"seed={seed}: PG {pg} has pages"
            generation = fresh.segment("v", pg).generation
            fresh.apply_ops([S.PutVersionsOp("v", pg, generation, versions)])
            assert fresh.segment("v", pg).scl == 0, "no SCL before the HydrateOp"
            [scl] = fresh.apply_ops([S.HydrateOp("v", pg, generation, as_of, m.gc_horizon)])
            assert scl == as_of
            above, *_ = peer.fetch_records("v", pg, as_of, 0, 0, 0)
            info = fresh.volume("v")
            if above:
                fresh.apply_ops([S.AppendOp("v", 0, 0, [S.verify_and_prepare(
                    info.layout, info.vol_id, pg, above)], "gossip")])
            assert fresh.segment("v", pg).scl == m.scl, f"seed={seed}: PG {pg}"
            page = next(p for p in chain.touched_pages() if chain.layout.pg_of(p) == pg)
            with pytest.raises(E.ReadPointBelowGcError):
                fresh.read_page("v", pg, page, as_of - 1, chain.epoch, min_scl=as_of - 1)
            hydrated += 1
        assert hydrated, f"seed={seed}: GC collected nothing, the test proves nothing"
        for pg in range(chain.layout.pg_count):
            if peer.segment("v", pg).log_floor == 0:
                # not hydrated: copy the whole log, as gossip would
                recs, *_ = peer.fetch_records("v", pg, 0, 0, 0, 0)
                if recs:
                    info = fresh.volume("v")
                    fresh.apply_ops([S.AppendOp("v", 0, 0, [S.verify_and_prepare(
                        info.layout, info.vol_id, pg, recs)], "gossip")])
        check_pages(fresh, chain, chain.lsn)
        check_pages(fresh, chain, horizon)
    finally:
        peer.close()
        fresh.close()
