"""The write-amplification benchmark's counting, checked against arithmetic done by hand.

Three layers:

* the pure counting rules (engine/baseline/io_count.py, R1-R7) and the per-phase summary;
* the baseline sink (engine/baseline/mirrored.py) over a fake in-process chain: group commit, binlog
  sizes, the flush pipeline (double-write, home, metadata), LRU flushing, old versions;
* a tiny known workload replayed through BOTH real paths (six storage-node processes with
  the real StorageDriver; four block-server processes with the baseline sink), every
  I/O and byte counter compared with numbers worked out in the comments;

plus a smoke run of ``aurora-lite bench write-amplification`` with tiny settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from aurora_pb import block_pb2 as bpb
from engine.baseline import procs as bench_procs, workload as wa_workload
from engine.baseline.mirrored import (
    BaselineSink,
    BlockChain,
    BlockTarget,
    TXN_EVENTS_BYTES,
    binlog_event,
    rows_event_bytes,
)
from engine.format.cluster_config import Latency
from engine.db.database import Database
from engine.errors import UnavailableError
from engine.baseline.io_count import (
    IO_UNIT_BYTES,
    Ledger,
    Tally,
    append_ios,
    block_request_ios,
    pg_batch_ios,
    per_txn,
    percentile,
    write_ios,
)
from engine.writer.recovery import recover
from engine.format.cluster_config import NodeInfo
from engine.format.volume import VolumeLayout
from engine.baseline.wa_bench import (
    CountingDriver,
    bench_transport,
    block_server_status,
    compare,
    counter_delta,
    storage_node_status,
    summarise,
)

REPO_ROOT = bench_procs.PACKAGE_ROOT


def run(coro, timeout_s: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


# --- Pure counting rules ----------------------------------------------------------------------


def test_write_ios_rounds_up_to_4k_units():
    """Scenario: R1, one I/O per started 4 KiB of one write; nothing for an empty write."""
    assert IO_UNIT_BYTES == 4096
    assert [write_ios(n) for n in (0, 1, 4095, 4096, 4097, 8192, 8193)] == [0, 1, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        write_ios(-1)


def test_each_pg_batch_is_a_write_and_the_old_count_beside_it():
    """Scenario: R2 counts each PG batch of an Append as its own write (Aurora boxcars per
    PG, [P17]); R2-old, the figure before issue 16, counted the whole Append as one write;
    R3 counts each block write."""
    # Three PG batches of 1000 + 2000 + 1500 bytes in ONE Append: R2 1 + 1 + 1 = 3 I/Os;
    # R2-old one write of 4500 bytes, ceil(4500/4096) = 2.
    assert pg_batch_ios([1000, 2000, 1500]) == 3
    assert append_ios([1000, 2000, 1500]) == 2
    # A big PG batch costs its 4 KiB units: 9000 bytes = 3 I/Os under both rules; a small
    # second batch then costs R2 one more I/O but R2-old none (9100 bytes is still 3).
    assert pg_batch_ios([9000]) == append_ios([9000]) == 3
    assert pg_batch_ios([9000, 100]) == 4 and append_ios([9000, 100]) == 3
    # One PG batch: the two rules agree (every PG of a 1,000-row run is PG 0).
    assert pg_batch_ios([213]) == append_ios([213]) == 1
    assert pg_batch_ios([]) == append_ios([]) == 0
    # The same sizes as three block writes: 1 + 1 + 1 = 3.
    assert block_request_ios([1000, 2000, 1500]) == 3
    # A double-write batch of two 8 KiB pages (16384 B = 4) + two home pages (2 + 2) + a
    # 512-byte metadata write (1) = 9.
    assert block_request_ios([16384]) + block_request_ios([8192, 8192]) + block_request_ios([512]) == 9


def test_ledger_per_destination_totals_and_deltas():
    """Scenario: R4 (every destination counts) and R5 (serialised bytes) in a Ledger."""
    ledger = Ledger()
    for node in ("sn1", "sn2", "sn3", "sn4", "sn5", "sn6"):
        # One batch of 5000 payload bytes (2 I/Os) serialised to 5040 bytes, to each node.
        assert ledger.sent_append(node, [5000], 5040) == 2
    before = ledger.snapshot()
    # A baseline log group: redo 300 B + binlog 700 B = 2 writes, 1 I/O each, 1100 B request.
    assert ledger.sent_blocks("bs1", [300], 340) == 1
    assert ledger.sent_blocks("bs1", [700], 740) == 1
    ledger.read("sn1", 8192)
    total = ledger.total()
    # 6 nodes x 2 I/Os + 2 = 14 I/Os; 6 x 5040 + 340 + 740 = 31,320 bytes; 8 requests.
    assert (total.ios, total.bytes, total.requests, total.writes) == (14, 31_320, 8, 8)
    assert total.append_ios == 14                            # one PG batch: the rules agree
    assert ledger.total(["sn1", "sn2"]).ios == 4
    assert ledger.read_total() == Tally(1, 1, 2, 8192, 8192, 2)  # an 8 KiB page read = 2 I/Os
    delta = ledger.delta(before)
    assert delta.total().ios == 2 and delta.total(["sn1"]).ios == 0
    assert delta.writes["bs1"] == Tally(2, 2, 2, 1000, 1080, 2)
    # An Append with batches of three PGs (1000 + 2000 + 1500 bytes, serialised 4540):
    # three writes, 3 I/Os by R2, 2 by R2-old.
    assert ledger.sent_append("sn1", [1000, 2000, 1500], 4540) == 3
    after = ledger.delta(before).writes["sn1"]
    assert after == Tally(requests=1, writes=3, ios=3, payload_bytes=4500, bytes=4540, append_ios=2)


def test_percentile_is_nearest_rank():
    """Scenario: p50 and p99 of 1..100 are 50 and 99; of 1..10 the p99 is the maximum."""
    values = list(range(100, 0, -1))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile(values, 100) == 100 and percentile(values, 0) == 1
    assert percentile(range(1, 11), 99) == 10
    assert percentile([], 50) == 0.0
    assert per_txn(10, 0) == 0.0 and per_txn(10, 4) == 2.5


def test_summarise_divides_by_committed_transactions():
    """Scenario: a phase of 4 commits; the headline counts only the instance's own block
    server, the whole path also the mirrors; aborted attempts are not transactions (R7)."""
    phase = wa_workload.PhaseResult(committed=4, aborted=3, elapsed_s=2.0,
                                    commit_latencies_s=[0.001, 0.002, 0.003, 0.010])
    writes = Ledger()
    writes.sent_blocks("bs1", [5000], 5100)      # 2 I/Os
    writes.sent_blocks("bs1", [100, 100], 300)   # 2 I/Os
    writes.sent_blocks("bs3", [5000], 5100)      # 2 I/Os
    writes.sent_blocks("bs3", [100, 100], 300)   # 2 I/Os
    nodes = {name: {"az": az, "received_ios": 4, "received_bytes": 5400,
                    "lmdb_bytes_written": 1000, "write_txns": 2}
             for name, az in (("bs1", "az-a"), ("bs2", "az-a"), ("bs3", "az-b"), ("bs4", "az-b"))}
    run_ = summarise("baseline", "healthy", phase, writes, ["bs1"], ["bs1", "bs3"], nodes)
    assert run_["tps"] == 2.0                              # 4 commits in 2 s
    assert run_["compute_ios_per_txn"] == 1.0              # bs1: 4 I/Os / 4 txns
    assert run_["compute_all_ios_per_txn"] == 2.0          # bs1 + bs3: 8 / 4
    assert run_["chain_ios_per_txn"] == 4.0                # 4 servers x 4 I/Os / 4 txns
    assert run_["compute_bytes_per_txn"] == 2700.0         # 2 x 5400 / 4
    assert run_["lmdb_bytes_per_txn"] == 1000.0            # 4 x 1000 / 4
    assert run_["busiest_node_ios_per_txn"] == 1.0
    assert run_["commit_ms"]["p50"] == 2.0 and run_["commit_ms"]["p99"] == 10.0
    aurora = dict(run_, config="aurora-lite", compute_ios_per_txn=0.5, compute_all_ios_per_txn=0.5,
                  chain_ios_per_txn=0.5, tps=8.0, busiest_node_ios_per_txn=0.25)
    c = compare([aurora, run_])["healthy"]
    assert (c["ios_ratio"], c["txn_ratio"], c["per_node_ratio"]) == (2.0, 4.0, 4.0)
    assert not c["goal_ios_ratio_met"] and c["goal_tps_ahead"]
    # The baseline's old and new counts are the same (R3 did not change).
    assert run_["compute_append_ios_per_txn"] == run_["compute_ios_per_txn"] == 1.0
    assert run_["chain_append_ios_per_txn"] == 4.0


def test_summarise_reports_both_counts_for_multi_pg_appends():
    """Scenario: 2 commits; each of the six nodes got two Appends, each carrying a batch of
    PG 0 (3000 bytes) and one of PG 1 (2000 bytes). R2: 2 I/Os per Append, R2-old 2 (5000
    bytes) too; a third Append to each node of 100 + 100 bytes: R2 2, R2-old 1."""
    phase = wa_workload.PhaseResult(committed=2, elapsed_s=1.0, commit_latencies_s=[0.001, 0.002])
    writes = Ledger()
    names = [f"sn{i}" for i in range(1, 7)]
    for name in names:
        writes.sent_append(name, [3000, 2000], 5100)
        writes.sent_append(name, [3000, 2000], 5100)
        writes.sent_append(name, [100, 100], 300)
    nodes = {name: {"az": "az-a", "received_ios": writes.writes[name].ios,
                    "received_append_ios": writes.writes[name].append_ios,
                    "received_bytes": writes.writes[name].bytes, "lmdb_bytes_written": 0,
                    "write_txns": 0} for name in names}
    run_ = summarise("aurora-lite", "healthy", phase, writes, names, names, nodes)
    # R2: per node 2 + 2 + 2 = 6, six nodes 36, per txn 18. R2-old: 2 + 2 + 1 = 5 -> 15.
    assert run_["compute_ios_per_txn"] == 18.0 and run_["compute_append_ios_per_txn"] == 15.0
    assert run_["chain_ios_per_txn"] == 18.0 and run_["chain_append_ios_per_txn"] == 15.0
    assert run_["busiest_node_ios_per_txn"] == 3.0 and run_["busiest_node_append_ios_per_txn"] == 2.5
    assert run_["compute_writes_per_request"] == 2.0    # six PG batches in three Appends
    base = dict(run_, config="baseline", compute_ios_per_txn=30.0, compute_append_ios_per_txn=30.0)
    c = compare([run_, base])["healthy"]
    assert c["ios_ratio"] == 30.0 / 18.0 and c["ios_ratio_append_rule"] == 2.0


def test_counting_driver_counts_each_pg_batch_of_an_append():
    """Scenario: the benchmark's driver wrapper parses a serialised Append once and hands
    the Ledger one size per PG batch (what R2 counts)."""
    from aurora_pb import storage_pb2 as spb
    nodes = [NodeInfo(f"sn{i}", "az-a", f"127.0.0.1:{i}") for i in range(1, 7)]   # never dialled
    driver = CountingDriver("v", nodes, VolumeLayout(2, 1), epoch=0, lal=10, instance="bench",
                            ledger=Ledger(), transport=bench_transport())
    data = spb.AppendRequest(volume="v", batches=[
        spb.PgBatch(pg=0, records=b"a" * 5000), spb.PgBatch(pg=1, records=b"b" * 300)]).SerializeToString()
    assert driver._payload(data) == [5000, 300]
    assert driver._payload(data) is driver._payload(data)    # parsed once, reused per node
    assert counter_delta({"a": {"x": 5, "az": "z"}}, {"a": {"x": 2, "az": "z"}}) == {"a": {"x": 3, "az": "z"}}


def test_binlog_event_sizes():
    """Scenario: MySQL 5.7 event sizes: 19-byte header + body + 4-byte CRC."""
    assert len(binlog_event(16, 8)) == 31                 # an XID event
    assert TXN_EVENTS_BYTES == 65 + 80 + 31               # GTID + BEGIN + XID
    assert rows_event_bytes(105) == 141                   # 36 + row image


# --- The baseline sink over a fake chain --------------------------------------------------------


class FakeChain:
    """Records block writes instead of sending them; reads answer from what was written."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, list[tuple[int, int, bytes]]]] = []
        self.blocks: dict[tuple[int, int], bytes] = {}
        self.reads = 0
        self.retries = 0
        self.gate: asyncio.Event | None = None        # when set, log writes wait for it
        self.flush_gate: asyncio.Event | None = None  # when set, page flushes wait for it

    async def write(self, writes, kind):
        if self.gate is not None and kind in ("redo", "binlog"):
            await self.gate.wait()
        if self.flush_gate is not None and kind == "doublewrite":
            await self.flush_gate.wait()
        await asyncio.sleep(0)
        self.writes.append((kind, [(w.area, w.offset, bytes(w.data)) for w in writes]))
        for w in writes:
            self.blocks[(w.area, w.offset)] = bytes(w.data)

    async def read(self, area, offset):
        self.reads += 1
        return self.blocks.get((area, offset))

    async def close(self):
        pass

    def kinds(self):
        return [k for k, _ in self.writes]


async def _fake_db(pool_pages: int = 64, **kw):
    chain = FakeChain()
    sink = BaselineSink(chain, layout=VolumeLayout(1, 64), lal=1000, **kw)
    await sink.start()
    db = Database(sink, pool_pages)
    db.pool.on_evict = sink.page_evicted
    await db.bootstrap()
    return chain, sink, db


def test_sink_commit_writes_redo_then_binlog_with_hand_computed_sizes():
    """Scenario: one put into an empty table is one redo write of its two records and one
    binlog write of GTID + BEGIN + TABLE_MAP + one rows event + XID."""
    async def scenario():
        chain, sink, db = await _fake_db()
        await db.create_table("t")
        chain.writes.clear()
        await db.put("t", b"key-1", b"v" * 100)
        kinds = chain.kinds()
        assert kinds == ["redo", "binlog"], kinds
        redo = chain.writes[0][1][0][2]
        # INSERT_CELL: 44-byte header + slot 2 + key_len 2 + key 5 + value 100 = 153;
        # COMMIT: 44 + txn_id 8 + timestamp 8 = 60. Redo write = 213 bytes.
        assert len(redo) == 153 + 60
        binlog = chain.writes[1][1][0][2]
        # GTID 65 + BEGIN 80 + TABLE_MAP 60 + rows event (36 + key 5 + value 100 = 141) +
        # XID 31 = 377 bytes.
        assert len(binlog) == 65 + 80 + 60 + 141 + 31 == 377
        # An update carries before and after images: 36 + 2 x 105 = 246, so 65+80+60+246+31.
        chain.writes.clear()
        await db.put("t", b"key-1", b"w" * 100)
        assert len(chain.writes[1][1][0][2]) == 65 + 80 + 60 + 246 + 31
        # A delete carries the before image: 36 + 105 = 141.
        chain.writes.clear()
        await db.delete("t", b"key-1")
        assert len(chain.writes[1][1][0][2]) == 65 + 80 + 60 + 141 + 31
        assert sink.vdl == sink.allocator.last_volume_lsn
        await sink.close()
    run(scenario())


def test_sink_binlog_skips_tables_not_listed():
    """Scenario: with binlog_tables={'rows'} a transaction writing 'rows' and 'idx' logs one
    rows event and one TABLE_MAP (the index is not binlogged, as in MySQL)."""
    async def scenario():
        chain, sink, db = await _fake_db(binlog_tables={"rows"})
        await db.create_table("rows")
        await db.create_table("idx")
        chain.writes.clear()
        txn = db.begin()
        txn.put("rows", b"r1", b"x" * 10)
        txn.put("idx", b"i1", b"")
        await txn.commit()
        binlog = [w for k, ws in chain.writes if k == "binlog" for w in ws]
        assert len(binlog) == 1
        # 65 + 80 + 60 (one TABLE_MAP) + (36 + 2 + 10) + 31 = 284.
        assert len(binlog[0][2]) == 284
        assert sink.stats["row_events"] == 1
        await sink.close()
    run(scenario())


def test_sink_group_commit_shares_one_log_write():
    """Scenario: while a group's redo write is held, five commits pile up in the open group;
    they leave together as ONE redo write and ONE binlog write (no timer)."""
    async def scenario():
        chain, sink, db = await _fake_db()
        await db.create_table("t")
        chain.writes.clear()
        chain.gate = asyncio.Event()
        first = asyncio.ensure_future(db.put("t", b"a", b"1"))
        await asyncio.sleep(0.01)            # the first group's redo write is now held
        rest = [asyncio.ensure_future(db.put("t", b"k%d" % i, b"2")) for i in range(5)]
        await asyncio.sleep(0.01)
        chain.gate.set()
        await asyncio.gather(first, *rest)
        assert chain.kinds() == ["redo", "binlog", "redo", "binlog"]
        second_redo = chain.writes[2][1][0][2]
        # Five MTRs of INSERT_CELL (44 + 2 + 2 + 2 + 1 = 51) + COMMIT (60) = 5 x 111.
        assert len(second_redo) == 5 * 111
        await sink.close()
    run(scenario())


def test_sink_flush_is_doublewrite_then_home_then_metadata():
    """Scenario: flush_all writes the two dirty pages (META, table root) as one
    double-write of 16 KiB, two home writes of 8 KiB and a 512-byte metadata write."""
    async def scenario():
        chain, sink, db = await _fake_db()
        await db.create_table("t")
        await db.put("t", b"a", b"1")
        chain.writes.clear()
        assert await sink.flush_all() == 2
        assert chain.kinds() == ["doublewrite", "page", "meta"]
        (dw,), home, (meta,) = (ws for _, ws in chain.writes)
        assert (dw[0], len(dw[2])) == (bpb.BLOCK_AREA_DOUBLEWRITE, 2 * 8192)
        assert sorted((w[0], w[1], len(w[2])) for w in home) == [
            (bpb.BLOCK_AREA_PAGE, 0, 8192), (bpb.BLOCK_AREA_PAGE, 1, 8192)]
        assert (meta[0], len(meta[2])) == (bpb.BLOCK_AREA_META, 512)
        assert block_request_ios([len(dw[2])]) + block_request_ios(len(w[2]) for w in home) + 1 == 9
        assert sink.status()["dirty_pages"] == 0
        # A clean page is now read from the block server (one read), not from memory.
        reads = chain.reads
        assert await sink.read_page(1, sink.vdl) == chain.blocks[(bpb.BLOCK_AREA_PAGE, 1)]
        assert chain.reads == reads + 1
        await sink.close()
    run(scenario())


def test_sink_lru_flush_of_evicted_dirty_pages():
    """Scenario: a buffer pool of 6 pages over a table of many leaves evicts dirty pages;
    each one is written home by the page cleaner (LRU flush), never before its records
    are durable (WAL), and every row reads back right."""
    async def scenario():
        chain, sink, db = await _fake_db(pool_pages=6)
        await db.create_table("t")
        for start in range(0, 400, 50):
            txn = db.begin()
            for i in range(start, start + 50):
                txn.put("t", b"%06d" % i, b"v" * 200)
            await txn.commit()
        await sink.quiesce()
        assert db.pool.evictions > 0
        assert sink.stats["lru_pages_flushed"] > 0
        assert "doublewrite" in chain.kinds()
        for kind, writes in chain.writes:
            if kind == "page":
                for _area, page_id, image in writes:
                    assert int.from_bytes(image[8:16], "little") <= sink.vdl
        for i in range(0, 400, 37):
            assert await db.get("t", b"%06d" % i) == b"v" * 200
        await sink.close()
    run(scenario())


def test_sink_reread_of_an_evicted_dirty_page_waits_for_its_write():
    """Scenario: the pool evicts a page that is dirty in the sink; a read of it waits until
    the LRU write (double-write, home, metadata) has finished, then reads it back from
    the block server, as MySQL waits for the page's write I/O before reusing it."""
    async def scenario():
        chain, sink, db = await _fake_db()
        await db.create_table("t")
        await db.put("t", b"a", b"1")
        chain.writes.clear()
        chain.flush_gate = asyncio.Event()
        sink.page_evicted(1)                        # the buffer pool's hook
        read = asyncio.ensure_future(sink.read_page(1, sink.vdl))
        await asyncio.sleep(0.05)
        assert not read.done() and chain.kinds() == []
        reads = chain.reads
        chain.flush_gate.set()
        page = await read
        assert chain.kinds() == ["doublewrite", "page", "meta"]
        assert chain.reads == reads + 1 and page == chain.blocks[(bpb.BLOCK_AREA_PAGE, 1)]
        assert sink.stats["lru_read_waits"] == 1 and sink.stats["lru_pages_flushed"] == 1
        await sink.close()
    run(scenario())


def test_sink_reads_old_versions_of_dirty_pages():
    """Scenario: a read as of an older read point gets the page as it was then (rebuilt
    from its image before the dirty period plus records); once written home past the
    read point, it is refused rather than answered wrong."""
    async def scenario():
        chain, sink, db = await _fake_db()
        await db.create_table("t")
        await db.put("t", b"a", b"old")
        old_point = sink.vdl
        await db.put("t", b"a", b"new")
        old = await sink.read_page(1, old_point)
        assert old is not None and b"old" in old and b"new" not in old
        await sink.flush_all()
        with pytest.raises(UnavailableError):
            await sink.read_page(1, old_point)
        assert sink.stats["old_version_misses"] == 1
        await sink.close()
    run(scenario())


# --- A tiny known workload through both real paths --------------------------------------------


def varint_len(n: int) -> int:
    """Bytes of a protobuf varint (7 bits per byte)."""
    return max(1, (n.bit_length() + 6) // 7)


@pytest.fixture(scope="module")
def storage_nodes(tmp_path_factory):
    with bench_procs.start_storage_nodes(tmp_path_factory.mktemp("wa-sn")) as group:
        yield group


@pytest.fixture(scope="module")
def block_servers(tmp_path_factory):
    with bench_procs.start_block_servers(tmp_path_factory.mktemp("wa-bs"), Latency(0.0, 0.0)) as group:
        yield group


async def settled_status(group, driver, timeout_s: float = 20.0) -> dict:
    """NodeStatus of every node once all six have acked every record sent (a commit returns
    at 4 acks; the last two nodes may still be committing its batch, and a node counts
    its LMDB bytes only once the commit is on disk, just before it acks)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last = driver.allocator.last_volume_lsn
    while any(driver.tracker.node_scl(name, 0) < last for name in group.names()):
        assert asyncio.get_running_loop().time() < deadline, "a node never acked"
        await asyncio.sleep(0.02)
    return await storage_node_status(group)


KEYS = [b"key-1", b"key-2", b"key-3"]
VALUE = b"v" * 100


def test_replay_aurora_lite_counts(storage_nodes):
    """Scenario: three single-row commits, one after the other, through the real driver
    and six storage nodes: each commit is one batch, sent to all six nodes."""
    async def scenario():
        ledger = Ledger()
        nodes = [NodeInfo(n, storage_nodes.az(n), storage_nodes.address(n)) for n in storage_nodes.names()]
        driver = CountingDriver("wa-replay", nodes, VolumeLayout(1, 64), epoch=0, lal=100,
                                instance="bench", ledger=ledger, transport=bench_transport())
        await driver.start()
        try:
            await recover(driver)
            db = Database(driver, 64)
            await db.bootstrap()
            await db.create_table("t")
            before, status_before = ledger.snapshot(), await settled_status(storage_nodes, driver)
            commit_lsns = [await db.put("t", key, VALUE) for key in KEYS]
            delta = ledger.delta(before)
            status = counter_delta(await settled_status(storage_nodes, driver), status_before)
        finally:
            await driver.close()
        # A new volume opens after the truncation range (0, LAL = 100]: bootstrap is LSNs
        # 101-102, create_table 103-106, and each put INSERT_CELL + COMMIT: 108, 110, 112.
        assert commit_lsns == [108, 110, 112]
        # Each batch: INSERT_CELL 44 + 2 + 2 + 5 + 100 = 153 bytes, COMMIT 44 + 16 = 60:
        # 213 payload bytes -> 1 I/O (R1, R2) per node.
        payload = 153 + 60
        # Serialised AppendRequest (R5): volume "wa-replay" 1 + 1 + 9 = 11; volume_epoch
        # (created at 1, recovery fences at 2) 1 + 1; writer_vdl (the previous commit,
        # 106/108/110) 1 + 1; the PgBatch for PG 0 (pg 0 is omitted; membership_epoch 1,
        # invariant 16: 1 + 1) holds records 1 + 2 + 213 = 216 and is framed
        # 1 + 2 + 2 + 216 = 221; sender "bench" 1 + 1 + 5 = 7; seq (the batch's number on
        # the AppendStream, below 128) 1 + 1.
        request = 11 + (1 + varint_len(driver.epoch)) + 2 + 221 + 7 + 2
        assert driver.epoch == 2 and driver.membership_epoch(0) == 1 and request == 245
        for name in storage_nodes.names():
            assert delta.writes[name] == Tally(requests=3, writes=3, ios=3, payload_bytes=3 * payload,
                                               bytes=3 * request, append_ios=3), name
            # The node saw the same: 3 Appends, 6 records, 639 record bytes; LMDB bytes at
            # least the records (keys, page versions and background work come on top), in
            # at least one synced transaction (a lagging node group-commits two Appends).
            s = status[name]
            assert (s["append_rpcs"], s["records_received"], s["bytes_received"]) == (3, 6, 639), s
            assert s["write_txns"] >= 1 and s["lmdb_bytes_written"] >= 639
        total = delta.total()
        # 3 commits x 6 nodes x 1 I/O = 18 I/Os, i.e. 6 I/Os per transaction;
        # 18 x 245 = 4410 bytes, i.e. 1470 bytes per transaction.
        assert (total.ios, total.bytes) == (18, 4410)
        assert per_txn(total.ios, 3) == 6.0 and per_txn(total.bytes, 3) == 1470.0
    run(scenario())


def test_replay_baseline_counts(block_servers):
    """Scenario: the same three commits through the baseline: each is a redo write and a
    binlog write, to bs1 (mirrored to bs2) then to bs3 (mirrored to bs4); then one flush
    of the two dirty pages; then one page read."""
    async def scenario():
        ledger = Ledger()
        g = block_servers
        chain = BlockChain("wa-replay", BlockTarget("bs1", "az-a", g.address("bs1")),
                           BlockTarget("bs3", "az-b", g.address("bs3")), ledger, instance="bench",
                           transport=bench_transport())
        await chain.start()
        sink = BaselineSink(chain, layout=VolumeLayout(1, 64), lal=100)
        await sink.start()
        try:
            db = Database(sink, 64)
            db.pool.on_evict = sink.page_evicted
            await db.bootstrap()
            await db.create_table("t")
            await sink.quiesce()
            before, status_before = ledger.snapshot(), await block_server_status(g)
            commit_lsns = [await db.put("t", key, VALUE) for key in KEYS]
            delta = ledger.delta(before)
            status = counter_delta(await block_server_status(g), status_before)
            flush_before, flush_status_before = ledger.snapshot(), await block_server_status(g)
            assert await sink.flush_all() == 2
            flush = ledger.delta(flush_before)
            flush_status = counter_delta(await block_server_status(g), flush_status_before)
            page = await sink.read_page(1, sink.vdl)
        finally:
            await sink.close()
        # LSNs start at 1 here: bootstrap 1-2, create_table 3-6, puts end at 8, 10, 12.
        assert commit_lsns == [8, 10, 12]
        # Per commit: redo write of 213 bytes (as above) -> 1 I/O; binlog write of GTID 65 +
        # BEGIN 80 + TABLE_MAP 60 + rows event (36 + 5 + 100) + XID 31 = 377 bytes -> 1 I/O.
        # Serialised requests: volume "wa-replay" 11, sender "bench" 7, and one BlockWrite:
        #   redo:   area 1+1, offset (slot 3, 4, 5) 1+1, data 1+2+213 = 216 -> 220, framed
        #           1+2+220 = 223 -> request 11 + 223 + 7 = 241
        #   binlog: area 2, offset (slot 2, 3, 4) 2, data 1+2+377 = 380 -> 384, framed
        #           1+2+384 = 387 -> request 11 + 387 + 7 = 405
        per_commit = Tally(requests=2, writes=2, ios=2, payload_bytes=213 + 377, bytes=241 + 405,
                           append_ios=2)
        three = per_commit + per_commit + per_commit
        assert delta.writes["bs1"] == three and delta.writes["bs3"] == three
        # Headline [P17 rule] 6 I/Os / 3 txns = 2 per transaction; with the standby 4.
        assert per_txn(delta.total(["bs1"]).ios, 3) == 2.0 and per_txn(delta.total().ios, 3) == 4.0
        # Every block server received the 6 writes (6 I/Os); the mirrors' copies carry
        # from_primary = true (2 more bytes per request): 3 x 646 = 1938 and 1938 + 6 x 2.
        for name, mirror in (("bs1", "bs2"), ("bs3", "bs4")):
            s, m = status[name], status[mirror]
            assert (s["write_rpcs"], s["block_writes"], s["write_ios"], s["bytes_received"]) == (6, 6, 6, 1938)
            assert (s["mirror_rpcs"], s["mirror_ios"], s["mirror_bytes"]) == (6, 6, 1950)
            assert (m["write_rpcs"], m["write_ios"], m["bytes_received"], m["mirror_rpcs"]) == (6, 6, 1950, 0)
            # LMDB: key = "wa-replay" 9 + separator 1 + area 1 + offset 8 = 19 bytes; per
            # commit (19 + 213) + (19 + 377) = 628; 3 commits = 1884, in 6 synced commits.
            for server in (s, m):
                assert (server["lmdb_bytes_written"], server["write_txns"]) == (1884, 6)
        # Whole path: 4 servers x 6 I/Os = 24 I/Os, 8 per transaction.
        assert sum(s["write_ios"] for s in status.values()) == 24
        # The flush: double-write of pages 0 and 1 (16384 B -> 4 I/Os), home writes 2 x 8192
        # (2 + 2 I/Os), metadata 512 B (1 I/O): 3 requests, 4 writes, 9 I/Os per server.
        #   double-write: area 2, offset 0 omitted, data 1+3+16384 -> 16390, framed 1+3+16390
        #                 = 16394 -> 11 + 16394 + 7 = 16412
        #   home: page 0 (offset omitted) 2 + 1+2+8192 = 8197 -> framed 8200; page 1 8199 ->
        #         8202 -> 11 + 8200 + 8202 + 7 = 16420
        #   meta: 2 + 1+2+512 = 517 -> framed 520 -> 11 + 520 + 7 = 538
        flush_tally = Tally(requests=3, writes=4, ios=9, payload_bytes=16384 + 16384 + 512,
                            bytes=16412 + 16420 + 538, append_ios=9)
        assert flush.writes["bs1"] == flush_tally and flush.writes["bs3"] == flush_tally
        assert all(s["write_ios"] == 9 for s in flush_status.values())
        # The page read back from bs1 is the flushed root leaf: one 8 KiB read = 2 I/Os (R6).
        assert page is not None and len(page) == 8192
        assert ledger.reads["bs1"].ios == 2
    run(scenario())


# --- The CLI verb, end to end ---------------------------------------------------------------


def test_cli_write_amplification_smoke(tmp_path):
    """Scenario: `aurora-lite bench write-amplification` with tiny settings runs both
    configurations, healthy and slow, and its JSON obeys the counting identities."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "write-amplification", "--rows", "200",
         "--clients", "4", "--duration", "1", "--json", "--no-chart", "--no-progress",
         "--slow-ms", "5"],
        capture_output=True, text=True, timeout=240, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    runs = {(r["config"], r["variant"]): r for r in results["runs"]}
    assert set(runs) == {(c, v) for c in ("aurora-lite", "baseline") for v in ("healthy", "slow")}
    for (config, variant), r in runs.items():
        assert r["transactions"] > 0 and r["tps"] > 0 and r["errors"] == 0, (config, variant, r["error_samples"])
        assert r["commit_ms"]["p99"] >= r["commit_ms"]["p50"] > 0
        # Each phase writes ~3 rows per transaction (8 redo records: 3 row updates, 2 index
        # deletes, 2 index inserts, a COMMIT): no phase replays another's values as no-ops.
        if config == "aurora-lite":
            assert r["extra"]["records"] / r["transactions"] > 6.5, (variant, r["extra"])
        else:
            assert r["extra"]["row_events"] / r["transactions"] > 2.5, (variant, r["extra"])
        if config == "aurora-lite":
            # Every batch goes to all six nodes: each node received exactly 1/6 of the I/Os,
            # and the instance's sends are the whole path.
            per_node = {round(n["ios_per_txn"], 9) for n in r["nodes"].values()}
            assert len(r["nodes"]) == 6 and len(per_node) == 1
            assert r["compute_ios_per_txn"] == pytest.approx(6 * per_node.pop())
            assert r["chain_ios_per_txn"] == pytest.approx(r["compute_ios_per_txn"])
            # R2 counts each PG batch, R2-old the Append: never fewer I/Os by R2.
            assert r["compute_ios_per_txn"] >= r["compute_append_ios_per_txn"] > 0
        else:
            # The standby gets what bs1 gets, and each mirror what its primary gets, but
            # for the one chained write that may be in flight at each edge of the phase
            # (with the scaled redo log, page flushes run throughout the phase: a flush
            # batch can be on bs1 and not yet on bs3 when the phase ends).
            sent = r["writes"]
            assert abs(sent["bs1"]["requests"] - sent["bs3"]["requests"]) <= 1, sent
            received = {name: n["counters"]["write_rpcs"] for name, n in r["nodes"].items()}
            assert all(abs(received[a] - received[b]) <= 1
                       for a, b in (("bs1", "bs2"), ("bs3", "bs4"), ("bs1", "bs3"))), received
            assert r["compute_append_ios_per_txn"] == r["compute_ios_per_txn"]
            assert len(r["nodes"]) == 4
    assert set(results["comparison"]) == {"healthy", "slow"}
    # One configuration at a time, in the order given: both of aurora-lite's phases end
    # before the baseline's start (its processes are stopped in between).
    assert results["order"] == ["aurora-lite", "baseline"]
    assert [(r["config"], r["variant"]) for r in results["runs"]] == [
        ("aurora-lite", "healthy"), ("aurora-lite", "slow"), ("baseline", "healthy"), ("baseline", "slow")]
    assert runs[("aurora-lite", "slow")]["started_at"] < runs[("baseline", "healthy")]["started_at"]
    # The baseline's redo log is MySQL's 96 MiB scaled to the 1 s phase: 96 MiB / 1800 is
    # 55,924 bytes, below the 128 KiB floor.
    assert results["config"]["redo_log_bytes_used"] == 128 << 10
    assert runs[("baseline", "healthy")]["extra"]["redo_log_bytes"] == 128 << 10


def test_redo_log_scales_with_the_phase_as_p17():
    """Scenario: [P17] ran 30 minutes (780,000 MySQL transactions) through 96 MiB of redo;
    a phase gets 96 MiB x its share of that run, in 4 KiB steps, between 128 KiB and 96 MiB."""
    from engine.baseline.wa_bench import BenchConfig, scaled_redo_log_bytes
    # 20 s: 96 MiB x 20 / 1800 = 1,118,481 bytes -> 273 x 4096 = 1,118,208.
    assert scaled_redo_log_bytes(20.0, None) == 1_118_208
    # 78,000 transactions, a tenth of [P17]'s: 9.6 MiB -> 10,066,329 -> 2457 x 4096.
    assert scaled_redo_log_bytes(None, 78_000) == 2457 * 4096
    assert scaled_redo_log_bytes(1.0, None) == 128 << 10
    assert scaled_redo_log_bytes(36_000.0, None) == 96 << 20
    assert BenchConfig(duration_s=20.0).redo_log_bytes_used == 1_118_208
    assert BenchConfig(redo_log_bytes=1 << 20).redo_log_bytes_used == 1 << 20
