"""Group commit: all pending work of a storage node in ONE LMDB write transaction.

Every durable change of a storage node goes through ``GroupCommitter.submit``. Foreground
work (Append, Truncate, fencing, CreateVolume, SetGcHorizon) and background work (records
pulled by gossip, page versions from the coalescer, GC steps, scrub quarantines) wait in
two bounded queues. A single writer task drains them::

    submit(op) --> [foreground queue, <= FG_OPS_MAX] --+
                                                       +--> writer task --> executor thread:
    submit(op, background=True) --> [background, <=   |       Store.apply_ops(ops)
                                     BG_OPS_MAX] ------+       (one txn, sync commit)
                                                               --> resolve every future

Priority (P17 Fig. 4: background work below foreground): a transaction takes every
pending foreground op (up to ``txn_ops_max`` / ``txn_bytes_max``) and at most one
background op, and that one only when no foreground op is waiting or the oldest
background op has waited longer than ``bg_max_wait_s`` (so background work is never
starved for good). While one transaction commits (fsync), new requests pile up and go
into the next one: the batch size adapts to load with no timer (invariant 2's group
commit, on the storage side). Acknowledgements are sent only after the commit returned,
i.e. after the data is on disk (invariant 3). In chaos mode ($AURORA_FAULTS_FILE) the
SCLs a transaction changed are appended to the node's SCL log first
(engine/hooks.py), the record the durability checker trusts.

The loop itself is engine/group_commit.py, shared with the baseline's block server; this
module binds it to ``Store.apply_ops``, sizes an op by its record bytes, and sleeps the
injected slow disk of engine/hooks.py before each commit. The LMDB transaction runs in a
dedicated single-thread executor, never on the event loop.
"""

from __future__ import annotations

import logging

from engine import hooks
from engine.group_commit import GroupCommitLoop
from storage_node.store import AppendOp, Store

FG_OPS_MAX = 1024        # foreground ops waiting; submitters wait (back-pressure) above it
BG_OPS_MAX = 16          # background ops waiting
TXN_OPS_MAX = 512        # ops in one transaction
TXN_BYTES_MAX = 32 << 20  # record bytes in one transaction
BG_MAX_WAIT_S = 0.1


def _op_bytes(op) -> int:
    if isinstance(op, AppendOp):
        return sum(len(b.buf) for b in op.batches)
    return 0


class GroupCommitter(GroupCommitLoop):
    """The single writer of a Store (see module doc)."""

    def __init__(self, store: Store, logger: logging.LoggerAdapter | logging.Logger, *,
                 txn_ops_max: int = TXN_OPS_MAX, txn_bytes_max: int = TXN_BYTES_MAX,
                 bg_max_wait_s: float = BG_MAX_WAIT_S) -> None:
        self.store = store
        #: Chaos mode only: the node's record of its SCLs for the durability checker.
        self._scl_log = hooks.scl_log_for(store.node_id)
        super().__init__(
            store.apply_ops, owner="storage node", logger=logger, txn_items_max=txn_ops_max,
            txn_bytes_max=txn_bytes_max, item_bytes=_op_bytes, fg_pending_max=FG_OPS_MAX,
            bg_pending_max=BG_OPS_MAX, bg_max_wait_s=bg_max_wait_s,
            # injected slow fsync (engine/hooks.py): 0 unless the fault file says so
            before_write_s=lambda: hooks.disk_delay_s(store.node_id),
            after_write=self._record_scls,
            task_name="group-commit", thread_name="lmdb-writer")

    def _record_scls(self) -> None:
        """Chaos mode only: after the sync and before any ack of the transaction, append the
        SCLs it changed to the node's SCL log (engine/hooks.py), the record the durability
        checker trusts."""
        if self._scl_log is not None:
            self._scl_log.record(self.store.segments())

    async def close(self) -> None:
        await super().close()
        if self._scl_log is not None:
            self._scl_log.close()
