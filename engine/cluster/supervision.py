"""Supervision: launching, watching and stopping the cluster's processes, and faults on demand.

``Supervision`` (a part of the control plane, engine/cluster/control_plane.py) owns the
process half of the control plane:

- ``launch`` builds a process's command line (an instance's from its role NOW: a former
  writer comes back as a replica of the current writer) and starts it as a fresh
  subprocess (engine/cluster/launcher.py ``spawn``);
- ``boot``: storage nodes first, the writer once they serve (its recovery needs them),
  the replicas once the writer serves (they start from its redo stream's snapshot);
- ``supervise``/``tick`` every TICK_S: reap exited processes and mark them down (an exit
  nobody asked for is a WARNING; a writer that is gone goes to ``on_writer_down``,
  engine/cluster/failover.py), and health-check the ones starting (``_probe_health``);
- the actions of `aurora-lite node kill|stop|start|pause|resume`, `az down|up` and
  `net delay|clear` (faults on demand), `replica add|remove`, and ``shutdown``.

It never restarts a process by itself: labs kill nodes on purpose.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

from aurora_pb import control_pb2 as pb
from engine.cluster.listen import listen_argv
from engine.cluster.launcher import STOP_GRACE_S, describe_exit, free_ports, spawn
from engine.cluster.state import (
    HEALTH_TIMEOUT_S, START_WAIT_S, TICK_S, ActionError, ClusterState, Managed,
    PreconditionError, log)
from engine.format.cluster_config import ClusterConfig
from engine.format.volume import AZS

BOOT_STORAGE_WAIT_S = 30.0   # at boot, wait for the storage nodes before the writer
KILL_WAIT_S = 5.0            # after SIGKILL, wait for the exit this long
MAX_EXTRA_DELAY_MS = 60_000  # `net delay --ms` above this is refused

ACTIONS = ("kill", "stop", "start", "pause", "resume", "wipe")
AZ_ACTIONS = ("down", "up")


class Supervision(ClusterState):
    """Launch, watch, stop and break processes (see the module doc)."""

    # --- Launch and supervise ---------------------------------------------------------

    def _argv(self, p: Managed) -> list[str]:
        """The command line for p's next launch. An instance's comes from its role NOW: a
        former writer comes back as a replica of the current writer, never as a second
        writer."""
        metrics = ["--metrics-port", str(p.metrics_port)] if p.metrics_port else []
        return self._argv_without_metrics(p) + metrics

    def _argv_without_metrics(self, p: Managed) -> list[str]:
        if p.role == "storage":
            # Gossip peers: the nodes sharing a PG with p (invariant 15); on six, all five.
            shared = {m for membership in self.config.memberships().values()
                      if p.name in membership.members for m in membership.members}
            peers = [n.address for n in self.config.storage_nodes
                     if n.name != p.name and n.name in shared]
            return self.base_argv + [
                "storage-node", "--node-id", p.name, "--az", p.az, *listen_argv(self.host),
                "--port", p.port, "--data-dir", self.dd.node_dir(p.name),
                "--peers", ",".join(peers), "--cluster-config", self.dd.cluster_json]
        common = ["--cluster", self.dd.cluster_json, "--instance", p.name, "--az", p.az,
                  *listen_argv(self.host), "--port", p.port, "--pg-port", str(p.pg_port)]
        spec = self.topology.get(p.name)
        if spec is not None and spec.min_acu is not None:
            # Serverless: it starts at its minimum (a paused minimum of 0 starts at 0.5).
            common += ["--acu", f"{max(spec.min_acu, 0.5):g}"]
        if p.role == "writer":
            return self.base_argv + ["writer", *common]
        return self.base_argv + ["replica", "--writer", self.procs[self.writer].address, *common]

    def launch(self, p: Managed) -> None:
        assert not p.alive, f"{p.name} is already running"
        p.autopaused = False
        p.popen = spawn(self._argv(p), p.log_path)
        p.state = "starting"
        p.exit_reason = ""
        p.started_at = time.monotonic()
        p.starts += 1
        if p.starts > 1:
            self.restarts += 1
            self.event("restart", f"{p.name} started again (pid {p.pid}, {p.role})")
        p.intentional = False
        if p.name == self.writer:
            self._writer_ok_at = time.monotonic()
        log.info("launched %s (%s, %s) pid %d, port %s", p.name, p.role, p.az, p.pid, p.port)
        self.write_control()

    async def boot(self) -> None:
        """Storage nodes first; the writer once they serve (its recovery needs them); the
        replicas once the writer serves (they start from its redo stream's snapshot)."""
        for p in self.storage:
            self.launch(p)
        if not await self._wait_states(self.storage, BOOT_STORAGE_WAIT_S):
            return
        not_up = [p.name for p in self.storage if p.state != "up"]
        if not_up:
            log.warning("storage nodes not serving at boot: %s; starting the writer anyway",
                        ", ".join(not_up))
        writer = self.procs[self.writer]
        self.launch(writer)
        if not await self._wait_states([writer], START_WAIT_S):
            return
        if writer.state != "up":
            log.warning("writer %s is not serving (%s); starting the replicas anyway",
                        writer.name, writer.state)
        for p in self.replicas:
            if not self.stopping and not p.alive:
                self.launch(p)

    async def _wait_states(self, procs: list[Managed], timeout_s: float) -> bool:
        """Wait until each of procs is up or down; False if the cluster is stopping."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stopping:
            if all(p.state in ("up", "down") for p in procs):
                break
            await asyncio.sleep(TICK_S / 2)
        return not self.stopping

    async def supervise(self) -> None:
        while not self.stopped.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("supervisor tick failed")
            await asyncio.sleep(TICK_S)

    def tick(self) -> None:
        changed = False
        for p in self.procs.values():
            if p.popen is None or p.state == "down":
                continue
            rc = p.popen.poll()
            if rc is not None:
                self._mark_down(p, rc)
                changed = True
            elif p.state == "starting" and not p.probing:
                p.probing = True
                asyncio.get_running_loop().create_task(self._probe_health(p))
        if changed:
            self.write_control()

    def _mark_down(self, p: Managed, rc: int) -> None:
        p.state = "down"
        p.exit_reason = describe_exit(rc)
        if not self.stopping:
            self.event("down", f"{p.name} ({p.role}) {p.exit_reason}")
        pid = p.popen.pid if p.popen else 0
        if p.intentional:
            log.info("%s (pid %d) %s", p.name, pid, p.exit_reason)
        else:
            log.warning("%s (pid %d) %s unexpectedly; see %s", p.name, pid, p.exit_reason, p.log_path)
        # Killed on purpose or not, a writer that is gone is a writer to replace; one
        # auto-paused (serverless, min 0 ACU) comes back on the next connection instead.
        if p.name == self.writer and not self.stopping and not p.autopaused:
            self.on_writer_down(p, f"{p.name} {p.exit_reason}")

    async def _probe_health(self, p: Managed) -> None:
        try:
            serving = await self.rpc.health(p.name, p.address, HEALTH_TIMEOUT_S)
        finally:
            p.probing = False
        if serving and p.state == "starting" and p.alive:
            p.state = "up"
            log.info("%s is serving on %s (pid %d, %.1fs after launch)", p.name, p.address,
                     p.pid, time.monotonic() - p.started_at)
            self.write_control()

    # --- Actions: node and AZ faults ----------------------------------------------------

    async def action(self, name: str, action: str, wait_s: float = 0.0) -> str:
        self._check_running()
        if action not in ACTIONS:
            raise ActionError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
        p = self.get(name)
        async with p.lock:
            if action == "start":
                return await self._start(p, wait_s or START_WAIT_S)
            if action == "kill":
                return await self._kill(p)
            if action == "stop":
                return await self._stop(p, STOP_GRACE_S)
            if action == "pause":
                return self._pause(p)
            if action == "wipe":
                return await self._wipe(p, wait_s or START_WAIT_S)
            return self._resume(p)

    async def az_action(self, az: str, action: str, wait_s: float = 0.0) -> str:
        """AZ failure = both storage nodes of the AZ (instances placed there keep running)."""
        self._check_running()
        if az not in AZS:
            raise ActionError(f"unknown AZ {az!r} (one of {', '.join(AZS)})")
        if action not in AZ_ACTIONS:
            raise ActionError(f"unknown AZ action {action!r} (down or up)")
        nodes = [p for p in self.storage if p.az == az]
        sub = "kill" if action == "down" else "start"
        self.event("az", f"AZ {az} {action}: {', '.join(p.name for p in nodes)}")
        lines = await asyncio.gather(*(self.action(p.name, sub, wait_s) for p in nodes))
        return "\n".join(lines)

    async def _start(self, p: Managed, wait_s: float) -> str:
        if p.alive:
            return f"{p.name} is already running (pid {p.pid}, {p.state})"
        self.launch(p)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not self.stopping:
            self.tick()
            if p.state in ("up", "down"):
                break
            await asyncio.sleep(TICK_S / 2)
        if p.state == "up":
            return (f"{p.name} started: pid {p.pid}, serving on {p.address} "
                    f"after {time.monotonic() - p.started_at:.1f}s")
        if p.state == "down":
            return f"{p.name} failed to start: {p.exit_reason}; see {p.log_path}"
        return f"{p.name} started (pid {p.pid}) but is not serving after {wait_s:.0f}s; see {p.log_path}"

    async def _kill(self, p: Managed) -> str:
        if not p.alive:
            return f"{p.name} is not running ({p.exit_reason or p.state})"
        pid = p.pid
        p.intentional = True
        os.kill(pid, signal.SIGKILL)
        await self._wait_exit(p, KILL_WAIT_S)
        return f"{p.name} killed (SIGKILL to pid {pid})"

    async def _wipe(self, p: Managed, wait_s: float) -> str:
        """`node wipe NAME`: SIGKILL a storage node, delete its data dir, start it empty.
        It comes back with a new incarnation, so the healing loop (membership.py) repairs
        its segments: they hydrate from its peers under new membership epochs."""
        if p.role != "storage":
            raise PreconditionError(f"{p.name} is an instance; only a storage node can be wiped")
        how = await self._kill(p) if p.alive else f"{p.name} was not running"
        data_dir = self.dd.node_dir(p.name)
        shutil.rmtree(data_dir, ignore_errors=True)
        self.event("wipe", f"{p.name} wiped: data dir {data_dir} deleted")
        log.warning("%s wiped: data dir %s deleted; starting it empty", p.name, data_dir)
        started = await self._start(p, wait_s)
        return f"{how}; data dir {data_dir} deleted; {started}"

    async def _stop(self, p: Managed, grace_s: float) -> str:
        if not p.alive:
            return f"{p.name} is not running ({p.exit_reason or p.state})"
        pid = p.pid
        p.intentional = True
        p.state = "stopping"
        self.write_control()
        how = await self._terminate(p, grace_s)
        return f"{p.name} stopped (pid {pid}: {how})"

    async def _terminate(self, p: Managed, grace_s: float) -> str:
        """SIGTERM, wait up to grace_s, then SIGKILL; says which it took."""
        started = time.monotonic()
        os.kill(p.pid, signal.SIGTERM)
        os.kill(p.pid, signal.SIGCONT)   # a paused process cannot act on SIGTERM
        if await self._wait_exit(p, grace_s):
            return f"SIGTERM, {p.exit_reason} after {time.monotonic() - started:.1f}s"
        os.kill(p.pid, signal.SIGKILL)
        await self._wait_exit(p, KILL_WAIT_S)
        return f"SIGTERM, still running after {grace_s:.0f}s, SIGKILL"

    def _pause(self, p: Managed) -> str:
        if not p.alive:
            return f"{p.name} is not running ({p.exit_reason or p.state})"
        if p.state == "paused":
            return f"{p.name} is already paused (pid {p.pid})"
        os.kill(p.pid, signal.SIGSTOP)
        p.state = "paused"
        self.event("pause", f"{p.name} paused (SIGSTOP)")
        self.write_control()
        log.info("%s paused (SIGSTOP to pid %d)", p.name, p.pid)
        return f"{p.name} paused (SIGSTOP to pid {p.pid})"

    def _resume(self, p: Managed) -> str:
        if not p.alive:
            return f"{p.name} is not running ({p.exit_reason or p.state})"
        if p.state != "paused":
            return f"{p.name} is not paused ({p.state})"
        os.kill(p.pid, signal.SIGCONT)
        p.state = "starting"   # the next health check turns it "up"
        self.event("resume", f"{p.name} resumed (SIGCONT)")
        self.write_control()
        log.info("%s resumed (SIGCONT to pid %d)", p.name, p.pid)
        return f"{p.name} resumed (SIGCONT to pid {p.pid})"

    async def _wait_exit(self, p: Managed, timeout_s: float) -> bool:
        assert p.popen is not None
        deadline = time.monotonic() + timeout_s
        while True:
            rc = p.popen.poll()
            if rc is not None:
                if p.state != "down":
                    self._mark_down(p, rc)
                    self.write_control()
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)

    # --- Network faults -----------------------------------------------------------------

    def set_network_delay(self, az: str, ms: float, clear: bool, node: str = "") -> str:
        """Rewrite cluster.json's latency.extra_az_ms (or extra_node_ms for ``node``);
        readers reload it by mtime."""
        self._check_running()
        config = ClusterConfig.load(self.dd.cluster_json)
        if clear:
            config.latency.extra_az_ms = {}
            config.latency.extra_node_ms = {}
            message = "extra network delays cleared"
        elif node:
            names = [n.name for n in config.storage_nodes]
            if node not in names:
                raise ActionError(f"unknown storage node {node!r} (one of {', '.join(names)})")
            _check_delay(ms)
            if ms:
                config.latency.extra_node_ms[node] = float(ms)
            else:
                config.latency.extra_node_ms.pop(node, None)
            message = f"every link into {node} now has {ms:g} ms of extra one-way delay"
        else:
            if az not in AZS:
                raise ActionError(f"unknown AZ {az!r} (one of {', '.join(AZS)})")
            _check_delay(ms)
            if ms:
                config.latency.extra_az_ms[az] = float(ms)
            else:
                config.latency.extra_az_ms.pop(az, None)
            message = f"every link into {az} now has {ms:g} ms of extra one-way delay"
        config.save(self.dd.cluster_json)
        self.config.latency = config.latency
        self.event("net", message)
        log.info("%s (cluster.json updated)", message)
        return message

    # --- Replicas added and removed at run time -----------------------------------------

    async def add_replica(self, tier: int | None, az: str, wait_s: float,
                          min_acu: float | None = None, max_acu: float | None = None) -> tuple[str, str]:
        """`replica add`: a new instance following the writer; waits until it serves.
        With min_acu/max_acu it is serverless (docs/serverless.md)."""
        self._check_running()
        try:
            spec = self.topology.next_instance(tier, az or None)
            if min_acu is not None:
                from engine.cluster.scaling import CapacityPolicy
                from engine.instance.capacity import check_acu
                spec.min_acu = check_acu(min_acu, "--min-acu", allow_zero=True)
                spec.max_acu = check_acu(max_acu, "--max-acu")
                CapacityPolicy(spec.min_acu, spec.max_acu).check()
        except ValueError as exc:
            raise ActionError(str(exc)) from None
        port, metrics_port = free_ports(2, self.host)
        self.topology.instances.append(spec)
        p = self._add_instance(spec, port, metrics_port)
        self.save_topology()
        async with p.lock:
            message = await self._start(p, wait_s or START_WAIT_S)
        return spec.name, f"{message} (replica of {self.writer}, {spec.az}, tier {spec.tier})"

    async def remove_replica(self, name: str) -> str:
        """`replica remove NAME`: stop it and forget it; it leaves every custom endpoint."""
        self._check_running()
        async with self.failover_lock:   # never remove a replica being promoted
            return await self._remove_replica(name)

    async def _remove_replica(self, name: str) -> str:
        p = self.get_instance(name)
        if p.name == self.writer:
            raise PreconditionError(f"{name} is the writer; `aurora-lite failover` first")
        async with p.lock:
            how = await self._stop(p, STOP_GRACE_S) if p.alive else f"{name} was not running"
            await self.rpc.close(name)
        del self.procs[name]
        self.topology.instances = [i for i in self.topology.instances if i.name != name]
        for members in self.topology.endpoints.values():
            if name in members:
                members.remove(name)
        self.save_topology()
        self.write_control()
        log.info("replica %s removed", name)
        return f"{how}; {name} removed from the cluster"

    # --- Shutdown -----------------------------------------------------------------------

    async def shutdown(self, grace_s: float = STOP_GRACE_S) -> list[pb.StopReport]:
        """Stop the instances first (so no write is in flight), then the storage nodes."""
        self.stopping = True
        log.info("shutting down (SIGTERM, %.0fs grace, then SIGKILL)", grace_s)
        reports = []

        async def stop_one(p: Managed) -> pb.StopReport:
            async with p.lock:
                pid = p.pid
                if not pid:
                    return pb.StopReport(name=p.name, action=f"was not running ({p.exit_reason or p.state})")
                p.intentional = True
                p.state = "stopping"
                self.write_control()
                return pb.StopReport(name=p.name, pid=pid, action=await self._terminate(p, grace_s))

        for group in (self.instances, self.storage):
            reports += await asyncio.gather(*(stop_one(p) for p in group))
        for r in reports:
            log.info("shutdown: %s pid %d: %s", r.name, r.pid, r.action)
        return reports


def _check_delay(ms: float) -> None:
    if not 0 <= ms <= MAX_EXTRA_DELAY_MS:
        raise ActionError(f"delay must be between 0 and 60000 ms, got {ms}")
