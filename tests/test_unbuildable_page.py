"""A record that passes its checksum but cannot apply must not poison a node (issue 15, s4).

Scenario on six real storage-node processes: a writer (here: the test) appends, to every
node, records whose checksums are valid but whose content cannot apply to their page: an
INSERT_CELL at slot 5 of an empty leaf (slot out of range) and a SET_AUX on a leaf (a
META-only record: page type mismatch). Every node accepts them (the content of a record
can only be judged against its page, see docs/storage-node.md "Records that cannot
apply"). A read of either page then gets a typed refusal, DATA_LOSS with aurora-error
UNBUILDABLE naming the page, on every node, and every other page of the same PG is
served as usual. Before, such a read ended in gRPC UNKNOWN.
"""

from __future__ import annotations

import grpc
import pytest

from aurora_pb import storage_pb2 as pb
from engine.format import page as pagefmt
from engine.format import redo
from engine.format.redo import RecordType as RT
from storage_node.errors import UNBUILDABLE, aurora_error_of
from tests.storage_client import StorageClient

VOLUME = "unbuildable"
GOOD, BAD_SLOT, BAD_TYPE = 2, 1, 3   # pages of PG 0 (pg_count 4, stripe 4)


def _records() -> bytes:
    plan = [
        (BAD_SLOT, RT.INIT_PAGE, redo.p_init_page(pagefmt.PageType.LEAF)),
        (GOOD, RT.INIT_PAGE, redo.p_init_page(pagefmt.PageType.LEAF)),
        (BAD_TYPE, RT.INIT_PAGE, redo.p_init_page(pagefmt.PageType.LEAF)),
        (BAD_SLOT, RT.INSERT_CELL, redo.p_insert_cell(5, b"k", b"v")),   # slot 5 > 0 cells
        (BAD_TYPE, RT.SET_AUX, redo.p_set_aux(0, 7)),                     # META only
        (GOOD, RT.INSERT_CELL, redo.p_insert_cell(0, b"k", b"v")),
    ]
    last_page: dict[int, int] = {}
    out = []
    for lsn, (page_id, rtype, payload) in enumerate(plan, start=1):
        flags = redo.FLAG_CPL if lsn == len(plan) else 0
        out.append(redo.encode_record(lsn, lsn - 1, lsn - 1, last_page.get(page_id, 0), page_id,
                                      rtype, flags, payload))
        last_page[page_id] = lsn
    return b"".join(out)


def test_a_record_that_cannot_apply_gives_a_typed_error_and_spares_other_pages(storage_cluster):
    client = StorageClient(storage_cluster.addresses(), timeout_s=10)
    try:
        nodes = list(storage_cluster.addresses())
        for n in nodes:
            client.stub(n).CreateVolume(pb.CreateVolumeRequest(
                volume=VOLUME, pg_count=4, stripe_pages=4, volume_epoch=1), timeout=10)
            reply = client.stub(n).Append(pb.AppendRequest(
                volume=VOLUME, volume_epoch=1, batches=[pb.PgBatch(pg=0, records=_records())]),
                timeout=10)
            assert {a.pg: a.scl for a in reply.acks} == {0: 6}, (n, reply)
        for n in nodes:
            for page_id in (BAD_SLOT, BAD_TYPE):
                with pytest.raises(grpc.RpcError) as info:
                    client.stub(n).ReadPage(pb.ReadPageRequest(
                        volume=VOLUME, pg=0, page_id=page_id, read_point=6, volume_epoch=1),
                        timeout=10)
                exc = info.value
                assert (exc.code(), aurora_error_of(exc)) == (grpc.StatusCode.DATA_LOSS, UNBUILDABLE), (
                    n, page_id, exc.code(), exc.details())
                assert f"page {page_id}" in exc.details(), exc.details()
            good = client.stub(n).ReadPage(pb.ReadPageRequest(
                volume=VOLUME, pg=0, page_id=GOOD, read_point=6, volume_epoch=1), timeout=10)
            assert good.page_lsn == 6 and pagefmt.verify_checksum(good.page), n
        # The good page as of before the bad records, too.
        early = client.stub(nodes[0]).ReadPage(pb.ReadPageRequest(
            volume=VOLUME, pg=0, page_id=BAD_SLOT, read_point=3, volume_epoch=1, min_scl=3),
            timeout=10)
        assert early.page_lsn == 1
    finally:
        client.close()
