"""The PostgreSQL front end in a real cluster (`aurora-lite up`: six storage nodes, a writer
and a replica), driven by the real clients: psql (through `aurora-lite psql`), pgbench
(`-i -s 1`, then the TPC-B-like script in simple and prepared mode, checked with TPC-B's
balance invariant), the reader endpoint's read-only refusal, and a failover behind the
cluster endpoint's unchanged port. docs/postgres.md."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

try:
    from tests.test_cli_tour import cluster, up  # noqa: F401 (cluster: the fixture)
except ImportError:  # tests/ is not a package here
    from test_cli_tour import cluster, up  # noqa: F401 (cluster: the fixture)


def require_tools(*tools: str) -> None:
    """Skip when a client tool is missing, except in CI (CI=true, or
    AURORA_REQUIRE_BROWSER=1 as .ci/run sets): there a missing tool is a failure."""
    missing = [t for t in tools if not shutil.which(t)]
    if not missing:
        return
    why = (f"needs {', '.join(missing)} (apt-get install postgresql-client sysbench; "
           ".ci/run installs them)")
    if os.environ.get("CI") == "true" or os.environ.get("AURORA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"in CI, but {why}")
    pytest.skip(why)


@pytest.fixture(autouse=True)
def _client_tools():
    require_tools("psql", "pgbench")


def psql(address: str, *args, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    host, port = address.rsplit(":", 1)
    result = subprocess.run(["psql", "-X", "-h", host, "-p", port, "-U", "tester", "-d", "aurora",
                             "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", "-At", *args],
                            capture_output=True, text=True, input=stdin, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def pgbench(address: str, *args, timeout: float = 180) -> str:
    host, port = address.rsplit(":", 1)
    result = subprocess.run(["pgbench", "-h", host, "-p", port, "-U", "tester", *args, "aurora"],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def copy_script(table: str, rows: int, end: str) -> str:
    """A psql script: BEGIN, COPY ``rows`` rows into ``table`` from the script, then ``end``."""
    data = "".join(f"{i}\tv{i}\n" for i in range(rows))
    return f"BEGIN;\nCOPY {table} (k, v) FROM STDIN;\n{data}\\.\n{end};\n"


def test_psql_pgbench_reader_and_failover(cluster, monkeypatch, tmp_path):
    # The fault file (absent until the last step) lets the last step pause the writer
    # between the pieces of a big commit (engine/hooks.py) and kill it there.
    fault_file = tmp_path / "faults.json"
    monkeypatch.setenv("AURORA_FAULTS_FILE", str(fault_file))
    up(cluster)
    pg = cluster.status()["postgres"]
    assert set(pg) == {"cluster", "reader", "instances"} and sorted(pg["instances"]) == ["db1", "db2"]
    for address in [pg["cluster"], pg["reader"], *pg["instances"].values()]:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address)

    # psql -c through `aurora-lite psql`, then a scripted session.
    out = cluster("psql", "-c", "CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)",
                  "-c", "INSERT INTO notes (body) VALUES ('one'), ('two')",
                  "-c", "SELECT id, body FROM notes ORDER BY id").stdout
    lines = [line.strip() for line in out.splitlines()]
    assert lines[:2] == ["CREATE TABLE", "INSERT 0 2"], out
    assert lines[2:] == ["id | body", "----+------", "1 | one", "2 | two", "(2 rows)", ""], out
    script = """
        BEGIN;
        INSERT INTO notes (body) VALUES ('three');
        UPDATE notes SET body = body || '!' WHERE id = 1;
        COMMIT;
        BEGIN;
        DELETE FROM notes WHERE id = 2;
        ROLLBACK;
        SELECT count(*), max(id) FROM notes;
        SELECT body FROM notes WHERE id = 1;
    """
    assert psql(pg["cluster"], "-f", "-", stdin=script).stdout.split() == \
        ["BEGIN", "INSERT", "0", "1", "UPDATE", "1", "COMMIT", "BEGIN", "DELETE", "1", "ROLLBACK", "3|3", "one!"]

    # The reader endpoint: reads (once the replica has applied the commit), writes refused.
    deadline = time.monotonic() + 10
    while psql(pg["reader"], "-c", "SELECT count(*) FROM notes", check=False).stdout.strip() != "3":
        assert time.monotonic() < deadline, "the replica never showed the committed rows"
        time.sleep(0.2)
    refused = psql(pg["reader"], "-c", "INSERT INTO notes (body) VALUES ('no')", check=False)
    assert refused.returncode != 0 and "25006" in refused.stderr, refused.stderr

    # pgbench: the standard initialisation, then the TPC-B-like script, simple and prepared.
    init = pgbench(pg["cluster"], "-i", "-s", "1")
    assert "done in" in init, init
    for mode in ("simple", "prepared"):
        run = pgbench(pg["cluster"], "-n", "-c", "4", "-T", "5", "-M", mode)   # -n: keep history
        assert "number of failed transactions: 0 " in run, run
        processed = int(re.search(r"number of transactions actually processed: (\d+)", run).group(1))
        assert processed > 0, run
    # TPC-B's invariant: every delta went to one account, one teller, one branch and history.
    sums = psql(pg["cluster"], "-c", "SELECT sum(abalance) FROM pgbench_accounts",
                "-c", "SELECT sum(tbalance) FROM pgbench_tellers",
                "-c", "SELECT sum(bbalance) FROM pgbench_branches",
                "-c", "SELECT sum(delta), count(*) FROM pgbench_history").stdout.split()
    assert sums[0] == sums[1] == sums[2] == sums[3].split("|")[0], sums
    assert int(sums[3].split("|")[1]) > 0

    # psql's \dt and \d TABLE (pg_catalog joins: engine/pg/catalog_query.py).
    host, port = pg["cluster"].rsplit(":", 1)
    described = subprocess.run(["psql", "-X", "-h", host, "-p", port, "-U", "tester", "-d", "aurora",
                                "-c", "\\dt", "-c", "\\d pgbench_accounts"],
                               capture_output=True, text=True, timeout=60)
    assert described.returncode == 0 and described.stderr == "", described.stderr
    for line in [" public | notes            | table | aurora", " public | pgbench_accounts | table | aurora",
                 'Table "public.pgbench_accounts"', " aid      | integer       |           | not null | ",
                 " filler   | character(84) |           |          | ", "Indexes:",
                 '    "pgbench_accounts_pkey" PRIMARY KEY, btree (aid)']:
        assert line in described.stdout, described.stdout

    # A big transaction (3,000 rows, one engine transaction in several MTR pieces) is
    # atomic: ROLLBACK leaves 0 rows.
    psql(pg["cluster"], "-c", "CREATE TABLE big (k int PRIMARY KEY, v text)")
    psql(pg["cluster"], "-f", "-", stdin=copy_script("big", 3000, "ROLLBACK"))
    assert psql(pg["cluster"], "-c", "SELECT count(*) FROM big").stdout.strip() == "0"

    # A failover: the cluster endpoint's port stays, and leads to the new writer.
    cluster("failover", timeout=90)
    assert cluster.status()["postgres"]["cluster"] == pg["cluster"]
    deadline = time.monotonic() + 30
    while True:
        result = psql(pg["cluster"], "-c", "INSERT INTO notes (body) VALUES ('after failover')", check=False)
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.5)
    assert psql(pg["cluster"], "-c", "SELECT count(*) FROM notes").stdout.strip() == "4"

    # A big transaction whose writer is killed (SIGKILL) in the middle of its commit: some
    # pieces are in storage (durable on every node: storage is healthy), its COMMIT record
    # is not. After the automatic failover: 0 rows (invariant 18, recovery truncates).
    writer = next(p["name"] for p in cluster.status()["processes"] if p.get("role") == "writer")
    fault_file.write_text(json.dumps({"commit": {"*": {"piece_pause_ms": 1000}}}))
    time.sleep(1.0)   # every process re-reads the fault file within 0.5 s
    log_path = os.path.join(cluster.data_dir, "logs", f"{writer}.log")
    log_size = os.path.getsize(log_path)
    script = tmp_path / "big_commit.sql"
    script.write_text(copy_script("big", 3000, "COMMIT"))
    client = subprocess.Popen(["psql", "-X", "-h", host, "-p", port, "-U", "tester", "-d", "aurora",
                               "-v", "ON_ERROR_STOP=1", "-f", str(script)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        with open(log_path) as f:
            f.seek(log_size)
            if "commit in pieces:" in f.read():
                break
        assert time.monotonic() < deadline, "the big commit never paused between pieces"
        time.sleep(0.1)
    out = cluster("node", "kill", writer).stdout
    assert re.match(rf"^{writer} killed \(SIGKILL to pid \d+\)$", out.strip()), out
    fault_file.unlink()
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode != 0 and "COMMIT" not in stdout, (stdout, stderr)
    deadline = time.monotonic() + 60
    while True:
        result = psql(pg["cluster"], "-c", "SELECT count(*) FROM big", check=False)
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.5)
    assert result.stdout.strip() == "0", result.stdout
    assert cluster.status()["by_name"][writer]["role"] != "writer"
    psql(pg["cluster"], "-c", "INSERT INTO notes (body) VALUES ('after the kill')")
    assert psql(pg["cluster"], "-c", "SELECT count(*) FROM notes").stdout.strip() == "5"


def test_sysbench_write_only_and_read_write(cluster):
    """sysbench's PostgreSQL driver: prepare (tables, multi-row INSERTs, a secondary index),
    oltp_write_only and oltp_read_write at 8 threads, cleanup. The only errors allowed are
    the ones sysbench retries (deadlocks and duplicate keys of its delete+insert): any other
    makes it print FATAL and exit non-zero."""
    require_tools("sysbench")
    up(cluster)
    pg = cluster.status()["postgres"]
    host, port = pg["cluster"].rsplit(":", 1)
    common = ["--db-driver=pgsql", f"--pgsql-host={host}", f"--pgsql-port={port}", "--pgsql-user=sb",
              "--pgsql-db=aurora", "--tables=2", "--table-size=500"]

    def sysbench(*args):
        result = subprocess.run(["sysbench", *args, *common], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "FATAL" not in result.stdout + result.stderr, result.stdout + result.stderr
        return result.stdout

    out = sysbench("oltp_write_only", "prepare")
    assert "Creating a secondary index on 'sbtest2'" in out, out
    for workload in ("oltp_write_only", "oltp_read_write"):
        out = sysbench(workload, "--threads=8", "--time=5", "run")
        transactions = int(re.search(r"transactions:\s+(\d+)", out).group(1))
        assert transactions > 0, out
    sums = psql(pg["cluster"], "-c", "SELECT count(*) FROM sbtest1", "-c", "SELECT count(*) FROM sbtest2").stdout.split()
    assert sums == ["500", "500"], sums   # delete+insert of the same id keeps the row count
    sysbench("oltp_read_write", "cleanup")
    assert psql(pg["cluster"], "-c", "SELECT count(*) FROM pg_tables").stdout.strip() == "0"
