"""Sensitivity of the write-amplification ratio: which regime gives which ratio.

``aurora-lite bench write-amplification --sensitivity`` calls ``run_sweep``: the I/O
ratio (baseline / aurora-lite I/Os per transaction from the instance, the [P17] rule of
engine/baseline/io_count.py) against the two knobs that decide whether the mirrored
baseline writes pages (docs/benchmarks.md, "Sensitivity"):

    redo log capacity      at the run's row count: the smaller the log, the more often
                           checkpoint flushing writes every hot page home. Only the
                           baseline depends on it, so aurora-lite is measured once.
    data size / pool       at the run's redo log: rows vary, the buffer pool is fixed;
                           beyond 1, LRU flushing writes a page for most changes.
                           Both configurations are measured at every size (aurora-lite's
                           batches spread over more PGs as the data grows).

Every point is a full ``wa_bench.run_bench`` (fresh processes and volume, load, one
healthy phase, processes stopped), each configuration alone, the order alternating from
point to point. The chart is a PNG with two panels (matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import dataclasses
import logging

from engine.baseline import wa_bench
from engine.baseline.io_count import PAPER, format_table, ratio

log = logging.getLogger(__name__)

DEFAULT_REDO_MIB = (0.25, 0.5, 1.0, 4.0, 16.0, 96.0)
DEFAULT_ROWS = (1000, 5000, 10000, 20000)


def _point(kind: str, knob: float, cfg: wa_bench.BenchConfig, aurora: dict, base: dict) -> dict:
    """One point of a sweep from one aurora-lite run and one baseline run (healthy)."""
    a_ios, b_ios = aurora["compute_ios_per_txn"], base["compute_ios_per_txn"]
    extra = base["extra"]
    return {
        "sweep": kind, "knob": knob, "rows": cfg.rows, "buffer_pool_pages": cfg.buffer_pool_pages,
        "redo_log_bytes": extra.get("redo_log_bytes"), "data_pages": extra.get("data_pages"),
        "data_over_pool": ratio(extra.get("data_pages", 0), cfg.buffer_pool_pages),
        "redo_log_wraps": extra.get("redo_log_wraps"),
        "aurora_ios_per_txn": a_ios, "baseline_ios_per_txn": b_ios, "ios_ratio": ratio(b_ios, a_ios),
        "aurora_append_ios_per_txn": aurora["compute_append_ios_per_txn"],
        "ios_ratio_append_rule": ratio(b_ios, aurora["compute_append_ios_per_txn"]),
        "baseline_pages_flushed_per_txn": ratio(extra.get("pages_flushed", 0), base["transactions"]),
        "aurora_tps": aurora["tps"], "baseline_tps": base["tps"],
    }


async def run_sweep(cfg: wa_bench.BenchConfig, redo_mib=DEFAULT_REDO_MIB, rows=DEFAULT_ROWS,
                    progress: wa_bench.Progress | None = None) -> dict:
    """Both sweeps around ``cfg`` (healthy phases only); returns every point."""
    base_cfg = dataclasses.replace(cfg, slow_phase=False, configs=wa_bench.CONFIGS)
    points: list[dict] = []
    flip = False

    def order() -> tuple[str, ...]:
        nonlocal flip
        flip = not flip
        return wa_bench.CONFIGS if flip else tuple(reversed(wa_bench.CONFIGS))

    # Redo log capacity: aurora-lite once (the knob is the baseline's), then the baseline.
    aurora = None
    for i, mib in enumerate(redo_mib):
        point_cfg = dataclasses.replace(base_cfg, redo_log_bytes=int(mib * 2**20))
        if aurora is None:
            point_cfg = dataclasses.replace(point_cfg, configs=order())
        else:
            point_cfg = dataclasses.replace(point_cfg, configs=("baseline",))
        results = await wa_bench.run_bench(point_cfg, progress)
        if aurora is None:
            aurora = wa_bench.find_run(results["runs"], "aurora-lite", "healthy")
        points.append(_point("redo", mib, point_cfg, aurora,
                             wa_bench.find_run(results["runs"], "baseline", "healthy")))
        log.info("redo %.2f MiB: ratio %s", mib, points[-1]["ios_ratio"])
    # Data size over the buffer pool: both configurations at every size.
    for n in rows:
        point_cfg = dataclasses.replace(base_cfg, rows=n, configs=order())
        results = await wa_bench.run_bench(point_cfg, progress)
        points.append(_point("data", n, point_cfg,
                             wa_bench.find_run(results["runs"], "aurora-lite", "healthy"),
                             wa_bench.find_run(results["runs"], "baseline", "healthy")))
        log.info("rows %d: ratio %s", n, points[-1]["ios_ratio"])
    return {"config": cfg.to_json(), "points": points, "paper": PAPER}


def render(sweep: dict) -> str:
    """Two plain-text tables, one per sweep."""
    cfg = sweep["config"]
    lines = [f"Sensitivity of the I/O ratio (baseline / aurora-lite I/Os per txn from the "
             f"instance, healthy phase of {cfg.get('duration_s') or cfg.get('transactions')} "
             f"{'s' if cfg.get('duration_s') else 'txns'}, {cfg['clients']} clients)", ""]
    header = ["", "data/pool", "redo wraps", "aurora-lite", "baseline", "pages/txn", "ratio",
              "ratio (R2-old)", "tx/s a / b"]
    for kind, title in (("redo", f"redo log capacity, {cfg['rows']} rows, pool "
                                 f"{cfg['buffer_pool_pages']} pages"),
                        ("data", f"data size over buffer pool ({cfg['buffer_pool_pages']} pages), "
                                 f"redo log {cfg['redo_log_bytes_used'] / 2**20:.2f} MiB")):
        rows = []
        for p in sweep["points"]:
            if p["sweep"] != kind:
                continue
            label = f"{p['knob']:g} MiB" if kind == "redo" else f"{p['rows']:,} rows"
            rows.append([label, p["data_over_pool"], p["redo_log_wraps"], p["aurora_ios_per_txn"],
                         p["baseline_ios_per_txn"], p["baseline_pages_flushed_per_txn"],
                         p["ios_ratio"], p["ios_ratio_append_rule"],
                         f"{p['aurora_tps']:.0f} / {p['baseline_tps']:.0f}"])
        if rows:
            lines.append(title)
            lines.append(format_table(header, rows))
            lines.append("")
    return "\n".join(lines)


def write_chart(sweep: dict, path: str) -> bool:
    """A PNG: the I/O ratio against redo capacity (left) and data size / pool (right).
    Returns False, writing nothing, when matplotlib (the ``plot`` extra) is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (
        (axes[0], "redo", "baseline redo log capacity (MiB, log scale)", "knob"),
        (axes[1], "data", "data size / buffer pool (pages / pages)", "data_over_pool"),
    )
    cfg = sweep["config"]
    for ax, kind, xlabel, xkey in panels:
        pts = [p for p in sweep["points"] if p["sweep"] == kind and p["ios_ratio"] is not None]
        xs = [p[xkey] for p in pts]
        ax.plot(xs, [p["ios_ratio"] for p in pts], "o-", color="tab:green",
                label="I/O ratio (a write = one PG batch)")
        ax.plot(xs, [p["ios_ratio_append_rule"] for p in pts], "x--", color="tab:gray",
                label="old count (an Append = one write)")
        ax.axhline(PAPER["ios_ratio"], color="tab:red", ls=":", lw=1, label="[P17] 7.7x")
        ax.axhline(1.0, color="black", lw=0.5)
        for p, x in zip(pts, xs):
            ax.annotate(f"{p['ios_ratio']:.1f}", (x, p["ios_ratio"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        if kind == "redo":
            ax.set_xscale("log")
            ax.set_title(f"{cfg['rows']:,} rows, pool {cfg['buffer_pool_pages']} pages", fontsize=10)
        else:
            ax.set_title(f"redo log {cfg['redo_log_bytes_used'] / 2**20:.2f} MiB, pool "
                         f"{cfg['buffer_pool_pages']} pages", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("baseline / aurora-lite I/Os per txn")
        ax.legend(fontsize=8)
    fig.suptitle("Which regime gives which ratio: baseline I/Os per transaction over aurora-lite's",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
