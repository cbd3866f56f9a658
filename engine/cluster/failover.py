"""Failover: automatic and planned, by promotion tier, and keeping every instance following
the writer.

``Failover`` (a part of the control plane, engine/cluster/control_plane.py):

- Automatic: the writer's process exits (killed, stopped, crashed: ``on_writer_down`` from
  the supervisor, engine/cluster/supervision.py) or its health check has failed for
  ``failover_after_s`` (``watch_writer``). The best live replica (lowest promotion tier,
  ties by name) is promoted: InstanceAdmin.Promote makes it run recovery under a new
  volume epoch (invariant 10) and take writes. It becomes the writer in topology.json and
  control.json (the cluster endpoint), the old writer becomes a replica there, and every
  other live instance is told to follow it (InstanceAdmin.Follow). If the old writer was
  only unreachable (paused) and comes back, storage already fences it (invariant 9) and
  ``reconcile`` tells it to follow. If no replica is up, the writer stays down until
  `node start` (recovery on start).
- Planned: ``failover(target)`` (`aurora-lite failover [--target NAME]`) promotes the
  target (default: the best live replica); the old writer steps down and follows it.
- ``reconcile`` every RECONCILE_S: a live instance that is not a replica of the current
  writer (a deposed writer that came back, a replica that missed a Follow) is told to
  follow it.

Roles move only here::

    replica --failover() / on_writer_down(): Promote--> writer
    writer  --failover() / on_writer_down(): another was promoted--> replica (Follow when up)
"""

from __future__ import annotations

import asyncio
import json
import time

from aurora_pb import control_pb2 as pb
from engine.errors import RpcError
from engine.cluster.state import (
    HEALTH_TIMEOUT_S, PROBE_TIMEOUT_S, ClusterState, Managed, PreconditionError, log)

WATCH_S = 0.25               # the writer's health is checked this often
WATCH_TIMEOUT_S = 0.75       # ... each check waits this long (a busy 2-core box is slow)
WATCH_FAILS_MIN = 2          # ... and a failover needs at least this many failed in a row
PROMOTE_TIMEOUT_S = 60.0     # one Promote (the replica's recovery)
FOLLOW_TIMEOUT_S = 10.0      # one Follow
RECONCILE_S = 1.0            # live instances are checked to follow the writer this often


class Failover(ClusterState):
    """Promote a replica when the writer is lost or on request (see the module doc)."""

    def on_writer_down(self, p: Managed, reason: str) -> None:
        """The writer exited, or has not answered its health check for failover_after_s:
        fail over to the best live replica (in the background; see the module doc)."""
        if self.failing_over:
            return
        self.failing_over = True   # set now: the watchdog must not start a second one
        self._spawn_task(self._auto_failover(p.name, reason))

    async def _auto_failover(self, old_name: str, reason: str) -> None:
        try:
            async with self.failover_lock:
                if self.writer != old_name or self.stopping:
                    return   # a planned failover got there first, or we are stopping
                old = self.procs[old_name]
                if old.alive and old.state != "paused" and await self._healthy(old):
                    log.info("writer %s answers again; no failover", old.name)
                    return
                log.warning("writer %s is down (%s): failing over", old.name, reason)
                try:
                    await self._promote_best(old, reason, exclude=())
                except PreconditionError as exc:
                    log.warning("%s; `aurora-lite node start %s` restarts the writer (recovery "
                                "runs on start)", exc, old.name)
        except Exception:
            log.exception("automatic failover failed")
        finally:
            self.failing_over = False
            self._writer_ok_at = time.monotonic()

    async def _healthy(self, p: Managed, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
        return await self.rpc.health(p.name, p.address, timeout_s)

    async def _promote_best(self, old: Managed, reason: str, exclude=()) -> pb.FailoverReply:
        """Promote the first candidate that succeeds. Caller holds failover_lock."""
        tried = []
        for cand in self.candidates(exclude):
            try:
                return await self._promote(cand, old, reason)
            except (RpcError, asyncio.TimeoutError) as exc:
                why = str(exc) if isinstance(exc, RpcError) else "timeout"
                log.warning("promoting %s failed (%s); trying the next replica", cand.name, why)
                tried.append(cand.name)
        raise PreconditionError(
            f"no replica can take over from {old.name}"
            + (f" (promotion failed on {', '.join(tried)})" if tried else " (no replica is up)"))

    async def _promote(self, new: Managed, old: Managed, reason: str) -> pb.FailoverReply:
        """Promote ``new`` (Promote RPC: recovery under a new epoch), then make it the writer
        everywhere and tell every other live instance to follow it. Caller holds the lock."""
        started = time.monotonic()
        log.info("promoting %s (tier %d) to writer in place of %s (%s)", new.name, new.tier,
                 old.name, reason)
        reply = await self.rpc.promote(new.name, new.address, PROMOTE_TIMEOUT_S)
        promote_s = time.monotonic() - started
        old.role, new.role = "replica", "writer"
        self.writer = new.name
        self.failovers += 1
        self._writer_ok_at = time.monotonic()
        self.last_failover = (f"{time.strftime('%H:%M:%S')} {old.name} -> {new.name} ({reason}); "
                              f"epoch {reply.volume_epoch}, VDL {reply.vdl}, promote {promote_s:.2f}s")
        self.event("failover", f"{old.name} -> {new.name} ({reason}); epoch {reply.volume_epoch}, "
                               f"VDL {reply.vdl}")
        self.save_topology()
        self.write_control()
        log.warning("%s is the writer now (epoch %d, VDL %d, recovery %.3fs, promote %.2fs); "
                    "cluster endpoint %s", new.name, reply.volume_epoch, reply.vdl,
                    reply.recovery_seconds, promote_s, new.address)
        others = [p for p in self.instances if p is not new and p.alive and p.state != "paused"]
        await asyncio.gather(*(self._follow(p) for p in others))
        return pb.FailoverReply(old_writer=old.name, new_writer=new.name,
                                volume_epoch=reply.volume_epoch, vdl=reply.vdl,
                                promote_s=promote_s, total_s=time.monotonic() - started)

    async def _follow(self, p: Managed) -> bool:
        """Tell ``p`` to follow the current writer; False if it did not answer."""
        writer = self.procs[self.writer]
        try:
            await self.rpc.follow(p.name, p.address, writer.address, FOLLOW_TIMEOUT_S)
            log.info("%s now follows %s at %s", p.name, writer.name, writer.address)
            return True
        except RpcError as exc:
            log.info("%s did not take Follow(%s) yet: %s", p.name, writer.name, exc)
            return False

    async def watch_writer(self) -> None:
        """Health-check the writer every WATCH_S; fail over once no check has passed for
        failover_after_s and the last WATCH_FAILS_MIN failed (a paused or unreachable
        writer: the process is still there). With no replica up there is nothing to do
        but say so, once per outage."""
        fails = 0
        told = False
        while not self.stopped.is_set():
            await asyncio.sleep(WATCH_S)
            try:
                w = self.procs[self.writer]
                if self.stopping or self.failing_over or w.state not in ("up", "paused") or not w.alive:
                    self._writer_ok_at, fails = time.monotonic(), 0
                    continue
                if await self._healthy(w, WATCH_TIMEOUT_S):
                    self._writer_ok_at, fails, told = time.monotonic(), 0, False
                    continue
                fails += 1
                silent_s = time.monotonic() - self._writer_ok_at
                if silent_s <= self.failover_after_s or fails < WATCH_FAILS_MIN:
                    continue
                if w.name != self.writer or self.failing_over:
                    continue
                if not self.candidates():
                    if not told:
                        log.warning("writer %s has not answered for %.1fs and no replica is up "
                                    "to take over", w.name, silent_s)
                        told = True
                    continue
                self.on_writer_down(w, f"no health check answer for {silent_s:.1f}s")
            except Exception:
                log.exception("writer watchdog failed")

    async def reconcile(self) -> None:
        """Every RECONCILE_S: a live instance other than the writer that is not a replica
        of the current writer (a deposed writer that came back, a replica that missed a
        Follow) is told to follow it."""
        while not self.stopped.is_set():
            await asyncio.sleep(RECONCILE_S)
            if self.stopping or self.failing_over or self.failover_lock.locked():
                continue
            writer = self.procs[self.writer]
            if writer.state != "up":
                continue
            try:
                await asyncio.gather(*(self._reconcile_one(p, writer) for p in self.replicas
                                       if p.state == "up" and p.alive))
            except Exception:
                log.exception("reconcile failed")

    async def _reconcile_one(self, p: Managed, writer: Managed) -> None:
        try:
            reply = await self.rpc.instance_status(p.name, p.address, PROBE_TIMEOUT_S)
            following = json.loads(reply.json).get("replica", {}).get("writer_address", "")
        except (RpcError, ValueError, AttributeError):
            return
        if reply.role != "replica" or following != writer.address:
            log.info("%s is %s (following %r), not a replica of %s: telling it to follow",
                     p.name, reply.role, following, writer.name)
            await self._follow(p)

    async def failover(self, target: str = "") -> pb.FailoverReply:
        """`aurora-lite failover [--target NAME]`: promote the target (default: the best
        live replica), then the old writer steps down and follows it (if it runs)."""
        self._check_running()
        if target:
            cand = self.get_instance(target)
            if cand.name == self.writer:
                raise PreconditionError(f"{target} is already the writer")
            if cand.state != "up" or not cand.alive:
                raise PreconditionError(f"{target} is not up ({cand.state}); it cannot take over")
        async with self.failover_lock:
            if target and target == self.writer:   # an automatic failover got there first
                raise PreconditionError(f"{target} is already the writer")
            self.failing_over = True
            try:
                old = self.procs[self.writer]
                reason = f"planned failover{' to ' + target if target else ''}"
                if target:
                    reply = await self._promote(self.procs[target], old, reason)
                else:
                    reply = await self._promote_best(old, reason)
            except RpcError as exc:
                raise PreconditionError(f"promoting {target} failed: {exc}") from None
            finally:
                self.failing_over = False
        lines = [f"{reply.new_writer} promoted: epoch {reply.volume_epoch}, VDL {reply.vdl}, "
                 f"in {reply.promote_s:.2f}s; it is the writer and the cluster endpoint "
                 f"({self.procs[reply.new_writer].address})"]
        old = self.procs[reply.old_writer]
        if old.alive:
            lines.append(f"{old.name} stepped down: a replica of {reply.new_writer} now")
        else:
            lines.append(f"{old.name} is {old.state}: it comes back as a replica of "
                         f"{reply.new_writer} (`aurora-lite node start {old.name}`)")
        reply.message = "\n".join(lines)
        return reply
