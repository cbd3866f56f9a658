"""Bounds on sizes and counts from the network (issue 15, section 4), on a real node.

A request beyond a bound of engine/format/volume.py is refused at the door
(storage_node/validate.py) with INVALID_ARGUMENT / MALFORMED and a message that names the
bound; the node then serves the next request as usual. Before the bounds, a pg_count near
2**32 made the node build billions of segment rows in its writer transaction.
"""

from __future__ import annotations

import grpc
import pytest

from aurora_pb import storage_pb2 as pb
from engine.format import volume as vol
from storage_node.errors import MALFORMED, aurora_error_of
from tests.storage_client import StorageClient

#: A refusal is immediate; a node that starts on the work instead runs into this deadline.
RPC_TIMEOUT_S = 10.0
U32_MAX = (1 << 32) - 1


def _create(name: str, pg_count: int = 2, stripe_pages: int = 4, tails=()) -> tuple:
    req = pb.CreateVolumeRequest(volume=name, pg_count=pg_count, stripe_pages=stripe_pages,
                                 volume_epoch=1, fork_tails=list(tails))
    return "CreateVolume", req


CASES = {
    "pg_count_u32": (_create("lim-pgs", pg_count=U32_MAX), "PG_COUNT_MAX"),
    "pg_count_above_max": (_create("lim-pgs2", pg_count=vol.PG_COUNT_MAX + 1), "PG_COUNT_MAX"),
    "stripe_pages_u32": (_create("lim-stripe", stripe_pages=U32_MAX), "STRIPE_PAGES_MAX"),
    "volume_name": (_create("v" * 600), "VOLUME_NAME_MAX_BYTES"),
    "fork_tails": (_create("lim-tails", tails=[0] * (vol.PG_COUNT_MAX + 1)), "PG_COUNT_MAX"),
    "append_batches": (("Append", pb.AppendRequest(
        volume="lim-ok", volume_epoch=1,
        batches=[pb.PgBatch(pg=0, records=b"")] * (vol.APPEND_BATCHES_MAX + 1))),
        "APPEND_BATCHES_MAX"),
    "truncation_set": (("Truncate", pb.TruncateRequest(
        volume="lim-ok", pg=0, volume_epoch=2, replace=True,
        set=[pb.TruncationRange(start_lsn=2 * i + 1, end_lsn=2 * i + 2, epoch=2)
             for i in range(vol.TRUNCATION_SET_MAX + 1)])),
        "TRUNCATION_SET_MAX"),
    "read_page_pg": (("ReadPage", pb.ReadPageRequest(volume="lim-ok", pg=U32_MAX, page_id=1,
                                                     read_point=1, volume_epoch=1)),
                     "PG_COUNT_MAX"),
}


@pytest.fixture(scope="module")
def node(storage_cluster_module):
    client = StorageClient({"sn1": storage_cluster_module.address("sn1")}, timeout_s=RPC_TIMEOUT_S)
    method, req = _create("lim-ok")
    getattr(client.stub("sn1"), method)(req, timeout=RPC_TIMEOUT_S)
    yield client
    client.close()


@pytest.mark.parametrize("case", list(CASES))
def test_out_of_bounds_request_is_refused_and_names_its_bound(node, case):
    (method, request), bound = CASES[case]
    with pytest.raises(grpc.RpcError) as info:
        getattr(node.stub("sn1"), method)(request, timeout=RPC_TIMEOUT_S)
    exc = info.value
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
    assert aurora_error_of(exc) == MALFORMED, exc.details()
    assert bound in exc.details(), exc.details()
    # The node serves the next request as usual.
    method, req = _create(f"lim-after-{case}")
    assert node.stub("sn1").CreateVolume(req, timeout=RPC_TIMEOUT_S).created


def test_bounds_leave_room_for_what_aurora_lite_uses():
    assert vol.DEFAULT_PG_COUNT <= vol.PG_COUNT_MAX
    assert vol.DEFAULT_STRIPE_PAGES <= vol.STRIPE_PAGES_MAX
    assert vol.APPEND_BATCHES_MAX >= vol.PG_COUNT_MAX
