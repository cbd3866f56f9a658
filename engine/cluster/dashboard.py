"""The dashboard: a live web page of the cluster, served by the control plane (docs/dashboard.md).

``Dashboard`` runs inside the control plane's process on its HTTP port (the port plan's
"control-plane" entry in engine/cluster/launcher.py; 127.0.0.1 unless --insecure-listen):

    GET  /              the page (engine/cluster/dashboard_page.py): rendered on the server
                        with every process by name and the VDL, then kept live by JS
    GET  /events        server-sent events: one JSON snapshot per SAMPLE_S (the first
                        one carries the history of the charts)
    GET  /api/state     the latest snapshot as JSON
    POST /api/action    a fault verb (ACTIONS), with the cluster's token
    GET  /metrics       the control plane's Prometheus metrics

Snapshots: every SAMPLE_S the sampler calls ``collect`` (what `aurora-lite status` shows,
engine/cluster/state.py) and adds what the page needs: each node's condition (up, down,
paused, partitioned, slowed: from the process state, the fault file $AURORA_FAULTS_FILE
and cluster.json's extra delays), per PG each segment's SCL against the writer's PGCL and
VDL and whether a write quorum (4/6) and a read quorum (3/6) of its segments can be
reached now, commits/s and commit p50/p99 from the writer's status, LAL headroom,
replica lag, and timeline entries (the control plane's own events, plus epoch changes,
VDL moving back (backtrack) and new volumes (clones) that the sampler notices).

Fault buttons call the control plane's own fault functions (engine/cluster/supervision.py
and failover.py), the same ones the CLI's verbs reach through the Control service. A POST
is refused (403) when the dashboard was started read-only (`up --dashboard-read-only`),
when its Host or Origin header is not this dashboard's own address (another site's page
cannot drive it from a browser), or when it lacks the cluster's token: a random string
kept in DATA_DIR/dashboard.token (mode 0600) and embedded in the page.

Not here yet: regions (step 14), segment replacement on a spare (step 12) and serverless capacity
(step 15) have not landed; the page says so.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import time
from collections import deque

from engine.cluster.dashboard_page import render_page
from engine.cluster.launcher import read_json
from engine.format.volume import AZS, VR, VW
from engine.hooks import FAULTS_FILE_ENV
from engine.metrics import (
    CONTENT_TYPE_LATEST, GaugeMetricFamily, HttpServer, Request, Response, counter, gauge,
    generate_latest, registry_of, response_head)

log = logging.getLogger("aurora_lite.dashboard")

SAMPLE_S = 1.0               # one snapshot per second
PROBE_TIMEOUT_S = 0.5        # each process's status probe within a sample
HISTORY_S = 300              # the charts show the last five minutes
TIMELINE_MAX = 60            # timeline entries sent to the page
TOKEN_FILE = "dashboard.token"
ACTIONS = ("node-kill", "node-start", "az-down", "az-up", "net-delay", "net-clear", "failover")


def load_token(root: str) -> str:
    """The cluster's dashboard token (created on first use, mode 0600)."""
    path = os.path.join(root, TOKEN_FILE)
    try:
        with open(path) as f:
            token = f.read().strip()
        if len(token) >= 16:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(24)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(path + ".tmp", path)
    return token


class Dashboard:
    """The page, its event stream, its actions and the control plane's metrics."""

    def __init__(self, cp, *, read_only: bool = False) -> None:
        self.cp = cp   # engine.cluster.control_plane.ControlPlane
        self.read_only = read_only
        self.token = load_token(cp.dd.root)
        self.snapshot: dict = {}
        self.history: deque[list] = deque(maxlen=int(HISTORY_S / SAMPLE_S))
        self.version = 0
        self._changed = asyncio.Condition()
        self._last_commits: tuple[str, int, float] | None = None   # (writer, commits, time)
        self._last_epoch: tuple[str, int] | None = None
        self._last_vdl = 0
        self._last_status: dict = {}
        self._volumes: set[str] = set()
        self.http = HttpServer({
            ("GET", "/"): self._page, ("GET", "/events"): self._events,
            ("GET", "/api/state"): self._state, ("POST", "/api/action"): self._action,
            ("GET", "/metrics"): self._metrics, ("GET", "/favicon.ico"): self._no_icon})
        self.registry = registry_of(self._collect_metrics)
        self.host_port = ""
        self._task: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> int:
        bound = await self.http.start(host, port)
        self.host_port = f"{host}:{bound}"
        self._task = asyncio.get_running_loop().create_task(self._sample_loop())
        return bound

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.http.close()

    # --- Sampling ------------------------------------------------------------------------

    async def _sample_loop(self) -> None:
        while not self.cp.stopped.is_set():
            started = time.monotonic()
            try:
                await self.sample()
            except Exception:
                log.exception("dashboard sample failed")
            await asyncio.sleep(max(0.05, SAMPLE_S - (time.monotonic() - started)))

    async def sample(self) -> dict:
        state = await self.cp.collect(PROBE_TIMEOUT_S, probes=not self.cp.stopping)
        snap = self.build(state)
        self.snapshot = snap
        self.history.append([snap["t"], snap["commits_s"], snap["commit_p50_ms"],
                             snap["commit_p99_ms"], snap["replica_lag_ms"], snap["vdl"]])
        async with self._changed:
            self.version += 1
            self._changed.notify_all()
        return snap

    def _conditions(self) -> dict[str, list[str]]:
        """Per process name: faults beyond its process state (partitioned, slowed)."""
        out: dict[str, list[str]] = {p: [] for p in self.cp.procs}
        faults = read_json(os.environ.get(FAULTS_FILE_ENV, "")) if os.environ.get(FAULTS_FILE_ENV) else None
        for rule in (faults or {}).get("links", []):
            kind = rule.get("kind")
            for end in (rule.get("src"), rule.get("dst")):
                targets = list(out) if end == "*" else [end]
                for name in targets:
                    if name in out:
                        tag = "partitioned" if kind == "partition" else "slowed" if kind in ("delay", "reorder") else "lossy"
                        if tag not in out[name]:
                            out[name].append(tag)
        for name, disk in (faults or {}).get("disk", {}).items():
            if name in out and disk.get("delay_ms") and "slowed" not in out[name]:
                out[name].append("slowed")
        latency = self.cp.config.latency
        for p in self.cp.procs.values():
            if (latency.extra_node_ms.get(p.name) or latency.extra_az_ms.get(p.az)) and "slowed" not in out[p.name]:
                out[p.name].append("slowed")
        return out

    def build(self, state) -> dict:
        """The page's snapshot from a ClusterState message (see the module doc)."""
        now = time.time()
        conditions = self._conditions()
        procs = {p.name: p for p in state.processes}
        writer = procs.get(state.writer)
        status = {}
        if writer is not None and writer.status_json:
            try:
                status = json.loads(writer.status_json)
            except ValueError:
                status = {}
        fresh = bool(status.get("driver"))
        if not fresh and self.snapshot.get("writer") == state.writer:
            # The writer did not answer this probe (busy, paused, down): keep showing what
            # it said last rather than zeros; the node grid shows its state.
            status = self._last_status
        else:
            self._last_status = status
        driver = status.get("driver", {})
        database = status.get("database", {})
        pgcl = {int(k): int(v) for k, v in driver.get("pgcl", {}).items()}
        vdl = int(driver.get("vdl", 0))
        commits = int(database.get("commits", 0))
        commits_s = 0.0
        if not fresh:
            commits_s = self.snapshot.get("commits_s", 0.0) if status else 0.0
        elif self._last_commits and self._last_commits[0] == state.writer and commits >= self._last_commits[1]:
            dt = now - self._last_commits[2]
            commits_s = (commits - self._last_commits[1]) / dt if dt > 0 else 0.0
        if fresh:
            self._last_commits = (state.writer, commits, now)
        self._timeline_from(state, writer, status, vdl)

        def node_status(p) -> str:
            if p.state != "up":
                return p.state          # down, starting, paused, stopping
            cond = conditions.get(p.name, [])
            return "partitioned" if "partitioned" in cond else "slowed" if "slowed" in cond else "up"

        nodes = []
        for p in sorted(state.processes, key=lambda q: (q.role != "storage", q.name)):
            nodes.append({
                "name": p.name, "role": p.role, "az": p.az, "state": p.state,
                "status": node_status(p), "conditions": conditions.get(p.name, []),
                "pid": p.pid, "exit_reason": p.exit_reason,
                "vdl": p.vdl if p.HasField("vdl") else None,
                "epoch": p.volume_epoch if p.HasField("vdl") else None,
                "lag_ms": round(p.lag_ms, 2) if p.HasField("lag_ms") else None,
                "lag_lsn": p.lag_lsn if p.HasField("lag_lsn") else None,
                "scl": {str(s.pg): s.scl for s in p.segments},
            })
        storage = [n for n in nodes if n["role"] == "storage"]
        reachable = [n for n in storage if n["status"] in ("up", "slowed")]
        # Growth (docs/fleet.md): only PGs that exist; a fixed layout shows all of them.
        every = set() if self.cp.config.layout.grows else set(range(self.cp.config.pg_count))
        pgs = sorted({int(pg) for n in storage for pg in n["scl"]} | {int(pg) for pg in pgcl} | every)
        pg_rows = []
        for pg in pgs:
            have = [n for n in reachable if str(pg) in n["scl"]]
            ref = pgcl.get(pg, max((n["scl"].get(str(pg), 0) for n in storage), default=0))
            pg_rows.append({
                "pg": pg, "pgcl": pgcl.get(pg, 0), "available": len(have),
                "write_ok": len(have) >= VW, "read_ok": len(have) >= VR,
                "segments": {n["name"]: (n["scl"].get(str(pg)) if n["status"] != "down" else None)
                             for n in storage},
                "behind": {n["name"]: max(0, ref - n["scl"][str(pg)]) for n in storage
                           if str(pg) in n["scl"]},
            })
        replicas = [n for n in nodes if n["role"] == "replica" and n["lag_ms"] is not None]
        limit = int(driver.get("allocation_limit", 0))
        return {
            "t": round(now, 3), "writer": state.writer, "vdl": vdl, "vcl": int(driver.get("vcl", 0)),
            "epoch": int(driver.get("epoch", 0)),
            "commits": commits, "commits_s": round(commits_s, 1),
            "commit_p50_ms": float(database.get("commit_p50_ms", 0.0)),
            "commit_p99_ms": float(database.get("commit_p99_ms", 0.0)),
            "waiting_commits": int(driver.get("waiting_commits", 0)),
            "lal": int(driver.get("lal", 0)),
            "lal_headroom": max(0, limit - int(driver.get("next_lsn", 0)) + 1) if limit else 0,
            "replica_lag_ms": max((r["lag_ms"] for r in replicas), default=0.0),
            "azs": AZS, "nodes": nodes, "pgs": pg_rows,
            "write_quorum": bool(pg_rows) and all(r["write_ok"] for r in pg_rows),
            "read_quorum": bool(pg_rows) and all(r["read_ok"] for r in pg_rows),
            "failovers": state.failovers, "failing_over": state.failing_over,
            "restarts": state.restarts,
            "latency": {"intra_az_ms": state.latency.intra_az_ms, "cross_az_ms": state.latency.cross_az_ms,
                        "extra_az_ms": dict(state.latency.extra_az_ms),
                        "extra_node_ms": dict(state.latency.extra_node_ms)},
            "events": [{"t": round(t, 3), "kind": k, "text": x}
                       for t, k, x in list(self.cp.events)[-TIMELINE_MAX:]],
            "read_only": self.read_only, "volume": state.volume, "data_dir": state.data_dir,
        }

    def _timeline_from(self, state, writer, status: dict, vdl: int) -> None:
        """Timeline entries the sampler notices: epochs, backtracks, clones."""
        if writer is not None and writer.HasField("vdl") and writer.reported_role == "writer":
            epoch = writer.volume_epoch
            if self._last_epoch is not None and (state.writer, epoch) != self._last_epoch and epoch:
                rec = status.get("recovery") or {}
                how = (f"recovery {rec.get('seconds', 0):.3f}s, VDL {rec.get('vdl')}"
                       if rec.get("epoch") == epoch else "new epoch")
                self.cp.event("epoch", f"{state.writer} at volume epoch {epoch} ({how})")
            if self._last_epoch is not None and self._last_epoch[0] == state.writer and vdl < self._last_vdl:
                self.cp.event("backtrack", f"VDL moved back {self._last_vdl} -> {vdl}")
            self._last_epoch = (state.writer, epoch)
            self._last_vdl = vdl
        seen = set(self.cp.volumes_seen)
        for volume in sorted(seen - self._volumes - {state.volume}):
            if self._volumes:   # not at the first sample
                self.cp.event("clone", f"volume {volume} appeared (a clone)")
        self._volumes |= seen or {state.volume}

    # --- HTTP handlers -------------------------------------------------------------------

    async def _current(self) -> dict:
        return self.snapshot or await self.sample()

    async def _page(self, request: Request, _writer) -> Response:
        snap = await self._current()
        html = render_page(snap, token=self.token, read_only=self.read_only,
                           history=list(self.history))
        return Response(200, html.encode(), "text/html; charset=utf-8",
                        {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                    "style-src 'unsafe-inline'; connect-src 'self'"})

    async def _no_icon(self, request: Request, _writer) -> Response:
        return Response(204)

    async def _state(self, request: Request, _writer) -> Response:
        return Response(200, json.dumps(await self._current()).encode(), "application/json")

    async def _events(self, request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(response_head(200, "text/event-stream", None))
        first = {**await self._current(), "history": list(self.history)}
        writer.write(f"data: {json.dumps(first)}\n\n".encode())
        await writer.drain()
        seen = self.version
        while not self.cp.stopped.is_set():
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: self.version != seen), 15.0)
                except asyncio.TimeoutError:
                    writer.write(b": keep-alive\n\n")
                    await writer.drain()
                    continue
            seen = self.version
            writer.write(f"data: {json.dumps(self.snapshot)}\n\n".encode())
            await writer.drain()
        return None

    def _same_origin(self, request: Request) -> bool:
        own = {self.host_port}
        if self.host_port.startswith("127.0.0.1:"):
            own.add("localhost:" + self.host_port.split(":", 1)[1])
        if request.headers.get("host") not in own:
            return False
        origin = request.headers.get("origin")
        return origin is None or origin in {f"http://{h}" for h in own}

    async def _action(self, request: Request, _writer) -> Response:
        def reply(status: int, ok: bool, message: str) -> Response:
            return Response(status, json.dumps({"ok": ok, "message": message}).encode(), "application/json")

        if self.read_only:
            return reply(403, False, "the dashboard was started read-only (--dashboard-read-only)")
        if not self._same_origin(request):
            return reply(403, False, "refused: the request does not come from this dashboard's page")
        if not hmac.compare_digest(request.headers.get("x-aurora-token", ""), self.token):
            return reply(403, False, "refused: missing or wrong cluster token")
        try:
            body = json.loads(request.body or b"{}")
            verb, target = str(body.get("verb", "")), str(body.get("target", ""))
            ms = float(body.get("ms", 0) or 0)
        except (ValueError, TypeError, AttributeError):
            return reply(400, False, "the body must be JSON: {verb, target, ms}")
        if verb not in ACTIONS:
            return reply(400, False, f"unknown verb {verb!r} (one of {', '.join(ACTIONS)})")
        from engine.cluster.state import ActionError
        log.info("dashboard action: %s %s%s", verb, target, f" {ms:g} ms" if verb == "net-delay" else "")
        try:
            message = await self._run(verb, target, ms)
        except ActionError as exc:
            return reply(400, False, str(exc))
        return reply(200, True, message)

    async def _run(self, verb: str, target: str, ms: float) -> str:
        cp = self.cp
        if verb in ("node-kill", "node-start"):
            return await cp.action(target, verb.split("-")[1])
        if verb in ("az-down", "az-up"):
            return await cp.az_action(target, verb.split("-")[1])
        if verb == "net-delay":
            if target in AZS:
                return cp.set_network_delay(target, ms, False)
            return cp.set_network_delay("", ms, False, node=target)
        if verb == "net-clear":
            return cp.set_network_delay("", 0.0, True)
        reply = await cp.failover(target)
        return f"{reply.new_writer} is the writer (epoch {reply.volume_epoch}, VDL {reply.vdl})"

    # --- Metrics -------------------------------------------------------------------------

    async def _metrics(self, request: Request, _writer) -> Response:
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    def _collect_metrics(self):
        cp = self.cp
        yield counter("aurora_control_failovers", "Writer changes (automatic and planned failovers)", cp.failovers)
        yield counter("aurora_control_repairs",
                      "Repairs: processes the control plane launched again (`node start`, `az up`); "
                      "it never restarts one by itself", cp.restarts)
        up = GaugeMetricFamily("aurora_control_process_up", "1 if the process serves, else 0",
                               labels=["name", "role", "az", "state"])
        for p in cp.procs.values():
            up.add_metric([p.name, p.role, p.az, p.state], int(p.state == "up"))
        yield up
        snap = self.snapshot
        if snap:
            wq = GaugeMetricFamily("aurora_control_pg_write_quorum",
                                   "1 if 4 of 6 segments of the PG are reachable now", labels=["pg"])
            rq = GaugeMetricFamily("aurora_control_pg_read_quorum",
                                   "1 if 3 of 6 segments of the PG are reachable now", labels=["pg"])
            for row in snap["pgs"]:
                wq.add_metric([str(row["pg"])], int(row["write_ok"]))
                rq.add_metric([str(row["pg"])], int(row["read_ok"]))
            yield wq
            yield rq
            yield gauge("aurora_control_writer_vdl", "The writer's VDL at the last sample (LSN)", snap["vdl"])
