"""Backtrack and clone episodes of the simulation (issue 17), judged by engine/sim/timelines.py.

Each runs the production path the CLI's verbs take, over the simulated network, while
the workload goes on and, with p SECONDARY_P, under a second fault drawn from
``SECONDARY_KINDS`` (healed with the episode):

    backtrack   the control plane calls InstanceAdmin.Backtrack on the writer (as
                `aurora-lite backtrack --to-lsn L` does): engine/instance/server.py's
                Instance.backtrack -> TimeTravel.resolve_backtrack -> write_backtrack ->
                reopen through recovery. L is the commit LSN of an acknowledged op: one
                shown on the current timeline (back), or, with p FORWARD_P when there is
                one, one shown only on an older timeline (forward again).
    clone       InstanceAdmin.CreateClone on the writer at an acknowledged commit's LSN or
                "now" (`clone create NAME [--at-lsn L]`), then a plain writer for the clone
                volume (`clone start NAME`, engine/sim/cluster.py start_clone_writer); the
                client reads the clone (registers and bank), then writes to it (puts of
                ``x-<clone>-<n>`` keys and a transfer); after heal it reads it again.

When a Backtrack call fails, whether it happened is found out the way the error message
tells an operator to (``check with `backtrack info` or a read``): once the writer is open
again, does its truncation set hold a range starting at L under a newer epoch. Everything
random comes from the nemesis's generator; every step is a trace note.
"""

from __future__ import annotations

import asyncio
import logging

from aurora_pb import database_pb2 as dpb
from engine.chaos.checkers import TABLE, Put, Transfer
from engine.errors import RpcError
from engine.sim.timelines import Backtrack, Clone, Timelines
from engine.sim.workload import _outcome, run_transfer
from engine.transport import service_of

log = logging.getLogger(__name__)

TIMELINE_KINDS = ("backtrack", "clone")
#: How often a schedule with timeline kinds draws one of them instead of a fault.
TIMELINE_P = 0.3
FORWARD_P = 0.4
SECONDARY_P = 0.5
SECONDARY_KINDS = ("delay", "drop", "node-crash", "slow-disk", "node-partition")
CLONES_MAX = 2
CLONE_PUTS = 3
RECENT_TARGETS = 20
ADMIN_TIMEOUT_S = 60.0
REOPEN_WAIT_S = 15.0
CLONE_READ_S = 20.0
ADMIN = service_of(dpb, "InstanceAdmin")


class TimelineEpisodes:
    def __init__(self, cluster, nemesis, workload, client_proc) -> None:
        self.cluster = cluster
        self.nemesis = nemesis
        self.workload = workload
        self.client_proc = client_proc
        self.rng = nemesis.rng
        self.tls = Timelines(workload.w)
        self.tasks: list = []
        self.clone_names = 0

    @property
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def _admin(self):
        return self.nemesis.ctl.channel(self.cluster.writer.address,
                                        timeout_s=ADMIN_TIMEOUT_S).stub(ADMIN)

    async def run(self, kind: str) -> str:
        if self.rng.random() < SECONDARY_P:
            await self.nemesis.inject(self.rng.choice(SECONDARY_KINDS))
        return await (self.backtrack() if kind == "backtrack" else self.clone())

    # -- backtrack ----------------------------------------------------------------------

    async def backtrack(self) -> str:
        w = self.cluster.writer
        if not (w.up and w.inst is not None and w.inst.role == "writer"):
            return "skipped: no open writer"
        forward = self.rng.random() < FORWARD_P
        targets = self.tls.targets(self.now, forward=True) if forward else []
        if not targets:
            forward, targets = False, self.tls.targets(self.now, forward=False)
        if not targets:
            return "skipped: nothing acknowledged yet"
        lsn = self.rng.choice(targets[-RECENT_TARGETS:])
        bt = Backtrack(lsn=lsn, t0=self.now, forward=forward)
        pre_epoch = w.inst.epoch
        self.nemesis.note(f"backtrack to LSN {lsn}{' (forward again)' if forward else ''}")
        try:
            reply = await self._admin().Backtrack(dpb.BacktrackRequest(to_lsn=lsn))
            bt.happened, bt.target, bt.vdl = True, reply.target_lsn, reply.vdl
        except RpcError as exc:
            bt.error = f"{exc.status}: {exc.detail}"[:200]
            bt.happened = await self._found_out(lsn, pre_epoch)
            bt.target = lsn if bt.happened else 0
        bt.t1 = self.now
        self.tls.record_backtrack(bt)
        what = (f"LSN {lsn} -> target {bt.target} VDL {bt.vdl}" if bt.happened
                else f"LSN {lsn} not done ({bt.error})")
        self.nemesis.note(f"backtrack {what}")
        return what

    async def _found_out(self, lsn: int, pre_epoch: int) -> bool:
        """After a failed call: did the backtrack happen? (module doc)"""
        deadline = self.now + REOPEN_WAIT_S
        while self.now < deadline:
            w = self.cluster.writer
            inst = w.inst if w.up else None
            if inst is not None and inst.role == "writer" and inst.driver is not None \
                    and inst.db is not None and not inst.backtracking:
                return any(s == lsn and ep > pre_epoch for s, _e, ep in inst.driver.truncations)
            await asyncio.sleep(0.25)
        self.tls.violations.append(f"backtrack to LSN {lsn}: the writer did not reopen within "
                                   f"{REOPEN_WAIT_S:g} s after the call failed")
        return False

    # -- clone ----------------------------------------------------------------------------

    async def clone(self) -> str:
        if len(self.tls.clones) >= CLONES_MAX:
            return "skipped: enough clones"
        w = self.cluster.writer
        if not (w.up and w.inst is not None and w.inst.role == "writer"):
            return "skipped: no open writer"
        self.clone_names += 1
        name = f"c{self.clone_names}"
        targets = self.tls.targets(self.now, forward=False)
        at_lsn = self.rng.choice(targets[-RECENT_TARGETS:]) if targets and self.rng.random() < 0.5 else 0
        t0 = self.now
        acked_before = max((o.lsn for o in self.workload.w.transfers + self.workload.w.puts
                            if self.tls.acked(o) and o.t1 <= t0 and self.tls.current.shows(o.lsn)),
                           default=0)
        self.nemesis.note(f"clone {name} at LSN {at_lsn or 'now'}")
        try:
            reply = await self._admin().CreateClone(dpb.CreateCloneRequest(name=name, at_lsn=at_lsn))
        except RpcError as exc:
            what = f"{name} refused ({exc.status}: {exc.detail})"[:200]
            self.nemesis.note(f"clone {what}")
            return what
        clone = Clone(name, reply.fork_lsn, t0, self.now, timeline=self.tls.current)
        self.tls.clones.append(clone)
        if at_lsn and reply.fork_lsn != at_lsn:
            self.tls.violations.append(f"clone {name} at LSN {at_lsn} (an acknowledged commit) "
                                       f"forked at LSN {reply.fork_lsn}")
        if not at_lsn and reply.fork_lsn < acked_before:
            self.tls.violations.append(f"clone {name} 'as of now' forked at LSN {reply.fork_lsn}, "
                                       f"below LSN {acked_before} acknowledged before it was asked")
        self.nemesis.note(f"clone {name} forked at LSN {reply.fork_lsn}")
        try:
            await self.cluster.start_clone_writer(name, self.rng.choice(["az-a", "az-b", "az-c"]))
        except Exception as exc:  # noqa: BLE001 - a writer that cannot open is a finding
            clone.error = f"its writer did not open: {exc!r}"[:300]
            return f"{name} writer failed"
        self.tasks.append(self.client_proc.spawn(self._clone_work(clone)))
        return f"{name} fork {reply.fork_lsn}"

    async def _read(self, address: str, deadline_s: float) -> tuple[dict, dict] | None:
        while self.now < deadline_s:
            try:
                regs: dict = {}
                for lo, hi in ((b"r-", b"r."), (b"x-", b"x.")):
                    start = lo
                    while True:
                        _rp, items = await self.workload.scan(address, start, hi)
                        if not items:
                            break
                        regs.update(items)
                        start = items[-1][0] + b"\x00"
                _rp, acc = await self.workload.scan(address, b"acct-", b"acct.")
                return regs, {int(k[5:]): int(v) for k, v in acc}
            except RpcError:
                await asyncio.sleep(0.5)
        return None

    def _address(self, clone: Clone) -> str:
        return next(c.address for c in self.cluster.clones if c.name == clone.name)

    async def _clone_work(self, clone: Clone) -> None:
        """The client: read the fresh clone, then write to it (module doc)."""
        address = self._address(clone)
        got = await self._read(address, self.now + CLONE_READ_S)
        if got is None:
            clone.error = f"cannot read the clone within {CLONE_READ_S:g} s of its creation"
            return
        clone.reads.append(("at creation", got[0], got[1], False))
        self.nemesis.note(f"clone {clone.name} read: {len(got[0])} registers")
        db = self.workload._db(address)
        for n in range(CLONE_PUTS):
            p = Put(b"x-%s-%d" % (clone.name.encode(), n), b"clone-%d" % n, t0=self.now)
            clone.puts.append(p)
            try:
                reply = await db.Put(dpb.PutRequest(table=TABLE, key=p.key, value=p.value))
                p.lsn, p.outcome = reply.commit_lsn, "ok"
            except RpcError as exc:
                p.outcome, p.error = _outcome(exc, True), str(exc)
            p.t1 = self.now
        src, dst = self.rng.sample(range(self.workload.w.accounts), 2)
        tr = Transfer(src, dst, 7, t0=self.now)
        clone.transfers.append(tr)
        await run_transfer(db, tr)
        tr.t1 = self.now
        self.nemesis.note(f"clone {clone.name} writes: "
                          f"{' '.join(p.outcome for p in clone.puts)} transfer {tr.outcome}")

    async def final_reads(self, deadline_s: float) -> list[str]:
        """After heal (the client): each clone again, and the parent for clone keys."""
        for t in self.tasks:
            if not t.done():
                await asyncio.wait([t], timeout=max(0.0, deadline_s - self.now))
        for clone in self.tls.clones:
            if clone.error or not clone.reads:
                continue
            got = await self._read(self._address(clone), deadline_s)
            if got is None:
                clone.error = "cannot read the clone after heal"
                continue
            clone.reads.append(("after heal", got[0], got[1], True))
        out = []
        got = await self._read(self.cluster.writer.address, deadline_s)
        if got is not None:
            leaked = sorted(k for k in got[0] if k.startswith(b"x-"))
            if leaked:
                out.append(f"clone writes leaked into the parent volume: {leaked[:5]}")
        return out
