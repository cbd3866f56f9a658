"""A storage node's Prometheus metrics (docs/dashboard.md lists them).

Read at scrape time from what the node already keeps: ``Counters`` (storage_node/node.py),
the store's in-memory segment mirrors and dirty counts, and the group committer's
``Buckets`` of LMDB commit times (engine/group_commit.py). Nothing here runs on the write
path. Served by storage_node/server.py at ``--metrics-port`` through engine/metrics.py.
"""

from __future__ import annotations

from engine.metrics import GaugeMetricFamily, counter, gauge
from storage_node.node import StorageNode


def collector(node: StorageNode):
    """The function a ``FnCollector`` calls: every family of this node."""

    def collect():
        c = node.counters
        base = {"node": node.node_id, "az": node.az}
        keys = list(base)
        seg_families = {
            "scl": GaugeMetricFamily("aurora_storage_segment_scl",
                                     "Segment complete LSN of each segment (LSN)", labels=keys + ["volume", "pg"]),
            "max_lsn": GaugeMetricFamily("aurora_storage_segment_max_lsn",
                                         "Highest LSN a segment holds (LSN)", labels=keys + ["volume", "pg"]),
            "gc_horizon": GaugeMetricFamily("aurora_storage_gc_horizon",
                                            "GC horizon (PGMRPL) of each segment: versions below it may be collected (LSN)",
                                            labels=keys + ["volume", "pg"]),
            "records": GaugeMetricFamily("aurora_storage_segment_records",
                                         "Log records a segment stores", labels=keys + ["volume", "pg"]),
        }
        for (volume, pg), m in sorted(node.store.segments()):
            values = list(base.values()) + [volume, str(pg)]
            seg_families["scl"].add_metric(values, m.scl)
            seg_families["max_lsn"].add_metric(values, m.max_lsn)
            seg_families["gc_horizon"].add_metric(values, m.gc_horizon)
            seg_families["records"].add_metric(values, m.n_records)
        yield from seg_families.values()
        yield counter("aurora_storage_append_requests", "Append requests from the writer", c.append_rpcs, base)
        yield counter("aurora_storage_append_batches", "Per-PG redo batches appended by the writer",
                      c.append_batches, base)
        yield counter("aurora_storage_append_records", "Redo records appended by the writer",
                      c.records_received, base)
        yield counter("aurora_storage_append_bytes", "Redo bytes appended by the writer",
                      c.bytes_received, base)
        yield counter("aurora_storage_gossip_records_pulled", "Redo records pulled from peers by gossip",
                      c.gossip_records_pulled, base)
        yield counter("aurora_storage_pages_materialised", "Page versions materialised by coalescing",
                      c.pages_materialised, base)
        yield counter("aurora_storage_gc_records_deleted", "Log records removed by GC", c.gc_records_deleted, base)
        yield counter("aurora_storage_scrub_errors", "Bad checksums found by scrub", c.scrub_errors_found, base)
        yield gauge("aurora_storage_coalesce_backlog_records",
                    "Log records not yet folded into a materialised page version", node.store.dirty_total(), base)
        committer = node.committer
        if committer is not None:
            yield counter("aurora_storage_lmdb_commits", "Synced LMDB write transactions (group commits)",
                          committer.txns, base)
            yield committer.write_seconds.family(
                "aurora_storage_lmdb_commit_seconds",
                "Time of one synced LMDB write transaction (fsync included) as the event loop sees it",
                base)
        yield counter("aurora_storage_lmdb_bytes_written", "Bytes written to LMDB", node.store.lmdb_bytes_written, base)

    return collect

