"""A small client that speaks the storage protocol directly, for tests and benchmarks.

Two parts:

* ``ChainBuilder`` makes valid redo record chains for one volume (engine.format.redo records with
  correct prev_volume / prev_pg / prev_page backlinks: INIT_PAGE first, then INSERT_CELL and
  UPDATE_CELL) and keeps every record, so it is also the *oracle*: ``oracle_page`` applies
  the log with the pure-Python reference materialiser (engine.format.materialise_py).
* ``StorageClient`` sends requests to storage nodes over gRPC (sync API): create a volume,
  Append the same PG batches to many nodes in parallel, read pages, ask for state.

Typical use::

    chain = ChainBuilder("vol1", seed=seed)
    client = StorageClient(cluster.addresses())
    client.create_volume(chain)
    recs = chain.next_records(200)
    client.append(chain, recs)                 # to every node, returns {node: reply|error}
    page = client.read_page("sn1", chain, page_id, read_point=chain.lsn)
    assert page == chain.oracle_page(page_id, chain.lsn)
"""

from __future__ import annotations

import random
from concurrent import futures
from dataclasses import dataclass

import grpc

from aurora_pb import storage_pb2 as pb
from aurora_pb import storage_pb2_grpc as pb_grpc
from engine.format import materialise_py
from engine.format import page as pagefmt
from engine.format import redo
from engine.format.redo import RecordType as RT
from engine.format.volume import VolumeLayout
from engine.transport import grpc_transport

#: Small stripes so that many PGs occur with few pages.
TEST_LAYOUT = VolumeLayout(pg_count=4, stripe_pages=4)
MAX_CELLS = 24  # keeps every page far from full (24 cells x <= 80 bytes)


@dataclass(frozen=True)
class Rec:
    """One record the builder made: where it goes and its packed bytes."""

    lsn: int
    pg: int
    page_id: int
    prev_pg_lsn: int
    data: bytes


class ChainBuilder:
    """Valid record chains for one volume, and the oracle of what storage must return."""

    def __init__(self, volume: str, layout: VolumeLayout = TEST_LAYOUT, seed: int = 0,
                 pages: list[int] | None = None, epoch: int = 1, lsn_gap_max: int = 3) -> None:
        self.volume = volume
        self.layout = layout
        self.epoch = epoch
        self.rng = random.Random(seed)
        self.pages = pages if pages is not None else list(range(1, layout.pg_count * layout.stripe_pages * 2))
        self.lsn_gap_max = lsn_gap_max
        self.lsn = 0                   # last LSN allocated
        self.records: list[Rec] = []   # every record ever made, in LSN order
        self.truncations: list[tuple[int, int]] = []
        self._last_pg: dict[int, int] = {}
        self._last_page: dict[int, int] = {}
        self._cells: dict[int, int] = {}

    # -- making records ------------------------------------------------------------------

    def next_records(self, n: int, pages: list[int] | None = None, value_max: int = 48) -> list[Rec]:
        """Make ``n`` records in LSN order on random pages (of ``pages`` if given)."""
        out = []
        choices = pages if pages is not None else self.pages
        for i in range(n):
            page_id = self.rng.choice(choices)
            pg = self.layout.pg_of(page_id)
            lsn = self.lsn + self.rng.randint(1, self.lsn_gap_max)
            cells = self._cells.get(page_id)
            if cells is None:
                rtype, payload = RT.INIT_PAGE, redo.p_init_page(pagefmt.PageType.LEAF)
                self._cells[page_id] = 0
            elif cells < MAX_CELLS:
                key = b"k%06d" % cells
                value = self.rng.randbytes(self.rng.randint(1, value_max))
                rtype, payload = RT.INSERT_CELL, redo.p_insert_cell(cells, key, value)
                self._cells[page_id] = cells + 1
            else:
                slot = self.rng.randrange(cells)
                value = self.rng.randbytes(self.rng.randint(1, value_max))
                rtype, payload = RT.UPDATE_CELL, redo.p_update_cell(slot, b"k%06d" % slot, value)
            flags = redo.FLAG_CPL if (i == n - 1 or self.rng.random() < 0.2) else 0
            data = redo.encode_record(lsn, self.lsn, self._last_pg.get(pg, 0),
                                      self._last_page.get(page_id, 0), page_id, rtype, flags, payload)
            rec = Rec(lsn, pg, page_id, self._last_pg.get(pg, 0), data)
            self._last_pg[pg] = lsn
            self._last_page[page_id] = lsn
            self.lsn = lsn
            self.records.append(rec)
            out.append(rec)
        return out

    def truncate(self, start: int, end: int) -> None:
        """Annul (start, end] like recovery does: later records chain to what is left."""
        self.truncations.append((start, end))
        self.lsn = max(self.lsn, end)
        self._rebuild_heads()

    def forget(self, n: int) -> None:
        """Drop the last ``n`` records (storage refused them), as if never made."""
        del self.records[len(self.records) - n:]
        self.lsn = max([self.records[-1].lsn if self.records else 0]
                       + [e for _s, e in self.truncations])
        self._rebuild_heads()

    def _rebuild_heads(self) -> None:
        self._last_pg.clear()
        self._last_page.clear()
        self._cells.clear()
        for rec in self.visible_records():
            self._last_pg[rec.pg] = rec.lsn
            self._last_page[rec.page_id] = rec.lsn
            rtype = rec.data[36]
            if rtype == RT.INIT_PAGE:
                self._cells[rec.page_id] = 0
            elif rtype == RT.INSERT_CELL:
                self._cells[rec.page_id] += 1

    # -- views ---------------------------------------------------------------------------

    def hidden(self, lsn: int) -> bool:
        return any(s < lsn <= e for s, e in self.truncations)

    def visible_records(self, pg: int | None = None) -> list[Rec]:
        return [r for r in self.records if not self.hidden(r.lsn) and (pg is None or r.pg == pg)]

    def pg_scl(self, pg: int) -> int:
        """The SCL a complete segment of ``pg`` must report: its last visible record."""
        recs = self.visible_records(pg)
        return recs[-1].lsn if recs else 0

    def pg_read_point(self, pg: int, read_point: int) -> int:
        """The read point to send to a segment of ``pg`` for a volume read point: the PG's
        last visible LSN <= read_point. Storage refuses read points above a segment's SCL,
        and a segment's SCL is an LSN of its own PG, so readers lower the volume read point
        to the PG's last LSN at or below it (the page as of both is the same)."""
        best = 0
        for r in self.records:
            if r.lsn > read_point:
                break
            if r.pg == pg and not self.hidden(r.lsn):
                best = r.lsn
        return best

    def touched_pages(self, pg: int | None = None) -> list[int]:
        return sorted({r.page_id for r in self.visible_records(pg)})

    @staticmethod
    def pack(recs: list[Rec]) -> dict[int, bytes]:
        """{pg: packed batch} of ``recs`` (kept in the given order)."""
        out: dict[int, list[bytes]] = {}
        for r in recs:
            out.setdefault(r.pg, []).append(r.data)
        return {pg: b"".join(parts) for pg, parts in out.items()}

    def oracle_page(self, page_id: int, read_point: int) -> bytes | None:
        """The page as of read_point, by the reference materialiser over the visible log."""
        buf = b"".join(r.data for r in self.visible_records()
                       if r.page_id == page_id and r.lsn <= read_point)
        image = materialise_py.apply(None, page_id, buf, upto_lsn=read_point)
        return None if image is None else bytes(image)


def append_request(chain: ChainBuilder, recs: list[Rec], epoch: int | None = None,
                   writer_vdl: int = 0, batches: dict[int, bytes] | None = None) -> pb.AppendRequest:
    """An AppendRequest carrying ``recs`` (or explicit ``batches``), one PgBatch per PG."""
    batches = ChainBuilder.pack(recs) if batches is None else batches
    return pb.AppendRequest(
        volume=chain.volume, volume_epoch=chain.epoch if epoch is None else epoch,
        writer_vdl=writer_vdl, sender="test-client",
        batches=[pb.PgBatch(pg=pg, records=buf) for pg, buf in sorted(batches.items())])


# The raw gRPC client of these tests uses the transport's own limits, and reconnects to a
# killed and restarted node within a fraction of a second.
CHANNEL_OPTIONS = [opt for opt in grpc_transport.CHANNEL_OPTIONS
                   if opt[0] != "grpc.max_reconnect_backoff_ms"] + [("grpc.max_reconnect_backoff_ms", 500)]


class StorageClient:
    """Sync gRPC client for a set of storage nodes {name: "host:port"}.

    Calls to one node (read_page, state, scls, status) wait for the connection to be ready
    (up to the timeout), so they work right after a node restarts; fan-out calls (append,
    create_volume) fail fast on a node that is down."""

    def __init__(self, addresses: dict[str, str], timeout_s: float = 10.0) -> None:
        self.addresses = dict(addresses)
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.Channel] = {}

    def stub(self, node: str) -> pb_grpc.StorageStub:
        ch = self._channels.get(node)
        if ch is None:
            ch = grpc.insecure_channel(self.addresses[node], options=CHANNEL_OPTIONS)
            self._channels[node] = ch
        return pb_grpc.StorageStub(ch)

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def _fanout(self, method: str, request, nodes) -> dict:
        """Call ``method`` on every node in parallel: {node: reply or grpc.RpcError}."""
        nodes = list(self.addresses) if nodes is None else list(nodes)
        calls = {n: getattr(self.stub(n), method).future(request, timeout=self.timeout_s) for n in nodes}
        out = {}
        for n, call in calls.items():
            try:
                out[n] = call.result()
            except grpc.RpcError as exc:
                out[n] = exc
        return out

    def create_volume(self, chain: ChainBuilder, nodes=None) -> dict:
        req = pb.CreateVolumeRequest(volume=chain.volume, pg_count=chain.layout.pg_count,
                                     stripe_pages=chain.layout.stripe_pages, volume_epoch=chain.epoch)
        return self._fanout("CreateVolume", req, nodes)

    def append(self, chain: ChainBuilder, recs: list[Rec], nodes=None, **kw) -> dict:
        """Append ``recs`` to ``nodes`` (default all): {node: AppendReply or RpcError}."""
        return self._fanout("Append", append_request(chain, recs, **kw), nodes)

    def append_ok(self, chain: ChainBuilder, recs: list[Rec], nodes=None, **kw) -> dict:
        """Like append, but raise if any node refused: {node: {pg: scl}}."""
        out = {}
        for n, reply in self.append(chain, recs, nodes, **kw).items():
            if isinstance(reply, grpc.RpcError):
                raise AssertionError(f"Append to {n} failed: {reply.code()} {reply.details()}")
            out[n] = {a.pg: a.scl for a in reply.acks}
        return out

    def read_page(self, node: str, chain: ChainBuilder, page_id: int, read_point: int,
                  epoch: int | None = None, min_scl: int | None = None) -> pb.ReadPageReply:
        """ReadPage as of a volume read point. ``min_scl`` defaults to the PG's last LSN at
        or below the read point (what a writer knows), so a PG with no recent record can
        serve it; pass 0 to require SCL >= read_point."""
        pg = chain.layout.pg_of(page_id)
        if min_scl is None:
            min_scl = chain.pg_read_point(pg, read_point)
        return self.stub(node).ReadPage(pb.ReadPageRequest(
            volume=chain.volume, pg=pg, page_id=page_id, read_point=read_point,
            volume_epoch=chain.epoch if epoch is None else epoch, min_scl=min_scl),
            timeout=self.timeout_s, wait_for_ready=True)

    def check_pages(self, node: str, chain: ChainBuilder, read_point: int | None = None) -> int:
        """Read every page the chain touched from ``node`` as of ``read_point`` (default: the
        chain's last LSN) and assert each equals the oracle; returns the pages compared."""
        read_point = chain.lsn if read_point is None else read_point
        n = 0
        for page_id in chain.touched_pages():
            want = chain.oracle_page(page_id, read_point)
            try:
                got = self.read_page(node, chain, page_id, read_point).page
            except grpc.RpcError as exc:
                if want is None and exc.code() == grpc.StatusCode.NOT_FOUND:
                    continue
                raise AssertionError(f"{node}: page {page_id} as of {read_point}: "
                                     f"{exc.code().name} {exc.details()}") from None
            assert got == want, f"{node}: page {page_id} as of {read_point} differs from the oracle"
            n += 1
        return n

    def state(self, node: str, chain: ChainBuilder, pg: int, **kw) -> pb.SegmentStateReply:
        return self.stub(node).SegmentState(
            pb.SegmentStateRequest(volume=chain.volume, pg=pg, **kw), timeout=self.timeout_s,
            wait_for_ready=True)

    def scls(self, node: str, chain: ChainBuilder) -> dict[int, int]:
        """{pg: scl} of a node's segments of the chain's volume (from NodeStatus)."""
        status = self.status(node)
        return {s.pg: s.scl for s in status.segments if s.volume == chain.volume}

    def status(self, node: str) -> pb.NodeStatusReply:
        return self.stub(node).NodeStatus(pb.NodeStatusRequest(), timeout=self.timeout_s,
                                          wait_for_ready=True)
