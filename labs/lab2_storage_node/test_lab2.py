"""Lab 2 grading tests: the storage node's SCL walk (storage_node/chain.py, invariant 4) and
gossip (storage_node/gossip.py). The first tests drive one node's Store in-process (no
gRPC); the last ones run a real cluster and make a node catch up by gossip."""

from __future__ import annotations

import random
import re

import pytest

from labs.support import Chain
from storage_node import store as S


@pytest.fixture
def store(tmp_path):
    st = S.Store(str(tmp_path / "sn-lab"), "sn-lab", map_size=1 << 28)
    yield st
    st.close()


def create(store, chain):
    [created] = store.apply_ops([S.CreateVolumeOp(chain.volume, chain.layout.pg_count,
                                                  chain.layout.stripe_pages, chain.epoch)])
    assert created is True


def append(store, chain, recs):
    """Append recs as one request; returns {pg: scl} (raises what the store refused with)."""
    info = store.volume(chain.volume)
    batches = [S.verify_and_prepare(info.layout, info.vol_id, pg, buf)
               for pg, buf in sorted(Chain.pack(recs).items())]
    [result] = store.apply_ops([S.AppendOp(chain.volume, chain.epoch, 0, batches, "writer")])
    if isinstance(result, Exception):
        raise result
    return result


def scls(store, chain):
    return {pg: store.segment(chain.volume, pg).scl for pg in range(chain.layout.pg_count)}


def oracle_scls(chain, received: set[int]):
    """Per PG: the last LSN of the longest prefix of the PG's chain that was received."""
    out = {}
    for pg in range(chain.layout.pg_count):
        scl = 0
        for rec in chain.records:
            if rec.pg != pg:
                continue
            if rec.lsn not in received:
                break
            scl = rec.lsn
        out[pg] = scl
    return out


@pytest.mark.given
def test_a_new_volume_has_scl_zero(store):
    chain = Chain()
    create(store, chain)
    assert scls(store, chain) == {pg: 0 for pg in range(chain.layout.pg_count)}


def test_in_order_appends_move_scl_to_each_pgs_last_record(store, seed):
    chain = Chain(seed=seed)
    create(store, chain)
    for _ in range(5):
        recs = chain.next_records(40)
        acks = append(store, chain, recs)
        expected = oracle_scls(chain, {r.lsn for r in chain.records})
        assert scls(store, chain) == expected
        assert all(acks[pg] == expected[pg] for pg in acks)


def test_scl_stops_at_a_hole_and_walks_on_when_it_is_filled(store, seed):
    chain = Chain(seed=seed)
    create(store, chain)
    recs = chain.next_records(60)
    pg = recs[10].pg
    hole = recs[10]
    later_same_pg = [r for r in recs if r.pg == pg and r.lsn > hole.lsn]
    append(store, chain, [r for r in recs if r is not hole])
    received = {r.lsn for r in recs} - {hole.lsn}
    assert scls(store, chain) == oracle_scls(chain, received)
    assert scls(store, chain)[pg] == hole.prev_pg_lsn, "the SCL must stop below the hole"
    append(store, chain, [hole])
    assert scls(store, chain)[pg] == (later_same_pg[-1].lsn if later_same_pg else hole.lsn)


def test_records_in_random_order_and_retransmits(store, seed):
    """Batches of records arrive in random order, some twice: after every append the SCL of
    every PG is exactly the end of the received prefix of its chain, never lower than before."""
    rng = random.Random(seed)
    chain = Chain(seed=seed)
    create(store, chain)
    recs = chain.next_records(150)
    pieces = [recs[i:i + rng.randint(1, 6)] for i in range(0, len(recs), 6)]
    pieces = [p for p in pieces if p]
    rng.shuffle(pieces)
    pieces += rng.sample(pieces, min(5, len(pieces)))      # retransmits
    received: set[int] = set()
    last = scls(store, chain)
    for piece in pieces:
        append(store, chain, piece)
        received |= {r.lsn for r in piece}
        now = scls(store, chain)
        assert now == oracle_scls(chain, received), f"seed {seed}"
        assert all(now[pg] >= last[pg] for pg in now), "invariant 4: an SCL moved back"
        last = now


def test_a_truncation_range_is_skipped_by_the_walk(store, seed):
    """Recovery annuls (vdl, end]: the SCL falls back to vdl; records written afterwards
    chain to vdl with LSNs above end, and the walk goes over the range to them."""
    chain = Chain(seed=seed, pages=[1])           # one page: one PG
    pg = chain.layout.pg_of(1)
    create(store, chain)
    first = chain.next_records(10, pages=[1])
    append(store, chain, first)
    assert store.segment(chain.volume, pg).scl == first[-1].lsn
    vdl, end = first[5].lsn, chain.lsn + 100
    [result] = store.apply_ops([S.TruncateOp(chain.volume, pg, vdl, end, 2)])
    assert not isinstance(result, Exception), result
    assert store.segment(chain.volume, pg).scl == vdl
    chain.truncate(vdl, end, epoch=2)
    more = chain.next_records(5, pages=[1])
    append(store, chain, more)
    assert store.segment(chain.volume, pg).scl == more[-1].lsn


class DirectStub:
    """A peer's real Storage service handlers called in-process (no transport)."""

    def __init__(self, service):
        self.service = service
        self.fetches = 0
        self.bytes = 0

    async def FetchRecords(self, request, timeout_s=None):
        self.fetches += 1
        reply = await self.service.FetchRecords(request, None)
        self.bytes += len(reply.records)
        return reply


def test_gossip_pulls_only_the_hole_from_a_peer(tmp_path, seed):
    """Node B missed a run of records of one PG but holds what came after. One gossip pull
    from node A brings B's SCL to A's; cost: B fetches only the missing records' bytes."""
    import asyncio

    from storage_node.gossip import Gossip
    from storage_node.node import StorageNode, Tuning
    from storage_node.service import StorageService

    async def run():
        chain = Chain(seed=seed, pages=[1, 2])            # pages 1, 2: PG 0 with 4-page stripes
        pg = chain.layout.pg_of(1)
        recs = chain.next_records(120)
        tuning = Tuning(map_size=1 << 28)
        a = StorageNode("sn-a", "az-a", str(tmp_path / "a"), tuning)
        b = StorageNode("sn-b", "az-b", str(tmp_path / "b"), tuning)
        try:
            for node in (a, b):
                await node.start()
                create(node.store, chain)
            append(a.store, chain, recs)
            hole = recs[30:70]
            append(b.store, chain, recs[:30] + recs[70:])
            assert b.store.segment(chain.volume, pg).scl == recs[29].lsn
            stub = DirectStub(StorageService(a))
            gossip = Gossip(b, [], transport=None)
            peer_scl = a.store.segment(chain.volume, pg).scl
            pulled, nbytes = await gossip._pull(stub, "sn-a", (chain.volume, pg), peer_scl, 1 << 30)
            assert b.store.segment(chain.volume, pg).scl == peer_scl == recs[-1].lsn
            assert pulled == len(hole)
            hole_bytes = sum(len(r.data) for r in hole)
            assert stub.bytes == nbytes == hole_bytes, (
                f"fetched {stub.bytes} bytes; the hole is {hole_bytes} bytes")
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


@pytest.mark.processes
def test_real_cluster_a_restarted_node_catches_up_by_gossip(cluster):
    """sn3 is killed, commits go on (4 of 6 suffice... and 5 nodes are up), sn3 comes back
    and gossip fills its holes: its SCL reaches the others' and its lag goes to 0. Cost:
    it pulls only what it missed, not the whole log again."""
    for i in range(5):
        cluster.put(f"a{i}", "x" * 50)
    cluster.run("node", "kill", "sn3")
    for i in range(30):
        cluster.put(f"b{i}", "y" * 200)
    before = cluster.status()["by_name"]["sn4"]["bytes_received"]
    cluster.run("node", "start", "sn3")

    def caught_up():
        procs = cluster.status()["by_name"]
        return procs["sn3"]["up"] and procs["sn3"]["lag_lsn"] == 0 and procs["sn3"]["scl"] == procs["sn4"]["scl"]

    cluster.wait_for("sn3 to catch up by gossip", caught_up, timeout_s=60)
    pulled = sum(int(m.group(1)) for m in re.finditer(r"gossip: pulled \d+ records \((\d+) bytes\)",
                                                       cluster.log_text("sn3")))
    assert pulled > 0, "sn3 caught up without gossip pulling anything?"
    assert pulled <= 2 * before, (f"sn3 pulled {pulled} bytes by gossip; the whole log a peer "
                                  f"received is {before} bytes")
