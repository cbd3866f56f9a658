"""The cluster verbs of `aurora-lite`: up, down, status, the client verbs, the faults,
failover, replicas and endpoints.

Registered by ``register(subparsers)`` from engine/cli/__init__.py. Every verb finds its cluster
through the data dir (``--data-dir``, else $AURORA_LITE_DATA_DIR, else ./.aurora-lite):
control.json names the control plane, which resolves endpoints (cluster, reader,
instance:NAME, custom:NAME; ``--endpoint`` on the client verbs), so nobody types an
address. See docs/cli.md for the user's view.

Exit codes (for scripts and tests)::

    0  done
    1  not found (get/delete of a missing key), or an action that did not happen
    2  usage error (argparse)
    3  no cluster running in the data dir, or the writer/control plane is unreachable, or
       the writer failed while a commit was in flight (its outcome is unknown)
    4  write quorum unavailable: the commit was not durable before --timeout
    5  conflict: another transaction wrote the same key first; retry
    130 interrupted (Ctrl-C)

Errors are one line on stderr, "aurora-lite: ...", never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import time

from engine.cluster.launcher import (
    DEFAULT_DATA_DIR, MAX_REPLICAS, TIER_MAX, DataDir, base_command, cluster_pids,
    describe_exit, load_topology, pid_belongs, pid_running, read_control, resolve_data_dir,
    running_control, spawn, stop_pids)

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_CLUSTER = 3
EXIT_QUORUM = 4
EXIT_CONFLICT = 5
EXIT_INTERRUPTED = 130

UP_TIMEOUT_S = 120.0
CONTROL_START_TIMEOUT_S = 20.0
READ_TIMEOUT_S = 10.0
SHUTDOWN_RPC_TIMEOUT_S = 120.0
FAILOVER_WAIT_S = 30.0          # a write waits this long for a new writer after a failure
FAILOVER_RPC_TIMEOUT_S = 120.0


class CliError(Exception):
    """A one-line error for the user, with the process exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int) -> int:
    sys.stdout.flush()
    print(f"aurora-lite: {message}", file=sys.stderr, flush=True)
    return code


def guarded(func):
    """Run a verb: CliError, Ctrl-C and engine errors become one line and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CliError as exc:
            return fail(str(exc), exc.code)
        except KeyboardInterrupt:
            return fail("interrupted", EXIT_INTERRUPTED)
        except Exception as exc:  # engine errors and gRPC errors: never a traceback
            message, code = describe_error(exc, endpoint_text(args))
            return fail(message, code)

    run.__name__ = func.__name__
    return run


def describe_error(exc: Exception, endpoint: str | None = None) -> tuple[str, int]:
    """(one-line message, exit code) for an error from the client library or gRPC."""
    from engine import errors

    detail = " ".join(str(exc).split())
    if isinstance(exc, errors.KeyNotFound):
        return f"not found: {detail}", EXIT_NOT_FOUND
    if isinstance(exc, errors.CommitOutcomeUnknown):
        return f"outcome unknown: {detail}", EXIT_NO_CLUSTER
    if isinstance(exc, errors.WriteQuorumUnavailable):
        return detail if detail.startswith("write quorum") else f"write quorum unavailable: {detail}", EXIT_QUORUM
    if isinstance(exc, errors.ConflictError):
        return f"conflict: {detail} (retry the transaction)", EXIT_CONFLICT
    if isinstance(exc, errors.UnavailableError):
        if "deadline" in detail.lower():
            where = f" from the writer at {endpoint}" if endpoint else ""
            return (f"unavailable: no answer{where} before the deadline: the writer is down or "
                    f"paused, or the request waits for a write that is not durable yet (write "
                    f"quorum unavailable); `aurora-lite status` shows which"), EXIT_NO_CLUSTER
        if _is_connection_failure(detail):
            where = f" at {endpoint}" if endpoint else ""
            who = "the writer" if not endpoint or "cluster endpoint" in endpoint else "the instance"
            return (f"unavailable: {who}{where} does not answer (is it down or paused? "
                    f"`aurora-lite status` shows the cluster)"), EXIT_NO_CLUSTER
        return f"unavailable: {detail}", EXIT_NO_CLUSTER
    if isinstance(exc, errors.DatabaseError):
        return f"{type(exc).__name__}: {detail}", EXIT_FAILED
    try:
        import grpc

        if isinstance(exc, grpc.RpcError):
            return f"{exc.code().name}: {exc.details()}", EXIT_NO_CLUSTER
    except ImportError:
        pass
    return f"unexpected error: {type(exc).__name__}: {detail}", EXIT_FAILED


def _is_connection_failure(detail: str) -> bool:
    d = detail.lower()
    return any(s in d for s in ("failed to connect", "connection refused", "socket closed",
                                "connect failed", "unavailable: ipv4"))


# --- Finding the cluster ----------------------------------------------------------------


def data_dir_of(args) -> DataDir:
    return DataDir(resolve_data_dir(getattr(args, "data_dir", None)))


def shown_data_dir_flag(args) -> str:
    """' --data-dir X' when the user did not use the default, for printed commands."""
    given = getattr(args, "data_dir", None)
    if given and os.path.abspath(given) != os.path.abspath(DEFAULT_DATA_DIR):
        return f" --data-dir {shlex.quote(given)}"
    return ""


def require_cluster(dd: DataDir) -> dict:
    info = running_control(dd)
    if info is None:
        raise CliError(f"no cluster running in {dd.root} (start one with `aurora-lite up`)",
                       EXIT_NO_CLUSTER)
    return info


def control_stub(info: dict):
    import grpc

    from aurora_pb import control_pb2_grpc

    channel = grpc.insecure_channel(info["control"]["address"])
    return channel, control_pb2_grpc.ControlStub(channel)


def control_call(info: dict, method: str, request, timeout_s: float = 30.0):
    import grpc

    channel, stub = control_stub(info)
    try:
        return getattr(stub, method)(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise CliError(exc.details(), EXIT_USAGE) from None
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
            raise CliError(exc.details(), EXIT_FAILED) from None
        raise CliError(f"the control plane at {info['control']['address']} did not answer "
                       f"({exc.code().name}: {exc.details()})", EXIT_NO_CLUSTER) from None
    finally:
        channel.close()


def get_state(info: dict, probes: bool = True, timeout_s: float = 10.0):
    from aurora_pb import control_pb2 as pb

    return control_call(info, "GetState", pb.GetStateRequest(skip_probes=not probes), timeout_s)


def open_client(args, timeout_s: float = READ_TIMEOUT_S, failover_wait_s: float = FAILOVER_WAIT_S):
    """A ClusterClient of --endpoint (default cluster), resolved by the control plane."""
    from engine import errors
    from engine.client import ClusterClient

    info = require_cluster(data_dir_of(args))
    endpoint = getattr(args, "endpoint", None) or "cluster"
    try:
        client = ClusterClient(info["control"]["address"], endpoint, timeout_s=timeout_s,
                               failover_wait_s=failover_wait_s)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except errors.UnavailableError as exc:
        raise CliError(str(exc), EXIT_NO_CLUSTER) from None
    except errors.DatabaseError as exc:   # unknown custom endpoint or instance
        raise CliError(str(exc), EXIT_USAGE) from None
    args._client = client
    return client


def _client_for(args, **kwargs):
    """The clone writer's Client for --volume NAME (engine/cli/clones.py), else the
    cluster's ClusterClient."""
    from engine.cli.clones import open_volume_client

    client = open_volume_client(args)
    return client if client is not None else open_client(args, **kwargs)


def endpoint_text(args) -> str | None:
    """'ADDRESS (NAME, ENDPOINT endpoint)' of the client's current target, for messages."""
    client = getattr(args, "_client", None)
    if client is None:
        return None
    kind = client.endpoint if client.kind != "cluster" else "cluster"
    return f"{client.address} ({client.instance}, {kind} endpoint)"


# --- Formatting -------------------------------------------------------------------------


def process_dict(p) -> dict:
    """One process as JSON-ready data; the same keys for every role (null if n/a)."""
    storage = p.role == "storage"
    replica = p.HasField("lag_ms")
    scl = {str(s.pg): s.scl for s in p.segments}
    return {
        "name": p.name, "role": p.role, "az": p.az, "address": p.address,
        "pid": p.pid or None, "state": p.state, "up": p.up,
        "exit_reason": p.exit_reason or None, "uptime_s": p.uptime_s, "starts": p.starts,
        "log": p.log,
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
    }


def state_dict(state) -> dict:
    return {
        "data_dir": state.data_dir, "volume": state.volume,
        "control": {"address": state.control_address, "pid": state.control_pid},
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
    }


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


def _table(rows: list[list[str]], indent: str = "") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def latency_line(lat) -> str:
    text = f"{lat.intra_az_ms:g} ms within an AZ, {lat.cross_az_ms:g} ms across AZs (one way)"
    extra = dict(lat.extra_az_ms)
    extra.update(getattr(lat, "extra_node_ms", {}))   # slow nodes: sn3 +50 ms
    if extra:
        text += "; extra delay into " + ", ".join(f"{az} +{ms:g} ms" for az, ms in sorted(extra.items()))
    return text


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
             f"{state.control_address}, pid {state.control_pid})", "", _table(rows), ""]
    lines += endpoint_lines(state)
    lines.append(f"network: {latency_line(state.latency)}")
    if state.failing_over:
        lines.append("failover: in progress")
    if state.failovers:
        lines.append(f"failovers: {state.failovers}; last: {state.last_failover}")
    grid = format_segments(state)
    if grid:
        lines += ["", "SCL of each segment (PG x storage node):", grid]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def endpoint_lines(state) -> list[str]:
    names = {p.address: p.name for p in state.processes}
    readers = reader_addresses(state)
    return [f"cluster endpoint: {state.cluster_endpoint} ({state.writer}, the writer)",
            "reader endpoint: " + ", ".join(f"{a} ({names.get(a, '?')})" for a in readers)
            + ("" if any(names.get(a) != state.writer for a in readers) else " (no replica is up: the writer)")]


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
    return _table(rows, indent="  ")


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
             _table(rows, indent="  "), "",
             *endpoint_lines(state),
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
    argv = base_command() + ["--log-level", args.log_level, "control-plane", "--data-dir", dd.root]
    for flag, value in (("--base-port", args.base_port), ("--intra-az-ms", args.intra_az_ms),
                        ("--cross-az-ms", args.cross_az_ms), ("--replicas", args.replicas)):
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
    from engine.cli.clones import stop_clone_writers

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


# --- Client verbs ---------------------------------------------------------------------------


def _b(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data + b"\n")
    sys.stdout.flush()


@guarded
def cmd_put(args) -> int:
    with _client_for(args) as db:
        lsn = db.put(_b(args.key), _b(args.value), timeout_s=args.timeout)
    print(f"OK (commit LSN {lsn})")
    return EXIT_OK


@guarded
def cmd_get(args) -> int:
    from engine import errors

    from engine.cli.clones import as_of_kwargs

    as_of = as_of_kwargs(args)
    with _client_for(args, timeout_s=args.timeout or READ_TIMEOUT_S,
                     failover_wait_s=args.timeout or READ_TIMEOUT_S) as db:
        try:
            value = db.get(_b(args.key), **as_of)
        except errors.KeyNotFound:
            raise CliError(f"not found: key {args.key!r}", EXIT_NOT_FOUND) from None
    _out(value)
    return EXIT_OK


@guarded
def cmd_delete(args) -> int:
    from engine import errors

    with _client_for(args) as db:
        try:
            lsn = db.delete(_b(args.key), timeout_s=args.timeout)
        except errors.KeyNotFound:
            raise CliError(f"not found: key {args.key!r}", EXIT_NOT_FOUND) from None
    print(f"deleted (commit LSN {lsn})")
    return EXIT_OK


@guarded
def cmd_scan(args) -> int:
    from engine.cli.clones import as_of_kwargs

    as_of = as_of_kwargs(args)
    with _client_for(args, timeout_s=args.timeout or READ_TIMEOUT_S,
                     failover_wait_s=args.timeout or READ_TIMEOUT_S) as db:
        items = db.scan(_b(args.start or ""), _b(args.end or ""), args.limit or 0, **as_of)
    for key, value in items:
        _out(key + b"\t" + value)
    return EXIT_OK


# --- shell ------------------------------------------------------------------------------------

SHELL_HELP = """commands:
  put KEY VALUE [--timeout S]    insert or replace (inside a transaction: buffered)
  get KEY                        print the value
  delete KEY [--timeout S]       delete the key
  scan [--start K] [--end K] [--limit N]
  begin | commit [--timeout S] | abort     transactions
  status [--json]                the cluster's status
  help | quit"""


class _ShellUsage(Exception):
    pass


class _ShellParser(argparse.ArgumentParser):
    def error(self, message):
        raise _ShellUsage(message)

    def exit(self, status=0, message=None):
        raise _ShellUsage(message or "")


def _shell_parser() -> argparse.ArgumentParser:
    parser = _ShellParser(prog="", add_help=False)
    sub = parser.add_subparsers(dest="verb", parser_class=_ShellParser)
    p = sub.add_parser("put", add_help=False)
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("--timeout", type=float)
    p = sub.add_parser("get", add_help=False)
    p.add_argument("key")
    for verb in ("delete", "del"):
        p = sub.add_parser(verb, add_help=False)
        p.add_argument("key")
        p.add_argument("--timeout", type=float)
    p = sub.add_parser("scan", add_help=False)
    p.add_argument("--start")
    p.add_argument("--end")
    p.add_argument("--limit", type=int, default=0)
    sub.add_parser("begin", add_help=False)
    p = sub.add_parser("commit", add_help=False)
    p.add_argument("--timeout", type=float)
    for verb in ("abort", "rollback", "help", "quit", "exit"):
        sub.add_parser(verb, add_help=False)
    p = sub.add_parser("status", add_help=False)
    p.add_argument("--json", action="store_true")
    return parser


@guarded
def cmd_shell(args) -> int:
    """Read commands from stdin; a prompt only when stdin is a terminal."""
    from engine import errors

    db = open_client(args, timeout_s=READ_TIMEOUT_S)
    parser = _shell_parser()
    interactive = sys.stdin.isatty()
    txn = None
    last_error = EXIT_OK
    if interactive:
        print(f"connected to {endpoint_text(args)}; `help` lists the commands")
    try:
        while True:
            prompt = f"aurora-lite (txn {txn.txn_id})> " if txn else "aurora-lite> "
            try:
                line = input(prompt) if interactive else sys.stdin.readline()
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print()
                continue
            if not interactive and line == "":
                break   # end of piped input
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                cmd = parser.parse_args(shlex.split(line))
            except (_ShellUsage, ValueError) as exc:
                print(f"error: {exc or 'bad command'} (try `help`)", file=sys.stderr, flush=True)
                last_error = EXIT_USAGE
                continue
            if cmd.verb in ("quit", "exit"):
                break
            try:
                txn = _shell_command(cmd, db, txn, args)
            except CliError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                last_error = exc.code
            except errors.DatabaseError as exc:
                message, code = describe_error(exc, endpoint_text(args))
                if isinstance(exc, errors.KeyNotFound):
                    message = f"not found: key {cmd.key!r}"
                print(f"error: {message}", file=sys.stderr, flush=True)
                last_error = code
                if txn is not None and isinstance(exc, (errors.ConflictError, errors.TransactionClosedError)):
                    txn = None
            sys.stdout.flush()
        if txn is not None and not txn.closed:
            try:
                txn.abort()
            except errors.DatabaseError:
                pass
            print(f"transaction {txn.txn_id} aborted (end of input)")
    finally:
        db.close()
    return EXIT_OK if interactive else last_error   # scripts learn that something failed


def _shell_command(cmd, db, txn, args):
    """Run one parsed shell command; returns the open transaction (or None)."""
    target = txn if txn is not None else db
    verb = cmd.verb
    if verb == "help":
        print(SHELL_HELP)
    elif verb == "put":
        if txn is not None:
            txn.put(_b(cmd.key), _b(cmd.value))
            print(f"OK (in transaction {txn.txn_id})")
        else:
            print(f"OK (commit LSN {db.put(_b(cmd.key), _b(cmd.value), timeout_s=cmd.timeout)})")
    elif verb == "get":
        _out(target.get(_b(cmd.key)))
    elif verb in ("delete", "del"):
        if txn is not None:
            txn.delete(_b(cmd.key))
            print(f"deleted (in transaction {txn.txn_id})")
        else:
            print(f"deleted (commit LSN {db.delete(_b(cmd.key), timeout_s=cmd.timeout)})")
    elif verb == "scan":
        for key, value in target.scan(_b(cmd.start or ""), _b(cmd.end or ""), cmd.limit or 0):
            _out(key + b"\t" + value)
    elif verb == "begin":
        if txn is not None:
            raise CliError(f"transaction {txn.txn_id} is already open (commit or abort it first)")
        txn = db.begin()
        print(f"BEGIN (transaction {txn.txn_id})")
    elif verb == "commit":
        if txn is None:
            raise CliError("no open transaction (begin first)")
        open_txn, txn = txn, None
        lsn = open_txn.commit(timeout_s=cmd.timeout)
        print(f"COMMIT (commit LSN {lsn})" if lsn else "COMMIT (nothing to write)")
    elif verb in ("abort", "rollback"):
        if txn is None:
            raise CliError("no open transaction")
        txn.abort()
        print(f"ABORT (transaction {txn.txn_id})")
        txn = None
    elif verb == "status":
        state = get_state(require_cluster(data_dir_of(args)))
        print(json.dumps(state_dict(state), indent=2) if cmd.json else format_status(state))
    return txn


# --- Faults -----------------------------------------------------------------------------------

EXPECTED_STATE = {"kill": ("down",), "stop": ("down",), "start": ("up",),
                  "pause": ("paused",), "resume": ("up", "starting")}


@guarded
def cmd_node(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    reply = control_call(info, "ProcessAction",
                         pb.ProcessActionRequest(name=args.name, action=args.action, wait_s=args.wait),
                         timeout_s=args.wait + 30)
    print(reply.message)
    ok = all(p.state in EXPECTED_STATE[args.action] for p in reply.processes)
    return EXIT_OK if ok else EXIT_FAILED


@guarded
def cmd_az(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    reply = control_call(info, "AzAction",
                         pb.AzActionRequest(az=args.az, action=args.action, wait_s=args.wait),
                         timeout_s=args.wait + 30)
    print(reply.message)
    expected = ("down",) if args.action == "down" else ("up",)
    return EXIT_OK if all(p.state in expected for p in reply.processes) else EXIT_FAILED


@guarded
def cmd_net(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    if args.action == "delay":
        request = pb.SetNetworkDelayRequest(az=args.az or "", node=args.node or "", ms=args.ms)
    else:
        request = pb.SetNetworkDelayRequest(clear=True)
    reply = control_call(info, "SetNetworkDelay", request)
    print(reply.message)
    print(f"network: {latency_line(reply.latency)}")
    return EXIT_OK


# --- Failover, replicas, endpoints -----------------------------------------------------------


@guarded
def cmd_failover(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    reply = control_call(info, "Failover", pb.FailoverRequest(target=args.target or ""),
                         timeout_s=FAILOVER_RPC_TIMEOUT_S)
    print(reply.message)
    return EXIT_OK


@guarded
def cmd_replica(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    if args.action == "add":
        request = pb.AddReplicaRequest(az=args.az or "", wait_s=args.wait)
        if args.tier is not None:
            request.tier = args.tier
        reply = control_call(info, "AddReplica", request, timeout_s=args.wait + 30)
        print(reply.message)
        return EXIT_OK if all(p.state == "up" for p in reply.processes) else EXIT_FAILED
    reply = control_call(info, "RemoveReplica", pb.RemoveReplicaRequest(name=args.name),
                         timeout_s=60)
    print(reply.message)
    return EXIT_OK


def _targets_text(targets) -> str:
    return ", ".join(f"{t.instance} ({t.role}{'' if t.up else ', down'}) {t.address}"
                     for t in targets) or "-"


@guarded
def cmd_endpoint(args) -> int:
    from aurora_pb import control_pb2 as pb

    info = require_cluster(data_dir_of(args))
    if args.action == "create":
        members = [m for m in args.members.split(",") if m.strip()]
        reply = control_call(info, "CreateEndpoint", pb.CreateEndpointRequest(name=args.name, members=members))
        print(f"custom endpoint {args.name} created: members {', '.join(reply.members)}; "
              f"leads to {_targets_text(reply.targets)}")
        print(f"use it: aurora-lite get KEY --endpoint custom:{args.name}{shown_data_dir_flag(args)}")
        return EXIT_OK
    if args.action == "delete":
        reply = control_call(info, "DeleteEndpoint", pb.DeleteEndpointRequest(name=args.name))
        print(f"custom endpoint {args.name} deleted (members were {', '.join(reply.members)})")
        return EXIT_OK
    reply = control_call(info, "ListEndpoints", pb.ListEndpointsRequest())
    if args.json:
        print(json.dumps([{"endpoint": e.name, "kind": e.kind, "members": list(e.members) or None,
                           "targets": [{"instance": t.instance, "address": t.address,
                                        "role": t.role, "up": t.up} for t in e.targets]}
                          for e in reply.endpoints], indent=2))
        return EXIT_OK
    rows = [["ENDPOINT", "MEMBERS", "LEADS TO"]]
    for e in reply.endpoints:
        rows.append([e.name, ",".join(e.members) or "-", _targets_text(e.targets)])
    print(_table(rows))
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


# --- Registration ---------------------------------------------------------------------------------


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help=f"the cluster's data dir (default: ${'AURORA_LITE_DATA_DIR'} or ./{DEFAULT_DATA_DIR})")


def _endpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default="cluster",
                   help="cluster (the writer, default) | reader (replicas in turn) | "
                        "instance:NAME | custom:NAME")


def register(subparsers) -> None:
    """Add the cluster verbs to `aurora-lite`'s subcommands."""
    from engine.cli.clones import add_volume_args, register as register_clones
    from engine.cluster.listen import add_listen_args
    p = subparsers.add_parser("up", help="start a local cluster (control plane, six storage nodes, writer, replicas)")
    _data_dir_arg(p)
    p.add_argument("--detach", action="store_true", help="return to the shell once every process serves")
    p.add_argument("--base-port", type=int, default=None,
                   help="control plane on N, db1 on N+1, sn1..sn6 on N+11..N+16 (default: free ports)")
    p.add_argument("--intra-az-ms", type=float, default=None,
                   help="one-way delay within an AZ (default 0.25, or the data dir's cluster.json)")
    p.add_argument("--cross-az-ms", type=float, default=None,
                   help="one-way delay across AZs (default 1.0, or the data dir's cluster.json)")
    p.add_argument("--replicas", type=int, default=None,
                   help=f"read replicas db2.. (0..{MAX_REPLICAS}; default 1 on a new data dir; "
                        f"an existing data dir brings back the instances it had)")
    p.add_argument("--timeout", type=float, default=UP_TIMEOUT_S,
                   help=f"give up if not every process serves after this many seconds (default {UP_TIMEOUT_S:.0f})")
    p.add_argument("--backtrack-window", type=float, default=None, metavar="SECONDS",
                   help="how far back backtrack and as-of reads reach (default 3600; at most "
                        "259200 = 72 h); storage keeps that much history")
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser("down", help="stop the cluster of a data dir")
    _data_dir_arg(p)
    p.set_defaults(func=cmd_down)

    p = subparsers.add_parser("control-plane", help="(started by `up`) launch and supervise a cluster")
    _data_dir_arg(p)
    add_listen_args(p)
    p.add_argument("--base-port", type=int, default=None)
    p.add_argument("--intra-az-ms", type=float, default=None)
    p.add_argument("--cross-az-ms", type=float, default=None)
    p.add_argument("--replicas", type=int, default=None)
    p.add_argument("--failover-after-s", type=float, default=None,
                   help="fail over once the writer's health check has failed this long (default 1.5)")
    p.set_defaults(func=cmd_control_plane, log_tag="control-plane")

    p = subparsers.add_parser("status", help="every process: role, AZ, pid, state, SCL or VDL, lag")
    _data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="the same as JSON, for scripts")
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("put", help="put KEY VALUE (autocommit)")
    _data_dir_arg(p)
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("--timeout", type=float, default=None,
                   help="give up waiting for durability after S seconds (exit code 4); default: wait")
    _endpoint_arg(p)
    add_volume_args(p, as_of=False)
    p.set_defaults(func=cmd_put)

    p = subparsers.add_parser("get", help="get KEY (exit code 1 if not found)")
    _data_dir_arg(p)
    p.add_argument("key")
    p.add_argument("--timeout", type=float, default=None, help=f"RPC deadline (default {READ_TIMEOUT_S:.0f}s)")
    _endpoint_arg(p)
    add_volume_args(p, as_of=True)
    p.set_defaults(func=cmd_get)

    p = subparsers.add_parser("delete", help="delete KEY (exit code 1 if not found)")
    _data_dir_arg(p)
    p.add_argument("key")
    p.add_argument("--timeout", type=float, default=None, help="commit deadline, as for put")
    _endpoint_arg(p)
    add_volume_args(p, as_of=False)
    p.set_defaults(func=cmd_delete)

    p = subparsers.add_parser("scan", help="keys in order: KEY<TAB>VALUE per line")
    _data_dir_arg(p)
    p.add_argument("--start", default=None, help="first key (inclusive)")
    p.add_argument("--end", default=None, help="stop before this key (exclusive)")
    p.add_argument("--limit", type=int, default=0, help="at most N keys (default: server's, 1000)")
    p.add_argument("--timeout", type=float, default=None, help=f"RPC deadline (default {READ_TIMEOUT_S:.0f}s)")
    _endpoint_arg(p)
    add_volume_args(p, as_of=True)
    p.set_defaults(func=cmd_scan)

    p = subparsers.add_parser("shell", help="interactive prompt: put/get/delete/scan, begin/commit/abort, status")
    _data_dir_arg(p)
    _endpoint_arg(p)
    p.set_defaults(func=cmd_shell)

    p = subparsers.add_parser("node", help="kill|stop|start|pause|resume NAME (storage node or instance)")
    _data_dir_arg(p)
    p.add_argument("action", choices=["kill", "stop", "start", "pause", "resume"],
                   help="kill=SIGKILL, stop=SIGTERM then SIGKILL, start=launch again, pause=SIGSTOP, resume=SIGCONT")
    p.add_argument("name", help="sn1..sn6, db1, db2, ...")
    p.add_argument("--wait", type=float, default=60.0, help="start: wait this long for SERVING (default 60)")
    p.set_defaults(func=cmd_node)

    p = subparsers.add_parser("az", help="down|up AZ: kill or start both storage nodes of an AZ")
    _data_dir_arg(p)
    p.add_argument("action", choices=["down", "up"])
    p.add_argument("az", help="az-a, az-b or az-c")
    p.add_argument("--wait", type=float, default=60.0, help="up: wait this long for SERVING (default 60)")
    p.set_defaults(func=cmd_az)

    p = subparsers.add_parser("net", help="delay (--az AZ | --node SN) --ms N | clear: extra one-way "
                                          "delay into an AZ or one storage node")
    net = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = net.add_parser("delay", help="add N ms of one-way delay on every link into AZ (or storage node SN)")
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument("--az")
    where.add_argument("--node", help="one storage node, e.g. sn3: a slow outlier")
    q.add_argument("--ms", type=float, required=True)
    _data_dir_arg(q)
    q.set_defaults(func=cmd_net)
    q = net.add_parser("clear", help="remove every extra delay")
    _data_dir_arg(q)
    q.set_defaults(func=cmd_net)

    p = subparsers.add_parser("failover", help="promote a replica to writer now (planned failover)")
    _data_dir_arg(p)
    p.add_argument("--target", default=None,
                   help="the replica to promote (default: the live replica with the best tier)")
    p.set_defaults(func=cmd_failover)

    # `replica` also runs a replica process (engine/cli/__init__.py); add/remove hang below it.
    p = subparsers.choices["replica"]
    rep = p.add_subparsers(dest="action", metavar="ACTION", required=False)
    q = rep.add_parser("add", help="start a new replica of the writer (next free name dbN)")
    q.add_argument("--tier", type=int, default=None,
                   help=f"promotion tier 0..{TIER_MAX}, lower promoted first (default: after every other)")
    q.add_argument("--az", default=None, help="az-a, az-b or az-c (default: round robin by name)")
    q.add_argument("--wait", type=float, default=60.0, help="wait this long for SERVING (default 60)")
    _data_dir_arg(q)
    q.set_defaults(func=cmd_replica)
    q = rep.add_parser("remove", help="stop a replica and forget it (not the writer)")
    q.add_argument("name")
    _data_dir_arg(q)
    q.set_defaults(func=cmd_replica)

    p = subparsers.add_parser("endpoint", help="create NAME --members a,b | list | delete NAME: custom endpoints")
    ep = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = ep.add_parser("create", help="a custom endpoint over some instances (reads go to its replicas)")
    q.add_argument("name")
    q.add_argument("--members", required=True, help="comma-separated instance names, e.g. db2,db3")
    _data_dir_arg(q)
    q.set_defaults(func=cmd_endpoint)
    q = ep.add_parser("list", help="every endpoint and where it leads now")
    q.add_argument("--json", action="store_true")
    _data_dir_arg(q)
    q.set_defaults(func=cmd_endpoint)
    q = ep.add_parser("delete", help="delete a custom endpoint")
    q.add_argument("name")
    _data_dir_arg(q)
    q.set_defaults(func=cmd_endpoint)

    register_clones(subparsers)

    p = subparsers.add_parser("logs", help="print a process's log (NAME: sn1..sn6, db1, db2, ..., control)")
    _data_dir_arg(p)
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C stops)")
    p.add_argument("-n", "--lines", type=int, default=0, help="only the last N lines")
    p.set_defaults(func=cmd_logs)
