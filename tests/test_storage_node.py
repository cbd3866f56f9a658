"""Storage nodes as real processes: six of them, talking to each other and to a test client.

Every test uses its own volume on the module's shared six-node cluster (tests/conftest.py)
and compares what the nodes serve with the oracle (tests/storage_client.ChainBuilder: the
pure-Python reference materialiser over the log the test wrote). Randomness comes from a
printed seed: replay a failure with AURORA_TEST_SEED=<seed>. A test fails on any ERROR
line a node logs during it, unless the test allows it (``allow_errors``).
"""

from __future__ import annotations

import os
import random
import re
import threading
import time

import grpc
import pytest

from aurora_pb import storage_pb2 as pb
from engine.format.redo import encode_record, p_init_page, p_insert_cell
from storage_node import errors as E
from storage_node import store as S
from tests.harness import NODE_NAMES
from tests.storage_client import ChainBuilder, StorageClient, append_request

pytestmark = pytest.mark.timeout(120)

CATCH_UP_TIMEOUT_S = 30.0


@pytest.fixture
def seed():
    value = int(os.environ.get("AURORA_TEST_SEED", random.randrange(1 << 32)))
    print(f"seed={value} (replay with AURORA_TEST_SEED={value})")
    return value


@pytest.fixture
def client(storage_cluster):
    c = StorageClient(storage_cluster.addresses())
    yield c
    c.close()


@pytest.fixture(autouse=True)
def no_new_error_lines(request, storage_cluster):
    """Fail the test on ERROR lines its nodes logged, except the patterns it allows."""
    before = {n: len(storage_cluster.error_lines(n)) for n in NODE_NAMES}
    yield
    marker = request.node.get_closest_marker("allow_errors")
    allowed = [re.compile(p) for p in (marker.args if marker else ())]
    unexpected = []
    for n in NODE_NAMES:
        for line in storage_cluster.error_lines(n)[before[n]:]:
            if not any(p.search(line) for p in allowed):
                unexpected.append(f"{n}: {line}")
    assert not unexpected, "unexpected ERROR lines:\n" + "\n".join(unexpected)


def wait_until(fn, timeout_s: float, what: str, seed: int | None = None, pause_s: float = 0.1):
    """Poll ``fn`` until it returns a truthy value; fail with ``what`` after timeout."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(pause_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (seed={seed}); last={last!r}")


def quorum_append(client: StorageClient, chain: ChainBuilder, recs, nodes=None, need: int = 4) -> dict:
    """Append to ``nodes``; assert at least ``need`` acked; return {node: {pg: scl}}."""
    out = {}
    for n, reply in client.append(chain, recs, nodes).items():
        if not isinstance(reply, grpc.RpcError):
            out[n] = {a.pg: a.scl for a in reply.acks}
    assert len(out) >= need, f"only {sorted(out)} acked"
    return out


def expected_scls(chain: ChainBuilder) -> dict[int, int]:
    return {pg: chain.pg_scl(pg) for pg in range(chain.layout.pg_count)}


def rpc_error(fn):
    """Call fn, expect a grpc.RpcError; return (status code, aurora-error, details, error)."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), E.aurora_error_of(exc), exc.details(), exc
    raise AssertionError("expected an RPC error")


def flip_bytes_in_file(path, needle: bytes, offset: int) -> int:
    """Flip one bit of ``needle[offset]`` at every place ``needle`` occurs in the file
    (stale LMDB copies included); returns how many copies were changed."""
    data = bytearray(path.read_bytes())
    count = 0
    pos = data.find(needle)
    while pos >= 0:
        data[pos + offset] ^= 0x10
        count += 1
        pos = data.find(needle, pos + 1)
    path.write_bytes(bytes(data))
    return count


# --- the write path ------------------------------------------------------------------------


def test_six_nodes_ack_scl_and_serve_the_oracle(storage_cluster, client, seed):
    """Scenario: a volume is created on six nodes and 600 records go to all of them in
    batches spanning every PG; every ack carries the PG's last LSN as SCL, and every node
    serves every page byte-identical to the reference materialiser, at the latest and at
    an older read point."""
    chain = ChainBuilder("basic", seed=seed)
    first = client.create_volume(chain)
    assert not any(isinstance(r, grpc.RpcError) for r in first.values()), first
    # (A node may already have learned the volume from a faster peer by gossip.)
    assert any(r.created for r in first.values())
    assert not any(r.created for r in client.create_volume(chain).values())  # idempotent
    middle = 0
    for i in range(6):
        acks = client.append_ok(chain, chain.next_records(100), writer_vdl=middle)
        for node, scls in acks.items():
            assert scls == expected_scls(chain), f"{node} seed={seed}"
        if i == 2:
            middle = chain.lsn
    for node in NODE_NAMES:
        assert client.check_pages(node, chain) > 0
        client.check_pages(node, chain, middle)
    status = client.status("sn1")
    assert status.records_received >= 600 and status.append_rpcs >= 6 and status.write_txns > 0
    state = client.state("sn1", chain, 0)
    assert state.writer_vdl == middle and state.scl == chain.pg_scl(0)


def test_holes_stop_the_scl_until_filled_and_retransmits_are_idempotent(storage_cluster, client, seed):
    """Scenario: one node alone holds a volume; a PG's records arrive out of order with
    two holes. Its SCL stops before the first hole (peers cannot fill it: none has the
    records), a retransmit of everything changes no count, and each fill moves the SCL to
    the next hole, then to the end of the chain (invariant 4)."""
    chain = ChainBuilder("holes", seed=seed, pages=[1, 2, 3])  # pages 1-3 are all in PG 0
    client.create_volume(chain, nodes=["sn2"])
    recs = chain.next_records(30)
    rng = random.Random(seed)
    h1, h2 = sorted(rng.sample(range(1, 29), 2))
    first, between, after = recs[:h1], recs[h1 + 1:h2], recs[h2 + 1:]
    shuffled = between + after
    rng.shuffle(shuffled)
    [ack] = client.append_ok(chain, shuffled, nodes=["sn2"]).values()
    assert ack == {0: 0}, f"seed={seed}"
    [ack] = client.append_ok(chain, first, nodes=["sn2"]).values()
    assert ack == {0: recs[h1 - 1].lsn}, f"seed={seed}"
    [ack] = client.append_ok(chain, recs[:h1] + between + after, nodes=["sn2"]).values()
    assert ack == {0: recs[h1 - 1].lsn}, "a retransmit must not move the SCL"
    seg = [s for s in client.status("sn2").segments if s.volume == "holes" and s.pg == 0][0]
    assert seg.records == 28, "a retransmit must not store anything twice"
    code, err, _, _ = rpc_error(lambda: client.read_page("sn2", chain, 1, recs[h1].lsn, min_scl=0))
    assert (code, err) == (grpc.StatusCode.OUT_OF_RANGE, E.READ_POINT_ABOVE_SCL)
    [ack] = client.append_ok(chain, [recs[h1]], nodes=["sn2"]).values()
    assert ack == {0: recs[h2 - 1].lsn}, f"seed={seed}"
    [ack] = client.append_ok(chain, [recs[h2]], nodes=["sn2"]).values()
    assert ack == {0: recs[-1].lsn}, f"seed={seed}"
    client.check_pages("sn2", chain)
    # The other nodes learned the volume by gossip and pulled the now complete chain.
    wait_until(lambda: client.scls("sn5", chain).get(0) == recs[-1].lsn, CATCH_UP_TIMEOUT_S,
               "sn5 to learn the volume and catch up by gossip", seed)
    client.check_pages("sn5", chain)


def test_killed_node_catches_up_by_gossip_alone(storage_cluster, client, seed):
    """Scenario: sn3 is SIGKILLed while batches stream to all six; writing goes on to the
    other five (4 acks suffice); sn3 restarts and, sent nothing more, reaches the others'
    SCL in every PG through gossip, then serves the oracle's pages. Nothing it had
    acknowledged before the kill is lost."""
    chain = ChainBuilder("catchup", seed=seed)
    client.create_volume(chain)
    acked_by_sn3 = {}
    killer = threading.Timer(0.3, storage_cluster.kill, args=("sn3",))
    killer.start()
    try:
        for _ in range(40):
            acks = quorum_append(client, chain, chain.next_records(50))
            if "sn3" in acks:
                acked_by_sn3 = acks["sn3"]
            time.sleep(0.02)
    finally:
        killer.join()
    assert not storage_cluster.running("sn3")
    others = [n for n in NODE_NAMES if n != "sn3"]
    for _ in range(10):
        quorum_append(client, chain, chain.next_records(50), nodes=others)
    storage_cluster.start_node("sn3")
    after_restart = client.scls("sn3", chain)
    for pg, scl in acked_by_sn3.items():
        assert after_restart[pg] >= scl, f"sn3 lost acknowledged records of PG {pg}"
    for _ in range(5):
        quorum_append(client, chain, chain.next_records(50), nodes=others)
    want = expected_scls(chain)
    wait_until(lambda: client.scls("sn3", chain) == want, CATCH_UP_TIMEOUT_S,
               f"sn3 to reach SCLs {want} by gossip", seed)
    assert client.status("sn3").gossip_records_pulled > 0
    client.check_pages("sn3", chain)


def test_sigkill_loses_nothing_acknowledged(storage_cluster, client, seed):
    """Scenario: appends stream to sn1 from four threads and sn1 is SIGKILLed mid-stream.
    Restarted while its five peers are frozen (SIGSTOP, so gossip cannot help), it still
    holds every record it acknowledged, byte for byte (invariant 3)."""
    chain = ChainBuilder("durable", seed=seed)
    client.create_volume(chain)
    lock = threading.Lock()
    acked: list = []
    stop = threading.Event()

    def stream():
        while not stop.is_set():
            with lock:
                recs = chain.next_records(20)
            try:
                client.stub("sn1").Append(append_request(chain, recs), timeout=5)
            except grpc.RpcError:
                return
            with lock:
                acked.extend(recs)

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acked) >= 40, 30.0, "the first acks from sn1", seed, pause_s=0.02)
    time.sleep(0.2)
    storage_cluster.kill("sn1")
    stop.set()
    for t in threads:
        t.join()
    assert acked, "nothing was acknowledged before the kill"
    # On disk, right after the kill: every acknowledged record, byte for byte.
    for pg in range(chain.layout.pg_count):
        stored = S.list_records(str(storage_cluster.data_dir("sn1")), chain.volume, pg)
        for rec in acked:
            if rec.pg == pg:
                assert stored.get(rec.lsn) == rec.data, f"acked record {rec.lsn} lost (seed={seed})"
    others = [n for n in NODE_NAMES if n != "sn1"]
    for n in others:
        storage_cluster.pause(n)
    try:
        storage_cluster.start_node("sn1")
        for pg in range(chain.layout.pg_count):
            # (wait_for_ready: the client's channel may still be backing off from the kill)
            reply = client.stub("sn1").FetchRecords(pb.FetchRecordsRequest(
                volume=chain.volume, pg=pg, after_lsn=0, upto_lsn=0, max_bytes=16 << 20),
                timeout=10, wait_for_ready=True)
            stored = {r[2]: reply.records[r[0]:r[0] + r[1]] for r in S.materialiser.scan_batch(reply.records)}
            extra = client.state("sn1", chain, pg)
            for rec in acked:
                if rec.pg != pg:
                    continue
                if rec.lsn <= extra.scl:
                    assert stored.get(rec.lsn) == rec.data, f"acked record {rec.lsn} lost (seed={seed})"
                else:
                    # Above a hole left by an unacknowledged concurrent request: still stored.
                    assert extra.max_lsn >= rec.lsn, f"acked record {rec.lsn} lost (seed={seed})"
    finally:
        for n in others:
            storage_cluster.resume(n)


def test_sigterm_stops_cleanly_and_keeps_everything(storage_cluster, client, seed):
    """Scenario: SIGTERM while appends are in flight: the node finishes them, closes LMDB
    and exits 0; restarted, it has the same SCLs and serves the same pages."""
    chain = ChainBuilder("sigterm", seed=seed)
    client.create_volume(chain)
    client.append_ok(chain, chain.next_records(200))
    before = client.scls("sn2", chain)
    in_flight = chain.next_records(50)
    pending = client.stub("sn2").Append.future(append_request(chain, in_flight), timeout=5)
    code = storage_cluster.stop("sn2")
    assert code == 0
    assert "stopped cleanly" in storage_cluster.log_path("sn2").read_text()
    try:
        pending.result()
        in_flight_acked = True
    except grpc.RpcError:
        in_flight_acked = False
    storage_cluster.start_node("sn2")
    after = client.scls("sn2", chain)
    assert all(after[pg] >= before[pg] for pg in before)
    if in_flight_acked:
        assert after == expected_scls(chain)
    # The writer retransmits to everyone (idempotent where it already landed).
    for node, scls in client.append_ok(chain, in_flight).items():
        assert scls == expected_scls(chain), node
    client.check_pages("sn2", chain)


# --- errors ----------------------------------------------------------------------------------


def test_every_refusal_has_its_own_code_and_the_node_keeps_serving(storage_cluster, client, seed):
    """Scenario: stale epoch, epoch ahead, bad checksum, malformed and truncated records,
    wrong PG, unknown volume, read points above the SCL / below the GC horizon, pages never
    initialised: each is refused with its own gRPC status and aurora-error code, a request
    with one bad batch stores nothing of its good batches, and the node then serves a good
    request as before."""
    chain = ChainBuilder("errors", seed=seed)
    client.create_volume(chain, nodes=["sn4"])
    stub = client.stub("sn4")
    client.append_ok(chain, chain.next_records(100), nodes=["sn4"])
    scls = client.scls("sn4", chain)

    def append(req):
        return rpc_error(lambda: stub.Append(req, timeout=5))

    # Bad bytes: nothing of the request is stored, not even its good batches.
    good = chain.next_records(8)
    chain.forget(8)  # refused below: not in the oracle
    batches = ChainBuilder.pack(good)
    pg_bad = sorted(batches)[-1]
    flipped = bytearray(batches[pg_bad])
    flipped[50] ^= 0xFF
    cases = [
        ({**batches, pg_bad: bytes(flipped)}, grpc.StatusCode.DATA_LOSS, E.BAD_CHECKSUM),
        ({**batches, pg_bad: batches[pg_bad][:-5]}, grpc.StatusCode.INVALID_ARGUMENT, E.MALFORMED),
        ({**batches, (pg_bad + 1) % 4: batches[pg_bad]}, grpc.StatusCode.INVALID_ARGUMENT, E.WRONG_PG),
        ({**batches, 9: batches[pg_bad]}, grpc.StatusCode.INVALID_ARGUMENT, E.MALFORMED),
    ]
    for bad_batches, status, code in cases:
        got = append(append_request(chain, [], batches=bad_batches))
        assert got[:2] == (status, code), got[2]
    assert client.scls("sn4", chain) == scls
    bad_backlink = encode_record(chain.lsn + 1, chain.lsn, chain.lsn + 5, 0, 1, 1, 0, p_init_page(1))
    got = append(append_request(chain, [], batches={0: bad_backlink}))
    assert got[:2] == (grpc.StatusCode.INVALID_ARGUMENT, E.MALFORMED)

    got = append(pb.AppendRequest(volume="no-such-volume", volume_epoch=1))
    assert got[:2] == (grpc.StatusCode.NOT_FOUND, E.UNKNOWN_VOLUME)
    got = rpc_error(lambda: client.read_page("sn4", ChainBuilder("nope"), 1, 1))
    assert got[:2] == (grpc.StatusCode.NOT_FOUND, E.UNKNOWN_VOLUME)

    # Reads.
    page = chain.touched_pages()[0]
    pg = chain.layout.pg_of(page)
    got = rpc_error(lambda: client.read_page("sn4", chain, page, scls[pg] + 1, min_scl=0))
    assert got[:2] == (grpc.StatusCode.OUT_OF_RANGE, E.READ_POINT_ABOVE_SCL)
    unused = 33  # in PG 0, outside the chain's pages: never initialised
    assert chain.layout.pg_of(unused) == 0 and unused not in chain.pages
    got = rpc_error(lambda: client.read_page("sn4", chain, unused, chain.lsn))
    assert got[:2] == (grpc.StatusCode.NOT_FOUND, E.PAGE_NOT_FOUND)
    got = rpc_error(lambda: stub.ReadPage(pb.ReadPageRequest(
        volume=chain.volume, pg=(pg + 1) % 4, page_id=page, read_point=1, volume_epoch=1), timeout=5))
    assert got[:2] == (grpc.StatusCode.INVALID_ARGUMENT, E.WRONG_PG)
    horizon = chain.records[60].lsn
    assert stub.SetGcHorizon(pb.SetGcHorizonRequest(volume=chain.volume, horizon_lsn=horizon,
                                                    volume_epoch=1), timeout=5).gc_horizon == horizon
    floor = chain.pg_read_point(pg, horizon)
    got = rpc_error(lambda: client.read_page("sn4", chain, page, floor - 1, min_scl=floor - 1))
    assert got[:2] == (grpc.StatusCode.OUT_OF_RANGE, E.READ_POINT_BELOW_GC)
    client.check_pages("sn4", chain, horizon)

    # Epochs: a new writer fences every PG at epoch 3 (SegmentState fence=true); the old
    # writer (epoch 1) is stale from then on, and epoch 4 is ahead of the segments.
    for pg in range(chain.layout.pg_count):
        state = stub.SegmentState(pb.SegmentStateRequest(
            volume=chain.volume, pg=pg, volume_epoch=3, fence=True, include_records=True,
            records_since=horizon, tail_bound=horizon), timeout=5)
        assert state.volume_epoch == 3
        assert [r.lsn for r in state.records] == [r.lsn for r in chain.visible_records(pg)
                                                  if r.lsn > horizon]
        assert state.tail_lsn == chain.pg_read_point(pg, horizon)
    got = append(append_request(chain, chain.next_records(4, pages=[1])))
    assert got[:2] == (grpc.StatusCode.FAILED_PRECONDITION, E.STALE_EPOCH)
    assert E.current_epoch_of(got[3]) == 3
    got = rpc_error(lambda: client.read_page("sn4", chain, 1, chain.lsn))
    assert got[:2] == (grpc.StatusCode.FAILED_PRECONDITION, E.STALE_EPOCH)
    got = rpc_error(lambda: stub.SegmentState(pb.SegmentStateRequest(
        volume=chain.volume, pg=0, volume_epoch=2, fence=True), timeout=5))
    assert got[:2] == (grpc.StatusCode.FAILED_PRECONDITION, E.STALE_EPOCH)
    got = append(append_request(chain, chain.records[-4:], epoch=4))
    assert got[:2] == (grpc.StatusCode.FAILED_PRECONDITION, E.EPOCH_AHEAD)
    chain.forget(4)

    # Still serving: the new writer's requests work.
    chain.epoch = 3
    client.append_ok(chain, chain.next_records(20), nodes=["sn4"])
    client.check_pages("sn4", chain, chain.lsn)
    assert client.status("sn4").node_id == "sn4"


def test_append_stream_acks_in_order_refuses_per_request_and_goes_on(storage_cluster, client, seed):
    """Scenario: the writer's path, AppendStream, on one node: five requests written back
    to back are answered in order, each reply tagged with its request's seq; a bad
    checksum and an epoch ahead are refused in their own replies (aurora-error code and
    status as a unary Append would fail with) and store nothing, the stream goes on, a
    retransmit is idempotent; after a fence the old epoch is refused with the current
    epoch in the reply's metadata (invariant 9); the acks' SCLs are what the node stores
    (invariant 3)."""
    chain = ChainBuilder("stream", seed=seed)
    client.create_volume(chain, nodes=["sn3"])
    stub = client.stub("sn3")
    first, second = chain.next_records(12), chain.next_records(12)
    batches = ChainBuilder.pack(second)
    pg_bad = max(batches, key=lambda pg: len(batches[pg]))   # >= 3 records: past byte 50
    flipped = bytearray(batches[pg_bad])
    flipped[50] ^= 0xFF
    requests = [append_request(chain, first), append_request(chain, [], batches={**batches, pg_bad: bytes(flipped)}),
                append_request(chain, second), append_request(chain, first),
                append_request(chain, chain.next_records(2), epoch=chain.epoch + 5)]
    chain.forget(2)
    for seq, request in enumerate(requests, start=10):
        request.seq = seq
    replies = list(stub.AppendStream(iter(requests), timeout=10))
    assert [r.seq for r in replies] == [10, 11, 12, 13, 14]
    assert [r.error_code for r in replies] == ["", E.BAD_CHECKSUM, "", "", E.EPOCH_AHEAD]
    assert (replies[1].error_status, replies[4].error_status) == ("DATA_LOSS", "FAILED_PRECONDITION")
    assert not replies[1].acks and not replies[4].acks
    scls = client.scls("sn3", chain)
    assert {a.pg: a.scl for a in replies[2].acks} == {pg: scls[pg] for pg in batches}
    assert {a.pg: a.scl for a in replies[3].acks} == {pg: scls[pg] for pg in ChainBuilder.pack(first)}, \
        "a retransmit acks the SCLs as they are"
    assert sum(seg.records for seg in client.status("sn3").segments if seg.volume == "stream") == 24
    client.check_pages("sn3", chain)
    # A new writer fences every PG at a higher epoch: the old one's next request is refused
    # as stale, in its reply, with the current epoch.
    for pg in range(chain.layout.pg_count):
        stub.SegmentState(pb.SegmentStateRequest(volume=chain.volume, pg=pg,
                                                 volume_epoch=chain.epoch + 1, fence=True), timeout=5)
    stale = append_request(chain, chain.next_records(3))
    chain.forget(3)
    stale.seq = 99
    [reply] = list(stub.AppendStream(iter([stale]), timeout=10))
    assert (reply.seq, reply.error_code, reply.error_status) == (99, E.STALE_EPOCH, "FAILED_PRECONDITION")
    assert int(reply.error_metadata[E.METADATA_CURRENT_EPOCH]) == chain.epoch + 1


# --- truncation and epochs -------------------------------------------------------------------


def test_truncate_hides_records_and_a_node_that_missed_it_learns_it_by_gossip(storage_cluster, client, seed):
    """Scenario: recovery truncates (VDL, VDL + 1000] at epoch 2 while sn6 is frozen. The
    truncated records vanish from SCL, ReadPage and FetchRecords on the five; the new
    writer's records (epoch 2) chain from the VDL; sn6, resumed, learns epoch 2 and the
    range from a peer by gossip and ends with the same SCLs and pages."""
    chain = ChainBuilder("trunc", seed=seed)
    client.create_volume(chain)
    client.append_ok(chain, chain.next_records(150))
    vdl = chain.lsn
    client.append_ok(chain, chain.next_records(40))  # written but never durable at a quorum
    storage_cluster.pause("sn6")
    five = [n for n in NODE_NAMES if n != "sn6"]
    try:
        end = chain.lsn + 1000
        for pg in range(chain.layout.pg_count):
            for n in five:
                client.stub(n).Truncate(pb.TruncateRequest(volume=chain.volume, pg=pg, start_lsn=vdl,
                                                           end_lsn=end, volume_epoch=2), timeout=5)
        chain.truncate(vdl, end)
        chain.epoch = 2
        for n in five:
            assert client.scls(n, chain) == expected_scls(chain), n
            for pg in range(chain.layout.pg_count):
                reply = client.stub(n).FetchRecords(pb.FetchRecordsRequest(
                    volume=chain.volume, pg=pg, volume_epoch=2), timeout=5)
                assert reply.records == b"".join(r.data for r in chain.visible_records(pg))
                assert [(t.start_lsn, t.end_lsn, t.epoch) for t in reply.truncations] == [(vdl, end, 2)]
        client.check_pages("sn1", chain, vdl)
        client.append_ok(chain, chain.next_records(60), nodes=five)
        client.check_pages("sn2", chain)
    finally:
        storage_cluster.resume("sn6")
    want = expected_scls(chain)

    def sn6_caught_up():
        segs = [s for s in client.status("sn6").segments if s.volume == chain.volume]
        return all(s.volume_epoch == 2 and s.truncations == 1 for s in segs) and \
            client.scls("sn6", chain) == want

    wait_until(sn6_caught_up, CATCH_UP_TIMEOUT_S, "sn6 to adopt epoch 2, its range and SCLs", seed)
    client.check_pages("sn6", chain)
    client.check_pages("sn6", chain, vdl)


def test_node_that_missed_create_volume_learns_it_from_peers(storage_cluster, client, seed):
    """Scenario: a volume is created and written on five nodes only; the sixth learns the
    volume's layout from a peer and pulls every record by gossip."""
    chain = ChainBuilder("learned", seed=seed)
    five = NODE_NAMES[:5]
    client.create_volume(chain, nodes=five)
    client.append_ok(chain, chain.next_records(200), nodes=five)
    want = expected_scls(chain)
    wait_until(lambda: client.scls("sn6", chain) == want, CATCH_UP_TIMEOUT_S,
               "sn6 to learn the volume and its records", seed)
    client.check_pages("sn6", chain)


# --- background work -------------------------------------------------------------------------


def _segment_status(client, node, volume):
    return {s.pg: s for s in client.status(node).segments if s.volume == volume}


def test_gc_below_the_horizon_keeps_every_read_above_it(storage_cluster, client, seed):
    """Scenario: after SetGcHorizon the nodes delete records and versions below it in the
    background; reads below the horizon are refused and every read at or above it still
    equals the oracle (invariant 12)."""
    chain = ChainBuilder("gc", seed=seed)
    client.create_volume(chain)
    for _ in range(4):
        client.append_ok(chain, chain.next_records(100))
    horizon = chain.lsn
    client.append_ok(chain, chain.next_records(100), writer_vdl=horizon)  # GC stays <= writer_vdl
    before = sum(s.records for s in _segment_status(client, "sn5", chain.volume).values())
    for n in NODE_NAMES:
        client.stub(n).SetGcHorizon(pb.SetGcHorizonRequest(volume=chain.volume, horizon_lsn=horizon,
                                                           volume_epoch=1), timeout=5)
    wait_until(lambda: sum(s.records for s in _segment_status(client, "sn5", chain.volume).values())
               < before / 2, CATCH_UP_TIMEOUT_S, "GC to delete records on sn5", seed)
    assert client.status("sn5").gc_records_deleted > 0
    page = chain.touched_pages()[0]
    floor = chain.pg_read_point(chain.layout.pg_of(page), horizon)
    got = rpc_error(lambda: client.read_page("sn5", chain, page, floor - 1))
    assert got[:2] == (grpc.StatusCode.OUT_OF_RANGE, E.READ_POINT_BELOW_GC)
    client.check_pages("sn5", chain, horizon)
    client.check_pages("sn5", chain)


def _wait_versions(client, node, chain, seed):
    return wait_until(
        lambda: all(s.page_versions > 0 for s in _segment_status(client, node, chain.volume).values()
                    if s.records),
        CATCH_UP_TIMEOUT_S, f"{node} to coalesce page versions in every PG it holds records of", seed)


@pytest.mark.allow_errors(r"failed its checksum")
def test_rotten_record_and_page_are_scrubbed_and_repaired_never_served(storage_cluster, client, seed):
    """Scenario: in stopped sn4's data.mdb one bit of a log record and one bit of a page
    version rot. Restarted, sn4 serves no bad byte: reads are either the oracle's page or
    refused as CORRUPT; the scrub finds both, the page version is rebuilt from the log
    and the record is refetched from a peer, after which every read equals the oracle and
    the stored bytes equal the originals (invariant 13)."""
    chain = ChainBuilder("rot", seed=seed, pages=[1, 2, 3, 5, 6, 7])  # PGs 0 and 1
    client.create_volume(chain)
    for _ in range(4):
        client.append_ok(chain, chain.next_records(60))
    _wait_versions(client, "sn4", chain, seed)
    assert storage_cluster.stop("sn4") == 0
    data_dir = storage_cluster.data_dir("sn4")
    rng = random.Random(seed)
    versions = S.list_page_versions(str(data_dir), chain.volume, 0)
    vkey = rng.choice(sorted(versions))
    records = S.list_records(str(data_dir), chain.volume, 1)
    victim = rng.choice([r for r in chain.records if r.pg == 1][:-5])
    assert records[victim.lsn] == victim.data
    mdb = data_dir / "data.mdb"
    assert flip_bytes_in_file(mdb, victim.data, len(victim.data) - 1) >= 1
    assert flip_bytes_in_file(mdb, versions[vkey], 4000) >= 1
    storage_cluster.start_node("sn4")
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    served = refused = 0
    while True:
        for page_id in chain.touched_pages():
            try:
                page = client.read_page("sn4", chain, page_id, chain.lsn).page
            except grpc.RpcError as exc:
                assert (exc.code(), E.aurora_error_of(exc)) == (grpc.StatusCode.DATA_LOSS, E.CORRUPT), \
                    exc.details()
                refused += 1
                continue
            assert page == chain.oracle_page(page_id, chain.lsn), "served bad bytes"
            served += 1
        status = client.status("sn4")
        if status.scrub_errors_found >= 2 and status.scrub_repairs >= 2 and status.quarantined == 0:
            break
        assert time.monotonic() < deadline, f"no repair in time: {status} (seed={seed})"
        time.sleep(0.1)
    client.check_pages("sn4", chain)
    assert storage_cluster.stop("sn4") == 0
    assert S.list_records(str(data_dir), chain.volume, 1)[victim.lsn] == victim.data
    assert S.list_page_versions(str(data_dir), chain.volume, 0)[vkey] == versions[vkey]
    storage_cluster.start_node("sn4")
    print(f"reads during repair: {served} served, {refused} refused as CORRUPT")


def test_dropped_page_versions_are_rebuilt_from_the_log_identically(storage_cluster, client, seed):
    """Scenario: invariant 14. Every materialised page version of a volume on stopped sn5
    is deleted (store.drop_page_versions). Rebuilding them from the log gives the same
    bytes; restarted, sn5 coalesces new versions from the log alone, and every page read
    equals engine.format.materialise_py applied to the log, at the latest and older read points."""
    chain = ChainBuilder("rebuild", seed=seed)
    client.create_volume(chain)
    points = []
    for _ in range(4):
        client.append_ok(chain, chain.next_records(80))
        points.append(chain.lsn)
    _wait_versions(client, "sn5", chain, seed)
    assert storage_cluster.stop("sn5") == 0
    data_dir = str(storage_cluster.data_dir("sn5"))
    old = {pg: S.list_page_versions(data_dir, chain.volume, pg) for pg in range(chain.layout.pg_count)}
    for pg, versions in old.items():
        for (page_id, lsn), image in versions.items():
            assert image == chain.oracle_page(page_id, lsn)
    assert S.drop_page_versions(data_dir, chain.volume) == sum(len(v) for v in old.values())
    for pg, versions in old.items():
        assert S.list_page_versions(data_dir, chain.volume, pg) == {}
        assert S.rebuild_page_versions(data_dir, chain.volume, pg, versions) == versions
    storage_cluster.start_node("sn5")
    for point in points:
        client.check_pages("sn5", chain, point)
    _wait_versions(client, "sn5", chain, seed)
    assert storage_cluster.stop("sn5") == 0
    for pg in range(chain.layout.pg_count):
        for (page_id, lsn), image in S.list_page_versions(data_dir, chain.volume, pg).items():
            assert image == chain.oracle_page(page_id, lsn)
            if (page_id, lsn) in old[pg]:
                assert image == old[pg][(page_id, lsn)]
    storage_cluster.start_node("sn5")
    client.check_pages("sn5", chain)


@pytest.mark.allow_errors(r"failed its checksum")
def test_rotten_page_whose_log_was_collected_is_refetched_from_a_peer(storage_cluster, client, seed):
    """Scenario: after GC, a page's only version at or below the horizon is all that is
    left of its history below it. That version rots on stopped sn2's disk; restarted, sn2
    cannot rebuild it from its own log, so it reads the page from a peer as of the GC
    horizon, and every read then equals the oracle again (invariant 13 with 12)."""
    chain = ChainBuilder("gcrot", seed=seed, pages=[1, 2, 3])  # all in PG 0
    client.create_volume(chain)
    for _ in range(3):
        client.append_ok(chain, chain.next_records(60))
    horizon = chain.lsn
    client.append_ok(chain, chain.next_records(20), writer_vdl=horizon)  # GC stays <= writer_vdl
    for n in NODE_NAMES:
        client.stub(n).SetGcHorizon(pb.SetGcHorizonRequest(volume=chain.volume, horizon_lsn=horizon,
                                                           volume_epoch=1), timeout=5)
    wait_until(lambda: client.status("sn2").gc_records_deleted > 0 and
               _segment_status(client, "sn2", chain.volume)[0].records < 100,
               CATCH_UP_TIMEOUT_S, "GC on sn2", seed)
    assert storage_cluster.stop("sn2") == 0
    data_dir = str(storage_cluster.data_dir("sn2"))
    versions = S.list_page_versions(data_dir, chain.volume, 0)
    page_id, lsn = max(k for k in versions if k[1] <= horizon)  # the page's anchor version
    assert S.list_records(data_dir, chain.volume, 0).keys().isdisjoint(
        r.lsn for r in chain.records if r.page_id == page_id and r.lsn < lsn), "log not collected"
    assert flip_bytes_in_file(storage_cluster.data_dir("sn2") / "data.mdb",
                              versions[(page_id, lsn)], 3000) >= 1
    storage_cluster.start_node("sn2")

    def repaired():
        status = client.status("sn2")
        return status.scrub_errors_found >= 1 and status.scrub_repairs >= 1 and status.quarantined == 0

    wait_until(repaired, CATCH_UP_TIMEOUT_S, "sn2 to refetch the page from a peer", seed)
    client.check_pages("sn2", chain)
    client.check_pages("sn2", chain, horizon)
