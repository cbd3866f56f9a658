"""What the labs' tests share.

- ``Chain``: valid redo record chains for one volume (INIT_PAGE, then INSERT_CELL and
  UPDATE_CELL records with correct volume, PG and page backlinks) and the oracle of what a
  page must hold: ``expected_cells`` follows the records themselves, without any
  materialiser, so a lab's own materialiser cannot make the oracle agree with it; compare
  with ``cells(image)`` (engine.format.page's reader). A trimmed copy of
  tests/storage_client.ChainBuilder, which does not ship with the package.
- ``CliCluster``: a real cluster run through the `aurora-lite` command in a subprocess
  (`up --detach`, verbs, `status --json`, `down`): control plane, six storage nodes,
  writer db1, replica db2, each a process running the tree's code.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.format import page as pagefmt
from engine.format import redo
from engine.format.redo import RecordType as RT
from engine.format.volume import VolumeLayout

#: Small stripes so that many PGs occur with few pages.
TEST_LAYOUT = VolumeLayout(pg_count=4, stripe_pages=4)
MAX_CELLS = 24


@dataclass(frozen=True)
class Rec:
    lsn: int
    pg: int
    page_id: int
    prev_pg_lsn: int
    data: bytes
    rtype: int
    key: bytes = b""
    value: bytes = b""


class Chain:
    """Record chains for one volume, and the expected contents of every page."""

    def __init__(self, volume: str = "vol1", layout: VolumeLayout = TEST_LAYOUT, seed: int = 0,
                 pages: list[int] | None = None, epoch: int = 1) -> None:
        self.volume = volume
        self.layout = layout
        self.epoch = epoch
        self.rng = random.Random(seed)
        self.pages = pages if pages is not None else list(range(1, layout.pg_count * layout.stripe_pages * 2))
        self.lsn = 0
        self.records: list[Rec] = []
        self._last_pg: dict[int, int] = {}
        self._last_page: dict[int, int] = {}
        self._cells: dict[int, int] = {}

    def next_records(self, n: int, pages: list[int] | None = None) -> list[Rec]:
        out = []
        choices = pages if pages is not None else self.pages
        for i in range(n):
            page_id = self.rng.choice(choices)
            pg = self.layout.pg_of(page_id)
            lsn = self.lsn + self.rng.randint(1, 3)
            cells = self._cells.get(page_id)
            key = value = b""
            if cells is None:
                rtype, payload = RT.INIT_PAGE, redo.p_init_page(pagefmt.PageType.LEAF)
                self._cells[page_id] = 0
            elif cells < MAX_CELLS:
                key, value = b"k%06d" % cells, self.rng.randbytes(self.rng.randint(1, 48))
                rtype, payload = RT.INSERT_CELL, redo.p_insert_cell(cells, key, value)
                self._cells[page_id] = cells + 1
            else:
                slot = self.rng.randrange(cells)
                key, value = b"k%06d" % slot, self.rng.randbytes(self.rng.randint(1, 48))
                rtype, payload = RT.UPDATE_CELL, redo.p_update_cell(slot, key, value)
            flags = redo.FLAG_CPL if (i == n - 1 or self.rng.random() < 0.2) else 0
            data = redo.encode_record(lsn, self.lsn, self._last_pg.get(pg, 0),
                                      self._last_page.get(page_id, 0), page_id, rtype, flags, payload)
            rec = Rec(lsn, pg, page_id, self._last_pg.get(pg, 0), data, rtype, key, value)
            self._last_pg[pg] = lsn
            self._last_page[page_id] = lsn
            self.lsn = lsn
            self.records.append(rec)
            out.append(rec)
        return out

    def truncate(self, start: int, end: int, epoch: int) -> None:
        """Annul (start, end] like recovery does: forget the records in it; the next records
        get LSNs above end and chain to what is left."""
        self.records = [r for r in self.records if not start < r.lsn <= end]
        self.lsn = max(self.lsn, end)
        self.epoch = epoch
        self._last_pg.clear()
        self._last_page.clear()
        self._cells.clear()
        for r in self.records:
            self._last_pg[r.pg] = r.lsn
            self._last_page[r.page_id] = r.lsn
            if r.rtype == RT.INIT_PAGE:
                self._cells[r.page_id] = 0
            elif r.rtype == RT.INSERT_CELL:
                self._cells[r.page_id] += 1

    def fork(self, name: str, fork_lsn: int) -> "Chain":
        """A chain for a clone of this volume made at fork_lsn: the parent's records up to
        the fork (what its pages start from), and its own records chained to the fork in
        every PG (a clone's segments start complete to the fork)."""
        clone = Chain(name, self.layout, seed=self.rng.randrange(1 << 30), pages=self.pages,
                      epoch=self.epoch)
        clone.records = [r for r in self.records if r.lsn <= fork_lsn]
        clone.truncate(fork_lsn, fork_lsn, self.epoch)
        for pg in range(self.layout.pg_count):
            clone._last_pg[pg] = fork_lsn
        return clone

    def pg_tail(self, pg: int, upto: int) -> int:
        """The PG's last record at or below upto (0: none)."""
        return max((r.lsn for r in self.records if r.pg == pg and r.lsn <= upto), default=0)

    @staticmethod
    def pack(recs: list[Rec]) -> dict[int, bytes]:
        """{pg: packed batch} of recs (in the given order)."""
        out: dict[int, list[bytes]] = {}
        for r in recs:
            out.setdefault(r.pg, []).append(r.data)
        return {pg: b"".join(parts) for pg, parts in out.items()}

    def page_log(self, page_id: int, upto: int = 1 << 62) -> bytes:
        return b"".join(r.data for r in self.records if r.page_id == page_id and r.lsn <= upto)

    def expected_cells(self, page_id: int, upto: int = 1 << 62) -> list[tuple[bytes, bytes]] | None:
        """The (key, value) cells the page holds as of ``upto``, from the records alone
        (None: the page did not exist then). Independent of any materialiser."""
        cells: list[tuple[bytes, bytes]] | None = None
        for r in self.records:
            if r.page_id != page_id or r.lsn > upto:
                continue
            if r.rtype == RT.INIT_PAGE:
                cells = []
            elif r.rtype == RT.INSERT_CELL:
                cells.append((r.key, r.value))
            elif r.rtype == RT.UPDATE_CELL:
                cells[int(r.key[1:])] = (r.key, r.value)
        return cells

    def last_lsn_of_page(self, page_id: int, upto: int = 1 << 62) -> int:
        lsns = [r.lsn for r in self.records if r.page_id == page_id and r.lsn <= upto]
        return lsns[-1] if lsns else 0


def cells(image) -> list[tuple[bytes, bytes]]:
    """The (key, value) cells of a leaf page image, read with engine.format.page."""
    return [(bytes(k), bytes(v)) for k, v in pagefmt.cells(bytes(image))]


# --- A real cluster through the CLI ------------------------------------------------------

CLI_TIMEOUT_S = 120.0


class CliCluster:
    """`aurora-lite ... --data-dir DIR` in subprocesses; every process runs the code that
    ``python -m engine.cli`` imports here (the tree's, when grading a tree)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = str(data_dir)
        self.started = False

    def run(self, *argv: str, check: bool = True, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop("AURORA_LITE_DATA_DIR", None)
        cmd = [sys.executable, "-m", "engine.cli", *argv, "--data-dir", self.data_dir]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"`aurora-lite {' '.join(argv)}` exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}")
        return result

    def up(self, *extra: str) -> None:
        self.started = True
        self.run("up", "--detach", "--timeout", "90", *extra)

    def down(self) -> None:
        if self.started:
            self.run("down", check=False)
            self.started = False

    def put(self, key: str, value: str, *extra: str) -> int:
        """Commit key=value; returns the commit LSN."""
        out = self.run("put", key, value, *extra).stdout.strip()
        assert out.startswith("OK (commit LSN "), out
        return int(out.split()[-1].rstrip(")"))

    def get(self, key: str, *extra: str) -> str:
        return self.run("get", key, *extra).stdout.strip()

    def status(self) -> dict:
        state = json.loads(self.run("status", "--json").stdout)
        state["by_name"] = {p["name"]: p for p in state["processes"]}
        return state

    def log_text(self, name: str) -> str:
        path = Path(self.data_dir) / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, what: str, predicate, timeout_s: float = 60.0, interval_s: float = 0.5):
        """Poll ``predicate()`` (sleeping between calls) until truthy; fail after timeout_s."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval_s)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")
