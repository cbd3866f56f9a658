"""The lifecycle verbs of `aurora-lite`: up, down, status, logs, and the control-plane
process that `up` starts.

    aurora-lite up [--detach] [--replicas N] [--base-port N] ...   start a local cluster
    aurora-lite down                                               stop it, leave nothing
    aurora-lite status [--json]                                    every process, SCLs, VDL, lag
    aurora-lite logs NAME [-f] [-n N]                              a process's log
    aurora-lite control-plane --data-dir DIR                       (started by `up`)

`up` starts `aurora-lite control-plane` (engine/cluster/control_plane.py) as a fresh
process in its own session, waits until every process serves, prints the cluster block,
and (without --detach) stops the cluster in order on Ctrl-C. This module also renders
the cluster's state for `status`, `up` and the shell's `status`. Registered by
engine/cli/__init__.py (``register`` and ``register_logs``); docs/cli.md is the user's view.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from engine.cli.clones import stop_clone_writers
from engine.cli.common import (
    EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, CliError,
    control_call, data_dir_arg, data_dir_of, fail, get_state, guarded, latency_line,
    require_cluster, shown_data_dir_flag, table)
from engine.cluster.launcher import (
    MAX_REPLICAS, DataDir, base_command, cluster_pids, describe_exit, load_topology,
    pid_belongs, pid_running, read_control, read_json, running_control, spawn, stop_pids)

UP_TIMEOUT_S = 120.0
CONTROL_START_TIMEOUT_S = 20.0
SHUTDOWN_RPC_TIMEOUT_S = 120.0


# --- Rendering the cluster's state ------------------------------------------------------


def process_dict(p) -> dict:
    """One process as JSON-ready data; the same keys for every role (null if n/a)."""
    storage = p.role == "storage"
    replica = p.HasField("lag_ms")
    scl = {str(s.pg): s.scl for s in p.segments}
    return {
        "name": p.name, "role": p.role, "az": p.az, "address": p.address,
        "pid": p.pid or None, "state": p.state, "up": p.up,
        "exit_reason": p.exit_reason or None, "uptime_s": p.uptime_s, "starts": p.starts,
        "log": p.log, "metrics": p.metrics or None,
        "scl": scl if storage and p.up and not p.probe_error else None,
        "scl_min": min(scl.values()) if storage and scl else None,
        "scl_max": max(scl.values()) if storage and scl else None,
        "bytes_received": p.bytes_received if storage and p.up and not p.probe_error else None,
        "records_received": p.records_received if storage and p.up and not p.probe_error else None,
        "lag_lsn": p.lag_lsn if p.HasField("lag_lsn") else None,
        "vdl": p.vdl if p.HasField("vdl") else None,
        "volume_epoch": p.volume_epoch if p.HasField("vdl") else None,
        "waiting_commits": p.waiting_commits if p.HasField("vdl") else None,
        "tier": None if storage else p.tier,
        "reported_role": p.reported_role or None,
        "following": p.following or None,
        "lag_ms": round(p.lag_ms, 3) if replica else None,
        "lag_ms_p50": round(p.lag_ms_p50, 3) if replica else None,
        "lag_ms_p99": round(p.lag_ms_p99, 3) if replica else None,
        "probe_error": p.probe_error or None,
        # Capacity (docs/serverless.md): null for storage nodes and instances not probed.
        "acu": p.acu if p.HasField("acu") else None,
        "min_acu": p.min_acu if p.HasField("min_acu") else None,
        "max_acu": p.max_acu if p.HasField("max_acu") else None,
        "serverless": p.serverless if p.HasField("acu") else None,
        "cpu_pct": round(p.cpu_pct, 1) if p.HasField("cpu_pct") else None,
        "cpu_share_cores": p.cpu_share_cores if p.HasField("acu") else None,
        "buffer_pool_pages": p.buffer_pool_pages if p.HasField("acu") else None,
        "resident_pages": p.resident_pages if p.HasField("acu") else None,
        "admission_limit": (p.admission_limit or None) if p.HasField("acu") else None,
        "admission_queued": p.admission_queued if p.HasField("acu") else None,
        "draining": p.draining if not storage else None,
        "autopaused": p.autopaused if not storage else None,
        "last_resume_s": (p.last_resume_s or None) if not storage else None,
    }


def pgs_list(state) -> list[dict]:
    """The placement as `status --json` shows it: one object per PG (docs/fleet.md)."""
    return [{"pg": p.pg, "membership_epoch": p.membership_epoch,
             "transitional": p.transitional, "target_lsn": p.target_lsn,   # docs/membership.md
             "members": [{"node": m.node, "az": m.az, "state": m.state, "scl": m.scl}
                         for m in p.members]} for p in state.pgs]


def state_dict(state) -> dict:
    return {
        "data_dir": state.data_dir,
        "volume": {"name": state.volume, "bytes": state.volume_bytes,
                   "pg_count": state.volume_pg_count},
        "pgs": pgs_list(state),
        "control": {"address": state.control_address, "pid": state.control_pid,
                    "metrics": state.control_metrics or None},
        "dashboard": state.dashboard or None,
        "restarts": state.restarts,
        "cluster_endpoint": state.cluster_endpoint, "writer": state.writer,
        "reader_endpoint": reader_addresses(state),
        "all_up": state.all_up,
        "failovers": state.failovers, "failing_over": state.failing_over,
        "last_failover": state.last_failover or None,
        "latency": {"intra_az_ms": state.latency.intra_az_ms,
                    "cross_az_ms": state.latency.cross_az_ms,
                    "extra_az_ms": dict(state.latency.extra_az_ms),
                    "extra_node_ms": dict(state.latency.extra_node_ms)},
        "processes": [process_dict(p) for p in state.processes],
        "postgres": postgres_addresses(state.data_dir),
        "scaling": _scaling(state),
        "repairs": [{"node": r.node, "reason": r.reason, "done": r.done,
                     "seconds": round(r.seconds, 2), "hydrated_bytes": r.hydrated_bytes,
                     "hydration_mb_s": r.hydration_mb_s} for r in state.repairs],
    }


def _scaling(state) -> dict | None:
    try:
        return json.loads(state.scaling_json) if state.scaling_json else None
    except ValueError:
        return None


def capacity_lines(state) -> list[str]:
    """The instances' capacity (docs/serverless.md) and the autoscaling policy's last
    decisions, for `status`."""
    rows = [["INSTANCE", "KIND", "ACU", "MIN..MAX", "CPU / SHARE", "BUFFER POOL", "ADMISSION"]]
    for p in sorted(state.processes, key=lambda p: (len(p.name), p.name)):   # db2 before db10
        d = process_dict(p)
        if p.role == "storage" or d["acu"] is None:
            continue
        cpu = f"{d['cpu_pct']:.0f}% of {d['cpu_share_cores']:g} core" if d["cpu_pct"] is not None else "-"
        limit = d["admission_limit"]
        admission = (f"{limit} slots, {d['admission_queued']} queued" if limit else "no limit")
        kind = ("serverless" if d["serverless"] else "provisioned") + (" (draining)" if d["draining"] else "")
        if d["autopaused"]:
            rows.append([p.name, "serverless (paused)", "0", f"{d['min_acu']:g}..{d['max_acu']:g}",
                         "-", "-", "resumes on the next connection"])
            continue
        rows.append([p.name, kind, f"{d['acu']:g}", f"{d['min_acu']:g}..{d['max_acu']:g}", cpu,
                     f"{d['buffer_pool_pages']} pages ({d['resident_pages']} used)", admission])
    if len(rows) == 1:
        return []
    lines = ["", "capacity (1 ACU = 1024 buffer pool pages + 0.25 core, enforced by admission "
                 "limit; docs/serverless.md):", table(rows)]
    scaling = _scaling(state) or {}
    policy = scaling.get("autoscale")
    if policy:
        lines.append(f"replica auto scaling: {policy['min']}..{policy['max']} replicas, target CPU "
                     f"{policy['target_cpu_pct']:g}%, cooldowns {policy['scale_out_cooldown_s']:g}s out / "
                     f"{policy['scale_in_cooldown_s']:g}s in; now: {scaling.get('autoscale_last') or '-'}")
    decisions = scaling.get("decisions") or []
    if decisions:
        lines.append("last scaling decisions:")
        for e in decisions[-5:]:
            when = time.strftime("%H:%M:%S", time.localtime(e["unix_time"]))
            if e.get("instance") == "replicas":
                lines.append(f"  {when} replicas {e['from_replicas']} -> {e['replicas']}: {e['reason']}")
            else:
                lines.append(f"  {when} {e['instance']} {e['from_acu']:g} -> {e['acu']:g} ACU: {e['reason']}")
    return lines


def postgres_addresses(data_dir: str) -> dict | None:
    """The PostgreSQL addresses the control plane published in control.json
    (docs/postgres.md): {"cluster": ..., "reader": ..., "instances": {NAME: ...}}."""
    info = read_json(os.path.join(data_dir, "control.json")) or {}
    return info.get("postgres")


def reader_addresses(state) -> list[str]:
    """Where the reader endpoint leads: every replica that is up, else the writer."""
    up = [p.address for p in sorted(state.processes, key=lambda p: p.name)
          if p.role == "replica" and p.up]
    return up or [state.cluster_endpoint]


def _instance_order(p) -> tuple:
    """Instances first (by name), then the storage nodes."""
    return (p.role == "storage", p.name)


def _lag_text(d: dict) -> str:
    if d["lag_ms"] is not None:
        return f"{d['lag_ms']:.1f} ms, {d['lag_lsn']} LSN"
    return f"{d['lag_lsn']} LSN" if d["lag_lsn"] is not None else "-"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_placement(state) -> str:
    """One row per PG: its membership epoch and six members (node, state, SCL)."""
    rows = [["PG", "EPOCH", *[f"MEMBER {i + 1}" for i in range(6)]]]
    for p in state.pgs:
        rows.append([str(p.pg), str(p.membership_epoch),
                     *[f"{m.node} {m.state} {m.scl}" for m in p.members]])
    return table(rows)


def format_status(state) -> str:
    rows = [["NAME", "ROLE", "AZ", "TIER", "PID", "STATE", "ADDRESS", "SCL / VDL", "RECEIVED", "LAG"]]
    notes = []
    for p in sorted(state.processes, key=_instance_order):
        d = process_dict(p)
        if p.role == "storage":
            if d["scl"] is not None and d["scl_max"] is not None:
                position = f"SCL {d['scl_max']}"   # highest; the grid below has every PG
            else:
                position = "-"
            received = _bytes(d["bytes_received"]) if d["bytes_received"] is not None else "-"
        else:
            position = f"VDL {d['vdl']} (epoch {d['volume_epoch']})" if d["vdl"] is not None else "-"
            received = "-"
            if d["waiting_commits"]:
                notes.append(f"{p.name}: {d['waiting_commits']} commit(s) waiting for a write quorum")
            if p.up and p.reported_role and p.reported_role != p.role:
                notes.append(f"{p.name}: reports role {p.reported_role}; the control plane "
                             f"makes it a {p.role} of {state.writer}")
        state_text = p.state + (f" ({p.exit_reason})" if p.state == "down" and p.exit_reason else "")
        tier = "-" if p.role == "storage" else str(p.tier)
        rows.append([p.name, p.role, p.az, tier, str(p.pid or "-"), state_text, p.address,
                     position, received, _lag_text(d)])
        if p.probe_error:
            notes.append(f"{p.name}: status query failed: {p.probe_error}")
    lines = [f"cluster {state.data_dir} (volume {state.volume}; control plane "
             f"{state.control_address}, pid {state.control_pid})", "", table(rows), ""]
    lines += endpoint_lines(state)
    lines.append(f"network: {latency_line(state.latency)}")
    if state.failing_over:
        lines.append("failover: in progress")
    if state.failovers:
        lines.append(f"failovers: {state.failovers}; last: {state.last_failover}")
    lines += capacity_lines(state)
    grid = format_segments(state)
    if grid:
        lines += ["", "SCL of each segment (PG x storage node):", grid]
    if state.pgs:
        lines += ["", f"volume {state.volume}: {_bytes(state.volume_bytes)} in "
                      f"{state.volume_pg_count} PGs; placement (members: state SCL):",
                  format_placement(state)]
    lines += format_membership(state)
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def endpoint_lines(state) -> list[str]:
    names = {p.address: p.name for p in state.processes}
    readers = reader_addresses(state)
    return [f"cluster endpoint: {state.cluster_endpoint} ({state.writer}, the writer)",
            "reader endpoint: " + ", ".join(f"{a} ({names.get(a, '?')})" for a in readers)
            + ("" if any(names.get(a) != state.writer for a in readers) else " (no replica is up: the writer)")]


def postgres_lines(state) -> list[str]:
    pg = postgres_addresses(state.data_dir)
    if not pg:
        return []
    instances = ", ".join(f"{n} {a}" for n, a in sorted(pg.get("instances", {}).items()))
    return [f"postgres: cluster {pg['cluster']}, reader {pg['reader']} (instances: {instances}); "
            f"try: aurora-lite psql"]


def format_segments(state) -> str:
    nodes = sorted((p for p in state.processes if p.role == "storage"), key=lambda p: p.name)
    pgs = sorted({s.pg for p in nodes for s in p.segments})
    if not pgs:
        return ""
    rows = [["PG"] + [p.name for p in nodes]]
    for pg in pgs:
        row = [str(pg)]
        for p in nodes:
            scl = next((s.scl for s in p.segments if s.pg == pg), None)
            row.append(str(scl) if scl is not None and p.up else "-")
        rows.append(row)
    return table(rows, indent="  ")


def format_membership(state) -> list[str]:
    """PG membership (docs/membership.md): only when a segment is not healthy, or a PG is
    past its first epoch or a repair was made, so a fresh cluster's status stays short."""
    unusual = [g for g in state.pgs
               if g.transitional or any(m.state != "healthy" for m in g.members)]
    if not unusual and not state.repairs:
        return []
    lines = ["", "membership (PG: epoch, members not healthy):"]
    for g in state.pgs:
        sick = [f"{m.node} {m.state} (SCL {m.scl})" for m in g.members if m.state != "healthy"]
        phase = f"transitional, target {g.target_lsn}" if g.transitional else "stable"
        lines.append(f"  PG {g.pg}: epoch {g.membership_epoch}, {phase}"
                     + (": " + ", ".join(sick) if sick else ": six healthy segments"))
    for r in state.repairs:
        what = (f"done in {r.seconds:.1f} s" if r.done else f"running for {r.seconds:.1f} s")
        lines.append(f"repair of {r.node} ({r.reason}): {what}; hydrated "
                     f"{r.hydrated_bytes / 1e6:.2f} MB at {r.hydration_mb_s:.1f} MB/s")
    return lines


def format_up_block(state, args, detached: bool) -> str:
    rows = [["NAME", "ROLE", "AZ", "TIER", "VDL", "LAG", "ADDRESS", "PID"]]
    for p in sorted(state.processes, key=_instance_order):
        d = process_dict(p)
        role = "storage node" if p.role == "storage" else p.role
        tier = "-" if p.role == "storage" else str(p.tier)
        vdl = str(d["vdl"]) if d["vdl"] is not None else "-"
        lag = _lag_text(d) if p.role == "replica" else "-"
        rows.append([p.name, role, p.az, tier, vdl, lag, p.address, str(p.pid or "-")])
    rows.append(["control-plane", "control plane", "-", "-", "-", "-", state.control_address,
                 str(state.control_pid)])
    flag = shown_data_dir_flag(args)
    lines = [f"aurora-lite cluster is up (data dir {state.data_dir}, volume {state.volume})", "",
             table(rows, indent="  "), "",
             *endpoint_lines(state),
             *([f"dashboard: {state.dashboard}   (metrics: `aurora-lite status --json`)"]
               if state.dashboard else []),
             *postgres_lines(state),
             f"network: {latency_line(state.latency)}",
             f"logs: aurora-lite logs NAME [-f]{flag}   (files in {os.path.join(state.data_dir, 'logs')})",
             f"try: aurora-lite put hello world{flag}; aurora-lite get hello{flag}; aurora-lite status{flag}"]
    if detached:
        lines.append(f"stop: aurora-lite down{flag}")
    else:
        lines.append(f"stop: press Ctrl-C (or run `aurora-lite down{flag}` in another shell)")
    return "\n".join(lines)


# --- up / down / control-plane ------------------------------------------------------------


def cmd_control_plane(args) -> int:
    from engine.cluster.control_plane import main

    return main(args)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()[-20000:]
    except OSError:
        return "(no log)"
    return "\n".join("    " + l for l in data.decode(errors="replace").splitlines()[-lines:])


@guarded
def cmd_up(args) -> int:
    dd = data_dir_of(args)
    dd.make()
    info = running_control(dd)
    if info is not None:
        raise CliError(f"a cluster is already running in {dd.root} (control plane pid "
                       f"{info['control']['pid']}, endpoint {info.get('cluster_endpoint')}); "
                       f"`aurora-lite status{shown_data_dir_flag(args)}` shows it, "
                       f"`aurora-lite down{shown_data_dir_flag(args)}` stops it", EXIT_FAILED)
    try:
        load_topology(dd, args.replicas)   # refuse a --replicas that contradicts the data dir
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    check_serverless_args(args)
    argv = base_command() + ["--log-level", args.log_level, "control-plane", "--data-dir", dd.root]
    if args.dashboard_read_only:
        argv.append("--dashboard-read-only")
    if args.serverless:
        argv.append("--serverless")
    for flag, attr in SERVERLESS_FLAGS:
        if getattr(args, attr) is not None:
            argv += [flag, str(getattr(args, attr))]
    for flag, value in (("--base-port", args.base_port), ("--intra-az-ms", args.intra_az_ms),
                        ("--cross-az-ms", args.cross_az_ms), ("--replicas", args.replicas),
                        ("--storage-nodes", args.storage_nodes), ("--pg-size-mb", args.pg_size_mb),
                        ("--max-pgs", args.max_pgs), ("--stripe-width", args.stripe_width),
                        ("--segment-failed-after-s", args.segment_failed_after_s)):
        if value is not None:
            argv += [flag, str(value)]
    # A fresh process in its own session: Ctrl-C in this terminal reaches only `up`,
    # which then stops the cluster in order.
    env = None
    if args.backtrack_window is not None:   # the writers read it (engine/writer/backtrack.py)
        env = dict(os.environ, AURORA_BACKTRACK_WINDOW_S=str(args.backtrack_window))
    popen = spawn(argv, dd.log("control"), new_session=True, env=env)
    print(f"starting a cluster in {dd.root} (control plane pid {popen.pid}) ...",
          file=sys.stderr, flush=True)
    stop = _StopSignal()
    try:
        info = _wait_control_json(dd, popen, stop)
        state = _wait_all_up(dd, info, popen, args.timeout, stop)
    except CliError:
        _abort_startup(dd, popen)
        raise
    print(format_up_block(state, args, args.detach), flush=True)
    if args.detach:
        return EXIT_OK
    stop.wait(lambda: popen.poll() is not None)
    if popen.poll() is not None:
        code = fail(f"the control plane exited unexpectedly ({describe_exit(popen.returncode)}); "
                    f"last lines of {dd.log('control')}:\n{_tail(dd.log('control'))}", EXIT_FAILED)
        _sweep(dd, info)
        return code
    print(f"\n{stop.name or 'signal'} received: stopping the cluster "
          "(SIGTERM, grace period, then SIGKILL) ...", flush=True)
    return _shutdown(dd, info, popen)


class _StopSignal:
    """SIGINT / SIGTERM / SIGHUP set a flag instead of raising, so that shutdown runs
    once and in order."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.name = ""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if not self.event.is_set():
            self.name = signal.Signals(signum).name
        self.event.set()

    def wait(self, done) -> None:
        while not self.event.is_set() and not done():
            self.event.wait(0.2)

    @property
    def set(self) -> bool:
        return self.event.is_set()


def _wait_control_json(dd: DataDir, popen, stop: _StopSignal) -> dict:
    deadline = time.monotonic() + CONTROL_START_TIMEOUT_S
    while time.monotonic() < deadline and not stop.set:
        info = read_control(dd)
        if info and info.get("running") and info.get("control", {}).get("pid") == popen.pid \
                and info["control"].get("address"):
            return info
        if popen.poll() is not None:
            raise CliError(f"the control plane failed to start ({describe_exit(popen.returncode)}); "
                           f"last lines of {dd.log('control')}:\n{_tail(dd.log('control'))}")
        time.sleep(0.05)
    if stop.set:
        raise CliError("interrupted while starting", EXIT_INTERRUPTED)
    raise CliError(f"the control plane did not start within {CONTROL_START_TIMEOUT_S:.0f}s; "
                   f"see {dd.log('control')}")


def _wait_all_up(dd: DataDir, info: dict, popen, timeout_s: float, stop: _StopSignal):
    deadline = time.monotonic() + timeout_s
    while True:
        if stop.set:
            raise CliError("interrupted while starting; the cluster was stopped", EXIT_INTERRUPTED)
        if popen.poll() is not None:
            raise CliError(f"the control plane exited ({describe_exit(popen.returncode)}); "
                           f"last lines of {dd.log('control')}:\n{_tail(dd.log('control'))}")
        state = get_state(info, probes=False)
        if state.all_up:
            return get_state(info, probes=True)
        failed = [p for p in state.processes if p.state == "down" and p.starts > 0]
        if failed:
            p = failed[0]
            raise CliError(f"{p.name} {p.exit_reason} during startup; last lines of {p.log}:\n"
                           f"{_tail(p.log)}")
        if time.monotonic() > deadline:
            waiting = ", ".join(f"{p.name} ({p.state})" for p in state.processes if p.state != "up")
            raise CliError(f"not every process was serving after {timeout_s:.0f}s: {waiting}; "
                           f"see {dd.logs}")
        time.sleep(0.2)


def _abort_startup(dd: DataDir, popen) -> None:
    """Startup failed: stop whatever started, so nothing is left running."""
    info = read_control(dd)
    if info and popen.poll() is None:
        try:
            from aurora_pb import control_pb2 as pb

            control_call(info, "Shutdown", pb.ShutdownRequest(), SHUTDOWN_RPC_TIMEOUT_S)
        except CliError:
            pass
        _wait_pid_exit(popen.pid, 10.0, popen)
    if popen.poll() is None:
        popen.kill()
        popen.wait()
    if info:
        _sweep(dd, info)


def _wait_pid_exit(pid: int, timeout_s: float, popen=None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen is not None and popen.poll() is not None:
            return True
        if popen is None and not pid_running(pid):
            return True
        time.sleep(0.05)
    return False


def _sweep(dd: DataDir, info: dict) -> list[str]:
    """Stop any process of control.json that is still alive (after a crash)."""
    pids = {n: p for n, p in cluster_pids(info).items() if pid_belongs(p, dd.root)}
    return stop_pids(pids, dd.root) if pids else []


def _shutdown(dd: DataDir, info: dict, popen=None) -> int:
    from aurora_pb import control_pb2 as pb

    code = EXIT_OK
    control_pid = int(info["control"]["pid"])
    try:
        reply = control_call(info, "Shutdown", pb.ShutdownRequest(), SHUTDOWN_RPC_TIMEOUT_S)
        for r in reply.reports:
            pid = f"pid {r.pid}" if r.pid else "-"
            print(f"  {r.name:<14} {pid:<11} {r.action}", flush=True)
    except CliError as exc:
        print(f"  {exc}; stopping the processes directly", flush=True)
        code = EXIT_FAILED
    if not _wait_pid_exit(control_pid, 10.0, popen):
        os.kill(control_pid, signal.SIGKILL)
        _wait_pid_exit(control_pid, 5.0, popen)
        print(f"  {'control-plane':<14} pid {control_pid:<7} did not exit, SIGKILL", flush=True)
    else:
        how = describe_exit(popen.returncode) if popen is not None else "exited"
        print(f"  {'control-plane':<14} pid {control_pid:<7} {how}", flush=True)
    for line in _sweep(dd, info):
        print(f"  leftover {line}", flush=True)
    left = [f"{n} (pid {p})" for n, p in cluster_pids(info).items() if pid_belongs(p, dd.root)]
    if left:
        print(f"still running: {', '.join(left)}", flush=True)
        return EXIT_FAILED
    print(f"cluster in {dd.root} stopped; no process left running", flush=True)
    return code


@guarded
def cmd_down(args) -> int:
    dd = data_dir_of(args)
    for line in stop_clone_writers(dd):   # before the storage nodes they write to
        print(line)
    info = running_control(dd)
    if info is None:
        stale = read_control(dd)
        lines = _sweep(dd, stale) if stale else []
        if lines:
            print(f"the control plane of {dd.root} was gone; stopped its leftover processes:")
            for line in lines:
                print(f"  {line}")
        else:
            print(f"no cluster running in {dd.root}")
        return EXIT_OK
    print(f"stopping the cluster in {dd.root} (SIGTERM, grace period, then SIGKILL) ...", flush=True)
    return _shutdown(dd, info)


# --- status -------------------------------------------------------------------------------


@guarded
def cmd_status(args) -> int:
    info = require_cluster(data_dir_of(args))
    state = get_state(info, probes=True)
    if args.json:
        print(json.dumps(state_dict(state), indent=2))
    else:
        print(format_status(state))
    return EXIT_OK


# --- logs --------------------------------------------------------------------------------------


@guarded
def cmd_logs(args) -> int:
    dd = data_dir_of(args)
    name = "control" if args.name in ("control-plane", "control") else args.name
    path = dd.log(name)
    if not os.path.exists(path):
        known = sorted(f[:-4] for f in os.listdir(dd.logs)) if os.path.isdir(dd.logs) else []
        raise CliError(f"no log for {args.name!r} in {dd.logs}"
                       + (f" (known: {', '.join(known)})" if known else ""), EXIT_NOT_FOUND)
    out = sys.stdout.buffer
    with open(path, "rb") as f:
        data = f.read()
        if args.lines:
            data = b"".join(data.splitlines(keepends=True)[-args.lines:])
        out.write(data)
        out.flush()
        if not args.follow:
            return EXIT_OK
        try:
            while True:
                chunk = f.read()
                if chunk:
                    out.write(chunk)
                    out.flush()
                else:
                    time.sleep(0.2)
        except (KeyboardInterrupt, BrokenPipeError):
            return EXIT_OK


# --- Registration -------------------------------------------------------------------------


SERVERLESS_FLAGS = (("--min-acu", "min_acu"), ("--max-acu", "max_acu"),
                    ("--scale-down-delay", "scale_down_delay"),
                    ("--scale-down-interval", "scale_down_interval"),
                    ("--pause-after", "pause_after"))


def add_serverless_args(p) -> None:
    """`up --serverless --min-acu A --max-acu B` (docs/serverless.md)."""
    p.add_argument("--serverless", action="store_true",
                   help="every instance serverless: capacity scales in place between --min-acu "
                        "and --max-acu (docs/serverless.md)")
    p.add_argument("--min-acu", type=float, default=0.5,
                   help="serverless: lowest capacity, ACUs (0.5..128, steps of 0.5; default 0.5)")
    p.add_argument("--max-acu", type=float, default=8.0,
                   help="serverless: highest capacity, ACUs (default 8)")
    p.add_argument("--scale-down-delay", type=float, default=None, metavar="SECONDS",
                   help="serverless: load low this long before the first step down (default 15)")
    p.add_argument("--scale-down-interval", type=float, default=None, metavar="SECONDS",
                   help="serverless: then one 0.5 ACU step down per interval (default 5)")
    p.add_argument("--pause-after", type=float, default=None, metavar="SECONDS",
                   help="serverless with --min-acu 0: stop an instance after this long without "
                        "a request; the next connection resumes it (default 300)")


def check_serverless_args(args) -> None:
    """Refuse a bad capacity range before anything starts."""
    if not args.serverless:
        return
    from engine.cluster.scaling import CapacityPolicy
    from engine.instance.capacity import check_acu
    try:
        policy = CapacityPolicy(check_acu(args.min_acu, "--min-acu", allow_zero=True),
                                check_acu(args.max_acu, "--max-acu"),
                                scale_down_delay_s=15.0 if args.scale_down_delay is None else args.scale_down_delay,
                                scale_down_interval_s=5.0 if args.scale_down_interval is None
                                else args.scale_down_interval,
                                pause_after_s=300.0 if args.pause_after is None else args.pause_after)
        policy.check()
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def register(subparsers) -> None:
    """Add up, down, control-plane and status to `aurora-lite`'s subcommands."""
    from engine.cluster.listen import add_listen_args
    p = subparsers.add_parser("up", help="start a local cluster (control plane, six storage nodes, writer, replicas)")
    data_dir_arg(p)
    p.add_argument("--detach", action="store_true", help="return to the shell once every process serves")
    p.add_argument("--base-port", type=int, default=None,
                   help="control plane on N, db1 on N+1, sn1..sn6 on N+11..N+16 (default: free ports)")
    p.add_argument("--intra-az-ms", type=float, default=None,
                   help="one-way delay within an AZ (default 0.25, or the data dir's cluster.json)")
    p.add_argument("--cross-az-ms", type=float, default=None,
                   help="one-way delay across AZs (default 1.0, or the data dir's cluster.json)")
    p.add_argument("--storage-nodes", type=int, default=None, metavar="N",
                   help="storage nodes sn1..snN, N/3 per AZ (N >= 6, a multiple of 3; default 6 "
                        "on a new data dir); each PG is placed on six of them (docs/fleet.md)")
    p.add_argument("--pg-size-mb", type=float, default=None, metavar="MIB",
                   help="a PG's capacity; the volume grows by PGs as it fills (new data dir "
                        "only; default 16, a multiple of 8 KiB)")
    p.add_argument("--max-pgs", type=int, default=None, metavar="N",
                   help="the volume's maximum PG count: past it writes get 'volume full' "
                        "(new data dir only; default 64)")
    p.add_argument("--stripe-width", type=int, default=None, metavar="N",
                   help="PGs each extent of the volume is striped over (new data dir only; "
                        "default 8; --max-pgs must be a multiple)")
    p.add_argument("--replicas", type=int, default=None,
                   help=f"read replicas db2.. (0..{MAX_REPLICAS}; default 1 on a new data dir; "
                        f"an existing data dir brings back the instances it had)")
    p.add_argument("--timeout", type=float, default=UP_TIMEOUT_S,
                   help=f"give up if not every process serves after this many seconds (default {UP_TIMEOUT_S:.0f})")
    p.add_argument("--backtrack-window", type=float, default=None, metavar="SECONDS",
                   help="how far back backtrack and as-of reads reach (default 3600; at most "
                        "259200 = 72 h); storage keeps that much history")
    p.add_argument("--dashboard-read-only", action="store_true",
                   help="serve the dashboard without its fault buttons (POSTs refused with 403)")
    add_serverless_args(p)
    p.add_argument("--segment-failed-after-s", type=float, default=None, metavar="SECONDS",
                   help="declare a storage node's segments failed once it has been unreachable "
                        "this long (default 5; docs/membership.md)")
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser("down", help="stop the cluster of a data dir")
    data_dir_arg(p)
    p.set_defaults(func=cmd_down)

    p = subparsers.add_parser("control-plane", help="(started by `up`) launch and supervise a cluster")
    data_dir_arg(p)
    add_listen_args(p)
    p.add_argument("--base-port", type=int, default=None)
    p.add_argument("--intra-az-ms", type=float, default=None)
    p.add_argument("--cross-az-ms", type=float, default=None)
    p.add_argument("--replicas", type=int, default=None)
    p.add_argument("--storage-nodes", type=int, default=None)
    p.add_argument("--pg-size-mb", type=float, default=None)
    p.add_argument("--max-pgs", type=int, default=None)
    p.add_argument("--stripe-width", type=int, default=None)
    p.add_argument("--failover-after-s", type=float, default=None,
                   help="fail over once the writer's health check has failed this long (default 1.5)")
    p.add_argument("--segment-failed-after-s", type=float, default=None,
                   help="segments of a node unreachable this long are failed (default 5)")
    p.add_argument("--dashboard-read-only", action="store_true",
                   help="the dashboard's fault buttons are off (its POSTs are refused)")
    add_serverless_args(p)
    p.set_defaults(func=cmd_control_plane, log_tag="control-plane")

    p = subparsers.add_parser("status", help="every process: role, AZ, pid, state, SCL or VDL, lag")
    data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="the same as JSON, for scripts")
    p.set_defaults(func=cmd_status)


def register_logs(subparsers) -> None:
    """Add `logs` (registered last, so `aurora-lite --help` lists it last)."""
    p = subparsers.add_parser("logs", help="print a process's log (NAME: sn1..sn6, db1, db2, ..., control)")
    data_dir_arg(p)
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C stops)")
    p.add_argument("-n", "--lines", type=int, default=0, help="only the last N lines")
    p.set_defaults(func=cmd_logs)
