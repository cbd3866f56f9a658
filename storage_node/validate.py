"""Bounds on every size and count that arrives from the network, checked at the door.

The storage service (storage_node/service.py) calls these before a request reaches the
node or its store, so an absurd value (a uint32 near 2**32 for pg_count, a volume name
longer than an LMDB key) is refused as MALFORMED with a message naming the bound,
instead of making the node build millions of rows or fail deep inside LMDB. The bounds
are constants of engine/format/volume.py, where the writer side sees them too.

    field                                   bound                        checked by
    volume (every request)                  VOLUME_NAME_MAX_BYTES        check_volume_name
    CreateVolume.pg_count                   1 .. PG_COUNT_MAX            check_create_volume
    CreateVolume.stripe_pages               0 (default) .. STRIPE_PAGES_MAX
    CreateVolume.fork_tails                 <= PG_COUNT_MAX entries
    Append.batches                          <= APPEND_BATCHES_MAX        check_append
    Append/ReadPage/... pg                  < PG_COUNT_MAX (and < the volume's pg_count,
                                            which the store checks)
    Truncate.set, FindCommit.set            <= TRUNCATION_SET_MAX ranges check_truncation_set

Bounded elsewhere, by type or by the store: page ids are u32 (the record header's
field); a record's payload is at most engine.format.redo.PAYLOAD_MAX bytes (checked when
a batch is scanned); FetchRecords.max_bytes is clamped to FETCH_BYTES_MAX and
SegmentState's record list to STATE_RECORDS_MAX (storage_node/store.py); a whole request
is at most the gRPC message limit.
"""

from __future__ import annotations

from engine.format.volume import (
    APPEND_BATCHES_MAX,
    PG_COUNT_MAX,
    STRIPE_PAGES_MAX,
    TRUNCATION_SET_MAX,
    VOLUME_NAME_MAX_BYTES,
)
from storage_node.errors import MalformedError


def check_volume_name(volume: str) -> None:
    size = len(volume.encode())
    if size > VOLUME_NAME_MAX_BYTES:
        raise MalformedError(f"volume name of {size} bytes exceeds VOLUME_NAME_MAX_BYTES "
                             f"{VOLUME_NAME_MAX_BYTES}")


def check_pg(pg: int) -> None:
    if pg >= PG_COUNT_MAX:
        raise MalformedError(f"pg {pg} is not below PG_COUNT_MAX {PG_COUNT_MAX}")


def check_create_volume(volume: str, pg_count: int, stripe_pages: int, n_fork_tails: int) -> None:
    check_volume_name(volume)
    if not 1 <= pg_count <= PG_COUNT_MAX:
        raise MalformedError(f"CreateVolume {volume!r}: pg_count {pg_count} is outside 1.."
                             f"PG_COUNT_MAX {PG_COUNT_MAX}")
    if stripe_pages > STRIPE_PAGES_MAX:
        raise MalformedError(f"CreateVolume {volume!r}: stripe_pages {stripe_pages} exceeds "
                             f"STRIPE_PAGES_MAX {STRIPE_PAGES_MAX}")
    if n_fork_tails > PG_COUNT_MAX:
        raise MalformedError(f"CreateVolume {volume!r}: {n_fork_tails} fork tails exceed "
                             f"PG_COUNT_MAX {PG_COUNT_MAX}")


def check_append(volume: str, pgs: list[int]) -> None:
    check_volume_name(volume)
    if len(pgs) > APPEND_BATCHES_MAX:
        raise MalformedError(f"Append of {len(pgs)} PG batches exceeds APPEND_BATCHES_MAX "
                             f"{APPEND_BATCHES_MAX}")
    for pg in pgs:
        check_pg(pg)


def check_truncation_set(what: str, n_ranges: int) -> None:
    if n_ranges > TRUNCATION_SET_MAX:
        raise MalformedError(f"{what}: a truncation set of {n_ranges} ranges exceeds "
                             f"TRUNCATION_SET_MAX {TRUNCATION_SET_MAX}")
