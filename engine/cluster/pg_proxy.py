"""The PostgreSQL addresses of the cluster and reader endpoints: TCP forwarders in the
control plane (docs/postgres.md).

Each listens on a port that stays the same for the control plane's life (and across `up`
runs when it is free: engine/cluster/launcher.py's port plan), so a failover does not
change the address a client uses. A new connection is forwarded, byte for byte, to the
PostgreSQL port of:

- ``cluster``: the current writer;
- ``reader``: the replicas that are up, in turn (the writer when none is).

A connection already open when its instance goes away is closed (the client reconnects,
and its next connection reaches the new writer). No bytes are interpreted here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

log = logging.getLogger("aurora.control")

BUFFER_BYTES = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(BUFFER_BYTES)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 (already closed)
            pass


class PgForwarder:
    """One endpoint's listener; ``targets()`` names the (host, port)s to use now."""

    def __init__(self, name: str, targets) -> None:
        self.name = name
        self.targets = targets        # callable -> list[tuple[str, int]]
        self.server: asyncio.AbstractServer | None = None
        self._turn = itertools.count()
        self.connections = 0

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._serve, host, port)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        targets = self.targets()
        if not targets:
            writer.close()
            return
        host, port = targets[next(self._turn) % len(targets)]
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            log.warning("PostgreSQL %s endpoint: cannot reach %s:%d (%s)", self.name, host, port, exc)
            writer.close()
            return
        self.connections += 1
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
