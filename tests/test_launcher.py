"""Tests of the launcher, the control plane and the CLI verbs, on fake nodes.

Scenario base: `aurora-lite up` runs the real control plane, but with $AURORA_LITE_EXEC
pointing at this file, which stands in for `aurora-lite storage-node` (health +
NodeStatus) and `aurora-lite writer` / `replica` (health + an in-memory Database service
that refuses writes while it is a replica, and InstanceAdmin: Promote makes it the writer,
Follow a replica). So these tests check the process management, the data dir, the CLI's
output and exit codes, failover and endpoints, and the control plane's supervision in a
few seconds, independently of the storage engine.
tests/test_cli_tour.py runs the same verbs against the real storage nodes and writer.

Run as a script, this file is the fake node: ``python tests/test_launcher.py [--log-level L]
storage-node|writer|control-plane ...`` (the same arguments as engine/cli/__init__.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --- The fake node (runs in its own process) ----------------------------------------------


def _fake_main(argv: list[str]) -> int:
    sys.path.insert(0, ROOT)
    from engine import cli

    args = cli.build_parser().parse_args(argv)
    if args.command not in ("storage-node", "writer", "replica") or (
            args.command == "replica" and getattr(args, "action", None)):
        return cli.main(argv)
    import asyncio
    import logging

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [fake "
                        f"{getattr(args, 'node_id', None) or args.instance} {args.az}] %(message)s")
    return asyncio.run(_fake_serve(args))


async def _fake_serve(args) -> int:
    import asyncio
    import logging

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from aurora_pb import database_pb2 as dpb
    from aurora_pb import database_pb2_grpc as dpb_grpc
    from aurora_pb import storage_pb2 as spb
    from aurora_pb import storage_pb2_grpc as spb_grpc

    server = grpc.aio.server()
    if args.command == "storage-node":
        os.makedirs(args.data_dir, exist_ok=True)

        class FakeStorage(spb_grpc.StorageServicer):
            async def NodeStatus(self, request, context):
                return spb.NodeStatusReply(
                    node_id=args.node_id, az=args.az, bytes_received=1234, records_received=7,
                    segments=[spb.SegmentStatus(volume="main", pg=pg, scl=100 + pg) for pg in range(2)])

        spb_grpc.add_StorageServicer_to_server(FakeStorage(), server)
    else:
        store: dict[bytes, bytes] = {}
        txns: dict[int, dict] = {}
        state = {"lsn": 0, "role": "replica" if args.command == "replica" else "writer",
                 "following": getattr(args, "writer", None) or "", "epoch": 1}

        async def fail(context, status, code, message, *metadata):
            context.set_trailing_metadata((("aurora-error", code), *metadata))
            await context.abort(status, message)

        class FakeDatabase(dpb_grpc.DatabaseServicer):
            async def _write(self, request, context, value):
                key = request.key
                if state["role"] != "writer" and not request.txn_id:
                    await fail(context, grpc.StatusCode.FAILED_PRECONDITION, "READ_ONLY",
                               f"{args.instance} is a read replica", ("aurora-nothing-done", "1"))
                if key.startswith(b"quorum"):
                    await asyncio.sleep(request.timeout_ms / 1000.0)
                    await fail(context, grpc.StatusCode.UNAVAILABLE, "WRITE_QUORUM_UNAVAILABLE",
                               f"write quorum unavailable: commit LSN {state['lsn'] + 1} is not durable")
                if key.startswith(b"conflict"):
                    await fail(context, grpc.StatusCode.ABORTED, "CONFLICT", "key conflict")
                if request.txn_id:
                    txns[request.txn_id][key] = value
                    return dpb.WriteReply()
                if value is None and key not in store:
                    await fail(context, grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND", repr(key))
                state["lsn"] += 1
                if value is None:
                    del store[key]
                else:
                    store[key] = value
                return dpb.WriteReply(commit_lsn=state["lsn"], vdl=state["lsn"])

            async def Put(self, request, context):
                return await self._write(request, context, request.value)

            async def Delete(self, request, context):
                return await self._write(request, context, None)

            async def Get(self, request, context):
                view = dict(store)
                if request.txn_id:
                    view.update(txns[request.txn_id])
                if view.get(request.key) is None:
                    await fail(context, grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND", repr(request.key))
                return dpb.GetReply(value=view[request.key], read_point=state["lsn"])

            async def Scan(self, request, context):
                keys = sorted(k for k in store if k >= request.start and (not request.end or k < request.end))
                keys = keys[:request.limit or 1000]
                return dpb.ScanReply(items=[dpb.KeyValue(key=k, value=store[k]) for k in keys])

            async def Begin(self, request, context):
                state["txns"] = txn_id = state.get("txns", 0) + 1
                txns[txn_id] = {}
                return dpb.BeginReply(txn_id=txn_id)

            async def Commit(self, request, context):
                # Writes come with the commit (CommitRequest.ops; txn_id 0: no Begin was
                # needed because the transaction read nothing), as the real instance takes them.
                writes = txns.pop(request.txn_id) if request.txn_id else {}
                for op in request.ops:
                    writes[op.key] = None if op.delete else op.value
                if not writes:
                    return dpb.WriteReply()
                state["lsn"] += 1
                for k, v in writes.items():
                    if v is None:
                        store.pop(k, None)
                    else:
                        store[k] = v
                return dpb.WriteReply(commit_lsn=state["lsn"], vdl=state["lsn"])

            async def Abort(self, request, context):
                txns.pop(request.txn_id, None)
                return dpb.AbortReply()

            async def Status(self, request, context):
                body = {"driver": {"waiting_commits": 0, "pgcl": {"0": 105}}}
                if state["role"] == "replica":
                    body = {"replica": {"writer_address": state["following"], "lag_lsn": 0,
                                        "lag_ms_last": 1.5, "lag_ms_p50": 1.0, "lag_ms_p99": 2.0}}
                return dpb.StatusReply(instance=args.instance, role=state["role"], vdl=state["lsn"],
                                       volume_epoch=state["epoch"], json=json.dumps(body))

        class FakeAdmin(dpb_grpc.InstanceAdminServicer):
            async def Promote(self, request, context):
                if state["role"] != "writer":
                    state["role"], state["epoch"] = "writer", state["epoch"] + 1
                    logging.info("promoted to writer")
                return dpb.PromoteReply(volume_epoch=state["epoch"], vdl=state["lsn"])

            async def Follow(self, request, context):
                state["role"], state["following"] = "replica", request.writer_address
                logging.info("following %s", request.writer_address)
                return dpb.FollowReply()

        dpb_grpc.add_DatabaseServicer_to_server(FakeDatabase(), server)
        dpb_grpc.add_InstanceAdminServicer_to_server(FakeAdmin(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    logging.info("fake %s serving on port %d", args.command, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.info("fake %s stopping", args.command)
    await server.stop(grace=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(_fake_main(sys.argv[1:]))


# --- The tests ----------------------------------------------------------------------------

import pytest  # noqa: E402

from engine.cluster import launcher  # noqa: E402
from engine.cluster.launcher import DataDir, pid_belongs, pid_running  # noqa: E402


def fake_env() -> dict:
    env = dict(os.environ)
    env[launcher.EXEC_ENV] = json.dumps([sys.executable, os.path.abspath(__file__)])
    env.pop(launcher.DATA_DIR_ENV, None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cli(data_dir, *argv, env=None, timeout=60, check=None, stdin=None):
    """Run `aurora-lite ARGV --data-dir DATA_DIR` as a new user would; returns the result."""
    cmd = [sys.executable, "-m", "engine.cli", *argv]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env=env or fake_env(), input=stdin, cwd=ROOT)
    if check is not None:
        assert result.returncode == check, (
            f"`{' '.join(argv)}` exited {result.returncode}, expected {check}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def status_json(data_dir, env=None) -> dict:
    return json.loads(cli(data_dir, "status", "--json", env=env, check=0).stdout)


def all_pids(data_dir) -> list[int]:
    info = launcher.read_control(DataDir(str(data_dir))) or {}
    return list(launcher.cluster_pids(info).values())


def assert_no_process_left(data_dir, pids):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pid_running(p) for p in pids):
        time.sleep(0.05)
    alive = [p for p in pids if pid_running(p)]
    assert not alive, f"processes still running after down: {alive}"


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


def assert_one_line_error(result, fragment):
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("aurora-lite:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


@pytest.fixture
def fake_cluster(tmp_path):
    """A detached cluster of fake nodes; always torn down."""
    data_dir = tmp_path / "cluster"
    cli(data_dir, "up", "--detach", check=0)
    pids = all_pids(data_dir)
    yield data_dir
    cli(data_dir, "down")
    for pid in pids:  # never leave a process behind, whatever the test did
        if pid_belongs(pid, str(data_dir)):
            os.kill(pid, signal.SIGKILL)


def test_plan_base_port_and_reuse(tmp_path):
    """Scenario: --base-port gives fixed offsets; a second plan reuses the free ports and
    keeps the latency of cluster.json unless a flag overrides it."""
    dd = DataDir(str(tmp_path))
    dd.make()
    base = launcher.free_ports(1)[0] // 100 * 100
    if base > 60000 or base < 1100:
        base = 41000
    try:
        plan = launcher.plan_cluster(dd, base_port=base, intra_az_ms=0.5)
    except ValueError as exc:
        pytest.skip(f"ports near {base} busy: {exc}")
    assert plan.control_port == base and plan.instance_ports == {"db1": base + 1, "db2": base + 2}
    assert [n.address for n in plan.config.storage_nodes] == [
        f"127.0.0.1:{base + 11 + i}" for i in range(6)]
    assert [(n.name, n.az) for n in plan.config.storage_nodes] == launcher.STORAGE_NODES
    plan.config.latency.extra_az_ms["az-b"] = 7.0
    plan.config.save(dd.cluster_json)
    again = launcher.plan_cluster(dd, cross_az_ms=2.0)
    assert [n.address for n in again.config.storage_nodes] == [n.address for n in plan.config.storage_nodes]
    assert again.config.latency.intra_az_ms == 0.5 and again.config.latency.cross_az_ms == 2.0
    assert again.config.latency.extra_az_ms == {"az-b": 7.0}


def test_pid_belongs_checks_the_command_line(tmp_path):
    """Scenario: a pid is only ever signalled if its command line names the data dir."""
    inside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(tmp_path / "sn1")])
    outside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "/elsewhere"])
    try:
        assert pid_belongs(inside.pid, str(tmp_path))
        assert not pid_belongs(outside.pid, str(tmp_path))
        assert not pid_belongs(inside.pid, str(tmp_path) + "2")  # a sibling dir is not inside
    finally:
        inside.kill()
        outside.kill()
        inside.wait()
        outside.wait()
    assert not pid_running(inside.pid)


def test_up_detach_status_verbs_and_down(fake_cluster):
    """Scenario: `up --detach` on fake nodes: the data dir layout, status --json, the client
    verbs, and every log line naming its node and AZ."""
    data_dir = fake_cluster
    dd = DataDir(str(data_dir))
    for path in (dd.cluster_json, dd.control_json, dd.log("control"), dd.log("sn1"), dd.log("db1")):
        assert os.path.exists(path), path
    config = json.load(open(dd.cluster_json))
    assert [n["name"] for n in config["storage_nodes"]] == ["sn1", "sn2", "sn3", "sn4", "sn5", "sn6"]
    state = status_json(data_dir)
    procs = {p["name"]: p for p in state["processes"]}
    assert set(procs) == {"db1", "db2", "sn1", "sn2", "sn3", "sn4", "sn5", "sn6"}
    assert state["all_up"] and all(p["up"] and p["state"] == "up" and p["pid"] for p in procs.values())
    assert [procs[n]["az"] for n in ("sn1", "sn2", "sn3", "sn4", "sn5", "sn6")] == \
        ["az-a", "az-a", "az-b", "az-b", "az-c", "az-c"]
    assert procs["db1"]["role"] == "writer" and procs["db1"]["az"] == "az-a"
    assert procs["db1"]["tier"] == 0 and procs["db1"]["lag_ms"] is None
    assert procs["db2"]["role"] == "replica" and procs["db2"]["az"] == "az-b" and procs["db2"]["tier"] == 1
    assert procs["db2"]["following"] == procs["db1"]["address"]
    assert procs["db2"]["lag_ms"] == 1.5 and procs["db2"]["lag_ms_p99"] == 2.0 and procs["db2"]["lag_lsn"] == 0
    assert state["cluster_endpoint"] == procs["db1"]["address"]
    assert state["reader_endpoint"] == [procs["db2"]["address"]]
    assert procs["sn1"]["scl"] == {"0": 100, "1": 101} and procs["sn1"]["bytes_received"] == 1234
    assert procs["sn1"]["lag_lsn"] == 5            # fake writer's PGCL of PG 0 is 105
    assert procs["db1"]["vdl"] == 0 and procs["db1"]["lag_lsn"] is None
    # Every peer list names the five others.
    peers = [l for l in open(dd.log("sn3")) if "launching" in l][-1]
    others = [n["address"] for n in config["storage_nodes"] if n["name"] != "sn3"]
    assert f"--peers {','.join(others)}" in peers

    table = cli(data_dir, "status", check=0).stdout
    for fragment in ("NAME", "sn6", "az-c", "SCL 101", "VDL 0 (epoch 1)", "cluster endpoint:",
                     "reader endpoint:", "1.5 ms, 0 LSN"):
        assert fragment in table, table

    assert cli(data_dir, "put", "a", "1", check=0).stdout.startswith("OK (commit LSN 1)")
    cli(data_dir, "put", "b", "2", check=0)
    assert cli(data_dir, "get", "a", check=0).stdout == "1\n"
    assert cli(data_dir, "scan", "--start", "a", "--limit", "5", check=0).stdout == "a\t1\nb\t2\n"
    assert cli(data_dir, "delete", "b", check=0).stdout.startswith("deleted")
    missing = cli(data_dir, "get", "b", check=1)
    assert_one_line_error(missing, "not found: key 'b'")
    assert_one_line_error(cli(data_dir, "delete", "b", check=1), "not found")
    assert_one_line_error(cli(data_dir, "put", "conflict-1", "x", check=5), "conflict")
    quorum = cli(data_dir, "put", "quorum-1", "x", "--timeout", "0.2", check=4)
    assert_one_line_error(quorum, "write quorum unavailable")

    logs = cli(data_dir, "logs", "control", check=0).stdout
    assert "[control-plane]" in logs and "sn1 is serving" in logs
    assert "[fake sn5 az-c]" in cli(data_dir, "logs", "sn5", "-n", "3", check=0).stdout
    assert_one_line_error(cli(data_dir, "logs", "sn9", check=1), "no log for 'sn9'")


def test_shell_from_a_pipe(fake_cluster):
    """Scenario: the shell reads commands from stdin: autocommit verbs, a transaction that
    commits, one that aborts, errors on one line that do not end the session."""
    script = "\n".join([
        "put k1 v1", "get k1", "begin", "put k2 v2", "get k2", "commit", "get k2",
        "begin", "put k3 v3", "abort", "get k3", "bogus", "scan", "status --json", "quit", "put never x"])
    result = cli(fake_cluster, "shell", stdin=script + "\n")
    out = result.stdout
    # The client buffers a transaction's writes and sends them with COMMIT (decision 11):
    # the shell has no transaction id to show before the first read.
    assert "OK (commit LSN 1)" in out and "BEGIN (writes are sent with COMMIT)" in out
    assert "OK (in transaction)" in out
    assert "COMMIT (commit LSN 2)" in out and "ABORT" in out.splitlines()
    assert out.splitlines().count("v2") == 2 and "k1\tv1\nk2\tv2\n" in out
    assert '"cluster_endpoint"' in out
    assert "error: not found: key 'k3'" in result.stderr
    assert "error: invalid choice" in result.stderr or "error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.returncode == 2   # the last failed command was a usage error
    assert cli(fake_cluster, "get", "never", check=1)


def test_faults_and_network_delay(fake_cluster):
    """Scenario: node kill/stop/start/pause/resume and az down/up move the processes'
    states as status reports them; net delay rewrites cluster.json's extra_az_ms."""
    data_dir = fake_cluster
    before = {p["name"]: p for p in status_json(data_dir)["processes"]}
    out = cli(data_dir, "node", "kill", "sn2", check=0).stdout
    assert f"sn2 killed (SIGKILL to pid {before['sn2']['pid']})" in out
    assert not pid_running(before["sn2"]["pid"])
    procs = {p["name"]: p for p in status_json(data_dir)["processes"]}
    assert procs["sn2"]["state"] == "down" and procs["sn2"]["exit_reason"] == "killed by SIGKILL"
    assert procs["sn2"]["pid"] is None and procs["sn2"]["scl"] is None
    assert "is not running" in cli(data_dir, "node", "kill", "sn2", check=0).stdout
    assert "started" in cli(data_dir, "node", "start", "sn2", check=0).stdout
    procs = {p["name"]: p for p in status_json(data_dir)["processes"]}
    assert procs["sn2"]["up"] and procs["sn2"]["pid"] != before["sn2"]["pid"]
    assert procs["sn2"]["address"] == before["sn2"]["address"] and procs["sn2"]["starts"] == 2

    # The writer stops: the control plane promotes db2; db1 comes back as its replica.
    assert "stopped (pid" in cli(data_dir, "node", "stop", "db1", check=0).stdout
    assert wait_for(lambda: status_json(data_dir)["writer"] == "db2", 10), status_json(data_dir)
    assert cli(data_dir, "put", "x", "y", check=0).stdout.startswith("OK")
    cli(data_dir, "node", "start", "db1", check=0)
    launched = [l for l in open(DataDir(str(data_dir)).log("db1")) if "launching" in l][-1]
    db2 = {p["name"]: p for p in status_json(data_dir)["processes"]}["db2"]
    assert f" replica --writer {db2['address']} " in launched, launched
    # No instance left to take over: a write fails at once, saying so.
    cli(data_dir, "node", "stop", "db1", check=0)
    cli(data_dir, "node", "stop", "db2", check=0)
    started = time.monotonic()
    put = cli(data_dir, "put", "x", "y", check=3)
    assert_one_line_error(put, "does not answer")
    assert time.monotonic() - started < 10
    cli(data_dir, "node", "start", "db2", check=0)
    cli(data_dir, "node", "start", "db1", check=0)

    assert "paused (SIGSTOP" in cli(data_dir, "node", "pause", "sn4", check=0).stdout
    assert {p["name"]: p["state"] for p in status_json(data_dir)["processes"]}["sn4"] == "paused"
    assert "resumed (SIGCONT" in cli(data_dir, "node", "resume", "sn4", check=0).stdout

    out = cli(data_dir, "az", "down", "az-c", check=0).stdout
    assert "sn5 killed" in out and "sn6 killed" in out
    states = {p["name"]: p["state"] for p in status_json(data_dir)["processes"]}
    assert states["sn5"] == states["sn6"] == "down" and states["sn4"] == "up"
    cli(data_dir, "az", "up", "az-c", check=0)
    assert status_json(data_dir)["all_up"]

    assert_one_line_error(cli(data_dir, "node", "kill", "sn9", check=2), "no process named 'sn9'")
    assert_one_line_error(cli(data_dir, "az", "down", "az-q", check=2), "unknown AZ")

    cli(data_dir, "net", "delay", "--az", "az-b", "--ms", "40", check=0)
    config = json.load(open(DataDir(str(data_dir)).cluster_json))
    assert config["latency"]["extra_az_ms"] == {"az-b": 40.0}
    assert status_json(data_dir)["latency"]["extra_az_ms"] == {"az-b": 40.0}
    cli(data_dir, "net", "clear", check=0)
    assert json.load(open(DataDir(str(data_dir)).cluster_json))["latency"]["extra_az_ms"] == {}


def test_down_leaves_nothing_and_up_again(tmp_path):
    """Scenario: down stops every process; a second down says so; up again on the same
    data dir reuses its ports; a control plane killed with SIGKILL leaves its children,
    which `down` then stops."""
    data_dir = tmp_path / "c"
    cli(data_dir, "up", "--detach", check=0)
    first = status_json(data_dir)
    pids = all_pids(data_dir)
    assert len(pids) == 9
    out = cli(data_dir, "down", check=0).stdout
    assert "no process left running" in out and "db1" in out
    assert_no_process_left(data_dir, pids)
    assert "no cluster running" in cli(data_dir, "down", check=0).stdout
    assert_one_line_error(cli(data_dir, "status", check=3), "no cluster running")

    cli(data_dir, "up", "--detach", check=0)
    second = status_json(data_dir)
    assert {p["name"]: p["address"] for p in second["processes"]} == \
        {p["name"]: p["address"] for p in first["processes"]}
    assert_one_line_error(cli(data_dir, "up", "--detach", check=1), "already running")
    pids = all_pids(data_dir)
    os.kill(second["control"]["pid"], signal.SIGKILL)
    time.sleep(0.3)
    out = cli(data_dir, "down", check=0).stdout
    assert "leftover" in out
    assert_no_process_left(data_dir, pids)


def test_two_clusters_side_by_side(tmp_path):
    """Scenario: two data dirs, two clusters, different ports, independent data."""
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        cli(a, "up", "--detach", check=0)
        cli(b, "up", "--detach", check=0)
        addrs_a = {p["address"] for p in status_json(a)["processes"]}
        addrs_b = {p["address"] for p in status_json(b)["processes"]}
        assert not addrs_a & addrs_b
        cli(a, "put", "k", "from-a", check=0)
        assert cli(a, "get", "k", check=0).stdout == "from-a\n"
        cli(b, "get", "k", check=1)
    finally:
        cli(a, "down")
        cli(b, "down")


def test_foreground_up_sigint_stops_everything(tmp_path):
    """Scenario: a foreground `up` prints one block; SIGINT (Ctrl-C) stops every process
    (SIGTERM first) and reports each one; no process is left."""
    data_dir = tmp_path / "fg"
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "up", "--data-dir", str(data_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=fake_env(), cwd=ROOT)
    try:
        block = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            block.append(line)
            if line.startswith("stop:"):
                break
        text = "".join(block)
        assert "aurora-lite cluster is up" in text and "cluster endpoint:" in text, text
        assert "press Ctrl-C" in text
        for name in ("db1", "sn1", "sn6", "control-plane"):
            assert name in text
        pids = all_pids(data_dir)
        assert len(pids) == 9 and all(pid_running(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            cli(data_dir, "down")
    assert proc.returncode == 0, err
    assert "SIGINT received: stopping the cluster" in out
    for name in ("db1", "sn1", "sn6"):
        assert any(l.strip().startswith(name) and "SIGTERM" in l for l in out.splitlines()), out
    assert "no process left running" in out
    assert_no_process_left(data_dir, pids)


def test_latency_watcher_sees_net_delay(tmp_path):
    """Scenario: `net delay` rewrites cluster.json; the writer's latency model (asked before
    each storage RPC) follows it, and does not stat the file again within its interval."""
    from engine.format.cluster_config import ClusterConfig
    from engine.transport.latency import AzLatency

    dd = DataDir(str(tmp_path))
    launcher.plan_cluster(dd).config.save(dd.cluster_json)
    config = ClusterConfig.load(dd.cluster_json)
    sn1, sn3, sn5 = (config.storage_nodes[i].address for i in (0, 2, 4))
    writer = AzLatency("az-a", "db1", path=dd.cluster_json, interval_s=0.0)
    assert [writer.one_way_ms(a) for a in (sn1, sn3, sn5)] == [0.25, 1.0, 1.0]
    config.latency.extra_az_ms["az-c"] = 50.0
    config.save(dd.cluster_json)
    assert [writer.one_way_ms(a) for a in (sn1, sn3, sn5)] == [0.25, 1.0, 51.0]
    slow = AzLatency("az-a", "db1", path=dd.cluster_json, interval_s=3600)
    assert slow.one_way_ms(sn5) == 51.0   # the first look reads the file
    config.latency.extra_az_ms.clear()
    config.save(dd.cluster_json)
    assert slow.one_way_ms(sn5) == 51.0   # not checked again within the interval: cheap per RPC


def test_gossip_latency_follows_cluster_json(tmp_path):
    """Scenario: a storage node's calls to a peer, through the transport, sleep the one-way
    delay before the request and after the reply; `net delay` (cluster.json) changes it live."""
    import asyncio

    from aurora_pb import storage_pb2
    from engine.format.cluster_config import ClusterConfig
    from engine.transport import service_of
    from engine.transport.grpc_transport import GrpcTransport
    from engine.transport.latency import AzLatency

    dd = DataDir(str(tmp_path))
    config = launcher.plan_cluster(dd).config
    config.save(dd.cluster_json)
    sn3 = config.storage_nodes[2].address          # az-b
    sn2 = config.storage_nodes[1].address          # az-a
    latency = AzLatency("az-a", "sn1", path=dd.cluster_json, interval_s=0.0)
    assert latency.one_way_s(sn2) == pytest.approx(0.00025)
    assert latency.one_way_s(sn3) == pytest.approx(0.001)
    assert latency.one_way_s("127.0.0.1:1") == 0.0   # not in the cluster: no delay
    config.latency.extra_az_ms["az-b"] = 40.0
    config.save(dd.cluster_json)
    assert latency.one_way_s(sn3) == pytest.approx(0.041)
    assert latency.one_way_s(sn2) == pytest.approx(0.00025)

    class Peer:
        async def NodeStatus(self, request, ctx):
            return storage_pb2.NodeStatusReply(node_id="sn3")

    async def timed_call() -> float:
        storage = service_of(storage_pb2, "Storage")
        server = await GrpcTransport("sn3").serve("127.0.0.1", 0, {storage: Peer()})
        # Pretend the server is sn3 (az-b, +40 ms): its address maps to that AZ.
        peer = f"127.0.0.1:{server.port}"
        config.storage_nodes[2] = type(config.storage_nodes[2])("sn3", "az-b", peer)
        config.save(dd.cluster_json)
        channel = GrpcTransport("sn1", latency).channel(peer, timeout_s=5)
        stub = channel.stub(storage)
        await stub.NodeStatus(storage_pb2.NodeStatusRequest())   # connect
        started = time.monotonic()
        reply = await stub.NodeStatus(storage_pb2.NodeStatusRequest())
        elapsed = time.monotonic() - started
        assert reply.node_id == "sn3"
        await channel.close()
        await server.stop(None)
        return elapsed

    assert asyncio.run(timed_call()) >= 2 * 0.041
    ClusterConfig.load(dd.cluster_json)   # still a valid config


def test_failover_replicas_and_endpoints_on_fakes(tmp_path):
    """Scenario: `up --replicas 2` on fake nodes: tiers and AZs by name; `failover --target
    db3` moves the writer (db1 steps down and follows); `replica add --tier 0` and `replica
    remove`; custom endpoints are created, listed, resolved to their replicas and deleted;
    the writer's death promotes the best tier; a writer that stops answering (paused) is
    replaced too and follows once resumed; `down` then `up` brings every instance back with
    the role it had (topology.json)."""
    data_dir = tmp_path / "fo"
    cli(data_dir, "up", "--detach", "--replicas", "2", check=0)
    pids = all_pids(data_dir)
    try:
        procs = {p["name"]: p for p in status_json(data_dir)["processes"]}
        assert [(procs[n]["role"], procs[n]["az"], procs[n]["tier"]) for n in ("db1", "db2", "db3")] == [
            ("writer", "az-a", 0), ("replica", "az-b", 1), ("replica", "az-c", 2)]
        assert_one_line_error(cli(data_dir, "failover", "--target", "db1", check=1), "already the writer")
        assert_one_line_error(cli(data_dir, "failover", "--target", "db9", check=1), "no instance named 'db9'")

        out = cli(data_dir, "failover", "--target", "db3", check=0).stdout
        assert "db3 promoted" in out and "db1 stepped down: a replica of db3" in out, out
        state = status_json(data_dir)
        procs = {p["name"]: p for p in state["processes"]}
        assert state["writer"] == "db3" and state["cluster_endpoint"] == procs["db3"]["address"]
        assert procs["db1"]["role"] == "replica" and procs["db1"]["reported_role"] == "replica"
        assert procs["db1"]["following"] == procs["db3"]["address"] == procs["db2"]["following"]
        assert state["failovers"] == 1 and "db1 -> db3" in state["last_failover"]
        assert json.load(open(DataDir(str(data_dir)).topology_json))["writer"] == "db3"

        out = cli(data_dir, "replica", "add", "--tier", "0", check=0).stdout
        assert out.startswith("db4 started") and "az-a, tier 0" in out, out
        assert_one_line_error(cli(data_dir, "replica", "remove", "db3", check=1), "is the writer")
        out = cli(data_dir, "endpoint", "create", "olap", "--members", "db2,db3", check=0).stdout
        assert "members db2, db3" in out and "db2 (replica)" in out and "db3" not in out.split("leads to")[1]
        assert_one_line_error(cli(data_dir, "endpoint", "create", "olap", "--members", "db2", check=1), "exists")
        assert_one_line_error(cli(data_dir, "endpoint", "create", "x", "--members", "db7", check=1), "no instance")
        listed = {e["endpoint"]: e for e in json.loads(cli(data_dir, "endpoint", "list", "--json", check=0).stdout)}
        assert [t["instance"] for t in listed["reader"]["targets"]] == ["db1", "db2", "db4"]
        assert [t["instance"] for t in listed["custom:olap"]["targets"]] == ["db2"]
        assert [t["instance"] for t in listed["cluster"]["targets"]] == ["db3"]
        assert cli(data_dir, "put", "k", "v", check=0).stdout.startswith("OK")   # on db3
        assert_one_line_error(cli(data_dir, "put", "k", "v", "--endpoint", "custom:olap", check=1),
                              "does not take writes")
        assert_one_line_error(cli(data_dir, "get", "k", "--endpoint", "custom:nope", check=2),
                              "no custom endpoint named 'nope'")
        out = cli(data_dir, "replica", "remove", "db2", check=0).stdout
        assert "db2 removed" in out
        listed = {e["endpoint"]: e for e in json.loads(cli(data_dir, "endpoint", "list", "--json", check=0).stdout)}
        assert listed["custom:olap"]["members"] == ["db3"]   # db2 left it; db3 is the writer now
        assert [t["instance"] for t in listed["custom:olap"]["targets"]] == ["db3"]
        cli(data_dir, "endpoint", "delete", "olap", check=0)
        assert "custom:olap" not in cli(data_dir, "endpoint", "list", check=0).stdout

        # The writer dies: db4 (tier 0, added after db1's tier 0: name breaks the tie) or
        # db1: tiers 0, 0 -> db1 wins by name.
        cli(data_dir, "node", "kill", "db3", check=0)
        assert wait_for(lambda: status_json(data_dir)["writer"] == "db1", 10), status_json(data_dir)
        out = cli(data_dir, "logs", "control", check=0).stdout
        assert "writer db3 is down (db3 killed by SIGKILL): failing over" in out

        # A writer that stops answering (SIGSTOP) is replaced after ~1.5 s; resumed, it is
        # told to follow the new writer.
        cli(data_dir, "node", "pause", "db1", check=0)
        assert wait_for(lambda: status_json(data_dir)["writer"] == "db4", 15), status_json(data_dir)
        assert "no health check answer for" in cli(data_dir, "logs", "control", check=0).stdout
        cli(data_dir, "node", "resume", "db1", check=0)

        def db1_follows_db4():
            procs = {p["name"]: p for p in status_json(data_dir)["processes"]}
            return procs["db1"]["reported_role"] == "replica" and procs["db1"]["following"] == procs["db4"]["address"]
        assert wait_for(db1_follows_db4, 15), status_json(data_dir)
        pids = all_pids(data_dir)
        cli(data_dir, "down", check=0)
        assert_no_process_left(data_dir, pids)

        assert_one_line_error(cli(data_dir, "up", "--detach", "--replicas", "1", check=2),
                              "has 2 replica(s) (db1, db3)")
        cli(data_dir, "up", "--detach", check=0)
        pids = all_pids(data_dir)
        state = status_json(data_dir)
        roles = {p["name"]: p["role"] for p in state["processes"] if p["role"] != "storage"}
        assert roles == {"db1": "replica", "db3": "replica", "db4": "writer"}
        assert {p["name"]: p["tier"] for p in state["processes"] if p["tier"] is not None} == \
            {"db1": 0, "db3": 2, "db4": 0}
        launched = [l for l in open(DataDir(str(data_dir)).log("db3")) if "launching" in l][-1]
        assert " replica --writer " in launched
    finally:
        cli(data_dir, "down")
        for pid in pids + all_pids(data_dir):
            if pid_belongs(pid, str(data_dir)):
                os.kill(pid, signal.SIGKILL)
