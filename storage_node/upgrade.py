"""Opening a data dir written by an older layout format: upgrade it in place, or refuse it.

The layout format (``FORMAT`` in storage_node/layout.py, stored under b"format" in the
``node`` database) says how the log and the page index are stored:

    format  log values                        pageidx rows
    1       one record per value, keyed by    one EMPTY row per record (its key's LSN)
            its LSN
    2       as format 1                       one group of LSNs per page per transaction
    3       runs (storage_node/runs.py)       groups, plus pagedelta rows

Format 1's empty pageidx rows are valid groups of one (``pageindex.group_of``), and a
format 1 or 2 log key is the last LSN of a run of one record, so an upgrade rewrites log
VALUES only, in the opening write transaction. Recording the new format makes older code
refuse the dir from then on. This module changes when FORMAT changes.
"""

from __future__ import annotations

import logging

from storage_node.layout import FORMAT, U32
from storage_node.runs import run_from_records, run_key_lsn


def upgrade_in_place(txn, db_log, path: str, log: logging.Logger | logging.LoggerAdapter) -> None:
    """Bring the layout of an open data dir to FORMAT inside ``txn`` (a write transaction
    whose default database is ``node``); RuntimeError for a format this code does not know."""
    fmt = U32.unpack(txn.get(b"format"))[0]
    if fmt in (1, 2):
        cur = txn.cursor(db=db_log)
        rows = 0
        for k, v in cur.iternext():
            cur.put(k, run_from_records([(run_key_lsn(k), bytes(v))]))
            rows += 1
        txn.put(b"format", U32.pack(FORMAT))
        log.info("data dir %s: layout format %d upgraded to %d (%d log records)",
                 path, fmt, FORMAT, rows)
    elif fmt != FORMAT:
        raise RuntimeError(f"data dir {path}: unknown layout format {fmt}")
