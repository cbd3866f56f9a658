"""Recovery when many records lie above the last writer_vdl storage heard (invariant 10).

Recovery (engine/writer/recovery.py) learns ``since`` = the highest writer_vdl any segment was told,
then walks the metadata of every chain record above it to find VDL, and re-appends
(since, VDL] to a write quorum. How far VDL can run ahead of the writer_vdl storage holds
is bounded only by LAL (100,000 by default): after an AZ+1 outage the writer has up to LAL
records waiting; when a node returns, VDL jumps over all of them and their commits are
acknowledged, and if the writer then sends nothing more (the clients were done) and is
restarted or crashes, storage still holds the pre-outage writer_vdl.

Storage answers SegmentState with at most 65,536 record metadata per call
(storage_node/service.py) and FetchRecords with at most 4 MiB by default, so recovery must
page through both. These tests put such a backlog straight into six real storage nodes.
"""

from __future__ import annotations

import asyncio

from engine.writer.recovery import recover
from engine.transport.grpc_transport import GrpcTransport
from engine.format.cluster_config import NodeInfo
from engine.writer.storage_driver import StorageDriver
from engine.format.volume import VolumeLayout
from tests.harness import NODE_AZS
from tests.storage_client import ChainBuilder, StorageClient

STATE_RECORDS_PER_REPLY = 65536   # storage_node/service.py SegmentState
BACKLOG_RECORDS = 70_000          # more than one SegmentState reply, and > 4 MiB of records
LAL = 100_000


def test_recovery_finds_vdl_beyond_one_segment_state_reply(storage_cluster):
    """Scenario: 70,000 durable records of ONE PG (about 5 MiB) above writer_vdl 0, on all
    six nodes, the last one a CPL: recovery must find VDL = that last CPL (not the last CPL
    of the first 65,536 listed, which would annul acknowledged commits), repair all of
    (0, VDL] although it exceeds one FetchRecords answer, and open above it."""
    layout = VolumeLayout(pg_count=1, stripe_pages=64)
    chain = ChainBuilder("backlog", layout=layout, seed=7, pages=list(range(1, 64)),
                         lsn_gap_max=1)
    client = StorageClient(storage_cluster.addresses(), timeout_s=60.0)
    try:
        client.create_volume(chain)
        while len(chain.records) < BACKLOG_RECORDS:
            client.append_ok(chain, chain.next_records(5000, value_max=64), writer_vdl=0)
        last_cpl = chain.records[-1].lsn        # next_records ends every call with a CPL
        assert last_cpl > STATE_RECORDS_PER_REPLY
        assert sum(len(r.data) for r in chain.records) > 4 << 20
        assert all(scls == {0: last_cpl} for scls in
                   (client.scls(n, chain) for n in storage_cluster.nodes))
    finally:
        client.close()

    async def run():
        nodes = [NodeInfo(n, NODE_AZS[n], storage_cluster.address(n)) for n in storage_cluster.nodes]
        driver = StorageDriver(chain.volume, nodes, layout, epoch=0, lal=LAL,
                               transport=GrpcTransport("writer"))
        await driver.start()
        try:
            return await recover(driver, create_if_missing=False, rpc_timeout_s=30.0)
        finally:
            await driver.close()

    result = asyncio.run(asyncio.wait_for(run(), 120))
    assert result.since == 0
    assert result.vdl == result.vcl == last_cpl, (
        f"recovered VDL {result.vdl}, but every record up to {last_cpl} is durable")
    assert result.truncate_end == last_cpl + LAL
    assert result.repaired_records == len(chain.records)
