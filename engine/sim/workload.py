"""The chaos workload and checkers, inside the simulation.

The same bank / register / reads workload as engine/chaos/checkers.py, as async tasks of
a simulated client process that calls the writer's and the replica's Database service
over the simulated network (one Begin + Gets + a Commit carrying the writes per
transfer, as engine/client.py does; a Put per register). Each op is recorded in the
chaos workload's own ``Transfer`` / ``Put`` / ``Read`` records with virtual times, so
the chaos checkers judge it unchanged:

    check_bank_reads      every read (writer or replica) is the history at its read point
    judge_final_state     after heal: no acknowledged write lost, final bank possible
    check_monotonic       VDL / epoch and every segment's SCL never move back
    judge_acks_held       every acknowledged commit was held by >= Vw segments of its PG
                          when acknowledged, from the nodes' own SCL records (SclRecords)

An op's outcome is ``ok``, ``fail`` (certainly not committed: a conflict, a refusal
marked nothing-done, an error before the commit was sent) or ``unknown``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aurora_pb import database_pb2 as dpb
from engine.chaos import checkers
from engine.chaos.checkers import INITIAL, TABLE, Put, Read, Transfer, acct
from engine.errors import METADATA_NOTHING_DONE, ErrorCode, RpcError
from engine.transport import service_of

DATABASE = service_of(dpb, "Database")
OP_TIMEOUT_S = 5.0
PAUSE_OK_S = 0.15
PAUSE_FAIL_S = 0.1
READ_EVERY_S = 0.25
SAMPLE_EVERY_S = 0.5


@dataclass
class TimedRead(Read):
    """A chaos Read that also knows when it was asked (engine/sim/timelines.py judges a
    writer read on the timelines current at some moment of it)."""
    t0: float = 0.0


class SclRecords:
    """The storage nodes' SCL records in memory (what hooks.SclLog writes to a file in
    chaos mode), in engine/chaos/checkers.read_scl_logs's shape."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.logs: dict[str, dict[tuple, tuple[list[float], list[int]]]] = {}

    def factory(self, me: str) -> "_NodeRecord":
        return _NodeRecord(self, me)


class _NodeRecord:
    def __init__(self, records: SclRecords, me: str) -> None:
        self.records = records
        self.segs = records.logs.setdefault(me, {})

    def record(self, segments) -> None:
        now = self.records.loop.time()
        for key, meta in segments:
            times, scls = self.segs.setdefault(key, ([], []))
            if not scls or scls[-1] != meta.scl:
                times.append(now)
                scls.append(meta.scl)

    def close(self) -> None:
        pass


async def run_transfer(db, tr: Transfer) -> None:
    """One bank transfer as a client transaction on ``db`` (a Database stub): Begin, two
    Gets, Commit with both writes. Sets ``tr.lsn`` and ``tr.outcome`` "ok", or the outcome
    of the RpcError (unknown once the Commit was sent) and ``tr.error``."""
    sent_commit = False
    try:
        txn = (await db.Begin(dpb.BeginRequest())).txn_id
        a = int((await db.Get(dpb.GetRequest(table=TABLE, key=acct(tr.src), txn_id=txn))).value)
        b = int((await db.Get(dpb.GetRequest(table=TABLE, key=acct(tr.dst), txn_id=txn))).value)
        sent_commit = True
        reply = await db.Commit(dpb.CommitRequest(txn_id=txn, ops=[
            dpb.WriteOp(table=TABLE, key=acct(tr.src), value=b"%d" % (a - tr.amount)),
            dpb.WriteOp(table=TABLE, key=acct(tr.dst), value=b"%d" % (b + tr.amount))]))
        tr.lsn, tr.outcome = reply.commit_lsn, "ok"
    except RpcError as exc:
        tr.outcome, tr.error = _outcome(exc, sent_commit), str(exc)


def _outcome(exc: RpcError, sent_commit: bool) -> str:
    if not sent_commit or exc.code == ErrorCode.CONFLICT or \
            exc.metadata.get(METADATA_NOTHING_DONE) == "1":
        return "fail"
    return "unknown"


class SimWorkload:
    """The workload's tasks (see the module doc); ``w`` holds its records."""

    def __init__(self, cluster, transport, seed: int, rng, trace, accounts: int = 8,
                 transfer_tasks: int = 2) -> None:
        self.cluster = cluster
        self.transport = transport
        self.rng = rng
        self.trace = trace
        self.w = checkers.Workload(None, None, seed=seed, accounts=accounts)
        self.transfer_tasks = transfer_tasks
        self.stopping = False
        self.sampler = _Sampler()
        self._channels: dict[str, object] = {}

    def _db(self, address: str):
        stub = self._channels.get(address)
        if stub is None:
            stub = self._channels[address] = self.transport.channel(
                address, timeout_s=OP_TIMEOUT_S).stub(DATABASE)
        return stub

    def _writer(self):
        return self._db(self.cluster.writer.address)

    @property
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def setup(self) -> None:
        while True:
            try:
                await self._writer().Commit(dpb.CommitRequest(ops=[
                    dpb.WriteOp(table=TABLE, key=acct(i), value=b"%d" % INITIAL)
                    for i in range(self.w.accounts)]))
                return
            except RpcError:
                await asyncio.sleep(0.5)

    def start(self, proc) -> list:
        tasks = [proc.spawn(self._transfer_loop(i)) for i in range(self.transfer_tasks)]
        tasks.append(proc.spawn(self._register_loop(0)))
        tasks.append(proc.spawn(self._read_loop()))
        tasks.append(proc.spawn(self._sample_loop()))
        return tasks

    async def _transfer_loop(self, i: int) -> None:
        w = self.w
        while not self.stopping:
            src, dst = self.rng.sample(range(w.accounts), 2)
            tr = Transfer(src, dst, self.rng.randint(1, 10), t0=self.now)
            w.transfers.append(tr)
            await run_transfer(self._writer(), tr)
            if tr.outcome == "ok":
                self.trace.note(self.now, f"ack transfer {src}->{dst} lsn {tr.lsn}")
            tr.t1 = self.now
            await asyncio.sleep(PAUSE_OK_S if tr.outcome == "ok" else PAUSE_FAIL_S)

    async def _register_loop(self, i: int) -> None:
        n = 0
        while not self.stopping:
            n += 1
            p = Put(b"r-%d-%06d" % (i, n), b"v-%d-%d-%d" % (self.w.seed, i, n), t0=self.now)
            self.w.puts.append(p)
            try:
                reply = await self._writer().Put(dpb.PutRequest(table=TABLE, key=p.key, value=p.value))
                p.lsn, p.outcome = reply.commit_lsn, "ok"
                self.trace.note(self.now, f"ack put {p.key.decode()} lsn {p.lsn}")
            except RpcError as exc:
                p.outcome, p.error = _outcome(exc, True), str(exc)
            p.t1 = self.now
            await asyncio.sleep(PAUSE_OK_S if p.outcome == "ok" else PAUSE_FAIL_S)

    async def scan(self, address: str, start: bytes, end: bytes) -> tuple[int, list]:
        reply = await self._db(address).Scan(dpb.ScanRequest(table=TABLE, start=start, end=end))
        return reply.read_point, [(kv.key, kv.value) for kv in reply.items]

    async def _read_loop(self) -> None:
        while not self.stopping:
            for inst in self.cluster.instances:
                t0 = self.now
                try:
                    read_point, items = await self.scan(inst.address, b"acct-", b"acct.")
                except RpcError:
                    self.w.read_errors += 1
                    continue
                if read_point == 0 and not items:
                    continue
                where = "writer" if inst.name == self.cluster.writer_name else inst.name
                self.w.reads.append(TimedRead(where, read_point,
                                              {int(k[5:]): int(v) for k, v in items}, self.now, t0))
            await asyncio.sleep(READ_EVERY_S)

    async def _sample_loop(self) -> None:
        """The StateSampler's samples, read from the objects (no RPC)."""
        last_vdl = -1
        while not self.stopping:
            self.sample()
            w = self.cluster.writer
            if w.up and w.inst is not None and w.inst.role == "writer" and w.inst.vdl != last_vdl:
                last_vdl = w.inst.vdl
                self.trace.note(self.now, f"{w.name} epoch {w.inst.epoch} VDL {last_vdl}")
            await asyncio.sleep(SAMPLE_EVERY_S)

    def sample(self) -> None:
        now = self.now
        w = self.cluster.writer
        if w.up and w.inst is not None and w.inst.role == "writer":
            self.sampler.vdl_samples.append((now, w.inst.epoch, w.inst.vdl))
        for n in self.cluster.nodes:
            if n.node is None:
                continue
            for (volume, pg), meta in n.node.store.segments():
                self.sampler.scl_samples.append((now, n.name, 0, volume, pg, meta.volume_epoch,
                                                 meta.scl))

    async def final_state(self, deadline_s: float) -> tuple[dict, int, list] | str:
        """Registers and accounts read from the writer after heal (retried)."""
        last = ""
        while self.now < deadline_s:
            try:
                got: dict = {}
                start = b"r-"
                address = self.cluster.writer.address
                while True:
                    _rp, items = await self.scan(address, start, b"r.")
                    if not items:
                        break
                    got.update(items)
                    start = items[-1][0] + b"\x00"
                read_point, acc = await self.scan(address, b"acct-", b"acct.")
                return got, read_point, acc
            except RpcError as exc:
                last = str(exc)
                await asyncio.sleep(0.5)
        return f"lost-writes: cannot read the final state: {last}"


class _Sampler:
    def __init__(self) -> None:
        self.vdl_samples: list = []
        self.scl_samples: list = []


def judge(workload: SimWorkload, final, scl: SclRecords, volume: str) -> list[str]:
    """Every checker's violations (empty: green)."""
    w = workload.w
    out = checkers.check_bank_reads(w)
    out += [final] if isinstance(final, str) else checkers.judge_final_state(w, *final)
    out += checkers.check_monotonic(workload.sampler)
    out += checkers.judge_acks_held(w, scl.logs, volume)
    return out


def acked(workload: SimWorkload) -> int:
    w = workload.w
    return sum(1 for o in w.transfers if o.outcome == "ok") + \
        sum(1 for o in w.puts if o.outcome == "ok")

