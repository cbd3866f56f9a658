"""Self-healing: the control plane's membership changes of the volume's PGs (docs/membership.md).

``Membership`` (a part of the control plane, engine/cluster/control_plane.py) keeps, per
PG of the cluster's volume, its membership epoch, its six members and the members still
hydrating, in DIR/membership.json (it survives a control-plane restart), and runs the
healing loop (``heal``, every HEAL_TICK_S):

- every storage node is asked its NodeStatus. A node unreachable for longer than
  ``segment_failed_after_s`` (``--segment-failed-after-s``, AURORA_SEGMENT_FAILED_AFTER_S;
  5 s by default) has its segments declared **failed**. A node that answers with another
  ``incarnation`` than before (its data dir was deleted: `aurora-lite node wipe`, a lost
  disk) came back **wiped**: the segments it held are gone;
- a repair starts for a wiped node at once, and for a failed one when it answers again.
  In a fleet of six, where an AZ has no spare node, the repair is in place: every PG moves
  to a TRANSITIONAL membership epoch (old set and new set are the same six names, and the
  writer forgets the node's SCLs from before: invariant 17), the node hydrates from its
  peers (storage_node/hydration.py) and catches up by gossip while writes go on, and each
  PG moves to the next epoch, the new set alone, once the node's SCL reached the target:
  the highest SCL its peers had when the change began (>= the PGCL then);
- a second failure during a change is one more transition: every PG moves to epoch + 1
  with that node hydrating too, and the change ends when both are done;
- each step is pushed to the writer (InstanceAdmin.SetMembership) and to every segment
  (Storage.SetMembership), and pushed again on later ticks until each acknowledged it (a
  node that was down, a new writer after a failover). Requests with an older epoch are
  refused by storage (invariant 16) and the writer re-learns the epoch (storage_driver.py).

``collect`` adds the ``pgs`` of `status` (epoch, members with state healthy | hydrating |
failed and SCL) and the repairs made (time to six healthy segments, hydration MB/s).
Placing a replacement on another node of the AZ needs a fleet of more than six nodes and
the writer routing each PG to its own members: that is the fleet's placement (step 12,
part A), not here.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

from aurora_pb import control_pb2 as pb
from engine.cluster.launcher import read_json, write_json_atomic
from engine.cluster.state import ClusterState, log
from engine.errors import ErrorCode, RpcError

HEAL_TICK_S = 0.5
SEGMENT_FAILED_AFTER_S = 5.0
STATUS_TIMEOUT_S = 1.0
PUSH_TIMEOUT_S = 2.0
REPAIRS_KEPT = 50


def segment_failed_after_s() -> float:
    raw = os.environ.get("AURORA_SEGMENT_FAILED_AFTER_S", "")
    try:
        return float(raw) if raw else SEGMENT_FAILED_AFTER_S
    except ValueError:
        log.warning("AURORA_SEGMENT_FAILED_AFTER_S=%r is not a number; using %.1f s", raw,
                    SEGMENT_FAILED_AFTER_S)
        return SEGMENT_FAILED_AFTER_S


@dataclass
class PgRecord:
    """One PG's membership as the control plane keeps it."""

    epoch: int
    members: list[str]
    hydrating: dict[str, int] = field(default_factory=dict)   # node -> target LSN
    changing: bool = False      # in a transitional epoch (closed by the next epoch)
    told: dict[str, int] = field(default_factory=dict)         # process -> epoch it acked

    @property
    def transitional(self) -> bool:
        return self.changing

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "members": self.members, "hydrating": self.hydrating,
                "changing": self.changing}


@dataclass
class Repair:
    node: str
    reason: str
    started_unix: float
    started: float                      # time.monotonic()
    seconds: float = 0.0
    hydrated_bytes: int = 0
    hydration_mb_s: float = 0.0
    done: bool = False


class Membership(ClusterState):
    """PG membership and the healing loop (see the module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.segment_failed_after_s = segment_failed_after_s()
        self.pgs: dict[int, PgRecord] = {}
        self.incarnations: dict[str, str] = {}
        self.failed_nodes: set[str] = set()
        self.repairs: list[Repair] = []
        self._down_since: dict[str, float] = {}
        self._node_status: dict[str, object] = {}
        self._hydration_base: dict[str, tuple[int, float]] = {}   # node -> (bytes, s) at start
        self._forget: set[str] = set()   # wiped members whose old SCLs the writer must drop
        self._went_down: dict[str, float] = {}   # node -> monotonic time it stopped answering
        self._load_membership()

    # --- Persistence -------------------------------------------------------------------

    @property
    def membership_json(self) -> str:
        return os.path.join(self.dd.root, "membership.json")

    def _load_membership(self) -> None:
        data = read_json(self.membership_json) or {}
        for pg, rec in (data.get("pgs") or {}).items():
            self.pgs[int(pg)] = PgRecord(int(rec["epoch"]), list(rec["members"]),
                                         {k: int(v) for k, v in rec.get("hydrating", {}).items()},
                                         bool(rec.get("changing")))
        self.incarnations = dict(data.get("incarnations") or {})
        self.failed_nodes = set(data.get("failed") or ())

    def _save_membership(self) -> None:
        write_json_atomic(self.membership_json, {
            "volume": self.config.volume,
            "pgs": {str(pg): rec.to_json() for pg, rec in sorted(self.pgs.items())},
            "incarnations": self.incarnations, "failed": sorted(self.failed_nodes)})

    # --- The healing loop --------------------------------------------------------------

    async def heal(self) -> None:
        while not self.stopped.is_set():
            try:
                await self.heal_tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("healing tick failed")
            await asyncio.sleep(HEAL_TICK_S)

    async def _status_of(self, p):
        if p.state not in ("up", "starting"):
            return None
        try:
            return await self.rpc.node_status(p.name, p.address, STATUS_TIMEOUT_S)
        except RpcError:
            return None

    async def heal_tick(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        nodes = self.storage
        replies = await asyncio.gather(*(self._status_of(p) for p in nodes))
        fresh = {}
        for p, reply in zip(nodes, replies):
            if reply is None:
                if p.name not in self.incarnations or self.stopping:
                    continue   # never seen serving yet (booting): nothing of it to fail
                since = self._down_since.setdefault(p.name, now)
                if now - since >= self.segment_failed_after_s and p.name not in self.failed_nodes:
                    self.failed_nodes.add(p.name)
                    self._save_membership()
                    self.event("segment", f"{p.name}: its segments are failed (unreachable for "
                                          f"{now - since:.1f} s)")
                    log.warning("%s unreachable for %.1f s: its segments are failed; they are "
                                "repaired in place when it returns (no spare in a fleet of six)",
                                p.name, now - since)
                continue
            since = self._down_since.pop(p.name, None)
            if since is not None:
                self._went_down[p.name] = since
            fresh[p.name] = reply
            self._node_status[p.name] = reply
        self._learn_pgs(fresh)
        for name, reply in fresh.items():
            known = self.incarnations.get(name)
            if known != reply.incarnation:
                self.incarnations[name] = reply.incarnation
                self._save_membership()
                if known:
                    await self.start_repair(name, "wiped", fresh)
                    continue
            if name in self.failed_nodes:
                await self.start_repair(name, "failed and back", fresh)
        await self._recreate(fresh)
        await self._progress(fresh)
        await self._push()

    def _learn_pgs(self, fresh: dict) -> None:
        """Create the PG records from what storage reports (the first time only)."""
        if self.pgs:
            return
        volume = self.config.volume
        count = 0
        epochs: dict[int, int] = {}
        for reply in fresh.values():
            for v in reply.volumes:
                if v.volume == volume:
                    count = max(count, v.pg_count)
            for s in reply.segments:
                if s.volume == volume:
                    epochs[s.pg] = max(epochs.get(s.pg, 0), s.membership_epoch)
        if not count:
            return
        placed = self.config.memberships()   # the fleet's placement (docs/fleet.md)
        for pg in range(count):
            if pg in placed:
                members = list(placed[pg].members)
                first = placed[pg].epoch
            else:
                members, first = [n.name for n in self.config.storage_nodes][:6], 1
            self.pgs[pg] = PgRecord(max(first, epochs.get(pg, 0)), members)
        self._save_membership()

    def _exists(self, pg: int, exclude: str, fresh: dict) -> bool:
        """True if a node other than ``exclude`` reports a segment of ``pg``."""
        return any(s.volume == self.config.volume and s.pg == pg
                   for name, reply in {**self._node_status, **fresh}.items() if name != exclude
                   for s in reply.segments)

    def _best_scl(self, pg: int, exclude: str, fresh: dict) -> int:
        best = 0
        for name, reply in {**self._node_status, **fresh}.items():
            if name == exclude:
                continue
            for s in reply.segments:
                if s.volume == self.config.volume and s.pg == pg:
                    best = max(best, s.scl)
        return best

    async def start_repair(self, node: str, reason: str, fresh: dict) -> None:
        """Every PG of the volume moves to a transitional epoch with ``node`` hydrating in
        place (a second failure during a change: a further transition)."""
        self.failed_nodes.discard(node)
        if not self.pgs:
            return
        reply = fresh.get(node)
        # A wiped node is a new process: its counters count from its start, hydration
        # included (it may be done before this tick saw it).
        self._hydration_base[node] = ((reply.hydrated_bytes, reply.hydration_s)
                                      if reply is not None and reason != "wiped" else (0, 0.0))
        for pg, rec in sorted(self.pgs.items()):
            if node not in rec.members:
                continue   # a fleet: the node holds no segment of this PG
            if not self._exists(pg, node, fresh):
                continue   # a growing volume: this PG has no segments yet (docs/fleet.md)
            rec.epoch += 1
            rec.changing = True
            rec.hydrating[node] = self._best_scl(pg, node, fresh)
        self.repairs = [r for r in self.repairs if not (r.node == node and not r.done)]
        # Time to repair counts from the node's death when the loop saw it (a wipe kills it).
        went_down = self._went_down.pop(node, None)
        now = time.monotonic()
        started = went_down if went_down is not None else now
        self.repairs.append(Repair(node, reason, time.time() - (now - started), started))
        self.repairs = self.repairs[-REPAIRS_KEPT:]
        self._forget.add(node)
        self._save_membership()
        epochs = sorted({rec.epoch for rec in self.pgs.values()})
        self.event("membership", f"{node} {reason}: every PG moves to a transitional membership "
                                 f"epoch ({epochs[0]}..{epochs[-1]}); {node} hydrates in place")
        log.warning("%s %s: repair starts in place; PGs move to transitional epochs %s",
                    node, reason, epochs)

    async def _recreate(self, fresh: dict) -> None:
        """A hydrating node that lacks the segments of its PGs (wiped: its data dir is new)
        gets them created empty, as the volume's creator did (CreateVolume with the PGs
        placed on it); gossip then adopts the epoch and truncation set and hydrates them."""
        volume = self.config.volume
        info = next((v for name, reply in self._node_status.items() for v in reply.volumes
                     if v.volume == volume and not v.dropped), None)
        if info is None:
            return
        for node, reply in fresh.items():
            have = {s.pg for s in reply.segments if s.volume == volume}
            missing = sorted(pg for pg, rec in self.pgs.items()
                             if node in rec.hydrating and pg not in have)
            if not missing:
                continue
            p = self.procs[node]
            try:
                await self.rpc.create_segments(node, p.address, info, missing, PUSH_TIMEOUT_S)
                log.info("%s: created its empty segments of PGs %s (they hydrate from peers)",
                         node, missing)
            except RpcError as exc:
                log.info("%s: creating its segments of PGs %s: %s", node, missing, exc)

    async def _progress(self, fresh: dict) -> None:
        """Drop members that reached their target; close each PG's change once none is
        left hydrating: the next epoch, the new set alone."""
        finished = []
        for pg, rec in sorted(self.pgs.items()):
            for node, target in list(rec.hydrating.items()):
                reply = fresh.get(node)
                if reply is None or self.incarnations.get(node) != reply.incarnation:
                    continue
                scl = next((s.scl for s in reply.segments
                            if s.volume == self.config.volume and s.pg == pg), None)
                if scl is not None and scl >= target:   # it holds the segment, complete to target
                    del rec.hydrating[node]
                    log.info("PG %d: %s holds everything up to %d (SCL %d)", pg, node, target, scl)
            if rec.changing and not rec.hydrating:
                rec.epoch += 1
                rec.changing = False
                finished.append(pg)
        if finished:
            self._save_membership()
            log.info("PGs %s: membership change complete, the new set alone", finished)
        self._finish_repairs(fresh)

    def _finish_repairs(self, fresh: dict) -> None:
        for r in self.repairs:
            if r.done or any(r.node in rec.hydrating for rec in self.pgs.values()):
                continue
            r.done = True
            r.seconds = round(time.monotonic() - r.started, 2)
            reply = fresh.get(r.node) or self._node_status.get(r.node)
            base_bytes, base_s = self._hydration_base.get(r.node, (0, 0.0))
            if reply is not None:
                r.hydrated_bytes = max(0, reply.hydrated_bytes - base_bytes)
                seconds = max(0.0, reply.hydration_s - base_s)
                r.hydration_mb_s = round(r.hydrated_bytes / 1e6 / seconds, 1) if seconds > 0 else 0.0
            self._forget.discard(r.node)
            self.event("membership", f"{r.node} repaired ({r.reason}): six healthy segments per PG "
                                     f"after {r.seconds:.1f} s")
            log.warning("%s repaired (%s) in %.1f s; hydration %d bytes at %.1f MB/s", r.node,
                        r.reason, r.seconds, r.hydrated_bytes, r.hydration_mb_s)

    # --- Pushing epochs ----------------------------------------------------------------

    async def _push(self) -> None:
        """Tell the writer and every live segment each PG's current epoch, until acked."""
        writer = self.procs.get(self.writer)
        forget = sorted(self._forget)
        calls = []
        for pg, rec in sorted(self.pgs.items()):
            if writer is not None and writer.state == "up" and rec.told.get(writer.name) != rec.epoch:
                new = rec.members if rec.transitional else None
                calls.append(self._tell_writer(writer, pg, rec, new, forget if rec.transitional else ()))
            for p in self.storage:
                if p.state == "up" and p.name in rec.members and rec.told.get(p.name) != rec.epoch \
                        and self._exists(pg, "", {}):
                    calls.append(self._tell_segment(p, pg, rec))
        if calls:
            await asyncio.gather(*calls)

    async def _tell_writer(self, writer, pg: int, rec: PgRecord, new, forget) -> None:
        epoch = rec.epoch
        try:
            await self.rpc.set_writer_membership(writer.name, writer.address, pg, epoch,
                                                 rec.members, new, forget, PUSH_TIMEOUT_S)
            rec.told[writer.name] = epoch
        except RpcError as exc:
            log.info("SetMembership(PG %d, epoch %d) to writer %s: %s", pg, epoch, writer.name, exc)

    async def _tell_segment(self, p, pg: int, rec: PgRecord) -> None:
        epoch = rec.epoch
        try:
            await self.rpc.set_segment_membership(p.name, p.address, self.config.volume, pg,
                                                  epoch, rec.members, PUSH_TIMEOUT_S)
            rec.told[p.name] = epoch
        except RpcError as exc:
            if exc.code == ErrorCode.STALE_MEMBERSHIP:
                rec.told[p.name] = epoch   # it knows a newer one: nothing to tell
            elif exc.code not in (ErrorCode.UNKNOWN_VOLUME, "UNKNOWN_SEGMENT"):
                # (a wiped node before its segments exist; a PG not created yet)
                log.info("SetMembership(PG %d, epoch %d) to %s: %s", pg, epoch, p.name, exc)

    # --- What `status` shows -----------------------------------------------------------

    async def collect(self, probe_timeout_s: float = 1.0, probes: bool = True) -> pb.ClusterState:
        """The placement's ``pgs`` (state.py) with this loop's view laid over them: the
        membership epoch, a change under way, and members hydrating or failed."""
        state = await super().collect(probe_timeout_s, probes)
        for g in state.pgs:
            rec = self.pgs.get(g.pg)
            if rec is None:
                continue
            g.membership_epoch = max(g.membership_epoch, rec.epoch)
            g.transitional = rec.transitional
            g.target_lsn = max(rec.hydrating.values(), default=0)
            for m in g.members:
                if m.node in rec.hydrating:
                    m.state = "hydrating"
                elif m.node in self.failed_nodes:
                    m.state = "failed"
        for r in self.repairs:
            state.repairs.append(pb.RepairRecord(
                node=r.node, reason=r.reason, started_unix=r.started_unix,
                seconds=r.seconds if r.done else round(time.monotonic() - r.started, 2),
                hydrated_bytes=r.hydrated_bytes, hydration_mb_s=r.hydration_mb_s, done=r.done))
        return state
