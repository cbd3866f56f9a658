"""The control plane: launches, supervises and breaks (on request) one local cluster.

`aurora-lite control-plane --data-dir DIR` is started by `aurora-lite up` as a fresh
process in its own session. It

1. takes DIR/control.lock (one control plane per data dir) and stops any process a
   previous control plane of DIR left behind (it was killed, its children were not);
2. plans the ports and writes DIR/cluster.json before anything starts
   (engine/cluster/launcher.py);
3. serves the Control gRPC service (proto/aurora_pb/control.proto) and writes
   DIR/control.json with its address and pid;
4. launches the six storage nodes, waits until they are SERVING (gRPC health), then the
   writer (db1 on a new data dir; topology.json says which instance after a failover),
   which runs recovery and serves the cluster endpoint, then the read replicas, each
   started with ``replica --writer <the writer's address>``;
5. supervises: every TICK_S it reaps exited processes and marks them down (a process it
   was not asked to stop is logged as a WARNING), and health-checks the ones starting;
6. watches the writer and fails over (below), and keeps every other live instance
   following the current writer (reconcile, every RECONCILE_S).

It never restarts a process by itself: labs kill nodes on purpose.

Failover (automatic): the writer's process exits (killed, stopped, crashed) or its health
check has failed for FAILOVER_AFTER_S. ``on_writer_down`` then promotes the live replica
with the best (lowest) promotion tier, ties by name: InstanceAdmin.Promote makes it run
recovery under a new volume epoch (invariant 10) and take writes. It becomes the writer
in topology.json and control.json (the cluster endpoint), the old writer becomes a
replica there, and every other live instance is told to follow it (InstanceAdmin.Follow).
A restart of the old writer (`node start db1`) launches it with the ``replica`` command
line: it never runs recovery as a second writer. If the old writer was only unreachable
(paused, SIGSTOP) and comes back, storage already fences it (invariant 9) and reconcile
tells it to follow. If no replica is up, the writer stays down until `node start`
(recovery on start). ``failover(target)`` is the planned variant (`aurora-lite failover`).

Roles (Managed.role, the control plane's assignment; instances report their own, which
lags by at most one reconcile) and the method that moves them::

    replica --failover() / on_writer_down(): Promote--> writer
    writer  --failover() / on_writer_down(): another was promoted--> replica (Follow when up)

Process state transitions (ProcessState.state), with the method that makes each::

    down/starting --launch()--> starting --health SERVING (_probe_health)--> up
    up/starting --pause()--> paused --resume()--> up (or starting)
    any live --kill() / stop() / exits by itself (tick)--> down
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aurora_pb import control_pb2 as pb
from aurora_pb import control_pb2_grpc as pb_grpc
from aurora_pb import database_pb2, database_pb2_grpc
from aurora_pb import storage_pb2, storage_pb2_grpc
from engine.format.cluster_config import ClusterConfig
from engine.cluster.launcher import (
    HOST, STOP_GRACE_S, DataDir, InstanceSpec, Plan, Topology, base_command, cluster_pids,
    describe_exit, free_ports, load_topology, pid_belongs, plan_cluster, read_control,
    resolve_data_dir, spawn, stop_pids, write_json_atomic)
from engine.format.volume import AZS
from engine.cluster.listen import listen_argv

log = logging.getLogger("aurora_lite.control_plane")

TICK_S = 0.2                 # supervision period
HEALTH_TIMEOUT_S = 0.5       # one health check
PROBE_TIMEOUT_S = 1.0        # one status query (GetState)
START_WAIT_S = 60.0          # `node start` waits this long for SERVING
BOOT_STORAGE_WAIT_S = 30.0   # at boot, wait for the storage nodes before the writer
KILL_WAIT_S = 5.0            # after SIGKILL, wait for the exit this long
WATCH_S = 0.25               # the writer's health is checked this often
WATCH_TIMEOUT_S = 0.75       # ... each check waits this long (a busy 2-core box is slow)
FAILOVER_AFTER_S = 1.5       # ... and a failover starts after it failed for this long
WATCH_FAILS_MIN = 2          # ... and at least this many checks in a row failed
PROMOTE_TIMEOUT_S = 60.0     # one Promote (the replica's recovery)
FOLLOW_TIMEOUT_S = 10.0      # one Follow
RECONCILE_S = 1.0            # live instances are checked to follow the writer this often
ENDPOINT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]

ACTIONS = ("kill", "stop", "start", "pause", "resume")
AZ_ACTIONS = ("down", "up")


class ActionError(Exception):
    """A request the control plane refuses (unknown name, shutting down, ...)."""


class NotFoundError(ActionError):
    """An unknown endpoint or instance (gRPC NOT_FOUND)."""


class PreconditionError(ActionError):
    """A request that cannot be done in the cluster's state now (FAILED_PRECONDITION)."""


@dataclass
class Managed:
    """One process the control plane launches and watches."""

    name: str
    role: str                      # "storage" | "writer" | "replica" (assigned, see doc)
    az: str
    address: str
    argv: list[str]                # storage nodes; instances get theirs at each launch
    log_path: str
    tier: int = 0                  # instances: promotion tier, lower promoted first
    popen: subprocess.Popen | None = None
    state: str = "down"
    exit_reason: str = "not started"
    started_at: float = 0.0        # time.monotonic() of the last launch
    starts: int = 0
    intentional: bool = False      # its next exit was asked for (kill/stop/shutdown)
    probing: bool = False
    channel: grpc.aio.Channel | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def pid(self) -> int:
        if self.popen is not None and self.popen.returncode is None:
            return self.popen.pid
        return 0

    @property
    def alive(self) -> bool:
        return self.pid != 0


class ControlPlane:
    """Supervisor state and actions; ControlService is its gRPC face."""

    def __init__(self, dd: DataDir, plan: Plan, topology: Topology, *, host: str = HOST,
                 log_level: str = "INFO", failover_after_s: float = FAILOVER_AFTER_S) -> None:
        self.dd = dd
        self.config = plan.config
        self.topology = topology
        self.host = host
        self.address = ""
        self.stopping = False
        self.stopped = asyncio.Event()
        self.procs: dict[str, Managed] = {}
        self.base_argv = base_command() + ["--log-level", log_level]
        self.failover_after_s = failover_after_s
        for spec in topology.instances:
            self._add_instance(spec, plan.instance_ports[spec.name])
        for node in self.config.storage_nodes:
            peers = [n.address for n in self.config.storage_nodes if n.name != node.name]
            self.procs[node.name] = Managed(
                node.name, "storage", node.az, node.address,
                self.base_argv + ["storage-node", "--node-id", node.name, "--az", node.az,
                                  *listen_argv(host), "--port", node.address.rsplit(":", 1)[1],
                                  "--data-dir", dd.node_dir(node.name), "--peers", ",".join(peers),
                                  "--cluster-config", dd.cluster_json],
                dd.log(node.name))
        self.writer = topology.writer
        # Failover bookkeeping.
        self.failover_lock = asyncio.Lock()
        self.failing_over = False
        self.failovers = 0
        self.last_failover = ""
        self._writer_ok_at = time.monotonic()   # last passing health check of the writer
        self._tasks: set[asyncio.Task] = set()

    def _add_instance(self, spec: InstanceSpec, port: int) -> Managed:
        p = Managed(spec.name, "writer" if spec.name == self.topology.writer else "replica",
                    spec.az, f"{self.host}:{port}", [], self.dd.log(spec.name), tier=spec.tier)
        self.procs[spec.name] = p
        return p

    def _instance_argv(self, p: Managed) -> list[str]:
        """The command line for an instance's next launch, from its role NOW: a former
        writer comes back as a replica of the current writer, never as a second writer."""
        common = ["--cluster", self.dd.cluster_json, "--instance", p.name, "--az", p.az,
                  *listen_argv(self.host), "--port", p.address.rsplit(":", 1)[1]]
        if p.role == "writer":
            return self.base_argv + ["writer", *common]
        return self.base_argv + ["replica", "--writer", self.procs[self.writer].address, *common]

    def _spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- Bookkeeping --------------------------------------------------------------------

    @property
    def storage(self) -> list[Managed]:
        return [p for p in self.procs.values() if p.role == "storage"]

    @property
    def instances(self) -> list[Managed]:
        return [p for p in self.procs.values() if p.role != "storage"]

    @property
    def replicas(self) -> list[Managed]:
        return [p for p in self.instances if p.name != self.writer]

    def get(self, name: str) -> Managed:
        try:
            return self.procs[name]
        except KeyError:
            raise ActionError(f"no process named {name!r} (known: {', '.join(self.procs)})") from None

    def get_instance(self, name: str) -> Managed:
        p = self.procs.get(name)
        if p is None or p.role == "storage":
            known = ", ".join(q.name for q in self.instances)
            raise NotFoundError(f"no instance named {name!r} (instances: {known})")
        return p

    def save_topology(self) -> None:
        """topology.json follows every change of roles, tiers, instances and endpoints."""
        self.topology.writer = self.writer
        for spec in self.topology.instances:
            spec.tier = self.procs[spec.name].tier
        self.topology.save(self.dd)

    def write_control(self) -> None:
        """DIR/control.json: everything a CLI verb needs to find this cluster."""
        write_json_atomic(self.dd.control_json, {
            "running": not self.stopped.is_set(),
            "data_dir": self.dd.root,
            "control": {"address": self.address, "pid": os.getpid()},
            "cluster_endpoint": self.procs[self.writer].address,
            "writer": self.writer,
            "failovers": self.failovers,
            "volume": self.config.volume,
            "processes": {p.name: {"role": p.role, "az": p.az, "address": p.address,
                                   "pid": p.pid, "state": p.state, "log": p.log_path,
                                   **({"tier": p.tier} if p.role != "storage" else {})}
                          for p in self.procs.values()},
        })

    def _channel(self, p: Managed) -> grpc.aio.Channel:
        if p.channel is None:
            p.channel = grpc.aio.insecure_channel(p.address, options=CHANNEL_OPTIONS)
        return p.channel

    # --- Launch and supervise ---------------------------------------------------------

    def launch(self, p: Managed) -> None:
        assert not p.alive, f"{p.name} is already running"
        argv = p.argv if p.role == "storage" else self._instance_argv(p)
        p.popen = spawn(argv, p.log_path)
        p.state = "starting"
        p.exit_reason = ""
        p.started_at = time.monotonic()
        p.starts += 1
        p.intentional = False
        if p.name == self.writer:
            self._writer_ok_at = time.monotonic()
        log.info("launched %s (%s, %s) pid %d, port %s", p.name, p.role, p.az, p.pid,
                 p.address.rsplit(":", 1)[1])
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
        pid = p.popen.pid if p.popen else 0
        if p.intentional:
            log.info("%s (pid %d) %s", p.name, pid, p.exit_reason)
        else:
            log.warning("%s (pid %d) %s unexpectedly; see %s", p.name, pid, p.exit_reason, p.log_path)
        # Killed on purpose or not, a writer that is gone is a writer to replace.
        if p.name == self.writer and not self.stopping:
            self.on_writer_down(p, f"{p.name} {p.exit_reason}")

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

    def _candidates(self, exclude=()) -> list[Managed]:
        """Replicas that can be promoted now: running, serving, best tier first."""
        live = [p for p in self.replicas if p.state == "up" and p.alive and p.name not in exclude]
        return sorted(live, key=lambda p: (p.tier, p.name))

    async def _promote_best(self, old: Managed, reason: str, exclude=()) -> pb.FailoverReply:
        """Promote the first candidate that succeeds. Caller holds failover_lock."""
        tried = []
        for cand in self._candidates(exclude):
            try:
                return await self._promote(cand, old, reason)
            except (grpc.RpcError, asyncio.TimeoutError) as exc:
                why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else "timeout"
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
        stub = database_pb2_grpc.InstanceAdminStub(self._channel(new))
        reply = await stub.Promote(database_pb2.PromoteRequest(), timeout=PROMOTE_TIMEOUT_S)
        promote_s = time.monotonic() - started
        old.role, new.role = "replica", "writer"
        self.writer = new.name
        self.failovers += 1
        self._writer_ok_at = time.monotonic()
        self.last_failover = (f"{time.strftime('%H:%M:%S')} {old.name} -> {new.name} ({reason}); "
                              f"epoch {reply.volume_epoch}, VDL {reply.vdl}, promote {promote_s:.2f}s")
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
            await database_pb2_grpc.InstanceAdminStub(self._channel(p)).Follow(
                database_pb2.FollowRequest(writer_address=writer.address), timeout=FOLLOW_TIMEOUT_S)
            log.info("%s now follows %s at %s", p.name, writer.name, writer.address)
            return True
        except grpc.RpcError as exc:
            log.info("%s did not take Follow(%s) yet: %s %s", p.name, writer.name,
                     exc.code().name, exc.details())
            return False

    async def _healthy(self, p: Managed, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel(p)).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNIMPLEMENTED
        except Exception:
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
                if not self._candidates():
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
            reply = await database_pb2_grpc.DatabaseStub(self._channel(p)).Status(
                database_pb2.StatusRequest(), timeout=PROBE_TIMEOUT_S)
            following = json.loads(reply.json).get("replica", {}).get("writer_address", "")
        except (grpc.RpcError, ValueError, AttributeError):
            return
        if reply.role != "replica" or following != writer.address:
            log.info("%s is %s (following %r), not a replica of %s: telling it to follow",
                     p.name, reply.role, following, writer.name)
            await self._follow(p)

    # --- Planned failover, replicas, endpoints ------------------------------------------

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
            except grpc.RpcError as exc:
                raise PreconditionError(f"promoting {target} failed: {exc.code().name}: "
                                        f"{exc.details()}") from None
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

    async def add_replica(self, tier: int | None, az: str, wait_s: float) -> tuple[str, str]:
        """`replica add`: a new instance following the writer; waits until it serves."""
        self._check_running()
        try:
            spec = self.topology.next_instance(tier, az or None)
        except ValueError as exc:
            raise ActionError(str(exc)) from None
        port = free_ports(1, self.host)[0]
        self.topology.instances.append(spec)
        p = self._add_instance(spec, port)
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
            if p.channel is not None:
                await p.channel.close()
                p.channel = None
        del self.procs[name]
        self.topology.instances = [i for i in self.topology.instances if i.name != name]
        for members in self.topology.endpoints.values():
            if name in members:
                members.remove(name)
        self.save_topology()
        self.write_control()
        log.info("replica %s removed", name)
        return f"{how}; {name} removed from the cluster"

    def _target(self, p: Managed) -> pb.EndpointTarget:
        return pb.EndpointTarget(instance=p.name, address=p.address, role=p.role,
                                 up=p.state == "up" and p.alive)

    def resolve(self, endpoint: str) -> pb.ResolveReply:
        kind, _, name = endpoint.partition(":")
        writer = self.procs[self.writer]
        if kind == "cluster" and not name:
            targets = [writer]
        elif kind == "reader" and not name:
            targets = [p for p in self.replicas if p.state == "up" and p.alive] or [writer]
            targets.sort(key=lambda p: p.name)
        elif kind == "instance" and name:
            targets = [self.get_instance(name)]
        elif kind == "custom" and name:
            members = self._custom(name)
            up = [self.procs[m] for m in members if self.procs[m].state == "up" and self.procs[m].alive]
            targets = [p for p in up if p.role == "replica"] or up
            if not targets:
                raise PreconditionError(f"no member of custom endpoint {name!r} is up "
                                        f"({', '.join(members) or 'it has no members'})")
        else:
            raise ActionError(f"bad endpoint {endpoint!r}: cluster, reader, instance:NAME or custom:NAME")
        writer_possible = (writer.state != "down" or self.failing_over
                           or bool(self._candidates()))
        return pb.ResolveReply(endpoint=endpoint, targets=[self._target(p) for p in targets],
                               writer=writer.name, writer_address=writer.address,
                               generation=self.failovers, failing_over=self.failing_over,
                               writer_possible=writer_possible)

    def _custom(self, name: str) -> list[str]:
        members = self.topology.endpoints.get(name)
        if members is None:
            known = ", ".join(sorted(self.topology.endpoints)) or "none"
            raise NotFoundError(f"no custom endpoint named {name!r} (custom endpoints: {known})")
        return members

    def create_endpoint(self, name: str, members: list[str]) -> pb.EndpointInfo:
        self._check_running()
        if not ENDPOINT_NAME_RE.match(name) or name in ("cluster", "reader"):
            raise ActionError(f"bad endpoint name {name!r}: 1-40 of a-z, 0-9 and '-', "
                              f"not 'cluster' or 'reader'")
        if name in self.topology.endpoints:
            raise PreconditionError(f"custom endpoint {name!r} exists (members "
                                    f"{', '.join(self.topology.endpoints[name])}); delete it first")
        members = list(dict.fromkeys(m.strip() for m in members if m.strip()))
        if not members:
            raise ActionError("a custom endpoint needs at least one member (--members db2,db3)")
        for m in members:
            self.get_instance(m)
        self.topology.endpoints[name] = members
        self.save_topology()
        log.info("custom endpoint %s created: %s", name, ", ".join(members))
        return self.endpoint_info(f"custom:{name}")

    def delete_endpoint(self, name: str) -> pb.EndpointInfo:
        self._check_running()
        info = self.endpoint_info(f"custom:{name}")
        del self.topology.endpoints[name]
        self.save_topology()
        log.info("custom endpoint %s deleted", name)
        return info

    def endpoint_info(self, endpoint: str) -> pb.EndpointInfo:
        kind, _, name = endpoint.partition(":")
        members = list(self._custom(name)) if kind == "custom" else []
        try:
            targets = list(self.resolve(endpoint).targets)
        except PreconditionError:
            targets = []
        return pb.EndpointInfo(name=endpoint, kind=kind, members=members, targets=targets)

    def list_endpoints(self) -> pb.EndpointList:
        names = ["cluster", "reader"] + [f"instance:{p.name}" for p in sorted(self.instances, key=lambda p: p.name)]
        names += [f"custom:{n}" for n in sorted(self.topology.endpoints)]
        return pb.EndpointList(endpoints=[self.endpoint_info(n) for n in names])

    async def _probe_health(self, p: Managed) -> None:
        try:
            stub = health_pb2_grpc.HealthStub(self._channel(p))
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""),
                                     timeout=HEALTH_TIMEOUT_S)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError as exc:
            # A server without the health service still proves it is listening.
            serving = exc.code() == grpc.StatusCode.UNIMPLEMENTED
        except Exception:
            serving = False
        finally:
            p.probing = False
        if serving and p.state == "starting" and p.alive:
            p.state = "up"
            log.info("%s is serving on %s (pid %d, %.1fs after launch)", p.name, p.address,
                     p.pid, time.monotonic() - p.started_at)
            self.write_control()

    # --- Actions ------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self.stopping:
            raise ActionError("the cluster is shutting down")

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
            if not 0 <= ms <= 60_000:
                raise ActionError(f"delay must be between 0 and 60000 ms, got {ms}")
            if ms:
                config.latency.extra_node_ms[node] = float(ms)
            else:
                config.latency.extra_node_ms.pop(node, None)
            message = f"every link into {node} now has {ms:g} ms of extra one-way delay"
        else:
            if az not in AZS:
                raise ActionError(f"unknown AZ {az!r} (one of {', '.join(AZS)})")
            if not 0 <= ms <= 60_000:
                raise ActionError(f"delay must be between 0 and 60000 ms, got {ms}")
            if ms:
                config.latency.extra_az_ms[az] = float(ms)
            else:
                config.latency.extra_az_ms.pop(az, None)
            message = f"every link into {az} now has {ms:g} ms of extra one-way delay"
        config.save(self.dd.cluster_json)
        self.config.latency = config.latency
        log.info("%s (cluster.json updated)", message)
        return message

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

    # --- State ---------------------------------------------------------------------------

    def _base_state(self, p: Managed) -> pb.ProcessState:
        return pb.ProcessState(
            name=p.name, role=p.role, az=p.az, address=p.address, pid=p.pid, state=p.state,
            up=p.state == "up", exit_reason=p.exit_reason if p.state == "down" else "",
            uptime_s=round(time.monotonic() - p.started_at, 1) if p.alive else 0.0,
            starts=p.starts, log=p.log_path, tier=p.tier)

    async def collect(self, probe_timeout_s: float = PROBE_TIMEOUT_S, probes: bool = True) -> pb.ClusterState:
        states = {name: self._base_state(p) for name, p in self.procs.items()}
        if probes:
            live = [p for p in self.procs.values() if p.state == "up"]
            await asyncio.gather(*(self._probe(p, states[p.name], probe_timeout_s) for p in live))
            self._fill_lag(states)
        latency = pb.Latency(intra_az_ms=self.config.latency.intra_az_ms,
                             cross_az_ms=self.config.latency.cross_az_ms,
                             extra_az_ms=self.config.latency.extra_az_ms,
                             extra_node_ms=self.config.latency.extra_node_ms)
        return pb.ClusterState(
            data_dir=self.dd.root, control_address=self.address, control_pid=os.getpid(),
            cluster_endpoint=self.procs[self.writer].address, writer=self.writer,
            volume=self.config.volume, processes=list(states.values()), latency=latency,
            all_up=all(p.state == "up" for p in self.procs.values()),
            failovers=self.failovers, failing_over=self.failing_over,
            last_failover=self.last_failover)

    async def _probe(self, p: Managed, state: pb.ProcessState, timeout_s: float) -> None:
        try:
            if p.role == "storage":
                reply = await storage_pb2_grpc.StorageStub(self._channel(p)).NodeStatus(
                    storage_pb2.NodeStatusRequest(), timeout=timeout_s)
                state.bytes_received = reply.bytes_received
                state.records_received = reply.records_received
                for seg in reply.segments:
                    if seg.volume in ("", self.config.volume):
                        state.segments.append(pb.SegmentScl(pg=seg.pg, scl=seg.scl, max_lsn=seg.max_lsn))
            else:
                reply = await database_pb2_grpc.DatabaseStub(self._channel(p)).Status(
                    database_pb2.StatusRequest(), timeout=timeout_s)
                state.vdl = reply.vdl
                state.volume_epoch = reply.volume_epoch
                state.status_json = reply.json
                state.reported_role = reply.role
                try:
                    status = json.loads(reply.json)
                    driver = status.get("driver", {})
                    state.waiting_commits = int(driver.get("waiting_commits", 0))
                    replica = status.get("replica")
                    if replica:   # lag as the replica measures it (engine/instance/replica.py)
                        state.following = str(replica.get("writer_address", ""))
                        state.lag_lsn = int(replica.get("lag_lsn", 0))
                        state.lag_ms = float(replica.get("lag_ms_last", 0.0))
                        state.lag_ms_p50 = float(replica.get("lag_ms_p50", 0.0))
                        state.lag_ms_p99 = float(replica.get("lag_ms_p99", 0.0))
                except (ValueError, AttributeError, TypeError):
                    pass
        except grpc.RpcError as exc:
            state.probe_error = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # a malformed reply must not break status
            state.probe_error = repr(exc)

    def _fill_lag(self, states: dict[str, pb.ProcessState]) -> None:
        """lag_lsn: how far each segment is behind the best SCL of its PG (or the
        writer's PGCL), maximised over the node's segments."""
        best: dict[int, int] = {}
        for s in states.values():
            for seg in s.segments:
                best[seg.pg] = max(best.get(seg.pg, 0), seg.scl)
        writer = states.get(self.writer)
        if writer is not None and writer.status_json:
            try:
                pgcl = json.loads(writer.status_json).get("driver", {}).get("pgcl", {})
                for pg, lsn in pgcl.items():
                    best[int(pg)] = max(best.get(int(pg), 0), int(lsn))
            except (ValueError, AttributeError, TypeError):
                pass
        for s in states.values():
            if s.role == "storage" and s.segments:
                s.lag_lsn = max(max(0, best.get(seg.pg, 0) - seg.scl) for seg in s.segments)

    async def stop_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close_channels(self) -> None:
        for p in self.procs.values():
            if p.channel is not None:
                await p.channel.close()
                p.channel = None


class ControlService(pb_grpc.ControlServicer):
    """gRPC face of ControlPlane (proto/aurora_pb/control.proto)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def GetState(self, request, context):
        timeout_s = (request.probe_timeout_ms or PROBE_TIMEOUT_S * 1000) / 1000.0
        return await self.cp.collect(timeout_s, probes=not request.skip_probes)

    async def ProcessAction(self, request, context):
        message = await self._call(context, self.cp.action, request.name, request.action, request.wait_s)
        state = await self.cp.collect(probes=False)
        return pb.ActionReply(message=message,
                              processes=[s for s in state.processes if s.name == request.name])

    async def AzAction(self, request, context):
        try:
            message = await self.cp.az_action(request.az, request.action, request.wait_s)
        except ActionError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        state = await self.cp.collect(probes=False)
        return pb.ActionReply(message=message,
                              processes=[s for s in state.processes
                                         if s.role == "storage" and s.az == request.az])

    async def SetNetworkDelay(self, request, context):
        try:
            message = self.cp.set_network_delay(request.az, request.ms, request.clear, request.node)
        except ActionError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        lat = self.cp.config.latency
        return pb.NetworkReply(message=message, latency=pb.Latency(
            intra_az_ms=lat.intra_az_ms, cross_az_ms=lat.cross_az_ms, extra_az_ms=lat.extra_az_ms,
            extra_node_ms=lat.extra_node_ms))

    async def _call(self, context, fn, *args):
        """Run an action; its refusals become the documented gRPC codes."""
        try:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except NotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except PreconditionError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ActionError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Failover(self, request, context):
        return await self._call(context, self.cp.failover, request.target)

    async def AddReplica(self, request, context):
        tier = request.tier if request.HasField("tier") else None
        name, message = await self._call(context, self.cp.add_replica, tier, request.az, request.wait_s)
        state = await self.cp.collect(probes=False)
        return pb.ActionReply(message=message, processes=[s for s in state.processes if s.name == name])

    async def RemoveReplica(self, request, context):
        message = await self._call(context, self.cp.remove_replica, request.name)
        return pb.ActionReply(message=message)

    async def ResolveEndpoint(self, request, context):
        return await self._call(context, self.cp.resolve, request.endpoint or "cluster")

    async def CreateEndpoint(self, request, context):
        return await self._call(context, self.cp.create_endpoint, request.name, list(request.members))

    async def DeleteEndpoint(self, request, context):
        return await self._call(context, self.cp.delete_endpoint, request.name)

    async def ListEndpoints(self, request, context):
        return await self._call(context, self.cp.list_endpoints)

    async def Shutdown(self, request, context):
        if self.cp.stopping:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "already shutting down")
        reports = await self.cp.shutdown(request.grace_s or STOP_GRACE_S)
        # Exit only after this reply is on its way.
        asyncio.get_running_loop().call_later(0.3, self.cp.stopped.set)
        return pb.ShutdownReply(reports=reports)


# --- The process -----------------------------------------------------------------------


def _take_lock(dd: DataDir):
    fd = os.open(dd.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _stop_leftovers(dd: DataDir) -> None:
    """Processes of a previous control plane of this data dir that died without them."""
    info = read_control(dd)
    if not info:
        return
    pids = {n: p for n, p in cluster_pids(info).items()
            if p != os.getpid() and pid_belongs(p, dd.root)}
    if pids:
        log.warning("stopping processes left over by a previous control plane: %s",
                    ", ".join(f"{n} (pid {p})" for n, p in pids.items()))
        for line in stop_pids(pids, dd.root):
            log.warning("leftover %s", line)


async def serve(args) -> int:
    dd = DataDir(resolve_data_dir(args.data_dir))
    dd.make()
    lock_fd = _take_lock(dd)
    if lock_fd is None:
        log.error("another control plane is running for %s (see control.json)", dd.root)
        return 1
    _stop_leftovers(dd)
    try:
        topology = load_topology(dd, getattr(args, "replicas", None))
        plan = plan_cluster(dd, base_port=args.base_port, intra_az_ms=args.intra_az_ms,
                            cross_az_ms=args.cross_az_ms, host=args.host, instances=topology.names)
    except ValueError as exc:
        log.error("cannot plan the cluster: %s", exc)
        return 1
    plan.config.save(dd.cluster_json)   # before any process starts
    topology.save(dd)
    cp = ControlPlane(dd, plan, topology, host=args.host, log_level=args.log_level,
                      failover_after_s=getattr(args, "failover_after_s", None) or FAILOVER_AFTER_S)
    log.info("instances: %s; writer %s", ", ".join(
        f"{i.name} ({i.az}, tier {i.tier})" for i in topology.instances), topology.writer)

    server = grpc.aio.server()
    pb_grpc.add_ControlServicer_to_server(ControlService(cp), server)
    port = server.add_insecure_port(f"{args.host}:{plan.control_port}")
    if not port:
        log.error("cannot bind the control plane to %s:%d", args.host, plan.control_port)
        return 1
    await server.start()
    cp.address = f"{args.host}:{port}"
    cp.write_control()
    log.info("control plane for %s serving on %s (pid %d)", dd.root, cp.address, os.getpid())

    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if cp.stopping:
            return
        log.info("%s received: shutting the cluster down", signal.Signals(signum).name)

        async def stop() -> None:
            await cp.shutdown()
            cp.stopped.set()
        loop.create_task(stop())

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)

    supervisor = loop.create_task(cp.supervise())
    watchdog = loop.create_task(cp.watch_writer())
    reconciler = loop.create_task(cp.reconcile())
    boot = loop.create_task(cp.boot())
    await cp.stopped.wait()
    for task in (boot, supervisor, watchdog, reconciler):
        task.cancel()
    await cp.stop_tasks()
    # Nothing may outlive the control plane (a crash in shutdown included).
    leftovers = {p.name: p.pid for p in cp.procs.values() if p.alive}
    if leftovers:
        for line in stop_pids(leftovers, dd.root, grace_s=1.0):
            log.warning("at exit: %s", line)
    cp.write_control()
    await server.stop(grace=0.5)
    await cp.close_channels()
    os.close(lock_fd)
    log.info("control plane stopped")
    return 0


def main(args) -> int:
    return asyncio.run(serve(args))
