"""Local processes of a cluster: the data dir, port planning, launching and stopping.

`aurora-lite up` and the control plane (engine/cluster/control_plane.py) share this module. It
imports no gRPC, so it can be used from a process before gRPC starts.

Data dir layout (default ``./.aurora-lite``; ``--data-dir`` or $AURORA_LITE_DATA_DIR)::

    DATA_DIR/
      cluster.json     storage nodes (name, AZ, address), volume layout, LAL, latency,
                       the placement (which six nodes hold each PG, docs/fleet.md);
                       written by the control plane BEFORE any process starts
                       (engine/format/cluster_config.py); `net delay` rewrites its latency
      control.json     control plane address and pid, the cluster endpoint, and every
                       process's role, AZ, address, pid and state; rewritten on every
                       change; after a shutdown it stays with "running": false (the
                       next `up` reuses its ports when they are free)
      topology.json    the compute instances (name, AZ, promotion tier), which one is the
                       writer, and the custom endpoints; rewritten on every change (failover,
                       `replica add|remove`, `endpoint create|delete`), so the next `up`
                       brings the same instances back with the roles they had
      control.lock     flock held by the running control plane (one per data dir)
      sn1/ ... snN/    each storage node's data (LMDB environment); N = 6 unless
                       `up --storage-nodes N` (a fleet, docs/fleet.md)
      logs/NAME.log    stdout + stderr of each process (control.log, sn1.log, db1.log, ...)

Processes are always fresh subprocesses (``python -m engine.cli ...``), never a fork of a
process that runs gRPC (docs/decisions.md, design choice D6). Every process of a cluster has the data dir
in its command line, which is how a pid read from control.json is told apart from an
unrelated process that reused the pid.

Port plan with ``--base-port N``: control plane N, db1 N+1 (db2.. N+2..), sn1..sn6
N+11..N+16; their HTTP ports (Prometheus ``/metrics``, engine/metrics.py) 20 higher: the
control plane's dashboard and metrics N+20, db1 N+21.., sn1..sn6 N+31..N+36; a fleet's
sn7..sn24 N+60..N+77 (HTTP N+80..N+97); PostgreSQL
(docs/postgres.md): the cluster endpoint N+40, the reader endpoint N+41, db1 N+42 (db2..
N+43..). Without it: each process keeps the previous run's ports if they are still free,
else gets free ports (engine/cluster/ports.py). A replica added later (`replica add`) gets
free ports.

Instances: db1 starts as the writer, db2..db(N+1) as its read replicas, spread over the AZs
(db1 az-a, db2 az-b, db3 az-c, db4 az-a, ...), each with a promotion tier (db1 0, db2 1,
db3 2, ...; lower is promoted first, as in Aurora's tiers 0-15). Names never change; the
writer role moves on failover and topology.json remembers where it went.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from engine.cluster.ports import free_ports, port_free  # noqa: F401 (re-exported)
from engine.format.placement import check_fleet_size, fleet_nodes
from engine.format.volume import AZS, NODES_PER_AZ

DEFAULT_DATA_DIR = ".aurora-lite"
DATA_DIR_ENV = "AURORA_LITE_DATA_DIR"
# Test hook: a JSON list that replaces [sys.executable, "-m", "engine.cli"] as the command
# prefix of every launched process (tests/test_launcher.py runs fake nodes with it).
EXEC_ENV = "AURORA_LITE_EXEC"
HOST = "127.0.0.1"

STORAGE_NODES: list[tuple[str, str]] = [
    (f"sn{i + 1}", AZS[i // NODES_PER_AZ]) for i in range(len(AZS) * NODES_PER_AZ)]
assert STORAGE_NODES[0] == ("sn1", "az-a") and STORAGE_NODES[5] == ("sn6", "az-c")
CONTROL_PORT_OFFSET = 0
INSTANCE_PORT_OFFSET = 1      # db1 -> base+1, db2 -> base+2, ...
STORAGE_PORT_OFFSET = 11      # sn1 -> base+11, ..., sn6 -> base+16
FLEET_PORT_OFFSET = 60        # a fleet's sn7 -> base+60, ..., sn24 -> base+77
FLEET_NODES_MAX = 24          # the port plan's room (sn7..sn24 below the HTTP ports +20)
METRICS_PORT_OFFSET = 20      # each process's HTTP port: its port + 20 (control: dashboard)
CONTROL_NAME = "control-plane"  # the control plane's key in Plan.metrics_ports
PG_CLUSTER_PORT_OFFSET = 40   # PostgreSQL: the cluster endpoint's listener (control plane)
PG_READER_PORT_OFFSET = 41    # PostgreSQL: the reader endpoint's listener (control plane)
PG_INSTANCE_PORT_OFFSET = 42  # PostgreSQL: db1 -> base+42, ..., db10 -> base+51

DEFAULT_REPLICAS = 1          # `up` without --replicas on a new data dir
MAX_INSTANCES = STORAGE_PORT_OFFSET - INSTANCE_PORT_OFFSET   # db1..db10 fit the port plan
MAX_REPLICAS = MAX_INSTANCES - 1
TIER_MAX = 15                 # promotion tiers 0..15 (Aurora's range); lower wins
assert MAX_REPLICAS == 9 and INSTANCE_PORT_OFFSET + MAX_INSTANCES <= STORAGE_PORT_OFFSET

STOP_GRACE_S = 5.0


def resolve_data_dir(arg: str | None) -> str:
    """The absolute data dir: --data-dir, else $AURORA_LITE_DATA_DIR, else ./.aurora-lite."""
    return os.path.abspath(arg or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


@dataclass(frozen=True)
class DataDir:
    """Paths inside one cluster's data dir (see the module doc)."""

    root: str

    @property
    def cluster_json(self) -> str:
        return os.path.join(self.root, "cluster.json")

    @property
    def control_json(self) -> str:
        return os.path.join(self.root, "control.json")

    @property
    def topology_json(self) -> str:
        return os.path.join(self.root, "topology.json")

    @property
    def lock_path(self) -> str:
        return os.path.join(self.root, "control.lock")

    @property
    def logs(self) -> str:
        return os.path.join(self.root, "logs")

    def log(self, name: str) -> str:
        return os.path.join(self.logs, f"{name}.log")

    def node_dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def make(self) -> None:
        os.makedirs(self.logs, exist_ok=True)


# --- Topology: instances, tiers, the writer, custom endpoints ---------------------------


@dataclass
class InstanceSpec:
    """One compute instance of the cluster: its name and AZ never change; tier may."""

    name: str
    az: str
    tier: int

    def __post_init__(self) -> None:
        assert 0 <= self.tier <= TIER_MAX, f"tier {self.tier} outside 0..{TIER_MAX}"
        assert self.az in AZS, self.az


def instance_number(name: str) -> int:
    """db7 -> 7 (0 for a name that is not dbN)."""
    return int(name[2:]) if name.startswith("db") and name[2:].isdigit() else 0


def default_instance(number: int) -> InstanceSpec:
    """dbN's defaults: AZs round robin from az-a, tier N-1 (db1 0, db2 1, ...)."""
    assert number >= 1
    return InstanceSpec(f"db{number}", AZS[(number - 1) % len(AZS)], min(number - 1, TIER_MAX))


@dataclass
class Topology:
    """DATA_DIR/topology.json: what `up` brings back (see the module doc)."""

    writer: str
    instances: list[InstanceSpec]
    endpoints: dict[str, list[str]] = field(default_factory=dict)   # custom endpoint -> members

    @classmethod
    def initial(cls, replicas: int = DEFAULT_REPLICAS) -> "Topology":
        if not 0 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"--replicas {replicas} is out of range (0..{MAX_REPLICAS})")
        return cls("db1", [default_instance(i + 1) for i in range(replicas + 1)])

    @classmethod
    def load(cls, dd: "DataDir") -> "Topology | None":
        data = read_json(dd.topology_json)
        if not data:
            return None
        topo = cls(data["writer"], [InstanceSpec(i["name"], i["az"], int(i["tier"]))
                                    for i in data["instances"]],
                   {k: list(v) for k, v in data.get("endpoints", {}).items()})
        topo.check()
        return topo

    def save(self, dd: "DataDir") -> None:
        self.check()
        write_json_atomic(dd.topology_json, {
            "writer": self.writer,
            "instances": [{"name": i.name, "az": i.az, "tier": i.tier} for i in self.instances],
            "endpoints": self.endpoints})

    def check(self) -> None:
        names = self.names
        assert len(set(names)) == len(names), f"duplicate instance names: {names}"
        assert self.writer in names, f"writer {self.writer} is not an instance ({names})"
        assert 1 <= len(names) <= MAX_INSTANCES, names
        for members in self.endpoints.values():
            assert set(members) <= set(names), members

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.instances]

    @property
    def replicas(self) -> list[InstanceSpec]:
        return [i for i in self.instances if i.name != self.writer]

    def get(self, name: str) -> InstanceSpec | None:
        return next((i for i in self.instances if i.name == name), None)

    def next_instance(self, tier: int | None = None, az: str | None = None) -> InstanceSpec:
        """A new replica: the lowest free dbN (N <= MAX_INSTANCES, so the port plan holds;
        a removed replica's name can come back), dbN's default AZ, and a tier one worse
        than the worst so far (a new replica is promoted last unless ``tier`` says).
        Raises ValueError on a full cluster or a bad tier or AZ."""
        if len(self.instances) >= MAX_INSTANCES:
            raise ValueError(f"a cluster has at most {MAX_INSTANCES} instances "
                             f"(the writer and {MAX_REPLICAS} replicas)")
        used = {instance_number(n) for n in self.names}
        number = min(n for n in range(1, MAX_INSTANCES + 1) if n not in used)
        spec = default_instance(number)
        if tier is not None:
            if not 0 <= tier <= TIER_MAX:
                raise ValueError(f"--tier {tier} is out of range (0..{TIER_MAX})")
            spec.tier = tier
        else:
            spec.tier = min(TIER_MAX, max(i.tier for i in self.instances) + 1)
        if az is not None:
            if az not in AZS:
                raise ValueError(f"unknown AZ {az!r} (one of {', '.join(AZS)})")
            spec.az = az
        return spec


def load_topology(dd: "DataDir", replicas: int | None = None) -> Topology:
    """The saved topology of dd, or a new one with ``replicas`` replicas (default 1).

    Raises ValueError if ``replicas`` is given and differs from a saved topology:
    `replica add|remove` change a cluster's replicas, `up` brings back what was saved.
    """
    saved = Topology.load(dd)
    if saved is None:
        return Topology.initial(DEFAULT_REPLICAS if replicas is None else replicas)
    if replicas is not None and replicas != len(saved.replicas):
        have = ", ".join(i.name for i in saved.replicas) or "none"
        raise ValueError(f"this data dir's cluster has {len(saved.replicas)} replica(s) "
                         f"({have}); `up` brings back what it had: leave out --replicas, or "
                         f"use `aurora-lite replica add|remove` on the running cluster")
    return saved


# --- Ports --------------------------------------------------------------------------------
# free_ports and port_free live in engine/cluster/ports.py (one copy for every caller);
# they are imported above and stay importable from here.


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@dataclass
class Plan:
    """Where every process of the cluster listens."""

    config: "ClusterConfig"  # noqa: F821 (engine.format.cluster_config, imported lazily)
    instance_ports: dict[str, int]
    control_port: int           # 0: let gRPC choose
    #: HTTP port of every process (/metrics) and of the control plane (CONTROL_NAME: the
    #: dashboard and its /metrics)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    pg_ports: dict[str, int] = field(default_factory=dict)  # PostgreSQL: dbN, "cluster", "reader"


def storage_port_offset(index: int) -> int:
    """Port offset of the storage node sn<index + 1> (sn1..sn6 as always; a fleet's more)."""
    if index < len(STORAGE_NODES):
        return STORAGE_PORT_OFFSET + index
    return FLEET_PORT_OFFSET + index - len(STORAGE_NODES)


def plan_cluster(dd: DataDir, *, base_port: int | None = None,
                 intra_az_ms: float | None = None, cross_az_ms: float | None = None,
                 host: str = HOST, instances: list[str] | None = None,
                 storage_nodes: int | None = None, pg_size_mb: float | None = None,
                 max_pgs: int | None = None, stripe_width: int | None = None) -> Plan:
    """The cluster config and ports for a start of the cluster in ``dd``.

    An existing cluster.json keeps its volume, layout, LAL, latency and placement (flags
    given here override the latency); only addresses may change, and the fleet may grow
    (``storage_nodes`` above the old count: new nodes take new PGs), never shrink (the
    segments placed on a node would be lost). ``storage_nodes``: the fleet's size
    (default 6, or the existing cluster's). ``pg_size_mb``, ``max_pgs``, ``stripe_width``:
    growth (engine/format/volume.py), for a new data dir only (a volume's layout never
    changes). Every PG of the volume is placed here, so the
    file every process reads always has the whole placement. ``instances``: the compute
    instances to plan ports for (default: those of dd's saved topology, or db1 and db2).
    With --base-port, dbN listens on base + N.
    """
    from engine.format.cluster_config import ClusterConfig, Latency  # imports grpc: only when planning
    from engine.format.cluster_config import NodeInfo

    previous = ClusterConfig.load(dd.cluster_json) if os.path.exists(dd.cluster_json) else None
    latency = previous.latency if previous else Latency()
    if intra_az_ms is not None:
        latency.intra_az_ms = float(intra_az_ms)
    if cross_az_ms is not None:
        latency.cross_az_ms = float(cross_az_ms)
    if latency.intra_az_ms < 0 or latency.cross_az_ms < 0:
        raise ValueError("latencies must be >= 0 ms")

    n_nodes = storage_nodes or (len(previous.storage_nodes) if previous else len(STORAGE_NODES))
    check_fleet_size(n_nodes)
    if n_nodes > FLEET_NODES_MAX:
        raise ValueError(f"at most {FLEET_NODES_MAX} storage nodes fit the port plan, not {n_nodes}")
    if previous and n_nodes < len(previous.storage_nodes):
        raise ValueError(f"this cluster has {len(previous.storage_nodes)} storage nodes; a fleet "
                         f"does not shrink (segments are placed on every node), asked for {n_nodes}")
    fleet = fleet_nodes(n_nodes)
    names = [n for n, _ in fleet]
    inst_names = instances if instances is not None else (Topology.load(dd) or Topology.initial()).names
    if base_port is not None:
        if not 1024 <= base_port <= 65535 - FLEET_PORT_OFFSET - FLEET_NODES_MAX - METRICS_PORT_OFFSET:
            raise ValueError(f"--base-port {base_port} is out of range")
        sn_ports = {n: base_port + storage_port_offset(i) for i, n in enumerate(names)}
        inst_ports = {n: base_port + INSTANCE_PORT_OFFSET + instance_number(n) - 1 for n in inst_names}
        control_port = base_port + CONTROL_PORT_OFFSET
        metrics_ports = {name: port + METRICS_PORT_OFFSET for name, port in
                         [(CONTROL_NAME, control_port), *sn_ports.items(), *inst_ports.items()]}
        pg_ports = {"cluster": base_port + PG_CLUSTER_PORT_OFFSET,
                    "reader": base_port + PG_READER_PORT_OFFSET,
                    **{n: base_port + PG_INSTANCE_PORT_OFFSET + instance_number(n) - 1 for n in inst_names}}
        busy = [p for p in [control_port, *sn_ports.values(), *inst_ports.values(),
                            *metrics_ports.values(), *pg_ports.values()]
                if not port_free(p, host)]
        if busy:
            raise ValueError(f"ports in use: {', '.join(map(str, busy))} (choose another --base-port)")
    else:
        old_sn = {n.name: _port_of(n.address) for n in previous.storage_nodes} if previous else {}
        old_inst = _previous_instance_ports(dd)
        wanted = {**{n: old_sn.get(n) for n in names}, **{n: old_inst.get(n) for n in inst_names}}
        # Keep each process's previous port if it is free; new free ports for the rest.
        fresh = free_ports(len(wanted), host)
        chosen: dict[str, int] = {}
        for name, port in wanted.items():
            if not port or port in chosen.values() or not port_free(port, host):
                port = next((p for p in fresh if p not in chosen.values() and p not in wanted.values()), 0)
                while not port or port in chosen.values() or port in wanted.values():
                    port = free_ports(1, host)[0]
            chosen[name] = port
        sn_ports = {n: chosen[n] for n in names}
        inst_ports = {n: chosen[n] for n in inst_names}
        control_port = 0
        old_http = _previous_metrics_ports(dd)
        metrics_ports = {}
        for name in [CONTROL_NAME, *names, *inst_names]:
            port = old_http.get(name)
            taken = set(chosen.values()) | set(metrics_ports.values())
            if not port or port in taken or not port_free(port, host):
                port = free_ports(1, host)[0]
                while port in taken:
                    port = free_ports(1, host)[0]
            metrics_ports[name] = port
        pg_ports = _plan_pg_ports(dd, ["cluster", "reader", *inst_names],
                                  set(chosen.values()) | set(metrics_ports.values()), host)
    nodes = [NodeInfo(n, az, f"{host}:{sn_ports[n]}") for n, az in fleet]
    growth = (pg_size_mb, max_pgs, stripe_width)
    if previous and any(v is not None for v in growth) and _growth_of(
            pg_size_mb, max_pgs, stripe_width) != (previous.pg_pages, previous.pg_count,
                                                   previous.stripe_width):
        raise ValueError("--pg-size-mb, --max-pgs and --stripe-width are chosen when a cluster is "
                         "created; this data dir's volume keeps its layout")
    if previous:
        config = ClusterConfig(storage_nodes=nodes, volume=previous.volume,
                               pg_count=previous.pg_count, stripe_pages=previous.stripe_pages,
                               pg_pages=previous.pg_pages, stripe_width=previous.stripe_width,
                               lal=previous.lal, latency=latency, placement=previous.placement)
    else:
        pg_pages, pg_count, width = _growth_of(pg_size_mb, max_pgs, stripe_width)
        config = ClusterConfig(storage_nodes=nodes, latency=latency, pg_count=pg_count,
                               pg_pages=pg_pages, stripe_width=width)
        config.layout   # a ValueError names what does not fit
    config.memberships()   # place every PG not placed yet (the control plane keeps it)
    return Plan(config, inst_ports, control_port, metrics_ports, pg_ports)


def _growth_of(pg_size_mb: float | None, max_pgs: int | None,
               stripe_width: int | None) -> tuple[int, int, int]:
    """(pg_pages, pg_count, stripe_width) of a new volume from `up`'s growth flags."""
    from engine.format.page import PAGE_SIZE
    from engine.format.volume import (
        DEFAULT_MAX_PGS, DEFAULT_PG_SIZE_MB, DEFAULT_STRIPE_WIDTH, PG_COUNT_MAX)
    size_mb = DEFAULT_PG_SIZE_MB if pg_size_mb is None else pg_size_mb
    pages = size_mb * 1024 * 1024 / PAGE_SIZE
    if size_mb <= 0 or pages != int(pages):
        raise ValueError(f"--pg-size-mb {size_mb:g} is not a positive whole number of "
                         f"{PAGE_SIZE // 1024} KiB pages")
    pg_count = DEFAULT_MAX_PGS if max_pgs is None else max_pgs
    if not 1 <= pg_count <= PG_COUNT_MAX:
        raise ValueError(f"--max-pgs {pg_count} is outside 1..{PG_COUNT_MAX}")
    width = min(DEFAULT_STRIPE_WIDTH, pg_count) if stripe_width is None else stripe_width
    return int(pages), pg_count, width


def _previous_metrics_ports(dd: DataDir) -> dict[str, int]:
    """HTTP ports of the last run (control.json's ``metrics`` and ``dashboard`` URLs)."""
    info = read_json(dd.control_json) or {}
    ports = {}
    for name, proc in info.get("processes", {}).items():
        if proc.get("metrics"):
            ports[name] = int(proc["metrics"].rsplit(":", 1)[1].split("/")[0])
    if info.get("dashboard"):
        ports[CONTROL_NAME] = int(info["dashboard"].rsplit(":", 1)[1].split("/")[0])
    return ports


def http_url(host: str, port: int, path: str = "/") -> str:
    """http://host:port/path (an empty string for port 0: no such server)."""
    return f"http://{host}:{port}{path}" if port else ""


def _plan_pg_ports(dd: DataDir, names: list[str], taken: set[int], host: str) -> dict[str, int]:
    """PostgreSQL ports: each keeps the last run's (control.json "postgres") if free."""
    old = (read_json(dd.control_json) or {}).get("postgres", {})
    previous = {"cluster": old.get("cluster"), "reader": old.get("reader"), **old.get("instances", {})}
    ports: dict[str, int] = {}
    for name in names:
        port = _port_of(previous[name]) if previous.get(name) else 0
        while not port or port in taken or not port_free(port, host):
            port = free_ports(1, host)[0]
        taken.add(port)
        ports[name] = port
    return ports


def _previous_instance_ports(dd: DataDir) -> dict[str, int]:
    """Instance ports of the last run (control.json outlives the cluster for this)."""
    info = read_json(dd.control_json) or {}
    ports = {}
    for name, proc in info.get("processes", {}).items():
        if proc.get("role") != "storage" and proc.get("address"):
            ports[name] = _port_of(proc["address"])
    return ports


# --- JSON files -------------------------------------------------------------------------


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# --- Processes --------------------------------------------------------------------------


def base_command() -> list[str]:
    """How to run `aurora-lite` as a fresh process."""
    override = os.environ.get(EXEC_ENV)
    if override:
        return list(json.loads(override))
    return [sys.executable, "-m", "engine.cli"]


def pid_running(pid: int) -> bool:
    """True if pid is a live process (zombies count as dead)."""
    if not pid or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def pid_belongs(pid: int, data_dir: str) -> bool:
    """True if pid is a live process of the cluster in data_dir (its command line names
    the data dir or a path inside it), so a reused pid is never signalled."""
    if not pid_running(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    root = os.path.abspath(data_dir).encode()
    return any(a == root or a.startswith(root + os.sep.encode()) for a in args)


def spawn(argv: list[str], log_path: str, *, new_session: bool = False,
          env: dict | None = None) -> subprocess.Popen:
    """Start a fresh process with stdout and stderr appended to log_path."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} launching: {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, close_fds=True,
                                start_new_session=new_session, env=child_env)


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited {returncode}"


def stop_pids(pids: dict[str, int], data_dir: str, grace_s: float = STOP_GRACE_S) -> list[str]:
    """Blocking stop of processes that are not our children (leftovers of a control plane
    that died): SIGTERM, wait up to grace_s, SIGKILL. Returns one line per process."""
    report = []
    live = {name: pid for name, pid in pids.items() if pid_belongs(pid, data_dir)}
    for name, pid in live.items():
        _signal(pid, signal.SIGTERM)
        _signal(pid, signal.SIGCONT)   # a paused process cannot act on SIGTERM
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_running(p) for p in live.values()):
        time.sleep(0.05)
    for name, pid in live.items():
        if pid_running(pid):
            _signal(pid, signal.SIGKILL)
            report.append(f"{name} (pid {pid}): SIGTERM, still running after {grace_s:.0f}s, SIGKILL")
        else:
            report.append(f"{name} (pid {pid}): SIGTERM, exited")
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(pid_running(p) for p in live.values()):
        time.sleep(0.05)
    return report


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- control.json -----------------------------------------------------------------------


def read_control(dd: DataDir) -> dict | None:
    return read_json(dd.control_json)


def running_control(dd: DataDir) -> dict | None:
    """control.json if its control plane is alive, else None."""
    info = read_control(dd)
    if not info or not info.get("running", False):
        return None
    pid = int(info.get("control", {}).get("pid", 0))
    return info if pid_belongs(pid, dd.root) else None


def cluster_pids(info: dict) -> dict[str, int]:
    """Every pid control.json names, the control plane included."""
    pids = {name: int(p.get("pid") or 0) for name, p in info.get("processes", {}).items()}
    pids["control-plane"] = int(info.get("control", {}).get("pid") or 0)
    return {n: p for n, p in pids.items() if p}
