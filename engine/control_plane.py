"""The control plane: launches, supervises and breaks (on request) one local cluster.

`aurora-lite control-plane --data-dir DIR` is started by `aurora-lite up` as a fresh
process in its own session. It

1. takes DIR/control.lock (one control plane per data dir) and stops any process a
   previous control plane of DIR left behind (it was killed, its children were not);
2. plans the ports and writes DIR/cluster.json before anything starts
   (engine/launcher.py);
3. serves the Control gRPC service (proto/aurora_pb/control.proto) and writes
   DIR/control.json with its address and pid;
4. launches the six storage nodes, waits until they are SERVING (gRPC health), then the
   writer db1, which runs recovery and serves the cluster endpoint;
5. supervises: every TICK_S it reaps exited processes and marks them down (a process it
   was not asked to stop is logged as a WARNING), and health-checks the ones starting.

It never restarts a process by itself: labs kill nodes on purpose. A writer that dies is
reported down and handed to ``ControlPlane.on_writer_down``, the hook where failover to a
replica goes (a later step).

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
from engine.cluster_config import ClusterConfig
from engine.launcher import (
    HOST, INSTANCES, STOP_GRACE_S, STORAGE_NODES, DataDir, Plan, base_command, cluster_pids,
    describe_exit, pid_belongs, plan_cluster, read_control, resolve_data_dir, spawn,
    stop_pids, write_json_atomic)
from engine.volume import AZS

log = logging.getLogger("aurora_lite.control_plane")

TICK_S = 0.2                 # supervision period
HEALTH_TIMEOUT_S = 0.5       # one health check
PROBE_TIMEOUT_S = 1.0        # one status query (GetState)
START_WAIT_S = 60.0          # `node start` waits this long for SERVING
BOOT_STORAGE_WAIT_S = 30.0   # at boot, wait for the storage nodes before the writer
KILL_WAIT_S = 5.0            # after SIGKILL, wait for the exit this long
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]

ACTIONS = ("kill", "stop", "start", "pause", "resume")
AZ_ACTIONS = ("down", "up")


class ActionError(Exception):
    """A request the control plane refuses (unknown name, shutting down, ...)."""


@dataclass
class Managed:
    """One process the control plane launches and watches."""

    name: str
    role: str                      # "storage" | "writer"
    az: str
    address: str
    argv: list[str]
    log_path: str
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

    def __init__(self, dd: DataDir, plan: Plan, *, host: str = HOST, log_level: str = "INFO") -> None:
        self.dd = dd
        self.config = plan.config
        self.host = host
        self.address = ""
        self.stopping = False
        self.stopped = asyncio.Event()
        self.procs: dict[str, Managed] = {}
        base = base_command() + ["--log-level", log_level]
        for inst, az, role in INSTANCES:
            port = plan.instance_ports[inst]
            self.procs[inst] = Managed(
                inst, role, az, f"{host}:{port}",
                base + ["writer", "--cluster", dd.cluster_json, "--instance", inst, "--az", az,
                        "--host", host, "--port", str(port)],
                dd.log(inst))
        for node in self.config.storage_nodes:
            peers = [n.address for n in self.config.storage_nodes if n.name != node.name]
            self.procs[node.name] = Managed(
                node.name, "storage", node.az, node.address,
                base + ["storage-node", "--node-id", node.name, "--az", node.az,
                        "--host", host, "--port", node.address.rsplit(":", 1)[1],
                        "--data-dir", dd.node_dir(node.name), "--peers", ",".join(peers),
                        "--cluster-config", dd.cluster_json],
                dd.log(node.name))
        self.writer = next(n for n, _, r in INSTANCES if r == "writer")

    # --- Bookkeeping --------------------------------------------------------------------

    @property
    def storage(self) -> list[Managed]:
        return [p for p in self.procs.values() if p.role == "storage"]

    @property
    def instances(self) -> list[Managed]:
        return [p for p in self.procs.values() if p.role != "storage"]

    def get(self, name: str) -> Managed:
        try:
            return self.procs[name]
        except KeyError:
            raise ActionError(f"no process named {name!r} (known: {', '.join(self.procs)})") from None

    def write_control(self) -> None:
        """DIR/control.json: everything a CLI verb needs to find this cluster."""
        write_json_atomic(self.dd.control_json, {
            "running": not self.stopped.is_set(),
            "data_dir": self.dd.root,
            "control": {"address": self.address, "pid": os.getpid()},
            "cluster_endpoint": self.procs[self.writer].address,
            "writer": self.writer,
            "volume": self.config.volume,
            "processes": {p.name: {"role": p.role, "az": p.az, "address": p.address,
                                   "pid": p.pid, "state": p.state, "log": p.log_path}
                          for p in self.procs.values()},
        })

    def _channel(self, p: Managed) -> grpc.aio.Channel:
        if p.channel is None:
            p.channel = grpc.aio.insecure_channel(p.address, options=CHANNEL_OPTIONS)
        return p.channel

    # --- Launch and supervise ---------------------------------------------------------

    def launch(self, p: Managed) -> None:
        assert not p.alive, f"{p.name} is already running"
        p.popen = spawn(p.argv, p.log_path)
        p.state = "starting"
        p.exit_reason = ""
        p.started_at = time.monotonic()
        p.starts += 1
        p.intentional = False
        log.info("launched %s (%s, %s) pid %d, port %s", p.name, p.role, p.az, p.pid,
                 p.address.rsplit(":", 1)[1])
        self.write_control()

    async def boot(self) -> None:
        """Storage nodes first; the writer once they serve (its recovery needs them)."""
        for p in self.storage:
            self.launch(p)
        deadline = time.monotonic() + BOOT_STORAGE_WAIT_S
        while time.monotonic() < deadline and not self.stopping:
            if all(p.state in ("up", "down") for p in self.storage):
                break
            await asyncio.sleep(TICK_S / 2)
        if self.stopping:
            return
        not_up = [p.name for p in self.storage if p.state != "up"]
        if not_up:
            log.warning("storage nodes not serving at boot: %s; starting the writer anyway",
                        ", ".join(not_up))
        for p in self.instances:
            if not self.stopping:
                self.launch(p)

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
            if p.role == "writer" and not self.stopping:
                self.on_writer_down(p)

    def on_writer_down(self, p: Managed) -> None:
        """Hook: the writer died without being asked to.

        Step 5 (replicas and failover) goes here: pick the replica with the best promotion
        tier, tell it to promote (it runs recovery under a new epoch, invariant 10), point
        ``self.writer`` and control.json's cluster_endpoint at it. Until then the writer
        stays down until `aurora-lite node start db1`.
        """
        log.warning("writer %s is down and no replica can take over yet; "
                    "`aurora-lite node start %s` restarts it (recovery runs on start)", p.name, p.name)

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

    def set_network_delay(self, az: str, ms: float, clear: bool) -> str:
        """Rewrite cluster.json's latency.extra_az_ms; readers reload it by mtime."""
        self._check_running()
        config = ClusterConfig.load(self.dd.cluster_json)
        if clear:
            config.latency.extra_az_ms = {}
            message = "extra network delays cleared"
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
            starts=p.starts, log=p.log_path)

    async def collect(self, probe_timeout_s: float = PROBE_TIMEOUT_S, probes: bool = True) -> pb.ClusterState:
        states = {name: self._base_state(p) for name, p in self.procs.items()}
        if probes:
            live = [p for p in self.procs.values() if p.state == "up"]
            await asyncio.gather(*(self._probe(p, states[p.name], probe_timeout_s) for p in live))
            self._fill_lag(states)
        latency = pb.Latency(intra_az_ms=self.config.latency.intra_az_ms,
                             cross_az_ms=self.config.latency.cross_az_ms,
                             extra_az_ms=self.config.latency.extra_az_ms)
        return pb.ClusterState(
            data_dir=self.dd.root, control_address=self.address, control_pid=os.getpid(),
            cluster_endpoint=self.procs[self.writer].address, writer=self.writer,
            volume=self.config.volume, processes=list(states.values()), latency=latency,
            all_up=all(p.state == "up" for p in self.procs.values()))

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
                try:
                    driver = json.loads(reply.json).get("driver", {})
                    state.waiting_commits = int(driver.get("waiting_commits", 0))
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
        try:
            message = await self.cp.action(request.name, request.action, request.wait_s)
        except ActionError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
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
            message = self.cp.set_network_delay(request.az, request.ms, request.clear)
        except ActionError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        lat = self.cp.config.latency
        return pb.NetworkReply(message=message, latency=pb.Latency(
            intra_az_ms=lat.intra_az_ms, cross_az_ms=lat.cross_az_ms, extra_az_ms=lat.extra_az_ms))

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
        plan = plan_cluster(dd, base_port=args.base_port, intra_az_ms=args.intra_az_ms,
                            cross_az_ms=args.cross_az_ms, host=args.host)
    except ValueError as exc:
        log.error("cannot plan the cluster: %s", exc)
        return 1
    plan.config.save(dd.cluster_json)   # before any process starts
    cp = ControlPlane(dd, plan, host=args.host, log_level=args.log_level)

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
    boot = loop.create_task(cp.boot())
    await cp.stopped.wait()
    boot.cancel()
    supervisor.cancel()
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
