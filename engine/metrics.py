"""Prometheus metrics of every process, and the tiny HTTP server that serves them.

Every long-running process of a cluster (storage nodes, instances, the control plane)
exposes its metrics at ``http://127.0.0.1:PORT/metrics`` (the port comes from the
launcher's port plan, engine/cluster/launcher.py) in the Prometheus text format, made by
prometheus-client. docs/dashboard.md lists every metric.

The hot path is not touched for metrics: each process registers a ``FnCollector`` that
reads the counters it already keeps (or plain ints and ``Buckets`` it bumps) at scrape
time, on the event loop, so a scrape never races the code that changes them.

- ``Buckets``: a histogram as plain ints (one ``bisect`` and two additions per
  observation), turned into a Prometheus histogram family when scraped, and a ring of
  the last samples for quantiles (p50/p99) that the dashboard shows.
- ``FnCollector``: a collector whose ``collect`` calls a function for metric families.
- ``HttpServer``: a minimal HTTP/1.1 server on asyncio streams (GET and POST, one
  request per connection, server-sent event streams); the metrics endpoint of every
  process and the control plane's dashboard (engine/cluster/dashboard.py) run on it.
  It listens where the caller says (127.0.0.1 in a cluster).

Imports no grpc, lmdb or anything of engine/ above it: storage_node/ may use it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (  # noqa: F401 (re-exported for the collectors)
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)

log = logging.getLogger("aurora_lite.metrics")

#: Bucket bounds (seconds) of the latency histograms: 0.25 ms .. 10 s.
LATENCY_BOUNDS_S = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
                    0.5, 1.0, 2.0, 5.0, 10.0)
RECENT_SAMPLES = 2048      # Buckets keeps this many recent observations for quantiles
MAX_REQUEST_BYTES = 64 * 1024


class Buckets:
    """A latency histogram as plain ints (see the module doc). Not thread-safe: observe
    from one thread (the event loop, or one writer thread)."""

    __slots__ = ("bounds", "counts", "sum", "count", "recent")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # last: above the highest bound (+Inf)
        self.sum = 0.0
        self.count = 0
        self.recent: deque[float] = deque(maxlen=RECENT_SAMPLES)

    def observe(self, value_s: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value_s)] += 1
        self.sum += value_s
        self.count += 1
        self.recent.append(value_s)

    def quantile(self, q: float) -> float:
        """q-quantile of the recent samples (0.0 when there are none)."""
        if not self.recent:
            return 0.0
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def family(self, name: str, doc: str, labels: dict[str, str] | None = None) -> HistogramMetricFamily:
        labels = labels or {}
        fam = HistogramMetricFamily(name, doc, labels=list(labels))
        cumulative, total = [], 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            cumulative.append((repr(bound), total))
        cumulative.append(("+Inf", total + self.counts[-1]))
        fam.add_metric(list(labels.values()), cumulative, self.sum)
        return fam


class FnCollector:
    """A prometheus-client collector: ``fn()`` returns the metric families of a scrape."""

    def __init__(self, fn: Callable[[], Iterable]) -> None:
        self.fn = fn

    def collect(self):
        try:
            yield from self.fn()
        except Exception:   # a scrape must never break the process
            log.exception("metrics collection failed")

    def describe(self):
        return []   # no eager collection at register time


def registry_of(fn: Callable[[], Iterable]) -> CollectorRegistry:
    """A registry with just ``fn``'s families (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FnCollector(fn))
    return registry


def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    labels = labels or {}
    fam = GaugeMetricFamily(name, doc, labels=list(labels))
    fam.add_metric(list(labels.values()), value)
    return fam


def counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> CounterMetricFamily:
    """``name`` without ``_total``: prometheus-client adds it."""
    labels = labels or {}
    fam = CounterMetricFamily(name, doc, labels=list(labels))
    fam.add_metric(list(labels.values()), value)
    return fam


# --- The HTTP server --------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]          # lower-case names
    body: bytes = b""


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


#: A route: takes the request and the stream writer; returns a Response, or None when it
#: wrote the reply itself (a server-sent event stream).
Handler = Callable[[Request, asyncio.StreamWriter], Awaitable["Response | None"]]

_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            500: "Internal Server Error"}


def response_head(status: int, content_type: str, length: int | None,
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
             f"Content-Type: {content_type}", "Cache-Control: no-store",
             "X-Content-Type-Options: nosniff"]
    if length is not None:
        lines += [f"Content-Length: {length}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class HttpServer:
    """GET/POST routes on asyncio streams, one request per connection (see module doc)."""

    def __init__(self, routes: dict[tuple[str, str], Handler]) -> None:
        self.routes = routes
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(self._read(reader), 10.0)
            if request is None:
                return
            handler = self.routes.get((request.method, request.path))
            if handler is None:
                known = any(path == request.path for _m, path in self.routes)
                response = Response(405 if known else 404, b"not found\n" if not known else b"method not allowed\n")
            else:
                response = await handler(request, writer)
            if response is not None:
                writer.write(response_head(response.status, response.content_type,
                                           len(response.body), response.headers) + response.body)
                await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except Exception:
            log.exception("HTTP request failed")
        finally:
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> Request | None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_REQUEST_BYTES:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        path, _, query = target.partition("?")
        length = int(headers.get("content-length", "0") or 0)
        if not 0 <= length <= MAX_REQUEST_BYTES:
            return None
        body = await reader.readexactly(length) if length else b""
        return Request(method.upper(), path, query, headers, body)


def metrics_route(registry: CollectorRegistry) -> Handler:
    async def handler(_request: Request, _writer) -> Response:
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)
    return handler


async def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> HttpServer | None:
    """Serve ``registry`` at http://host:port/metrics; None (logged) if the port is taken:
    a process runs without metrics rather than not at all."""
    server = HttpServer({("GET", "/metrics"): metrics_route(registry)})
    try:
        await server.start(host, port)
    except OSError as exc:
        log.warning("cannot serve metrics on %s:%d: %s", host, port, exc)
        return None
    log.info("metrics on http://%s:%d/metrics", host, server.port)
    return server
