"""End to end through the CLI only, as a new user would: the README tour on real processes.

Scenario base: every test starts a real cluster (`aurora-lite up --detach`: control plane,
six storage nodes, writer db1, replica db2) on a temporary data dir and talks to it only
by running `python -m engine.cli ...` and reading what it prints and its exit code. After
`down`, or Ctrl-C on a foreground `up`, no process of the cluster may be left running.

test_readme_tour also checks that the commands it runs are exactly the `$ aurora-lite`
lines of README.md's Tour, in order, so the README cannot drift from what is tested.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from engine.cluster import launcher
from engine.cluster.launcher import DataDir, pid_belongs, pid_running

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
INSTANCES = ["db1", "db2"]          # `up` starts the writer db1 and one replica, db2
STORAGE = ["sn1", "sn2", "sn3", "sn4", "sn5", "sn6"]
NAMES = INSTANCES + STORAGE
COMMIT_RE = re.compile(r"^OK \(commit LSN (\d+)\)$")



def cli_env() -> dict:
    env = dict(os.environ)
    env.pop(launcher.EXEC_ENV, None)
    env.pop(launcher.DATA_DIR_ENV, None)
    return env


class Cli:
    """Runs `aurora-lite ARGS --data-dir DIR`; remembers the commands it ran."""

    def __init__(self, data_dir) -> None:
        self.data_dir = str(data_dir)
        self.ran: list[str] = []

    def __call__(self, *argv, check: int | None = 0, timeout: float = 60, stdin: str | None = None,
                 record: bool = True) -> subprocess.CompletedProcess:
        if record:
            self.ran.append(" ".join(argv))
        cmd = [sys.executable, "-m", "engine.cli", *argv, "--data-dir", self.data_dir]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                env=cli_env(), input=stdin, cwd=ROOT)
        assert "Traceback" not in result.stderr, result.stderr
        if check is not None:
            assert result.returncode == check, (
                f"`aurora-lite {' '.join(argv)}` exited {result.returncode}, expected {check}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def status(self) -> dict:
        state = json.loads(self("status", "--json", record=False).stdout)
        state["by_name"] = {p["name"]: p for p in state["processes"]}
        return state

    def pids(self) -> list[int]:
        info = launcher.read_control(DataDir(self.data_dir)) or {}
        return list(launcher.cluster_pids(info).values())

    def kill_leftovers(self, pids) -> None:
        for pid in pids:
            if pid_belongs(pid, self.data_dir):
                os.kill(pid, signal.SIGKILL)


def assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pid_running(p) for p in pids):
        time.sleep(0.05)
    assert not [p for p in pids if pid_running(p)], "processes left running"


def commit_lsn(result) -> int:
    match = COMMIT_RE.match(result.stdout.strip())
    assert match, result.stdout
    return int(match.group(1))


def one_error_line(result) -> str:
    lines = [l for l in result.stderr.splitlines() if l.startswith("aurora-lite:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def up(cli: Cli, *flags) -> list[int]:
    out = cli("up", "--detach", *flags, timeout=90, record=False).stdout  # README: foreground `up`
    assert "aurora-lite cluster is up" in out and "cluster endpoint:" in out, out
    state = cli.status()
    assert state["all_up"], state
    assert sorted(state["by_name"]) == NAMES
    return cli.pids()


def readme_tour_commands(section: str = "Tour") -> list[str]:
    with open(README) as f:
        text = f.read()
    tour = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    return [line[len("$ aurora-lite "):].strip() for line in tour.splitlines()
            if line.startswith("$ aurora-lite ")]


@pytest.fixture
def cluster(tmp_path):
    cli = Cli(tmp_path / "aurora")
    pids: list[int] = []
    try:
        yield cli
        pids = cli.pids()
    finally:
        pids = pids or cli.pids()
        cli("down", check=None, record=False)
        cli.kill_leftovers(pids)


def test_readme_tour(cluster):
    """Scenario: the README tour. Writes go on with an AZ down (4/6), stall when one more
    node dies (3/6) while earlier reads go on, and the stalled commit completes when a
    node comes back; the AZ returns and catches up by gossip; the writer is killed, the
    replica db2 takes over by itself and the next put finds it, and db1 comes back as
    db2's replica; down leaves nothing."""
    cli = cluster
    up(cli)

    lsns = [commit_lsn(cli("put", "apple", "red")), commit_lsn(cli("put", "banana", "yellow")),
            commit_lsn(cli("put", "cherry", "dark-red"))]
    assert lsns == sorted(lsns) and len(set(lsns)) == 3
    assert cli("get", "banana").stdout == "yellow\n"
    text = cli("status").stdout
    for name in NAMES:
        assert f"\n{name} " in text, text
    assert "SCL of each segment" in text and "cluster endpoint:" in text
    state = cli.status()
    assert state["by_name"]["db1"]["vdl"] >= lsns[-1]
    assert all(state["by_name"][n]["scl_max"] >= lsns[-1] for n in STORAGE)
    assert all(state["by_name"][n]["bytes_received"] > 0 for n in STORAGE)

    out = cli("az", "down", "az-c").stdout
    assert re.search(r"^sn5 killed \(SIGKILL to pid \d+\)$", out, re.M), out
    assert re.search(r"^sn6 killed \(SIGKILL to pid \d+\)$", out, re.M), out
    state = cli.status()
    for name in ("sn5", "sn6"):
        assert state["by_name"][name]["state"] == "down"
        assert state["by_name"][name]["exit_reason"] == "killed by SIGKILL"
    lsns.append(commit_lsn(cli("put", "date", "brown")))   # 4 of 6: writes go on

    assert re.match(r"^sn1 killed \(SIGKILL to pid \d+\)$", cli("node", "kill", "sn1").stdout)
    assert cli("get", "apple").stdout == "red\n"            # 3 of 6: reads go on
    assert cli("scan").stdout == "apple\tred\nbanana\tyellow\ncherry\tdark-red\ndate\tbrown\n"

    stalled = cli("put", "elder", "purple", "--timeout", "3", check=4)
    line = one_error_line(stalled)
    assert line.startswith("aurora-lite: write quorum unavailable: commit LSN "), line
    assert "not durable after 3.0s" in line and "the commit may still complete when a node returns" in line
    stalled_lsn = int(re.search(r"commit LSN (\d+)", line).group(1))
    assert stalled_lsn > lsns[-1]
    text = cli("status").stdout
    assert "db1: 1 commit(s) waiting for a write quorum" in text, text
    state = cli.status()
    writer = state["by_name"]["db1"]
    assert writer["waiting_commits"] == 1 and lsns[-1] <= writer["vdl"] < stalled_lsn
    for name in ("sn2", "sn3", "sn4"):   # the record is in three logs: SCL past the VDL
        assert state["by_name"][name]["scl_max"] >= stalled_lsn
    assert [state["by_name"][n]["state"] for n in ("sn1", "sn5", "sn6")] == ["down"] * 3

    assert cli("get", "apple").stdout == "red\n"   # reads go on during the stall, as of VDL

    assert re.match(r"^sn1 started: pid \d+, serving on 127\.0\.0\.1:\d+ after [\d.]+s$",
                    cli("node", "start", "sn1").stdout)
    started = time.monotonic()
    while True:   # "within a second or two": the writer's retry reaches sn1
        writer = cli.status()["by_name"]["db1"]
        if writer["waiting_commits"] == 0:
            break
        assert time.monotonic() - started < 5, f"stalled commit still waiting after 5s: {writer}"
        time.sleep(0.2)
    assert writer["vdl"] >= stalled_lsn
    text = cli("status").stdout
    assert "waiting for a write quorum" not in text, text
    assert cli("get", "elder").stdout == "purple\n"          # the stalled commit completed

    out = cli("az", "up", "az-c").stdout
    assert re.search(r"^sn5 started: pid \d+", out, re.M) and re.search(r"^sn6 started: pid \d+", out, re.M)
    deadline = time.monotonic() + 20
    while True:   # gossip fills sn5's and sn6's gaps
        state = cli.status()
        lags = {n: state["by_name"][n]["lag_lsn"] for n in STORAGE}
        if state["all_up"] and all(lag == 0 for lag in lags.values()):
            break
        assert time.monotonic() < deadline, (
            f"not caught up by gossip after 20s: lag {lags}; SCL per PG "
            f"{ {n: state['by_name'][n]['scl'] for n in STORAGE} }")
        time.sleep(0.5)
    assert all(state["by_name"][n]["scl_max"] >= stalled_lsn for n in STORAGE)
    text = cli("status").stdout
    assert re.search(r"^sn5 .* up .*SCL \d+ .* 0 LSN$", text, re.M), text

    # Lose the writer: the control plane promotes db2; the next put finds it by itself.
    epoch = cli.status()["by_name"]["db1"]["volume_epoch"]
    out = cli("node", "kill", "db1").stdout
    assert re.match(r"^db1 killed \(SIGKILL to pid \d+\)$", out.strip()), out
    fig = commit_lsn(cli("put", "fig", "green"))
    assert fig > stalled_lsn
    assert cli("get", "elder").stdout == "purple\n"   # nothing acknowledged was lost
    out = cli("node", "start", "db1").stdout
    assert re.match(r"^db1 started: pid \d+, serving on 127\.0\.0\.1:\d+ after [\d.]+s$", out.strip()), out
    text = cli("status").stdout
    assert re.search(r"^db1 +replica +az-a +0 +\d+ +up .* ms, \d+ LSN$", text, re.M), text
    assert re.search(r"^db2 +writer +az-b +1 +\d+ +up ", text, re.M), text
    assert "(db2, the writer)" in text and "failovers: 1; last:" in text, text
    state = cli.status()
    db1, db2 = state["by_name"]["db1"], state["by_name"]["db2"]
    assert state["writer"] == "db2" and state["cluster_endpoint"] == db2["address"]
    assert db2["volume_epoch"] > epoch and db2["vdl"] >= fig
    assert (db1["reported_role"], db1["following"]) == ("replica", db2["address"])
    with open(DataDir(cli.data_dir).log("db1")) as f:
        last_run = f.read().rsplit("--- ", 1)[1]
    assert " replica --writer " in last_run.splitlines()[0] and "recovered volume" not in last_run

    pids = cli.pids()
    assert len(pids) == 9
    out = cli("down").stdout
    assert "no process left running" in out, out
    assert_gone(pids)
    assert cli.ran == readme_tour_commands(), "README.md's tour and this test differ"
    assert_no_error_lines(cli)


def assert_no_error_lines(cli: Cli) -> None:
    """ERROR lines mean something is wrong; the faults of the tour are expected ones."""
    logs = DataDir(cli.data_dir).logs
    errors = []
    for name in sorted(os.listdir(logs)):
        with open(os.path.join(logs, name), errors="replace") as f:
            errors += [f"{name}: {line.rstrip()}" for line in f if " ERROR " in line or "Traceback" in line]
    assert not errors, "\n".join(errors[:20])


def test_up_again_restores_every_committed_key(tmp_path):
    """Scenario: random keys (seeded; the seed is printed), a transaction, deletes; down;
    up on the same data dir: every committed key is back, deleted ones are not."""
    seed = int(os.environ.get("AURORA_LITE_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (AURORA_LITE_SEED={seed} replays it)")
    rng = random.Random(seed)
    cli = Cli(tmp_path / "aurora")
    pids = []
    try:
        pids = up(cli)
        expected: dict[str, str] = {}
        lines = []
        for i in range(40):
            key = f"k{rng.randrange(1000):03d}"
            value = f"v{i}-{rng.randrange(10**6)}"
            lines.append(f"put {key} {value}")
            expected[key] = value
        lines += ["begin", "put txn-a 1", "put txn-b 2", "commit", "begin", "put txn-c 3", "abort"]
        expected.update({"txn-a": "1", "txn-b": "2"})
        for key in rng.sample(sorted(k for k in expected if k.startswith("k")), 5):
            lines.append(f"delete {key}")
            del expected[key]
        result = cli("shell", stdin="\n".join(lines) + "\n")
        assert "COMMIT (commit LSN" in result.stdout and "ABORT" in result.stdout, result.stdout
        assert result.stderr == "", result.stderr
        cli("down")
        assert_gone(pids)

        pids = up(cli)
        scan = cli("scan", "--limit", "1000").stdout
        got = dict(line.split("\t", 1) for line in scan.splitlines())
        assert got == expected
        cli("get", "txn-c", check=1)
        cli("down")
        assert_gone(pids)
    finally:
        cli("down", check=None, record=False)
        cli.kill_leftovers(pids)


def test_ctrl_c_on_foreground_up(tmp_path):
    """Scenario: `up` in the foreground prints one block and waits; SIGINT (Ctrl-C) stops
    every process, writer first, SIGTERM before SIGKILL, reports each, leaves none."""
    cli = Cli(tmp_path / "aurora")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "up", "--data-dir", cli.data_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=ROOT)
    pids: list[int] = []
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
        assert "aurora-lite cluster is up" in text and "press Ctrl-C" in text, text
        for name in NAMES + ["control-plane"]:
            assert re.search(rf"^  {name} .* 127\.0\.0\.1:\d+ +\d+$", text, re.M), text
        pids = cli.pids()
        assert len(pids) == 9 and all(pid_running(p) for p in pids)
        commit_lsn(cli("put", "k", "v"))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        cli("down", check=None, record=False)
        cli.kill_leftovers(pids)
    assert proc.returncode == 0, err
    assert "SIGINT received: stopping the cluster" in out, out
    for name in NAMES:
        assert re.search(rf"^  {name} +pid \d+ +SIGTERM, ", out, re.M), out
    assert "no process left running" in out
    assert_gone(pids)


def test_two_clusters_side_by_side(tmp_path):
    """Scenario: two data dirs (one with --base-port) run at once on different ports and
    hold different data; each `down` stops only its own cluster."""
    a, b = Cli(tmp_path / "a"), Cli(tmp_path / "b")
    pids_a, pids_b = [], []
    try:
        pids_a = up(a)
        # Below the ephemeral range, so cluster a's client connections cannot take these;
        # chosen after a is up. The machine is shared: a port found free can be taken
        # before b's control plane binds it, and `up` then refuses with "ports in use"
        # (its own clear error): try the next free block, at most three times.
        base = None
        refused = 0
        for start in range(21000, 31000, 100):
            if not all(launcher.port_free(start + i) for i in range(20)):
                continue
            result = b("up", "--detach", "--base-port", str(start), check=None, timeout=90,
                       record=False)
            if result.returncode == 0:
                assert "aurora-lite cluster is up" in result.stdout, result.stdout
                base = start
                break
            assert "ports in use" in result.stderr, result.stderr
            refused += 1
            assert refused < 3, f"three free port blocks were taken before b bound them: {result.stderr}"
        if base is None:
            pids_b = up(b)
        else:
            state = b.status()
            assert state["all_up"] and sorted(state["by_name"]) == NAMES, state
            pids_b = b.pids()
        addr_a = {p["address"] for p in a.status()["processes"]}
        state_b = b.status()
        addr_b = {p["address"] for p in state_b["processes"]}
        assert not addr_a & addr_b
        if base:
            assert state_b["by_name"]["sn1"]["address"] == f"127.0.0.1:{base + 11}"
            assert state_b["control"]["address"] == f"127.0.0.1:{base}"
        commit_lsn(a("put", "where", "a"))
        commit_lsn(b("put", "where", "b"))
        assert a("get", "where").stdout == "a\n" and b("get", "where").stdout == "b\n"
        a("down")
        assert_gone(pids_a)
        assert all(pid_running(p) for p in pids_b)
        assert b("get", "where").stdout == "b\n"
        b("down")
        assert_gone(pids_b)
    finally:
        for cli, pids in ((a, pids_a), (b, pids_b)):
            cli("down", check=None, record=False)
            cli.kill_leftovers(pids)


def test_readme_time_travel(tmp_path):
    """Scenario: README.md's "Time travel" section on a fresh data dir: an as-of scan, a
    clone at an older commit that takes its own writes, a backtrack that hides the last
    commit and one that brings it back, then down (which also stops the clone's writer).
    LSNs are taken from the puts' answers (the README shows those of one run)."""
    cli = Cli(tmp_path / "aurora")
    pids: list[int] = []
    try:
        out = cli("up", "--detach", timeout=90).stdout
        assert "aurora-lite cluster is up" in out, out
        pids = cli.pids()
        apple = commit_lsn(cli("put", "apple", "red"))
        banana = commit_lsn(cli("put", "banana", "yellow"))
        cherry = commit_lsn(cli("put", "cherry", "dark-red"))
        assert apple < banana < cherry
        assert cli("scan", "--as-of-lsn", str(banana)).stdout == "apple\tred\nbanana\tyellow\n"
        out = cli("clone", "create", "experiment", "--at-lsn", str(banana)).stdout
        assert f"as of commit LSN {banana} " in out and "no data copied" in out, out
        out = cli("clone", "start", "experiment", timeout=120).stdout
        assert "writer of volume experiment serving on" in out, out
        commit_lsn(cli("put", "kiwi", "brown", "--volume", "experiment"))
        assert cli("scan", "--volume", "experiment").stdout == (
            "apple\tred\nbanana\tyellow\nkiwi\tbrown\n")
        assert cli("get", "kiwi", check=1, record=False).returncode == 1  # not in the parent
        out = cli("clone", "list").stdout
        assert re.search(rf"^experiment +main +{banana} +[\d,]+ B +[1-9][\d,]* B +writer up$",
                         out, re.M), out
        out = cli("backtrack", "--to-lsn", str(banana), timeout=120).stdout
        assert out.startswith(f"backtracked to commit LSN {banana} "), out
        assert one_error_line(cli("get", "cherry", check=1)) == "aurora-lite: not found: key 'cherry'"
        out = cli("backtrack", "--to-lsn", str(cherry), timeout=120).stdout
        assert out.startswith(f"backtracked to commit LSN {cherry} "), out
        assert cli("get", "cherry").stdout == "dark-red\n"
        out = cli("backtrack", "info").stdout
        assert f"latest reachable:   LSN {cherry} " in out and "timelines recorded" in out, out
        clone_pid = json.load(open(os.path.join(cli.data_dir, "clones", "experiment.json")))["pid"]
        out = cli("down").stdout
        assert "clone writer experiment" in out and "no process left running" in out, out
        assert_gone(pids + [clone_pid])
        normalise = lambda cmds: [re.sub(r"\b\d{5,}\b", "LSN", c) for c in cmds]
        assert normalise(cli.ran) == normalise(readme_tour_commands("Time travel")), (
            "README.md's time-travel section and this test differ")
        assert_no_error_lines(cli)
    finally:
        cli("down", check=None, record=False)
        cli.kill_leftovers(pids)
