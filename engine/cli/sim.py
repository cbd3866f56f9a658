"""`aurora-lite sim`: the deterministic simulation (engine/sim/, docs/reliability.md).

    aurora-lite sim --seeds N [--first-seed S] [--virtual-s V] [--workers W]
                    [--faults KIND,...] [--timelines] [--bug NAME] [--json]
    aurora-lite sim --seed S [--trace] [--virtual-s V] [--faults ...] [--timelines] [--bug NAME]

Runs N seeded schedules (seeds S .. S+N-1), each the whole cluster in one process on a
virtual clock, over W worker processes (default: one per core). Progress goes to stderr,
then one verdict line; with --json stdout holds only the JSON summary. A red seed prints
the one command that replays it. ``--seed S --trace`` replays one schedule and prints its
events (who sent what to whom, acks, VDL moves, faults): nothing in that output varies
between runs of the same seed. Exit code 0 when every schedule is green, 1 otherwise.
``--timelines`` adds backtrack and clone episodes (engine/sim/episodes.py), judged on
timelines (engine/sim/timelines.py); they can also be named in ``--faults``.

Every schedule runs in a spawned worker with PYTHONHASHSEED=0 (no grpc is imported there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from engine.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def register(sub) -> None:
    from engine.sim.faults import ALL_KINDS, BUGS, FAULT_KINDS, VIRTUAL_S_DEFAULT
    p = sub.add_parser("sim", help="run seeded fault schedules on the whole cluster simulated "
                       "in one process (deterministic, replayable)")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="schedules to run")
    p.add_argument("--first-seed", type=int, default=1, metavar="S",
                   help="the first seed (default 1): seeds S .. S+N-1")
    p.add_argument("--seed", type=int, default=None, help="replay this one seed")
    p.add_argument("--trace", action="store_true", help="with --seed: print the run's events")
    p.add_argument("--virtual-s", type=float, default=VIRTUAL_S_DEFAULT, metavar="V",
                   help=f"virtual seconds of faults per schedule (default {VIRTUAL_S_DEFAULT:g})")
    p.add_argument("--workers", type=int, default=None, metavar="W",
                   help="worker processes (default: one per core)")
    p.add_argument("--faults", default=",".join(FAULT_KINDS),
                   help=f"comma-separated fault kinds, of: {', '.join(ALL_KINDS)} "
                   f"(default: all but backtrack and clone)")
    p.add_argument("--timelines", action="store_true",
                   help="add backtrack and clone episodes (the checkers follow timelines)")
    p.add_argument("--bug", default=None, choices=sorted(BUGS),
                   help="plant one bug (engine/hooks.py), to see the checkers catch it")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=cmd_sim)


def _replay_command(seed: int, args) -> str:
    cmd = f"aurora-lite sim --seed {seed} --trace"
    if args.virtual_s != _default_virtual_s():
        cmd += f" --virtual-s {args.virtual_s:g}"
    from engine.sim.faults import FAULT_KINDS
    if args.faults != ",".join(FAULT_KINDS):
        cmd += f" --faults {args.faults}"
    if args.timelines:
        cmd += " --timelines"
    if args.bug:
        cmd += f" --bug {args.bug}"
    return cmd


def _default_virtual_s() -> float:
    from engine.sim.faults import VIRTUAL_S_DEFAULT
    return VIRTUAL_S_DEFAULT


def cmd_sim(args: argparse.Namespace) -> int:
    from engine.sim.faults import ALL_KINDS, TIMELINE_KINDS
    from engine.sim.run import run_many
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds:
        print(f"aurora-lite sim: unknown fault kind {bad[0] if bad else '(none)'}; "
              f"kinds: {', '.join(ALL_KINDS)}", file=sys.stderr)
        return EXIT_USAGE
    if args.timelines:
        kinds += [k for k in TIMELINE_KINDS if k not in kinds]
    if (args.seed is None) == (args.seeds is None):
        print("aurora-lite sim: give --seeds N (many schedules) or --seed S (one)", file=sys.stderr)
        return EXIT_USAGE
    if args.trace and args.seed is None:
        print("aurora-lite sim: --trace replays one schedule: use it with --seed S", file=sys.stderr)
        return EXIT_USAGE
    if args.virtual_s <= 0 or (args.seeds is not None and args.seeds < 1):
        print("aurora-lite sim: --seeds and --virtual-s must be positive", file=sys.stderr)
        return EXIT_USAGE
    if args.seed is not None:
        return _one(args, kinds)
    workers = args.workers or os.cpu_count() or 1
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    started = time.perf_counter()
    results = []
    red = []
    for r in run_many(seeds, workers, args.virtual_s, kinds, args.bug):
        results.append(r)
        if not r["green"]:
            red.append(r["seed"])
            print(f"seed {r['seed']} RED: {r['violations'][0][:300]}", file=sys.stderr)
            print(f"  replay: {_replay_command(r['seed'], args)}", file=sys.stderr)
        print(f"[{len(results)}/{len(seeds)}] +{time.perf_counter() - started:.1f}s "
              f"seed {r['seed']} {'green' if r['green'] else 'RED'} "
              f"hash {r['trace_hash']} acked {r['acked']} episodes {r['episodes']}",
              file=sys.stderr, flush=True)
    wall_s = time.perf_counter() - started
    virtual_s = sum(r["virtual_s"] for r in results)
    summary = {
        "schedules": len(results), "green": len(results) - len(red), "red": sorted(red),
        "virtual_s": round(virtual_s, 1), "wall_s": round(wall_s, 1),
        "episodes": sum(r["episodes"] for r in results),
        "acked": sum(r["acked"] for r in results),
        "backtracks": sum(r["backtracks"] for r in results),
        "forward_backtracks": sum(r["forward"] for r in results),
        "clones": sum(r["clones"] for r in results),
        "workers": workers,
        "compression": round(virtual_s / wall_s, 1) if wall_s else 0.0,
        "schedules_per_min": round(len(results) / wall_s * 60, 1) if wall_s else 0.0,
        "min_episodes": min(r["episodes"] for r in results),
        "min_acked": min(r["acked"] for r in results),
        "min_virtual_s": min(r["virtual_s"] for r in results),
        "bug": args.bug,
        "grpc_imported": any(r.get("grpc_imported") for r in results),
        "hashes": {str(r["seed"]): r["trace_hash"] for r in sorted(results, key=lambda r: r["seed"])},
    }
    verdict = "GREEN" if not red else "RED"
    print(f"sim: {verdict}: {summary['green']}/{summary['schedules']} schedules green, "
          f"{summary['virtual_s']:g} virtual s in {summary['wall_s']:g} wall s "
          f"({summary['compression']:g}x, {summary['schedules_per_min']:g} schedules/min), "
          f"{summary['episodes']} fault episodes, {summary['acked']} acknowledged transactions"
          + (f", {summary['backtracks']} backtracks ({summary['forward_backtracks']} forward "
             f"again), {summary['clones']} clones" if set(kinds) & set(TIMELINE_KINDS) else "")
          + (f"; red seeds {sorted(red)}" if red else ""), file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=1))
    return EXIT_OK if not red else EXIT_FAILED


def _one(args, kinds) -> int:
    """Replay one seed in a worker; print its trace with --trace (nothing that varies)."""
    from engine.sim.run import run_in_worker
    r = run_in_worker(args.seed, args.virtual_s, kinds, args.bug, keep_trace=args.trace)
    if args.trace:
        for line in r["trace"]:
            print(line)
    for f in r["faults"]:
        print(f"fault {f}", file=sys.stderr)
    for v in r["violations"]:
        print(f"violation: {v}", file=sys.stderr)
    print(f"sim: seed {args.seed} {'GREEN' if r['green'] else 'RED'}: trace hash {r['trace_hash']}, "
          f"{r['events']} events, {r['virtual_s']:g} virtual s, {r['episodes']} fault episodes, "
          f"{r['acked']} acknowledged transactions"
          + (f", {r['backtracks']} backtracks ({r['forward']} forward again), {r['clones']} clones"
             if r["backtracks"] or r["clones"] else ""), file=sys.stderr)
    if not r["green"]:
        print(f"  replay: {_replay_command(args.seed, args)}", file=sys.stderr)
    if args.json:
        r.pop("trace", None)
        r.pop("wall_s", None)
        r.pop("cpu_s", None)
        print(json.dumps(r, indent=1))
    return EXIT_OK if r["green"] else EXIT_FAILED
