"""The control plane's state: the processes it manages, the topology, and what `status` shows.

``ClusterState`` is the base the control plane's concerns build on
(engine/cluster/supervision.py, failover.py, endpoints.py; put together in
control_plane.py). It holds

- one ``Managed`` per process (six storage nodes, the instances of topology.json), with
  its role as the control plane assigns it and its process state (see control_plane.py's
  module doc for the transitions);
- the topology (which instance is the writer, tiers, custom endpoints) and the two files
  that follow it: DIR/topology.json (``save_topology``) and DIR/control.json
  (``write_control``, everything a CLI verb needs to find the cluster);
- the failover bookkeeping that the supervisor, the watchdog and the endpoints read
  (``failing_over``, ``failovers``, ``last_failover``, ``failover_lock``);
- ``collect``: the ClusterState message of `aurora-lite status` (control.proto), with each
  live process probed for its SCLs (storage) or VDL, epoch and replica lag (instances),
  and each storage node's lag behind the best SCL of its PGs.

No grpc here: probes go through engine/cluster/rpc.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field

from aurora_pb import control_pb2 as pb
from engine.cluster.launcher import (
    HOST, DataDir, InstanceSpec, Plan, Topology, base_command, http_url,
    write_json_atomic)
from engine.cluster.rpc import ProcessRpc
from engine.errors import RpcError
from engine.format.page import PAGE_SIZE
from engine.transport import Transport

log = logging.getLogger("aurora_lite.control_plane")

TICK_S = 0.2                 # supervision period
HEALTH_TIMEOUT_S = 0.5       # one health check
PROBE_TIMEOUT_S = 1.0        # one status query (GetState)
START_WAIT_S = 60.0          # `node start` waits this long for SERVING
FAILOVER_AFTER_S = 1.5       # a failover starts after the writer's health check failed this long
EVENTS_MAX = 200             # timeline entries kept for the dashboard


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
    log_path: str
    tier: int = 0                  # instances: promotion tier, lower promoted first
    metrics_port: int = 0          # its /metrics HTTP port (0: none)
    pg_port: int = 0               # instances: PostgreSQL port (docs/postgres.md)
    popen: subprocess.Popen | None = None
    state: str = "down"
    exit_reason: str = "not started"
    started_at: float = 0.0        # time.monotonic() of the last launch
    starts: int = 0
    intentional: bool = False      # its next exit was asked for (kill/stop/shutdown)
    probing: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def pid(self) -> int:
        if self.popen is not None and self.popen.returncode is None:
            return self.popen.pid
        return 0

    @property
    def alive(self) -> bool:
        return self.pid != 0

    @property
    def port(self) -> str:
        return self.address.rsplit(":", 1)[1]


class ClusterState:
    """The processes, the topology and the files that publish them (see the module doc)."""

    def __init__(self, dd: DataDir, plan: Plan, topology: Topology, *, host: str = HOST,
                 log_level: str = "INFO", failover_after_s: float = FAILOVER_AFTER_S,
                 transport: Transport) -> None:
        self.dd = dd
        self.transport = transport
        self.config = plan.config
        self.topology = topology
        self.host = host
        self.address = ""
        self.stopping = False
        self.stopped = asyncio.Event()
        self.procs: dict[str, Managed] = {}
        self.rpc = ProcessRpc(transport)
        self.base_argv = base_command() + ["--log-level", log_level]
        self.failover_after_s = failover_after_s
        self.metrics_ports = dict(plan.metrics_ports)
        self.pg_ports = dict(plan.pg_ports)     # "cluster", "reader", dbN -> port
        for spec in topology.instances:
            self._add_instance(spec, plan.instance_ports[spec.name],
                               self.metrics_ports.get(spec.name, 0))
        for node in self.config.storage_nodes:
            self.procs[node.name] = Managed(node.name, "storage", node.az, node.address,
                                            dd.log(node.name),
                                            metrics_port=self.metrics_ports.get(node.name, 0))
        self.dashboard_port = 0        # set once the dashboard serves (engine/cluster/dashboard.py)
        self.restarts = 0              # launches of a process that ran before: repairs
        self.volumes_seen: set[str] = set()   # volumes storage reports (clones show up here)
        #: What the dashboard's timeline shows: (unix time, kind, text), newest last.
        self.events: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=EVENTS_MAX)
        self.writer = topology.writer
        # Failover bookkeeping.
        self.failover_lock = asyncio.Lock()
        self.failing_over = False
        self.failovers = 0
        self.last_failover = ""
        self._writer_ok_at = time.monotonic()   # last passing health check of the writer
        self._tasks: set[asyncio.Task] = set()

    def _add_instance(self, spec: InstanceSpec, port: int, metrics_port: int = 0) -> Managed:
        p = Managed(spec.name, "writer" if spec.name == self.topology.writer else "replica",
                    spec.az, f"{self.host}:{port}", self.dd.log(spec.name), tier=spec.tier,
                    metrics_port=metrics_port)
        p.pg_port = self.pg_ports.get(spec.name, 0)
        if not p.pg_port:
            from engine.cluster.ports import free_ports
            p.pg_port = self.pg_ports[spec.name] = free_ports(1, self.host)[0]
        self.procs[spec.name] = p
        return p

    def postgres(self) -> dict:
        """The PostgreSQL addresses (`status --json`'s "postgres", control.json)."""
        return {"cluster": f"{self.host}:{self.pg_ports.get('cluster', 0)}",
                "reader": f"{self.host}:{self.pg_ports.get('reader', 0)}",
                "instances": {p.name: f"{self.host}:{p.pg_port}" for p in self.instances}}

    def pg_targets(self, endpoint: str) -> list[tuple[str, int]]:
        """Where a new PostgreSQL connection to ``endpoint`` goes now (engine/cluster/pg_proxy.py)."""
        writer = self.procs[self.writer]
        if endpoint == "cluster":
            chosen = [writer]
        else:
            chosen = [p for p in self.replicas if p.state == "up" and p.alive] or [writer]
        return [(self.host, p.pg_port) for p in chosen if p.pg_port]

    def _spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def event(self, kind: str, text: str) -> None:
        """One entry of the dashboard's timeline (failover, epoch, restart, ...)."""
        self.events.append((time.time(), kind, text))

    def metrics_url(self, p: Managed) -> str:
        return http_url(self.host, p.metrics_port, "/metrics")

    @property
    def dashboard_url(self) -> str:
        return http_url(self.host, self.dashboard_port, "/")

    def _check_running(self) -> None:
        if self.stopping:
            raise ActionError("the cluster is shutting down")

    def on_writer_down(self, p: Managed, reason: str) -> None:
        """The writer is gone or silent: engine/cluster/failover.py decides what follows."""
        raise NotImplementedError

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

    def candidates(self, exclude=()) -> list[Managed]:
        """Replicas that can be promoted now: running, serving, best tier first."""
        live = [p for p in self.replicas if p.state == "up" and p.alive and p.name not in exclude]
        return sorted(live, key=lambda p: (p.tier, p.name))

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
            "dashboard": self.dashboard_url,
            "postgres": self.postgres(),
            "processes": {p.name: {"role": p.role, "az": p.az, "address": p.address,
                                   "pid": p.pid, "state": p.state, "log": p.log_path,
                                   "metrics": self.metrics_url(p),
                                   **({"tier": p.tier} if p.role != "storage" else {})}
                          for p in self.procs.values()},
        })

    # --- What `status` shows ------------------------------------------------------------

    def _base_state(self, p: Managed) -> pb.ProcessState:
        return pb.ProcessState(
            name=p.name, role=p.role, az=p.az, address=p.address, pid=p.pid, state=p.state,
            up=p.state == "up", exit_reason=p.exit_reason if p.state == "down" else "",
            uptime_s=round(time.monotonic() - p.started_at, 1) if p.alive else 0.0,
            starts=p.starts, log=p.log_path, tier=p.tier, metrics=self.metrics_url(p))

    def latency_message(self) -> pb.Latency:
        lat = self.config.latency
        return pb.Latency(intra_az_ms=lat.intra_az_ms, cross_az_ms=lat.cross_az_ms,
                          extra_az_ms=lat.extra_az_ms, extra_node_ms=lat.extra_node_ms)

    async def collect(self, probe_timeout_s: float = PROBE_TIMEOUT_S, probes: bool = True) -> pb.ClusterState:
        states = {name: self._base_state(p) for name, p in self.procs.items()}
        if probes:
            live = [p for p in self.procs.values() if p.state == "up"]
            await asyncio.gather(*(self._probe(p, states[p.name], probe_timeout_s) for p in live))
            self._fill_lag(states)
        pgs, volume_bytes = self.placement_state(states) if probes else ([], 0)
        return pb.ClusterState(
            pgs=pgs, volume_bytes=volume_bytes, volume_pg_count=len(pgs),
            data_dir=self.dd.root, control_address=self.address, control_pid=os.getpid(),
            cluster_endpoint=self.procs[self.writer].address, writer=self.writer,
            volume=self.config.volume, processes=list(states.values()),
            latency=self.latency_message(),
            all_up=all(p.state == "up" for p in self.procs.values()),
            failovers=self.failovers, failing_over=self.failing_over,
            last_failover=self.last_failover, dashboard=self.dashboard_url,
            control_metrics=http_url(self.host, self.dashboard_port, "/metrics"),
            restarts=self.restarts)

    async def _probe(self, p: Managed, state: pb.ProcessState, timeout_s: float) -> None:
        try:
            if p.role == "storage":
                reply = await self.rpc.node_status(p.name, p.address, timeout_s)
                self.volumes_seen.update(v.volume for v in reply.volumes if not v.dropped)
                state.bytes_received = reply.bytes_received
                state.records_received = reply.records_received
                for seg in reply.segments:
                    if seg.volume in ("", self.config.volume):
                        state.segments.append(pb.SegmentScl(pg=seg.pg, scl=seg.scl, max_lsn=seg.max_lsn))
            else:
                reply = await self.rpc.instance_status(p.name, p.address, timeout_s)
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
        except RpcError as exc:
            state.probe_error = str(exc)
        except Exception as exc:  # a malformed reply must not break status
            state.probe_error = repr(exc)

    def placement_state(self, states: dict[str, pb.ProcessState]) -> tuple[list, int]:
        """([PgState], volume bytes): each PG's members with their state and SCL.

        A member is healthy when its node is up and reported the segment in this probe,
        failed otherwise (down, unreachable, or the segment missing). Invariant 15: the
        placement is cluster.json's, which the launcher wrote for every PG.
        """
        azs = self.config.node_azs()
        pgs = []
        reported = {g.pg for s in states.values() for g in s.segments}
        for pg, membership in sorted(self.config.memberships().items()):
            if self.config.layout.grows and pg not in reported:
                continue   # growth: a PG not created yet (docs/fleet.md)
            members = []
            for node in membership.members:
                s = states.get(node)
                seg = next((g for g in s.segments if g.pg == pg), None) if s is not None else None
                healthy = s is not None and s.up and not s.probe_error and seg is not None
                members.append(pb.PgMember(node=node, az=azs.get(node, ""),
                                           state="healthy" if healthy else "failed",
                                           scl=seg.scl if seg is not None else 0))
            pgs.append(pb.PgState(pg=pg, membership_epoch=membership.epoch, members=members))
        volume_bytes = 0
        writer = states.get(self.writer)
        if writer is not None and writer.status_json:
            try:
                pages = int(json.loads(writer.status_json).get("database", {}).get("volume_pages", 0))
                volume_bytes = pages * PAGE_SIZE
            except (ValueError, AttributeError, TypeError):
                pass
        return pgs, volume_bytes

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
