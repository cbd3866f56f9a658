"""An in-process PostgreSQL front end (engine/pg/) over a Database on the FakeSink, in a
background thread, for fast tests with real clients (psycopg, psql) against real sockets."""

from __future__ import annotations

import asyncio
import threading

from engine.db.database import Database
from engine.format.volume import VolumeLayout
from engine.pg.protocol import PgServer
from engine.pg.sql import Backend
try:
    from tests.fake_sink import FakeSink
except ImportError:  # tests/ is not a package here
    from fake_sink import FakeSink


class InProcessPg:
    """``with InProcessPg() as pg: pg.port``; ``read_only=True`` plays a replica."""

    def __init__(self, read_only: bool = False) -> None:
        self.read_only = read_only
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        sink = FakeSink(layout=VolumeLayout(pg_count=3, stripe_pages=4), ack_delay_s=0.0)
        self.db = Database(sink, 256)
        await self.db.bootstrap()
        self.backend = Backend(lambda: self.db, lambda: self.read_only)
        await self.backend.ensure_table()
        self.server = PgServer(self.backend)
        self.port = await self.server.start("127.0.0.1", 0)

    def __enter__(self) -> "InProcessPg":
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
