"""The client's failover rules (engine/client.py ClusterClient), against in-process fakes.

Scenario base: a fake control plane (ResolveEndpoint answers from a table the test edits)
and fake database instances (each Put/Commit answers with what the test scripted: an ack,
or a failure with a given gRPC status, aurora-error code and aurora-nothing-done marker)
run in this process. Each test counts the requests every fake received, so "retried" and
"not retried" are facts, not inferences. The rule under test: a write is sent again only
when the client KNOWS nothing was done; a commit whose outcome is unknown raises
CommitOutcomeUnknown and is never reported as done.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from aurora_pb import control_pb2 as cpb
from aurora_pb import control_pb2_grpc as cpb_grpc
from aurora_pb import database_pb2 as dpb
from aurora_pb import database_pb2_grpc as dpb_grpc
from engine import errors
from engine.client import Client, ClusterClient, parse_endpoint, translate
from engine.cluster.launcher import free_ports

OK = ("ok",)
# (gRPC status, aurora-error code or "", nothing-done marker, details)
SOCKET_CLOSED = ("fail", grpc.StatusCode.UNAVAILABLE, "", False, "Stream removed (Socket closed)")
READ_ONLY = ("fail", grpc.StatusCode.FAILED_PRECONDITION, "READ_ONLY", True, "db1 is a read replica")
FENCED_AFTER = ("fail", grpc.StatusCode.FAILED_PRECONDITION, "FENCED", False, "this writer is fenced")
FENCED_BEFORE = ("fail", grpc.StatusCode.FAILED_PRECONDITION, "FENCED", True, "this writer is fenced")
SHUTTING_DOWN = ("fail", grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", False, "writer is shutting down")
STARTING = ("fail", grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", True, "db2 is starting")
QUORUM = ("fail", grpc.StatusCode.UNAVAILABLE, "WRITE_QUORUM_UNAVAILABLE", False, "not durable after 1.0s")


class FakeInstance(dpb_grpc.DatabaseServicer):
    """A database instance whose writes answer from a script (then OK)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.script: list[tuple] = []
        self.calls: dict[str, int] = {"Put": 0, "Get": 0, "Begin": 0, "Commit": 0}
        self.commits: list = []          # every CommitRequest received
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        dpb_grpc.add_DatabaseServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _answer(self, method: str, context, reply):
        with self.lock:
            self.calls[method] += 1
            step = self.script.pop(0) if self.script else OK
        if step[0] == "hang":   # a writer that stops answering (paused, cut off)
            time.sleep(step[1])
        if step[0] == "fail":
            _, status, code, nothing_done, details = step
            metadata = []
            if code:
                metadata.append(("aurora-error", code))
            if nothing_done:
                metadata.append(("aurora-nothing-done", "1"))
            context.set_trailing_metadata(tuple(metadata))
            context.abort(status, details)
        return reply

    def Put(self, request, context):
        return self._answer("Put", context, dpb.WriteReply(commit_lsn=100, vdl=100))

    def Get(self, request, context):
        with self.lock:
            self.calls["Get"] += 1
        return dpb.GetReply(value=self.name.encode(), read_point=7)

    def Begin(self, request, context):
        with self.lock:
            self.calls["Begin"] += 1
        return dpb.BeginReply(txn_id=1)

    def Commit(self, request, context):
        with self.lock:
            self.commits.append(request)
        return self._answer("Commit", context, dpb.WriteReply(commit_lsn=200, vdl=200))

    def stop(self) -> None:
        self.server.stop(None)


class FakeControl(cpb_grpc.ControlServicer):
    """ResolveEndpoint from ``routes``: endpoint -> list of (name, address, up); plus
    ``writer_possible``. ``after`` (n, routes): from the n-th resolution on, use those."""

    def __init__(self) -> None:
        self.routes: dict[str, list[tuple[str, str, bool]]] = {}
        self.writer_possible = True
        self.after: tuple[int, dict] | None = None
        self.resolutions = 0
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        cpb_grpc.add_ControlServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def ResolveEndpoint(self, request, context):
        with self.lock:
            self.resolutions += 1
            if self.after and self.resolutions >= self.after[0]:
                self.routes.update(self.after[1])
            targets = self.routes.get(request.endpoint)
        if targets is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no endpoint {request.endpoint!r}")
        writer = self.routes.get("cluster", [("?", "?", False)])[0]
        return cpb.ResolveReply(
            endpoint=request.endpoint, writer=writer[0], writer_address=writer[1],
            writer_possible=self.writer_possible,
            targets=[cpb.EndpointTarget(instance=n, address=a, up=up) for n, a, up in targets])


@pytest.fixture
def fakes():
    control = FakeControl()
    a, b = FakeInstance("db1"), FakeInstance("db2")
    dead = f"127.0.0.1:{free_ports(1)[0]}"   # nothing listens here: connection refused
    yield control, a, b, dead
    control.server.stop(None)
    a.stop()
    b.stop()


def client(control, endpoint="cluster", **kw) -> ClusterClient:
    kw.setdefault("timeout_s", 5)
    kw.setdefault("failover_wait_s", 5)
    return ClusterClient(control.address, endpoint, **kw)


def test_refused_connection_is_retried_on_the_new_writer(fakes):
    """Scenario: the writer's address refuses connections (it died; the request never left
    the client); after two resolutions the control plane names db2: the put is sent to
    db2 once and succeeds."""
    control, a, b, dead = fakes
    control.routes["cluster"] = [("db1", dead, False)]
    control.after = (3, {"cluster": [("db2", b.address, True)]})
    with client(control) as db:
        assert db.put(b"k", b"v") == 100
        assert db.instance == "db2" and db.retries >= 1
    assert b.calls["Put"] == 1


@pytest.mark.parametrize("failure", [READ_ONLY, FENCED_BEFORE, STARTING],
                         ids=["read-only", "fenced-up-front", "starting"])
def test_refused_up_front_is_retried_on_the_new_writer(fakes, failure):
    """Scenario: db1 refuses the put before doing anything (a replica now; fenced and
    knows it; still starting) and says so (READ_ONLY or aurora-nothing-done): the client
    resolves again, sends the put to db2, and reports db2's commit."""
    control, a, b, _ = fakes
    a.script = [failure]
    control.routes["cluster"] = [("db1", a.address, True)]
    control.after = (2, {"cluster": [("db2", b.address, True)]})
    with client(control) as db:
        assert db.put(b"k", b"v") == 100
    assert (a.calls["Put"], b.calls["Put"]) == (1, 1)


@pytest.mark.parametrize("failure", [SOCKET_CLOSED, FENCED_AFTER, SHUTTING_DOWN],
                         ids=["socket-closed", "fenced-after-accept", "shutting-down"])
def test_unknown_outcome_raises_and_is_never_resent(fakes, failure):
    """Scenario: db1 fails after it may have started the commit (connection lost mid-call,
    fenced by storage while waiting, stepping down): the put raises CommitOutcomeUnknown,
    is not sent again anywhere, and the control plane is not even asked."""
    control, a, b, _ = fakes
    a.script = [failure]
    control.routes["cluster"] = [("db1", a.address, True)]
    control.after = (2, {"cluster": [("db2", b.address, True)]})
    with client(control) as db:
        with pytest.raises(errors.CommitOutcomeUnknown) as info:
            db.put(b"k", b"v")
    assert "may or may not have committed" in str(info.value)
    assert (a.calls["Put"], b.calls["Put"], control.resolutions) == (1, 0, 1)


def test_commit_waiting_on_a_deposed_writer_gives_up(fakes):
    """Scenario: db1 stops answering a put that has no deadline (it was paused); the
    control plane makes db2 the writer: within about a second the client stops waiting and
    raises CommitOutcomeUnknown (db1 got the commit), without sending it to db2. The same
    for a transaction's commit."""
    control, a, b, _ = fakes
    control.routes["cluster"] = [("db1", a.address, True)]
    with client(control) as db:
        a.script = [("hang", 3.0)]
        threading.Timer(0.3, lambda: control.routes.update(cluster=[("db2", b.address, True)])).start()
        started = time.monotonic()
        with pytest.raises(errors.CommitOutcomeUnknown) as info:
            db.put(b"k", b"v")
        assert time.monotonic() - started < 2.0
        assert "the writer changed from db1 to db2" in str(info.value)
        assert (a.calls["Put"], b.calls["Put"]) == (1, 0)
        assert db.put(b"k2", b"v") == 100 and b.calls["Put"] == 1   # the next one goes to db2

        for reads_first in (True, False):   # pinned by its first read; write-only
            control.routes["cluster"] = [("db1", a.address, True)]
            db.resolve()
            txn = db.begin()
            if reads_first:
                txn.get(b"k")
            txn.put(b"k", b"v")
            a.script = [("hang", 3.0)]
            threading.Timer(0.3, lambda: control.routes.update(cluster=[("db2", b.address, True)])).start()
            with pytest.raises(errors.CommitOutcomeUnknown):
                txn.commit()
            assert b.calls["Commit"] == 0


def test_write_quorum_timeout_is_raised_as_is(fakes):
    """Scenario: the --timeout of a commit passes (WRITE_QUORUM_UNAVAILABLE): the commit
    may still complete, exactly as with a plain Client; nothing is retried."""
    control, a, b, _ = fakes
    a.script = [QUORUM]
    control.routes["cluster"] = [("db1", a.address, True)]
    with client(control) as db:
        with pytest.raises(errors.WriteQuorumUnavailable):
            db.put(b"k", b"v", timeout_s=1)
    assert a.calls["Put"] == 1 and control.resolutions == 1


def test_no_writer_possible_gives_up_at_once(fakes):
    """Scenario: the writer is down and the control plane says no replica can take over:
    a put fails at once (not after failover_wait_s) and says why."""
    control, a, b, dead = fakes
    control.routes["cluster"] = [("db1", dead, False)]
    control.writer_possible = False
    with client(control, failover_wait_s=30) as db:
        started = time.monotonic()
        with pytest.raises(errors.UnavailableError) as info:
            db.put(b"k", b"v")
    assert time.monotonic() - started < 5
    assert "no replica is up to take over" in str(info.value)
    assert not isinstance(info.value, errors.CommitOutcomeUnknown)


def test_waiting_for_a_failover_has_a_deadline(fakes):
    """Scenario: the writer stays unreachable and the control plane keeps naming it: the
    put gives up after failover_wait_s with UnavailableError (it was never sent)."""
    control, a, b, dead = fakes
    control.routes["cluster"] = [("db1", dead, False)]
    with client(control, failover_wait_s=1.0) as db:
        started = time.monotonic()
        with pytest.raises(errors.UnavailableError) as info:
            db.put(b"k", b"v")
    assert 0.9 < time.monotonic() - started < 5
    assert "answered within" in str(info.value)


def test_reader_endpoint_spreads_reads_and_skips_a_dead_replica(fakes):
    """Scenario: the reader endpoint names db1 and db2: reads alternate between them. Then
    db1 dies and the control plane names only db2: a read that hits db1 is retried on db2."""
    control, a, b, dead = fakes
    control.routes["reader"] = [("db1", a.address, True), ("db2", b.address, True)]
    with client(control, "reader") as db:
        assert sorted(db.get(b"k") for _ in range(4)) == [b"db1", b"db1", b"db2", b"db2"]
        assert {db.get_at(b"k")[2] for _ in range(4)} == {"db1", "db2"}
        control.routes["reader"] = [("db1", dead, False), ("db2", b.address, True)]
        db.resolve()
        control.routes["reader"] = [("db2", b.address, True)]
        assert [db.get(b"k") for _ in range(3)] == [b"db2"] * 3


def test_reader_endpoint_refreshes_to_a_replica_added_or_drained(fakes, monkeypatch):
    """Scenario (docs/serverless.md): a reader client that keeps running sees a replica
    added by auto scaling without any failure (it resolves again every REFRESH_S; 0 here, so
    no sleeping), and stops using a replica taken out of the endpoint (draining) while it
    still answers."""
    import engine.client as client_mod
    control, a, b, dead = fakes
    control.routes["reader"] = [("db1", a.address, True)]
    with client(control, "reader") as db:
        assert [db.get(b"k") for _ in range(2)] == [b"db1", b"db1"]
        monkeypatch.setattr(client_mod, "REFRESH_S", 0.0)
        control.routes["reader"] = [("db1", a.address, True), ("db2", b.address, True)]
        assert sorted(db.get(b"k") for _ in range(4)) == [b"db1", b"db1", b"db2", b"db2"]
        control.routes["reader"] = [("db2", b.address, True)]   # db1 draining, still up
        before = a.calls["Get"]
        assert [db.get(b"k") for _ in range(3)] == [b"db2"] * 3
        assert a.calls["Get"] == before and db.retries == 0


def test_writes_through_a_reader_endpoint_are_refused(fakes):
    """Scenario: a put through the reader endpoint reaches a replica (READ_ONLY): it is not
    sent elsewhere; the error says to use the cluster endpoint."""
    control, a, b, _ = fakes
    a.script = [READ_ONLY]
    control.routes["reader"] = [("db1", a.address, True)]
    with client(control, "reader") as db:
        with pytest.raises(errors.ReadOnlyError) as info:
            db.put(b"k", b"v")
    assert "cluster endpoint" in str(info.value) and a.calls["Put"] == 1


def test_transaction_stays_on_its_instance(fakes):
    """Scenario: a transaction that began on db1 (its first read sent Begin there) commits
    on db1, with its writes, even after the endpoint moved to db2. Its commit failing
    mid-call raises CommitOutcomeUnknown; refused up front, it says nothing was committed.
    Neither is re-run by the client."""
    control, a, b, _ = fakes
    control.routes["cluster"] = [("db1", a.address, True)]

    def begun(db):
        txn = db.begin()
        assert txn.get(b"k") == b"db1"
        txn.put(b"k", b"v")
        return txn

    with client(control) as db:
        txn = begun(db)
        control.routes["cluster"] = [("db2", b.address, True)]
        db.resolve()
        assert txn.commit() == 200
        assert (a.calls["Commit"], b.calls["Commit"]) == (1, 0)
        assert a.commits[-1].txn_id == 1 and [op.key for op in a.commits[-1].ops] == [b"k"]

        control.routes["cluster"] = [("db1", a.address, True)]
        db.resolve()
        a.script = [SOCKET_CLOSED]
        with pytest.raises(errors.CommitOutcomeUnknown):
            begun(db).commit()
        a.script = [READ_ONLY]
        with pytest.raises(errors.UnavailableError) as info:
            begun(db).commit()
        assert "nothing was committed" in str(info.value)
        assert not isinstance(info.value, errors.CommitOutcomeUnknown)
    assert b.calls["Commit"] == 0


def test_write_only_transaction_commits_like_a_put(fakes):
    """Scenario: a transaction that read nothing has begun nowhere: begin() sends nothing,
    and its commit (txn_id 0, every write in ops) goes where the endpoint leads at commit.
    Refused up front by db1, it is sent once to the new writer db2; lost mid-call, it
    raises CommitOutcomeUnknown and is not sent again."""
    control, a, b, _ = fakes
    control.routes["cluster"] = [("db1", a.address, True)]
    with client(control) as db:
        txn = db.begin()
        txn.put(b"k1", b"v1")
        txn.delete(b"k2")
        assert a.calls["Begin"] == 0
        a.script = [READ_ONLY]
        control.after = (2, {"cluster": [("db2", b.address, True)]})
        assert txn.commit() == 200
        assert (a.calls["Commit"], b.calls["Commit"]) == (1, 1)
        sent = b.commits[-1]
        assert sent.txn_id == 0
        assert [(op.key, op.value, op.delete) for op in sent.ops] == [(b"k1", b"v1", False),
                                                                      (b"k2", b"", True)]
        control.after = None
        txn = db.begin()
        txn.put(b"k3", b"v3")
        b.script = [SOCKET_CLOSED]
        with pytest.raises(errors.CommitOutcomeUnknown):
            txn.commit()
        assert b.calls["Commit"] == 2 and a.calls["Commit"] == 1
    assert a.calls["Begin"] == b.calls["Begin"] == 0


def test_unknown_endpoint_and_bad_names():
    """Scenario: endpoint strings are checked before anything is sent."""
    assert parse_endpoint("cluster") == ("cluster", "")
    assert parse_endpoint("instance:db2") == ("instance", "db2")
    assert parse_endpoint("custom:olap") == ("custom", "olap")
    for bad in ("writer", "instance", "custom:", "reader:db2", "cluster:x"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_unknown_custom_endpoint(fakes):
    """Scenario: the control plane does not know the custom endpoint: DatabaseError (not
    UnavailableError: waiting would not help)."""
    control, *_ = fakes
    with pytest.raises(errors.DatabaseError) as info:
        client(control, "custom:nope")
    assert not isinstance(info.value, errors.UnavailableError)


def test_translate_marks_only_what_is_certain(fakes):
    """Scenario: translate() sets retry_safe for a refused connection, READ_ONLY and the
    nothing-done marker, and for nothing else, as the module doc's table says."""
    control, a, _, dead = fakes
    with Client(dead, timeout_s=2) as c:
        with pytest.raises(errors.UnavailableError) as info:
            c.put(b"k", b"v")
        assert info.value.retry_safe
    expected = {READ_ONLY: True, FENCED_BEFORE: True, STARTING: True, SOCKET_CLOSED: False,
                FENCED_AFTER: False, SHUTTING_DOWN: False, QUORUM: False}
    with Client(a.address, timeout_s=2) as c:
        for step, safe in expected.items():
            a.script = [step]
            try:
                c._stub.Put(dpb.PutRequest(key=b"k", value=b"v"), timeout_s=2)
            except errors.RpcError as exc:
                assert translate(exc).retry_safe is safe, step
            else:
                raise AssertionError(f"{step} did not fail")
