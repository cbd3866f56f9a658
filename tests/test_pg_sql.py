"""The PostgreSQL front end in-process (engine/pg/ over a Database on the FakeSink), through
a real client library (psycopg 3) over a real socket: SQL, SQLSTATEs, transactions, the
extended protocol (prepared statements, binary results) and COPY. The same front end in a
real cluster, with psql and pgbench: tests/test_pg_cluster.py."""

from __future__ import annotations

import datetime as dt
import threading

import psycopg
import pytest

try:
    from tests.pg_inprocess import InProcessPg
except ImportError:  # tests/ is not a package here
    from pg_inprocess import InProcessPg


@pytest.fixture(scope="module")
def pg():
    with InProcessPg() as server:
        yield server


def connect(pg, **kw):
    return psycopg.connect(host="127.0.0.1", port=pg.port, user="u", dbname="d", connect_timeout=10, **kw)


def test_startup_parameters_and_select_without_from(pg):
    with connect(pg) as conn:
        assert conn.info.server_version >= 140000
        assert conn.info.parameter_status("client_encoding") == "UTF8"
        assert conn.info.parameter_status("integer_datetimes") == "on"
        assert conn.info.parameter_status("standard_conforming_strings") == "on"
        row = conn.execute("SELECT 1, 'a' || 'b', 7 / 2, -7 % 3, 2 + 3 * 4, NULL IS NULL, md5('x')").fetchone()
        assert row == (1, "ab", 3, -1, 14, True, "9dd4e461268c8034f5c8564e155c67a6")
        assert conn.execute("SHOW server_version").fetchone()[0].startswith("15")


def test_table_lifecycle_types_and_tags(pg):
    with connect(pg, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS t1, t2")
        conn.execute("CREATE TABLE t1 (id serial PRIMARY KEY, name varchar(10) NOT NULL DEFAULT 'x', "
                     "code char(4), big bigint, flag boolean, at timestamp) WITH (fillfactor=90)")
        cur = conn.execute("INSERT INTO t1 (name, code, big, flag, at) VALUES "
                           "('a', 'ab', 5000000000, true, '2024-01-02 03:04:05.5'), (DEFAULT, NULL, -1, false, NULL)")
        assert cur.statusmessage == "INSERT 0 2"
        rows = conn.execute("SELECT id, name, code, big, flag, at FROM t1 ORDER BY id").fetchall()
        assert rows == [(1, "a", "ab  ", 5000000000, True, dt.datetime(2024, 1, 2, 3, 4, 5, 500000)),
                        (2, "x", None, -1, False, None)]
        cur = conn.execute("UPDATE t1 SET big = big + 1 WHERE id = 1")
        assert cur.statusmessage == "UPDATE 1"
        assert conn.execute("UPDATE t1 SET big = 0 WHERE name = 'zz'").statusmessage == "UPDATE 0"
        assert conn.execute("SELECT count(*), sum(big), min(name), max(id) FROM t1").fetchone() == \
            (2, 5000000000, "a", 2)
        assert conn.execute("DELETE FROM t1 WHERE big < 0").statusmessage == "DELETE 1"
        assert conn.execute("TRUNCATE t1").statusmessage == "TRUNCATE TABLE"
        assert conn.execute("SELECT count(*) FROM t1").fetchone() == (0,)
        assert conn.execute("DROP TABLE t1").statusmessage == "DROP TABLE"


def test_where_order_limit_and_ranges(pg):
    with connect(pg, autocommit=True) as conn:
        conn.execute("CREATE TABLE r (k int PRIMARY KEY, v text, n int)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO r VALUES (%s, %s, %s)", [(i, f"v{i % 3}", i % 5) for i in range(1, 51)])
        assert conn.execute("SELECT k FROM r WHERE k BETWEEN 10 AND 13 ORDER BY k").fetchall() == \
            [(10,), (11,), (12,), (13,)]
        assert conn.execute("SELECT k FROM r WHERE k > 47 OR k < 2 ORDER BY k DESC").fetchall() == \
            [(50,), (49,), (48,), (1,)]
        assert conn.execute("SELECT k, n FROM r WHERE n = 0 AND k >= 20 ORDER BY k LIMIT 2 OFFSET 1").fetchall() == \
            [(25, 0), (30, 0)]
        assert conn.execute("SELECT DISTINCT v FROM r ORDER BY v").fetchall() == [("v0",), ("v1",), ("v2",)]
        assert conn.execute("SELECT k FROM r WHERE k IN (3, 4, 99) AND v LIKE 'v%'").fetchall() == [(3,), (4,)]
        conn.execute("DROP TABLE r")


def test_secondary_index_is_kept_with_its_rows(pg):
    with connect(pg, autocommit=True) as conn:
        conn.execute("CREATE TABLE s (id int PRIMARY KEY, k int NOT NULL, c text)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO s VALUES (%s, %s, %s)", [(i, i % 7, f"c{i}") for i in range(1, 71)])
        assert conn.execute("CREATE INDEX k_1 ON s (k)").statusmessage == "CREATE INDEX"
        lookups = pg.backend.counters["index_lookups"]
        assert conn.execute("SELECT count(*) FROM s WHERE k = 3").fetchone() == (10,)
        assert pg.backend.counters["index_lookups"] == lookups + 1   # read through the index
        conn.execute("UPDATE s SET k = k + 100 WHERE id = 3")          # moves its index entry
        conn.execute("DELETE FROM s WHERE id = 10")                     # removes one
        conn.execute("INSERT INTO s VALUES (1000, 3, 'new')")           # adds one
        with conn.transaction():
            conn.execute("INSERT INTO s VALUES (1001, 3, 'rolled back')")
            conn.execute("UPDATE s SET k = 5 WHERE id = 17")
            raise psycopg.Rollback()
        assert conn.execute("SELECT id FROM s WHERE k = 3 ORDER BY id").fetchall() == \
            [(i,) for i in range(1, 71) if i % 7 == 3 and i not in (3, 10)] + [(1000,)]
        assert conn.execute("SELECT id, c FROM s WHERE k = 103").fetchall() == [(3, "c3")]
        conn.execute("TRUNCATE s")
        conn.execute("INSERT INTO s VALUES (1, 3, 'x')")
        assert conn.execute("SELECT id FROM s WHERE k = 3").fetchall() == [(1,)]
        assert conn.execute("DROP INDEX k_1").statusmessage == "DROP INDEX"
        assert conn.execute("SELECT id FROM s WHERE k = 3").fetchall() == [(1,)]
        conn.execute("DROP TABLE s")


def test_sqlstates(pg):
    with connect(pg, autocommit=True) as conn:
        conn.execute("CREATE TABLE u (k int PRIMARY KEY, v text NOT NULL)")
        conn.execute("INSERT INTO u VALUES (1, 'a')")
        cases = [("INSERT INTO u VALUES (1, 'b')", "23505"), ("SELECT * FROM nope", "42P01"),
                 ("SELEC 1", "42601"), ("INSERT INTO u VALUES (2, NULL)", "23502"),
                 ("SELECT nope FROM u", "42703"), ("CREATE UNIQUE INDEX i ON u (v)", "0A000"),
                 ("SELECT * FROM u, u AS w", "0A000"), ("SELECT 1 / 0", "22012"),
                 ("CREATE TABLE u (k int)", "42P07"), ("INSERT INTO u VALUES ('x', 'y')", "22P02")]
        for sql, code in cases:
            with pytest.raises(psycopg.Error) as info:
                conn.execute(sql)
            assert info.value.sqlstate == code, (sql, info.value)
        assert conn.execute("SELECT v FROM u").fetchall() == [("a",)]   # nothing lost
        conn.execute("DROP TABLE u")


def test_transaction_blocks_and_failed_state(pg):
    with connect(pg) as conn:   # psycopg opens a block (BEGIN) for the first statement
        conn.execute("CREATE TABLE b (k int PRIMARY KEY, v int)")
        conn.commit()
        conn.execute("INSERT INTO b VALUES (1, 1)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM b").fetchone() == (0,)
        conn.execute("INSERT INTO b VALUES (1, 1)")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM missing")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM b").fetchone() == (0,)
        conn.execute("INSERT INTO b VALUES (2, 2)")
        conn.commit()
        assert conn.execute("SELECT k, v FROM b").fetchall() == [(2, 2)]
        conn.commit()


def test_row_locks_serialise_read_modify_write(pg):
    """Two sessions increment one row: the second waits for the first (no lost update,
    no 40001), as in PostgreSQL's read committed."""
    with connect(pg, autocommit=True) as conn:
        conn.execute("CREATE TABLE c (k int PRIMARY KEY, n int)")
        conn.execute("INSERT INTO c VALUES (1, 0)")
    errors = []

    def worker():
        try:
            with connect(pg) as conn:
                for _ in range(20):
                    conn.execute("UPDATE c SET n = n + 1 WHERE k = 1")
                    conn.commit()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with connect(pg, autocommit=True) as conn:
        assert conn.execute("SELECT n FROM c WHERE k = 1").fetchone() == (80,)


def test_deadlock_is_40P01(pg):
    with connect(pg, autocommit=True) as conn:
        conn.execute("CREATE TABLE dl (k int PRIMARY KEY, n int)")
        conn.execute("INSERT INTO dl VALUES (1, 0), (2, 0)")
    a, b = connect(pg), connect(pg)
    try:
        a.execute("UPDATE dl SET n = 1 WHERE k = 1")
        b.execute("UPDATE dl SET n = 2 WHERE k = 2")
        result = {}

        def a_second():
            try:
                a.execute("UPDATE dl SET n = 1 WHERE k = 2")
                a.commit()
                result["a"] = "ok"
            except psycopg.Error as exc:
                result["a"] = exc.sqlstate

        t = threading.Thread(target=a_second)
        t.start()
        import time
        time.sleep(0.3)   # a waits for b's lock on k = 2
        with pytest.raises(psycopg.errors.DeadlockDetected):
            b.execute("UPDATE dl SET n = 2 WHERE k = 1")
        b.rollback()
        t.join(30)
        assert result["a"] == "ok"
    finally:
        a.close()
        b.close()


def test_prepared_statements_and_binary(pg):
    with connect(pg, autocommit=True) as conn:
        conn.execute("CREATE TABLE p (k int PRIMARY KEY, v text, f boolean)")
        for i in range(5):
            conn.execute("INSERT INTO p VALUES (%s, %s, %s)", (i, f"s{i}", i % 2 == 0), prepare=True)
        rows = conn.execute("SELECT k, v, f FROM p WHERE k >= %s ORDER BY k", (3,), prepare=True).fetchall()
        assert rows == [(3, "s3", False), (4, "s4", True)]
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT k, v, f FROM p WHERE k = %s", (2,))
            assert cur.fetchone() == (2, "s2", True)


def test_copy_from_stdin(pg):
    with connect(pg, autocommit=True) as conn:
        conn.execute("CREATE TABLE cp (k int PRIMARY KEY, v text, n int)")
        with conn.cursor() as cur:
            with cur.copy("COPY cp (k, v, n) FROM STDIN") as copy:
                for i in range(1, 5001):   # more than one engine transaction's worth
                    copy.write_row((i, f"row\t{i}" if i == 7 else f"r{i}", None if i == 9 else i))
            assert cur.statusmessage == "COPY 5000"
        assert conn.execute("SELECT count(*), sum(n) FROM cp").fetchone() == (5000, 5000 * 5001 // 2 - 9)
        assert conn.execute("SELECT v, n FROM cp WHERE k = 7 OR k = 9 ORDER BY k").fetchall() == \
            [("row\t7", 7), ("r9", None)]


def test_big_transaction_is_atomic(pg):
    """A transaction of thousands of keys (COPY) is ONE engine transaction committed in MTR
    pieces with one COMMIT record (invariant 18): ROLLBACK leaves 0 rows, an error leaves
    0 rows, COMMIT makes all of them visible at once, and nobody is warned."""
    notices = []
    sink = pg.db.sink
    with connect(pg, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("CREATE TABLE bigtx (k int PRIMARY KEY, v text)")
        conn.execute("CREATE INDEX bigtx_v ON bigtx (v)")   # 2 keys per row: 3,000 keys

        def copy_rows(cur):
            with cur.copy("COPY bigtx (k, v) FROM STDIN") as copy:
                for i in range(1500):
                    copy.write_row((i, f"v{i % 10}"))
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            copy_rows(cur)
            cur.execute("ROLLBACK")
        assert conn.execute("SELECT count(*) FROM bigtx").fetchone() == (0,)
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            copy_rows(cur)
            with pytest.raises(psycopg.errors.UniqueViolation):
                cur.execute("INSERT INTO bigtx VALUES (5, 'dup')")
            cur.execute("ROLLBACK")
        assert conn.execute("SELECT count(*) FROM bigtx").fetchone() == (0,)
        cpls, submits = len(sink.cpls), sink.submits
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            copy_rows(cur)
            cur.execute("COMMIT")
        assert sink.submits - submits >= 3 and len(sink.cpls) - cpls == 1   # pieces, one CPL
        assert conn.execute("SELECT count(*) FROM bigtx").fetchone() == (1500,)
        assert conn.execute("SELECT count(*) FROM bigtx WHERE v = 'v3'").fetchone() == (150,)
        assert notices == [] and sink.violations == []
        conn.execute("DROP TABLE bigtx")


def test_a_transaction_past_the_atomic_limit_warns_that_it_is_not_atomic(pg, monkeypatch):
    """Past ATOMIC_WRITES_MAX keys (lowered here; 40,000 by default) a transaction is
    committed in pieces (docs/postgres.md): the client is told so with a WARNING, and a
    ROLLBACK says which rows stay committed."""
    from engine.pg import session as session_mod
    monkeypatch.setattr(session_mod, "ATOMIC_WRITES_MAX", 500)
    limit = 500
    notices = []
    with connect(pg, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append((d.severity, d.sqlstate, d.message_primary)))
        conn.execute("CREATE TABLE big (k int PRIMARY KEY)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO big (k) VALUES " + ", ".join(f"({i})" for i in range(10)))
        assert notices == []            # a small transaction stays atomic, no warning
        conn.execute("INSERT INTO big (k) VALUES " + ", ".join(f"({i})" for i in range(10, limit + 10)))
        assert len(notices) == 1 and notices[0][:2] == ("WARNING", "01000")
        assert "not atomic" in notices[0][2]
        conn.execute("ROLLBACK")
        assert len(notices) == 2 and "already committed in pieces" in notices[1][2]
        kept = conn.execute("SELECT count(*) FROM big").fetchone()[0]
        assert kept == int(notices[1][2].split()[0]) and kept >= limit
        conn.execute("DROP TABLE big")


def test_commit_refused_is_40001_not_committed_and_unknown_is_08006(pg):
    """A COMMIT refused before any of its records was logged (the writer stepped down: its
    driver refuses) is 40001 and says NOT committed; a COMMIT whose records were shipped
    but whose durability wait failed is 08006, outcome unknown."""
    from engine.errors import UnavailableError, WriteQuorumUnavailable
    sink = pg.db.sink
    with connect(pg, autocommit=True) as conn:
        conn.execute("CREATE TABLE outcome (k int PRIMARY KEY)")
    real_wait_room, real_wait_durable = sink.wait_room, sink.wait_durable

    async def refused(n):
        raise UnavailableError("writer db1 stepped down: its storage driver is closed")

    async def lost(lsn, timeout_s=None):
        raise WriteQuorumUnavailable("no write quorum within the timeout")
    try:
        with connect(pg) as conn:
            conn.execute("INSERT INTO outcome VALUES (1)")
            sink.wait_room = refused
            with pytest.raises(psycopg.errors.SerializationFailure) as info:
                conn.commit()
            assert info.value.sqlstate == "40001" and "NOT committed" in str(info.value)
            sink.wait_room = real_wait_room
            conn.rollback()
            assert conn.execute("SELECT count(*) FROM outcome").fetchone() == (0,)
            conn.execute("INSERT INTO outcome VALUES (2)")
            sink.wait_durable = lost
            with pytest.raises(psycopg.OperationalError) as info:
                conn.commit()
            assert info.value.sqlstate == "08006" and "unknown" in str(info.value)
    finally:
        sink.wait_room, sink.wait_durable = real_wait_room, real_wait_durable
    with connect(pg, autocommit=True) as conn:
        assert conn.execute("SELECT k FROM outcome").fetchall() == [(2,)]   # it did commit
        conn.execute("DROP TABLE outcome")


def test_replica_refuses_writes_with_25006():
    with InProcessPg(read_only=True) as replica:
        with connect(replica, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("CREATE TABLE x (k int)")


PSQL_DT = """\
         List of relations
 Schema |   Name   | Type  | Owner  
--------+----------+-------+--------
 public | accounts | table | aurora
 public | t2       | table | aurora
(2 rows)
"""
PSQL_D_ACCOUNTS = """\
                                    Table "public.accounts"
 Column  |         Type          | Collation | Nullable |               Default                
---------+-----------------------+-----------+----------+--------------------------------------
 id      | integer               |           | not null | nextval('accounts_id_seq'::regclass)
 owner   | text                  |           | not null | 
 balance | bigint                |           |          | 0
 note    | character varying(20) |           |          | 
Indexes:
    "accounts_pkey" PRIMARY KEY, btree (id)
    "accounts_owner_idx" btree (owner)
"""
PSQL_D = """\
              List of relations
 Schema |      Name       |   Type   | Owner  
--------+-----------------+----------+--------
 public | accounts        | table    | aurora
 public | accounts_id_seq | sequence | aurora
 public | t2              | table    | aurora
(3 rows)
"""


def test_psql_describe_commands():
    """psql 15's \\dt, \\d and \\d TABLE (their pg_catalog joins, subqueries, regex and
    UNIONs: engine/pg/catalog_query.py) print what PostgreSQL 15 prints for the same
    schema (captured from a real PostgreSQL 15 with psql -E; only the owner differs)."""
    import shutil
    import subprocess
    if not shutil.which("psql"):
        pytest.skip("needs psql (apt-get install postgresql-client; .ci/run installs it)")
    with InProcessPg() as server:
        def psql(*commands, check=True):
            args = ["psql", "-X", "-h", "127.0.0.1", "-p", str(server.port), "-U", "u", "-d", "d"]
            for c in commands:
                args += ["-c", c]
            out = subprocess.run(args, capture_output=True, text=True, timeout=60)
            assert not check or (out.returncode == 0 and out.stderr == ""), out.stderr
            return out
        psql("CREATE TABLE accounts (id serial PRIMARY KEY, owner text NOT NULL, "
             "balance bigint DEFAULT 0, note varchar(20))",
             "CREATE INDEX accounts_owner_idx ON accounts (owner)", "CREATE TABLE t2 (a int)")
        assert psql("\\dt").stdout == PSQL_DT + "\n"
        assert psql("\\d accounts").stdout == PSQL_D_ACCOUNTS + "\n"
        assert psql("\\d").stdout == PSQL_D + "\n"
        assert "t2" in psql("\\d t2").stdout and "a      | integer |" in psql("\\d t2").stdout
        missing = psql("\\d nothere", check=False)
        assert 'Did not find any relation named "nothere"' in missing.stderr
        # The catalog follows DDL: a dropped table leaves \dt.
        psql("DROP TABLE t2")
        assert " t2 " not in psql("\\dt").stdout
        with connect(server, autocommit=True) as conn:   # joins of user tables stay 0A000
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                conn.execute("SELECT * FROM accounts a JOIN pg_class c ON c.relname = a.owner")


def test_early_lock_release_orders_commits_and_loses_no_update(pg):
    """Early lock release (invariant 20): a committing transaction's row locks go once its
    COMMIT record is in the log, before it is durable. With durability slowed to 1 s:
    B's UPDATE of A's row returns while A's COMMIT still waits (it did not wait for A's
    durability), reads A's value (no lost update), and B's COMMIT is acknowledged only
    after A's. A read-only B (UPDATE 0 under the lock) also hears COMMIT only after A."""
    import time
    sink = pg.db.sink
    with connect(pg, autocommit=True) as conn:
        conn.execute("CREATE TABLE elr (k int PRIMARY KEY, n int)")
        conn.execute("INSERT INTO elr VALUES (1, 0)")
    done: dict[str, float] = {}

    def a_commit(conn):
        conn.execute("UPDATE elr SET n = n + 1 WHERE k = 1")
        conn.commit()
        done["a_commit"] = time.monotonic()

    sink.ack_delay_s = 1.0
    try:
        for read_only in (False, True):
            a, b = connect(pg), connect(pg)
            try:
                t = threading.Thread(target=a_commit, args=(a,))
                t.start()
                time.sleep(0.1)    # A's COMMIT is in the log, waiting for its acks
                if read_only:
                    cur = b.execute("UPDATE elr SET n = 0 WHERE k = 1 AND n < 0")
                    assert cur.statusmessage == "UPDATE 0"
                else:
                    b.execute("UPDATE elr SET n = n + 10 WHERE k = 1")
                done["b_update"] = time.monotonic()
                b.commit()
                done["b_commit"] = time.monotonic()
                t.join(30)
                assert done["b_update"] < done["a_commit"] <= done["b_commit"], done
            finally:
                a.close()
                b.close()
    finally:
        sink.ack_delay_s = 0.0
    with connect(pg, autocommit=True) as conn:
        assert conn.execute("SELECT n FROM elr WHERE k = 1").fetchone() == (12,)
        conn.execute("DROP TABLE elr")
