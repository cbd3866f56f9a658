"""Side by side: the same pgbench and sysbench workloads, same clients, against aurora-lite
(a throwaway `aurora-lite up` cluster) and a local PostgreSQL primary with a synchronous
standby (a throwaway data dir, when the PostgreSQL server binaries are installed).

Behind `aurora-lite bench pgbench` (engine/cli/bench.py) and bench/bench_pg_compare.py.
For each system and workload: transactions/s, average latency (ms), and bytes of log per
transaction: for aurora-lite the redo bytes the writer shipped (the storage nodes' received
bytes over the run divided by six, since every record goes to the six segments of its PG),
for PostgreSQL the WAL bytes (pg_current_wal_lsn before and after). Nothing here asserts a
speed; it measures (docs/postgres.md, "Side by side").

PostgreSQL setup (initdb refuses root): as root the server runs as user ``nobody`` (through
``runuser``), in a temporary directory it owns; primary on one port, standby (pg_basebackup
-R, application_name ``standby1``) on the next, ``synchronous_standby_names = 'standby1'``
and ``synchronous_commit = on``; both stopped (pg_ctl stop -m fast) and deleted at the end.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

log = logging.getLogger("aurora.bench.pg")

PG_USER = "nobody"


def pg_bin_dir() -> str | None:
    """The newest /usr/lib/postgresql/N/bin with initdb, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def _run(argv, *, user: str | None = None, timeout: float = 600, check: bool = True, env=None) -> str:
    if user is not None and os.geteuid() == 0:
        argv = ["runuser", "-u", user, "--", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def _psql_value(host: str, port: int, sql: str) -> str:
    return _run(["psql", "-X", "-At", "-h", host, "-p", str(port), "-U", "postgres",
                 "-d", "postgres", "-c", sql]).strip()


# --- The workloads (the same for both systems) ------------------------------------------------

def run_sysbench(system, user: str, db: str, *, threads: int, duration_s: int,
                 table_size: int, tables: int, workload: str = "oltp_write_only") -> dict:
    """prepare, then a measured run (log bytes of the run only), then cleanup."""
    common = ["--db-driver=pgsql", f"--pgsql-host={system.host}", f"--pgsql-port={system.port}",
              f"--pgsql-user={user}", f"--pgsql-db={db}", f"--tables={tables}", f"--table-size={table_size}"]
    _run(["sysbench", workload, *common, "cleanup"], check=False)
    _run(["sysbench", workload, *common, "prepare"])
    before = system.log_bytes()
    out = _run(["sysbench", workload, *common, f"--threads={threads}", f"--time={duration_s}", "run"],
               timeout=duration_s + 300)
    log_bytes = system.log_bytes() - before
    _run(["sysbench", workload, *common, "cleanup"], check=False)
    m = re.search(r"transactions:\s+(\d+)\s+\(([\d.]+) per sec", out)
    return {"transactions": int(m.group(1)), "tps": float(m.group(2)),
            "ignored_errors": int(re.search(r"ignored errors:\s+(\d+)", out).group(1)),
            "latency_ms": float(re.search(r"avg:\s+([\d.]+)", out).group(1)), "log_bytes": log_bytes}


# --- aurora-lite -------------------------------------------------------------------------------

class AuroraCluster:
    """A throwaway `aurora-lite up --detach` cluster; log bytes from its storage nodes."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="aurora-pgbench-")
        self.cli = [sys.executable, "-m", "engine.cli"]

    def __enter__(self) -> "AuroraCluster":
        _run([*self.cli, "up", "--detach", "--data-dir", self.dir], timeout=180)
        pg = self.status()["postgres"]["cluster"]
        self.host, port = pg.rsplit(":", 1)
        self.port = int(port)
        return self

    def status(self) -> dict:
        return json.loads(_run([*self.cli, "status", "--json", "--data-dir", self.dir]))

    def log_bytes(self) -> int:
        """Redo bytes shipped so far: storage nodes' received bytes / 6."""
        nodes = [p for p in self.status()["processes"] if p["role"] == "storage"]
        return sum(p["bytes_received"] or 0 for p in nodes) // max(len(nodes), 1)

    def __exit__(self, *exc) -> None:
        _run([*self.cli, "down", "--data-dir", self.dir], timeout=120, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- PostgreSQL primary + synchronous standby ------------------------------------------------

class PgPair:
    """A local PostgreSQL primary with one synchronous standby, in a temporary directory."""

    def __init__(self, bin_dir: str, port: int) -> None:
        self.bin = bin_dir
        self.host = "127.0.0.1"
        self.port = port
        self.root = tempfile.mkdtemp(prefix="pg-sync-")
        self.primary = os.path.join(self.root, "primary")
        self.standby = os.path.join(self.root, "standby")
        self.user = PG_USER if os.geteuid() == 0 else None

    def _pg(self, tool: str, *args, **kw) -> str:
        return _run([os.path.join(self.bin, tool), *args], user=self.user, **kw)

    def __enter__(self) -> "PgPair":
        os.chmod(self.root, 0o777)
        if self.user:
            shutil.chown(self.root, self.user)
        self._pg("initdb", "-D", self.primary, "-U", "postgres", "-A", "trust", "--no-sync")
        with open(os.path.join(self.primary, "postgresql.conf"), "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.root}'\nwal_level = replica\n"
                    "max_wal_senders = 4\nsynchronous_standby_names = 'standby1'\n"
                    "synchronous_commit = on\nfsync = on\nshared_buffers = 128MB\n")
        with open(os.path.join(self.primary, "pg_hba.conf"), "a") as f:
            f.write("host replication all 127.0.0.1/32 trust\n")
        self._pg("pg_ctl", "-D", self.primary, "-l", os.path.join(self.root, "primary.log"), "-w", "start")
        self._pg("pg_basebackup", "-h", self.host, "-p", str(self.port), "-U", "postgres",
                 "-D", self.standby, "-R", "--no-sync")
        with open(os.path.join(self.standby, "postgresql.auto.conf"), "a") as f:
            f.write(f"\nport = {self.port + 1}\nprimary_conninfo = 'host={self.host} port={self.port} "
                    f"user=postgres application_name=standby1'\n")
        self._pg("pg_ctl", "-D", self.standby, "-l", os.path.join(self.root, "standby.log"), "-w", "start")
        deadline = time.monotonic() + 30
        while _psql_value(self.host, self.port, "SELECT count(*) FROM pg_stat_replication "
                                                "WHERE sync_state = 'sync'") != "1":
            if time.monotonic() > deadline:
                raise RuntimeError("the standby never became synchronous")
            time.sleep(0.3)
        return self

    def log_bytes(self) -> int:
        return int(_psql_value(self.host, self.port, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))

    def __exit__(self, *exc) -> None:
        for d in (self.standby, self.primary):
            if os.path.exists(os.path.join(d, "postmaster.pid")):
                self._pg("pg_ctl", "-D", d, "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


# --- One comparison -----------------------------------------------------------------------------

def measure(system, user: str, db: str, *, scale: int, clients: int, duration_s: int,
            sysbench_table_size: int, workloads: list[str]) -> dict:
    out = {}
    for workload in workloads:
        if workload.startswith("pgbench"):
            mode = "prepared" if workload.endswith("prepared") else "simple"
            result = _pgbench_measured(system, user, db, scale, clients, duration_s, mode)
        else:
            result = run_sysbench(system, user, db, threads=clients, duration_s=duration_s,
                                  table_size=sysbench_table_size, tables=4, workload=workload)
        result["log_bytes_per_txn"] = round(result["log_bytes"] / max(result["transactions"], 1), 1)
        out[workload] = result
        log.info("%s %s: %s", type(system).__name__, workload, result)
    return out


def _pgbench_measured(system, user, db, scale, clients, duration_s, mode) -> dict:
    base = ["pgbench", "-h", system.host, "-p", str(system.port), "-U", user]
    _run([*base, "-i", "-s", str(scale), db])
    before = system.log_bytes()
    out = _run([*base, "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(duration_s),
                "-M", mode, db], timeout=duration_s + 300)
    return {"transactions": int(re.search(r"number of transactions actually processed: (\d+)", out).group(1)),
            "failed": int(re.search(r"number of failed transactions: (\d+)", out).group(1)),
            "tps": float(re.search(r"tps = ([\d.]+)", out).group(1)),
            "latency_ms": float(re.search(r"latency average = ([\d.]+) ms", out).group(1)),
            "log_bytes": system.log_bytes() - before}


def compare(*, scale: int = 1, clients: int = 8, duration_s: int = 30, sysbench_table_size: int = 10_000,
            workloads: list[str] | None = None, pg_port: int = 55432, with_postgres: bool = True) -> dict:
    """Run the workloads on aurora-lite, then (if installed) on PostgreSQL + sync standby."""
    workloads = workloads or ["pgbench", "pgbench-prepared", "oltp_write_only"]
    kw = dict(scale=scale, clients=clients, duration_s=duration_s,
              sysbench_table_size=sysbench_table_size, workloads=workloads)
    report = {"config": {**kw, "machine_cpus": os.cpu_count()}, "aurora-lite": None, "postgresql": None}
    with AuroraCluster() as cluster:
        report["aurora-lite"] = measure(cluster, "bench", "aurora", **kw)
    bin_dir = pg_bin_dir() if with_postgres else None
    if bin_dir is None:
        report["postgresql_skipped"] = "PostgreSQL server binaries not installed (apt-get install postgresql)"
    else:
        with PgPair(bin_dir, pg_port) as pair:
            version = _psql_value(pair.host, pair.port, "SHOW server_version")
            report["postgresql"] = measure(pair, "postgres", "postgres", **kw)
            report["postgresql_version"] = version
        report["ratio_tps"] = {w: round(report["aurora-lite"][w]["tps"] / report["postgresql"][w]["tps"], 3)
                               for w in workloads if report["postgresql"][w]["tps"]}
        report["ratio_log_bytes_per_txn"] = {
            w: round(report["aurora-lite"][w]["log_bytes_per_txn"] / report["postgresql"][w]["log_bytes_per_txn"], 3)
            for w in workloads if report["postgresql"][w]["log_bytes_per_txn"]}
    return report


def format_report(report: dict) -> str:
    rows = [f"{'workload':<18} {'system':<12} {'tps':>9} {'latency ms':>11} {'log B/txn':>10} {'failed/ignored':>15}"]
    for system in ("aurora-lite", "postgresql"):
        for workload, r in (report.get(system) or {}).items():
            rows.append(f"{workload:<18} {system:<12} {r['tps']:>9.1f} {r['latency_ms']:>11.2f} "
                        f"{r['log_bytes_per_txn']:>10.0f} {r.get('failed', r.get('ignored_errors', 0)):>15}")
    if report.get("ratio_tps"):
        rows.append("aurora-lite / PostgreSQL: tps " + ", ".join(f"{w} {v}x" for w, v in report["ratio_tps"].items()))
        rows.append("log bytes per txn, aurora-lite / PostgreSQL: "
                    + ", ".join(f"{w} {v}x" for w, v in report["ratio_log_bytes_per_txn"].items()))
    if report.get("postgresql_skipped"):
        rows.append(f"PostgreSQL: skipped ({report['postgresql_skipped']})")
    return "\n".join(rows)
