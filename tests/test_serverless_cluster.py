"""Serverless capacity and replica auto scaling on real processes (docs/serverless.md).

One module-scoped cluster (`aurora-lite up --serverless --min-acu 0.5 --max-acu 4` with
short scale-down timers), driven through the CLI and the client library:

- every instance object of `status --json` carries acu, min_acu and max_acu, and starts
  at its minimum;
- the instance process's OWN buffer pool capacity and admission limit (its Database
  Status and its /metrics) follow its ACU when `capacity` changes the range, with no
  failed request on a connection kept open across every change;
- a step of load scales the writer up, and capacity returns to the minimum after it;
- replica auto scaling adds a replica under a read load (it joins the reader endpoint once
  it serves) and drains and removes it after, with zero failed reads;
- an instance with a minimum of 0 ACU pauses when idle and the next connection resumes
  it (the resume time is printed with -s);
- bad input is refused with one clear line.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from engine.client import Client, ClusterClient

try:
    from tests.test_cli_tour import Cli
except ImportError:  # run from tests/
    from test_cli_tour import Cli

SCALE_DOWN_DELAY_S = 2.0
SCALE_DOWN_INTERVAL_S = 0.5
PAUSE_AFTER_S = 3.0


@pytest.fixture(scope="module")
def sl(tmp_path_factory):
    cli = Cli(tmp_path_factory.mktemp("serverless") / "aurora")
    pids: list[int] = []
    try:
        out = cli("up", "--detach", "--serverless", "--min-acu", "0.5", "--max-acu", "4",
                  "--scale-down-delay", str(SCALE_DOWN_DELAY_S),
                  "--scale-down-interval", str(SCALE_DOWN_INTERVAL_S),
                  "--pause-after", str(PAUSE_AFTER_S), timeout=120).stdout
        assert "aurora-lite cluster is up" in out, out
        pids = cli.pids()
        yield cli
    finally:
        pids = pids or cli.pids()
        cli("down", check=None, record=False)
        cli.kill_leftovers(pids)


def control_address(cli: Cli) -> str:
    with open(f"{cli.data_dir}/control.json") as f:
        return json.load(f)["control"]["address"]


def own_capacity(address: str) -> dict:
    """The instance's own report (Database.Status), not the control plane's view."""
    with Client(address) as client:
        return json.loads(client.status().json)["capacity"]


def own_metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("aurora_capacity_acu", "aurora_buffer_pool_capacity_pages", "aurora_admission_limit"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values


def wait_for(what: str, check, timeout_s: float, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f}s (last: {last!r})")


class Traffic:
    """Threads that put and get through one ClusterClient each (one connection kept open)
    until stopped; every failure is kept."""

    def __init__(self, control: str, endpoint: str, threads: int, writes: bool,
                 pause_s: float = 0.0) -> None:
        self.pause_s = pause_s
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.done = 0
        self._threads = [threading.Thread(target=self._run, args=(control, endpoint, i, writes), daemon=True)
                         for i in range(threads)]

    def _run(self, control: str, endpoint: str, i: int, writes: bool) -> None:
        client = ClusterClient(control, endpoint, failover_wait_s=30.0)
        n = 0
        while not self.stop.is_set():
            key = b"sl-%d-%d" % (i, n % 50)
            try:
                if writes:
                    client.put(key, b"v%d" % n)
                    client.get(key)
                else:
                    client.get(b"sl-read-%d" % (n % 20))
                self.done += 1
            except Exception as exc:   # any failed request is a test failure
                self.failures.append(f"{type(exc).__name__}: {exc}")
            n += 1
            if self.pause_s:
                self.stop.wait(self.pause_s)
        client.close()

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self._threads:
            t.join(timeout=60)


def test_instances_start_at_their_minimum_and_show_their_range(sl):
    state = sl.status()
    for name in ("db1", "db2"):
        p = state["by_name"][name]
        assert p["serverless"] is True
        assert (p["acu"], p["min_acu"], p["max_acu"]) == (0.5, 0.5, 4.0), p
        assert p["buffer_pool_pages"] == 512 and p["admission_limit"] == 2
    for name in ("sn1", "sn6"):
        assert state["by_name"][name]["acu"] is None
    text = sl("status").stdout
    assert "capacity (1 ACU = 1024 buffer pool pages" in text and "serverless" in text, text


def test_the_instance_itself_follows_its_acu_without_a_failed_request(sl):
    state = sl.status()
    db1 = state["by_name"]["db1"]
    control = control_address(sl)
    with Traffic(control, "cluster", threads=2, writes=True) as traffic:
        for target in (2.5, 1.0):   # up, then down below where it started
            sl("capacity", "db1", "--min-acu", str(target), "--max-acu", str(target))
            own = wait_for(f"db1 at {target} ACU", lambda: (lambda c: c if c["acu"] == target else None)(
                own_capacity(db1["address"])), timeout_s=15)
            assert own["buffer_pool_pages"] == 1024 * target
            assert own["admission"]["limit"] == int(4 * target)
            metrics = own_metrics(db1["metrics"])
            assert metrics == {"aurora_capacity_acu": target,
                               "aurora_buffer_pool_capacity_pages": 1024 * target,
                               "aurora_admission_limit": 4 * target}, metrics
        sl("capacity", "db1", "--min-acu", "0.5", "--max-acu", "4")
        time.sleep(1.0)
    assert traffic.failures == [] and traffic.done > 0
    # The same process served it all: no restart.
    assert sl.status()["by_name"]["db1"]["pid"] == db1["pid"]


def test_a_step_of_load_scales_up_and_capacity_returns_to_the_minimum(sl):
    control = control_address(sl)
    wait_for("db1 back at 0.5 ACU", lambda: sl.status()["by_name"]["db1"]["acu"] == 0.5, timeout_s=30)
    with Traffic(control, "cluster", threads=6, writes=True) as traffic:
        started = time.monotonic()
        wait_for("db1 above 0.5 ACU under load",
                 lambda: sl.status()["by_name"]["db1"]["acu"] > 0.5, timeout_s=20)
        reached_s = time.monotonic() - started
    assert traffic.failures == [], traffic.failures[:3]
    assert reached_s < 10, reached_s
    peak = max(e["acu"] for e in sl.status()["scaling"]["decisions"] if e["instance"] == "db1")
    # Back at the minimum within delay + steps * max(interval, tick) (+ slack, loaded machine).
    budget = SCALE_DOWN_DELAY_S + (peak - 0.5) / 0.5 * 1.0 + 10
    wait_for("db1 back at its minimum", lambda: sl.status()["by_name"]["db1"]["acu"] == 0.5,
             timeout_s=budget)
    with open(f"{sl.data_dir}/capacity.csv") as f:
        header = f.readline().strip().split(",")
        rows = f.read().splitlines()
    assert header[:3] == ["unix_time", "instance", "acu"] and len(rows) >= 2


def test_replica_autoscaling_adds_then_drains_and_removes_with_zero_failed_reads(sl):
    with ClusterClient(control_address(sl), "cluster") as writer:
        for i in range(20):
            writer.put(b"sl-read-%d" % i, b"r%d" % i)
    # Keep db2 small so a read load pushes it past the target.
    sl("capacity", "db2", "--min-acu", "0.5", "--max-acu", "0.5")
    out = sl("replica", "autoscale", "--min", "1", "--max", "2", "--target-cpu", "40",
             "--scale-out-cooldown", "1", "--scale-in-cooldown", "4").stdout
    assert "1..2 replicas, target CPU 40%" in out, out
    with Traffic(control_address(sl), "reader", threads=4, writes=False) as traffic:
        state = wait_for("a replica added", lambda: (lambda s: s if "db3" in s["by_name"]
                                                     and s["by_name"]["db3"]["up"] else None)(sl.status()),
                         timeout_s=60)
        assert state["by_name"]["db3"]["serverless"] is True
        endpoints = json.loads(sl("endpoint", "list", "--json").stdout)
        reader = next(e for e in endpoints if e["endpoint"] == "reader")
        assert "db3" in [t["instance"] for t in reader["targets"]]
        time.sleep(1.0)
    assert traffic.failures == [], traffic.failures[:3]
    with Traffic(control_address(sl), "reader", threads=1, writes=False, pause_s=0.1) as light:
        try:
            wait_for("the added replica removed after the load",
                     lambda: "db3" not in sl.status()["by_name"], timeout_s=60)
        except AssertionError:
            raise AssertionError(json.dumps(sl.status()["scaling"], indent=1)) from None
    assert light.failures == [], light.failures[:3]
    scaling = sl.status()["scaling"]
    kinds = [e["reason"].split(":")[0] for e in scaling["decisions"] if e["instance"] == "replicas"]
    assert "out" in kinds and "in" in kinds, scaling
    assert "replica auto scaling is off" in sl("replica", "autoscale", "--off").stdout


def test_min_zero_pauses_when_idle_and_the_next_connection_resumes_it(sl):
    with ClusterClient(control_address(sl), "cluster") as writer:
        writer.put(b"sl-pause", b"kept")
    out = sl("replica", "add", "--serverless", "--min-acu", "0", "--max-acu", "1").stdout
    name = out.split()[0]
    assert name.startswith("db") and "started" in out, out
    # Auto-paused means stopped: status shows "stopping" while the process exits, so wait
    # until the pause is complete.
    state = wait_for(f"{name} auto-paused", lambda: (lambda s: s if s["by_name"][name]["autopaused"]
                                                     and s["by_name"][name]["state"] == "down"
                                                     else None)(sl.status()), timeout_s=PAUSE_AFTER_S + 20)
    p = state["by_name"][name]
    assert p["state"] == "down" and p["exit_reason"] == "auto-paused" and p["pid"] is None, p
    assert (p["acu"], p["min_acu"], p["max_acu"]) == (0.0, 0.0, 1.0), p
    assert "serverless (paused)" in sl("status").stdout
    started = time.monotonic()
    with ClusterClient(control_address(sl), f"instance:{name}") as client:
        assert client.get(b"sl-pause") == b"kept"
    resume_s = time.monotonic() - started
    p = sl.status()["by_name"][name]
    assert p["up"] and not p["autopaused"] and p["acu"] == 0.5, p
    assert 0 < p["last_resume_s"] <= resume_s, (p["last_resume_s"], resume_s)
    reasons = [e["reason"] for e in sl.status()["scaling"]["decisions"] if e["instance"] == name]
    assert any(r.startswith("pause: no request") for r in reasons), reasons
    assert any(r.startswith("resume: a connection to instance:") for r in reasons), reasons
    print(f"{name} resumed in {p['last_resume_s']:.2f}s (client saw {resume_s:.2f}s)")
    sl("replica", "remove", name)


def test_bad_capacity_input_is_refused_clearly(sl):
    r = sl("capacity", "db1", "--min-acu", "4", "--max-acu", "2", check=None)
    assert r.returncode != 0 and "--min-acu 4 is above --max-acu 2" in r.stderr, r.stderr
    r = sl("capacity", "sn1", "--min-acu", "1", "--max-acu", "2", check=None)
    assert r.returncode != 0 and "no instance named 'sn1'" in r.stderr, r.stderr
    r = sl("replica", "autoscale", "--min", "3", "--max", "2", check=None)
    assert r.returncode != 0 and "--min 3" in r.stderr, r.stderr
    assert sl.status()["by_name"]["db1"]["max_acu"] == 4.0
