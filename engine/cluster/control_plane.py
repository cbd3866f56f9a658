"""The control plane: launches, supervises and breaks (on request) one local cluster.

This module puts the control plane together and runs it as a process; each concern has
its own module in engine/cluster/:

- state.py: the managed processes, the topology, control.json, and what `status` shows;
- supervision.py: launching, watching and stopping processes, faults on demand,
  `replica add|remove`, shutdown;
- failover.py: automatic and planned failover by promotion tier, and reconcile;
- endpoints.py: cluster, reader, instance and custom endpoints;
- membership.py: self-healing: failed and wiped segments, membership changes of the PGs
  (docs/membership.md);
- service.py: the Control gRPC service, a thin layer over ``ControlPlane``;
- serverless.py: the scaling loop: serverless capacity and replica auto scaling
  (its decisions are scaling.py's pure functions);
- dashboard.py (and dashboard_page.py): the live web page, its fault buttons and the
  control plane's Prometheus metrics, on its HTTP port;
- rpc.py: the calls the control plane makes to its processes (health, status, Promote,
  Follow);
- launcher.py and ports.py: the data dir, the port plan, spawning and stopping processes.

`aurora-lite control-plane --data-dir DIR` is started by `aurora-lite up` as a fresh
process in its own session. It

1. takes DIR/control.lock (one control plane per data dir) and stops any process a
   previous control plane of DIR left behind (it was killed, its children were not);
2. plans the ports and writes DIR/cluster.json before anything starts
   (engine/cluster/launcher.py);
3. serves the Control gRPC service (proto/aurora_pb/control.proto) and the dashboard
   (engine/cluster/dashboard.py, http://127.0.0.1:PORT/, read-only with
   --dashboard-read-only), and writes DIR/control.json with their addresses and its pid;
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
import logging
import os
import signal

from engine.cluster.dashboard import Dashboard
from engine.cluster.endpoints import Endpoints
from engine.cluster.failover import Failover
from engine.cluster.membership import Membership
from engine.cluster.launcher import (
    CONTROL_NAME, DataDir, cluster_pids, load_topology, pid_belongs, plan_cluster, read_control,
    resolve_data_dir, stop_pids)
from engine.cluster.pg_proxy import PgForwarder
from engine.cluster.service import start_server
from engine.cluster.state import FAILOVER_AFTER_S, ActionError, NotFoundError, PreconditionError
from engine.cluster.serverless import Scaling
from engine.cluster.supervision import Supervision

__all__ = ["ControlPlane", "ActionError", "NotFoundError", "PreconditionError", "serve", "main"]

log = logging.getLogger("aurora_lite.control_plane")


class ControlPlane(Supervision, Failover, Endpoints, Scaling, Membership):
    """Supervisor state and actions (state.py, supervision.py, failover.py, endpoints.py,
    serverless.py, membership.py);
    engine/cluster/service.py's ControlService is its service face."""

    async def close_channels(self) -> None:
        await self.rpc.close_all()


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
                            cross_az_ms=args.cross_az_ms, host=args.host, instances=topology.names,
                            storage_nodes=getattr(args, "storage_nodes", None),
                            pg_size_mb=getattr(args, "pg_size_mb", None),
                            max_pgs=getattr(args, "max_pgs", None),
                            stripe_width=getattr(args, "stripe_width", None))
        if getattr(args, "serverless", False):
            _make_serverless(topology, args.min_acu, args.max_acu)
    except ValueError as exc:
        log.error("cannot plan the cluster: %s", exc)
        return 1
    plan.config.save(dd.cluster_json)   # before any process starts
    topology.save(dd)
    from engine.transport.grpc_transport import GrpcTransport   # the process entry point
    if getattr(args, "segment_failed_after_s", None) is not None:
        os.environ["AURORA_SEGMENT_FAILED_AFTER_S"] = str(args.segment_failed_after_s)
    cp = ControlPlane(dd, plan, topology, host=args.host, log_level=args.log_level,
                      failover_after_s=getattr(args, "failover_after_s", None) or FAILOVER_AFTER_S,
                      transport=GrpcTransport("control"))
    cp.init_scaling(scale_down_delay_s=getattr(args, "scale_down_delay", None),
                    scale_down_interval_s=getattr(args, "scale_down_interval", None),
                    pause_after_s=getattr(args, "pause_after", None))
    log.info("instances: %s; writer %s", ", ".join(
        f"{i.name} ({i.az}, tier {i.tier})" for i in topology.instances), topology.writer)

    server = await start_server(cp, args.host, plan.control_port, cp.transport)
    if server is None:
        log.error("cannot bind the control plane to %s:%d", args.host, plan.control_port)
        return 1
    cp.address = f"{args.host}:{server.port}"
    dashboard = Dashboard(cp, read_only=getattr(args, "dashboard_read_only", False))
    try:
        cp.dashboard_port = await dashboard.start(args.host, plan.metrics_ports.get(CONTROL_NAME, 0))
        log.info("dashboard on %s%s", cp.dashboard_url,
                 " (read-only)" if dashboard.read_only else "")
    except OSError as exc:
        log.warning("no dashboard: cannot listen on %s:%d: %s", args.host,
                    plan.metrics_ports.get(CONTROL_NAME, 0), exc)
    forwarders = []
    for endpoint in ("cluster", "reader"):   # PostgreSQL endpoints (engine/cluster/pg_proxy.py)
        forwarder = PgForwarder(endpoint, lambda e=endpoint: cp.pg_targets(e))
        try:
            cp.pg_ports[endpoint] = await forwarder.start(args.host, cp.pg_ports.get(endpoint, 0))
        except OSError as exc:
            log.warning("PostgreSQL %s endpoint: cannot listen (%s); picking a free port", endpoint, exc)
            cp.pg_ports[endpoint] = await forwarder.start(args.host, 0)
        forwarders.append(forwarder)
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
    healer = loop.create_task(cp.heal())
    boot = loop.create_task(cp.boot())
    scaler = loop.create_task(cp.scale())
    await cp.stopped.wait()
    for task in (boot, supervisor, watchdog, reconciler, scaler, healer):
        task.cancel()
    for forwarder in forwarders:
        forwarder.close()
    await cp.stop_tasks()
    # Nothing may outlive the control plane (a crash in shutdown included).
    leftovers = {p.name: p.pid for p in cp.procs.values() if p.alive}
    if leftovers:
        for line in stop_pids(leftovers, dd.root, grace_s=1.0):
            log.warning("at exit: %s", line)
    await dashboard.close()
    cp.write_control()
    await server.stop(0.5)
    await cp.close_channels()
    os.close(lock_fd)
    log.info("control plane stopped")
    return 0


def _make_serverless(topology, min_acu: float, max_acu: float) -> None:
    """`up --serverless --min-acu A --max-acu B`: every instance serverless in A..B
    (docs/serverless.md); raises ValueError on a bad range."""
    from engine.cluster.scaling import CapacityPolicy
    from engine.instance.capacity import check_acu
    min_acu = check_acu(min_acu, "--min-acu", allow_zero=True)
    max_acu = check_acu(max_acu, "--max-acu")
    CapacityPolicy(min_acu, max_acu).check()
    for spec in topology.instances:
        spec.min_acu, spec.max_acu = min_acu, max_acu


def main(args) -> int:
    return asyncio.run(serve(args))
