"""A JSON file that running processes re-read when it changes.

Three files steer live processes: cluster.json (its latency model, rewritten by `aurora-lite
net delay`), the fault file of the chaos tools ($AURORA_FAULTS_FILE), and the dashboard and
tests read others. Each is rewritten atomically (write a temporary file, then rename), and
each reader wants the same thing: a check cheap enough to make before every RPC.

``WatchedJson.poll()`` stats the file at most every ``interval_s`` seconds and parses it only
when its (mtime, inode, size) signature changed. It returns the new parsed value when it
changed, else None. A file that cannot be parsed is reported once per signature and its last
good value is kept; a file that disappears gives ``missing`` (by default None) once.

No grpc, no asyncio: storage_node/ and the engine's lower layers may use it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

#: Default time between two stats of the file: `net delay` and the nemesis reach running
#: processes within this.
CHECK_INTERVAL_S = 0.5

_MISSING = object()


class WatchedJson:
    """Poll a JSON file for changes; see the module doc."""

    def __init__(self, path: str, interval_s: float = CHECK_INTERVAL_S,
                 missing: Any = None) -> None:
        self.path = path
        self.interval_s = interval_s
        self.missing = missing            # value poll() reports once when the file goes away
        self._next_check_s = 0.0
        self._signature: tuple | None | object = _MISSING   # _MISSING: never looked yet

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def poll(self, force: bool = False) -> Any | None:
        """The file's new content if it changed since the last poll, else None.

        ``force`` skips the interval (the first poll always looks)."""
        now = time.monotonic()
        if not force and self._signature is not _MISSING and now < self._next_check_s:
            return None
        self._next_check_s = now + self.interval_s
        signature = self._stat()
        if signature == self._signature:
            return None
        if signature is None:
            self._signature = None
            return self.missing
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s: %s", self.path, exc)
            self._signature = signature   # do not warn again until the file changes
            return None
        self._signature = signature
        return data
