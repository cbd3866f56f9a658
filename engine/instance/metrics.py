"""An instance's Prometheus metrics (writer or replica; docs/dashboard.md lists them).

Read at scrape time from what the instance already keeps: the quorum tracker (VDL, VCL,
PGCL per PG), the allocator and LAL, the database's counters and commit-latency
``Buckets`` (engine/db/database.py), the buffer pool's hits and misses, and a replica's
lag samples (engine/instance/replica.py). The role can change under it (promotion,
stepping down): each scrape reports what the instance is now. Served by
engine/instance/server.py at ``--metrics-port`` through engine/metrics.py.
"""

from __future__ import annotations

from engine.metrics import GaugeMetricFamily, counter, gauge


def collector(inst):
    """The function a ``FnCollector`` calls; ``inst`` is engine/instance/server.py's Instance."""

    def collect():
        base = {"instance": inst.name}
        role = inst.role
        info = GaugeMetricFamily("aurora_instance_info", "1 for the instance, its role as a label",
                                 labels=["instance", "role"])
        info.add_metric([inst.name, role], 1)
        yield info
        yield gauge("aurora_instance_is_writer", "1 while this instance is the writer", int(role == "writer"), base)
        yield gauge("aurora_vdl", "Volume durable LSN as this instance knows it (LSN)", inst.vdl, base)
        yield gauge("aurora_volume_epoch", "Volume epoch of the instance's storage driver", inst.epoch, base)
        # Capacity (engine/instance/capacity.py): the instance's own view of its ACU.
        yield gauge("aurora_capacity_acu", "Capacity of the instance now (ACU; provisioned: fixed)",
                    inst.acu, base)
        yield gauge("aurora_buffer_pool_capacity_pages", "Buffer pool capacity (8 KiB pages)",
                    inst.pool_pages, base)
        admission = inst.admission
        yield gauge("aurora_admission_limit", "Concurrent Database requests allowed (0: unlimited)",
                    admission.limit or 0, base)
        yield gauge("aurora_admission_queued", "Database requests waiting for an admission slot",
                    admission.queued, base)
        driver = inst.driver
        if driver is not None and inst.replica is None:
            tracker = driver.tracker
            yield gauge("aurora_vcl", "Volume complete LSN (LSN)", tracker.vcl, base)
            pgcl = GaugeMetricFamily("aurora_pgcl", "Protection group complete LSN of each PG (LSN)",
                                     labels=["instance", "pg"])
            for pg, lsn in sorted(tracker.pgcl.items()):
                pgcl.add_metric([inst.name, str(pg)], lsn)
            yield pgcl
            yield gauge("aurora_lsn_allocation_headroom",
                        "LSNs that may still be allocated before the LAL stops the writer (invariant 6)",
                        max(0, driver.allocation_limit() - driver.allocator.next_lsn + 1), base)
            yield gauge("aurora_waiting_commits", "Commits waiting for VDL to pass them", len(driver.commits), base)
            # The boxcars (docs/writer.md): commits per batch = aurora_commits / this.
            yield counter("aurora_redo_batches", "Redo batches sealed and sent to storage (one per "
                          "boxcar, each to every segment)", driver.stats["batches"], base)
            yield counter("aurora_redo_records", "Redo records sent to storage", driver.stats["records"], base)
            yield counter("aurora_redo_record_bytes", "Redo record bytes sent to storage (one copy)",
                          driver.stats["record_bytes"], base)
        db = inst.replica.db if inst.replica is not None else inst.db
        if db is not None:
            yield counter("aurora_commits", "Committed transactions", db.counters["commits"], base)
            yield counter("aurora_commit_aborts", "Aborted transactions", db.counters["aborts"], base)
            yield db.commit_latency.family(
                "aurora_commit_latency_seconds",
                "Commit latency: from planning the commit's MTR to VDL passing its COMMIT record", base)
            yield counter("aurora_buffer_pool_hits", "Buffer pool lookups served from the cache",
                          db.pool.hits, base)
            yield counter("aurora_buffer_pool_misses", "Buffer pool lookups that read from storage",
                          db.pool.misses, base)
            yield gauge("aurora_buffer_pool_pages", "Pages in the buffer pool", len(db.pool), base)
        replica = inst.replica
        if replica is not None:
            lags = replica.lag_ms
            yield gauge("aurora_replica_lag_seconds",
                        "Replica lag: last commit-to-visibility sample", (lags[-1] / 1000.0) if lags else 0.0, base)
            vdl = replica.sink.vdl if replica.sink else 0
            yield gauge("aurora_replica_lag_lsn", "Replica lag: writer's announced VDL minus this replica's VDL (LSN)",
                        max(0, replica.writer_vdl - vdl), base)

    return collect
