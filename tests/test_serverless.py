"""Serverless capacity (docs/serverless.md): the ACU mapping, the admission limit, the
buffer pool's online resize, and the scaling policies on recorded load traces.

Fast in-process tests, deterministic, no sleeping; the real-process tests (an instance's
own buffer pool and limit following its ACU) are in tests/test_serverless_cluster.py.
"""

from __future__ import annotations

import asyncio

import pytest

from engine.db.database import Database
from engine.instance import capacity as cap

try:
    from tests.fake_sink import FakeSink
    from tests.test_engine import LAYOUT, acked, check_cache_equals_storage, check_sink
except ImportError:  # run from tests/
    from fake_sink import FakeSink
    from test_engine import LAYOUT, acked, check_cache_equals_storage, check_sink


def run(coro, timeout_s: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


# --- The ACU mapping -----------------------------------------------------------------------


def test_one_acu_is_pages_slots_and_a_cpu_share():
    assert cap.buffer_pool_pages(1) == cap.PAGES_PER_ACU == 1024
    assert cap.buffer_pool_pages(0.5) == 512
    assert cap.buffer_pool_pages(8) == 8192
    assert cap.admission_slots(0.5) == 2 and cap.admission_slots(8) == 32
    assert cap.cpu_share_cores(2) == 0.5
    # A provisioned instance shows the ACU its fixed pool corresponds to.
    assert cap.acu_of_pages(4096) == 4.0 and cap.acu_of_pages(100) == 0.5


@pytest.mark.parametrize("bad", [0.25, 0.7, -1, 0, 128.5, 200])
def test_bad_acu_is_refused_with_the_reason(bad):
    with pytest.raises(ValueError) as info:
        cap.check_acu(bad, "--max-acu")
    assert "--max-acu" in str(info.value)


def test_zero_acu_only_where_pausing_is_allowed():
    assert cap.check_acu(0, allow_zero=True) == 0.0
    assert cap.check_acu(127.5) == 127.5


def test_cpu_enforcement_reports_which_mechanism(tmp_path):
    # No cgroup v2 at all.
    assert cap.cpu_enforcement(str(tmp_path / "none"))[0] == "admission"
    # A hybrid layout whose unified hierarchy lacks the cpu controller (this container).
    unified = tmp_path / "hybrid" / "unified"
    unified.mkdir(parents=True)
    (unified / "cgroup.controllers").write_text("hugetlb\n")
    how, why = cap.cpu_enforcement(str(tmp_path / "hybrid"))
    assert how == "admission" and "no cpu controller" in why
    # A pure v2 hierarchy with cpu and a writable cpu.max for this process's cgroup.
    root = tmp_path / "v2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory io\n")
    with open("/proc/self/cgroup") as f:
        rel = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), "/")
    group = root / rel.lstrip("/")
    group.mkdir(parents=True, exist_ok=True)
    (group / "cpu.max").write_text("max 100000\n")
    how, where = cap.cpu_enforcement(str(root))
    assert how == "cgroup" and where.endswith("cpu.max")


# --- The admission limit ---------------------------------------------------------------------


def test_admission_limit_holds_and_follows_set_limit():
    async def main():
        adm = cap.Admission(2)
        running_max = 0
        gate = asyncio.Event()

        async def request():
            nonlocal running_max
            async with adm.slot():
                running_max = max(running_max, adm.running)
                await gate.wait()

        tasks = [asyncio.create_task(request()) for _ in range(6)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert adm.running == 2 and adm.queued == 4
        adm.set_limit(4)                     # scale up: two waiters admitted at once
        assert adm.running == 4 and adm.queued == 2
        adm.set_limit(1)                     # scale down: running requests are not cancelled
        assert adm.running == 4 and adm.queued == 2
        gate.set()
        await asyncio.gather(*tasks)
        assert adm.running == 0 and adm.queued == 0 and adm.admitted == 6
        assert running_max == 4 and adm.waited == 4
    run(main())


def test_admission_waiter_cancelled_gives_no_slot_away():
    async def main():
        adm = cap.Admission(1)
        gate = asyncio.Event()

        async def request():
            async with adm.slot():
                await gate.wait()

        first = asyncio.create_task(request())
        await asyncio.sleep(0)
        second = asyncio.create_task(request())
        await asyncio.sleep(0)
        assert adm.queued == 1
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert adm.queued == 0 and adm.running == 1
        gate.set()
        await first
        assert adm.running == 0
        unlimited = cap.Admission(None)
        async with unlimited.slot():
            assert unlimited.running == 1
    run(main())


# --- The buffer pool's online resize ---------------------------------------------------------


async def _filled_db(pages: int) -> tuple[FakeSink, Database]:
    sink = FakeSink(layout=LAYOUT, ack_delay_s=None)
    db = Database(sink, pages)
    await acked(sink, db.bootstrap())
    await acked(sink, db.create_table("t"))
    for i in range(300):
        await acked(sink, db.put("t", b"%05d" % i, b"v" * 200))
    return sink, db


def test_pool_grows_in_place_and_keeps_what_it_has():
    async def main():
        sink, db = await _filled_db(16)
        resident = db.pool.resident_pages()
        assert db.pool.resize(64) == 0
        assert db.pool.capacity_pages == 64 and db.pool.resident_pages() == resident
        for i in range(300):
            assert await acked(sink, db.get("t", b"%05d" % i)) == b"v" * 200
        assert len(db.pool) > 16      # it used the room
        check_sink(sink)
    run(main())


def test_pool_shrink_evicts_only_clean_unpinned_pages():
    """Invariant 7: a shrink while writes are not durable keeps every dirty page (page_lsn
    above VDL) and every pinned page; they go once VDL passes them."""
    async def main():
        sink, db = await _filled_db(64)
        await acked(sink, db.get("t", b"00000"))
        # Dirty pages: writes submitted, acks held back (ack_delay_s=None).
        pending = [asyncio.create_task(db.put("t", b"%05d" % i, b"w" * 200)) for i in range(0, 300, 40)]
        for _ in range(50):
            await asyncio.sleep(0)
        vdl = sink.vdl
        from engine.format import page as pagefmt
        dirty = {pid for pid in db.pool.resident_pages() if pagefmt.page_lsn(db.pool.peek(pid)) > vdl}
        pinned = {pid for pid in db.pool.resident_pages() if db.pool.is_pinned(pid)}
        assert dirty, "the test needs dirty pages"
        before = len(db.pool)
        evicted = db.pool.resize(4)
        assert evicted > 0 and len(db.pool) == before - evicted
        left = set(db.pool.resident_pages())
        assert dirty | pinned <= left, "a dirty or pinned page was evicted"
        assert len(db.pool) > db.pool.capacity_pages   # overshoot while they are dirty
        sink.ack_all()
        await asyncio.gather(*pending)
        await sink.settle()
        db.pool.trim()
        assert len(db.pool) <= max(4, len(pinned))
        for i in range(300):
            expect = b"w" * 200 if i % 40 == 0 else b"v" * 200
            assert await acked(sink, db.get("t", b"%05d" % i)) == expect
        await check_cache_equals_storage(db, sink)
        check_sink(sink)
    run(main())


def test_pool_resize_refuses_a_pool_too_small():
    async def main():
        _sink, db = await _filled_db(16)
        with pytest.raises(ValueError):
            db.pool.resize(1)
        assert db.pool.capacity_pages == 16
    run(main())


# --- The capacity policy on load traces (engine/cluster/scaling.py) ----------------------------

from engine.cluster import scaling  # noqa: E402


def _replay(policy, acu, trace, tick_s=1.0):
    """Feed a trace of (cpu_demand_cores, queued_fraction) per tick; CPU is measured against
    the share the instance has at that tick (capped at the 2-core machine). Returns the
    capacity after every tick and the decisions' reasons."""
    state = scaling.CapacityState(acu)
    history, reasons = [], []
    for i, (demand_cores, queued) in enumerate(trace):
        share = cap.cpu_share_cores(state.acu)
        sample = scaling.LoadSample(t_s=i * tick_s, cpu_pct=100.0 * min(demand_cores, 2.0) / share,
                                    queued_fraction=queued)
        d = scaling.decide_capacity(policy, state, sample)
        state = d.state
        assert d.acu == state.acu
        history.append(d.acu)
        reasons.append(d.reason)
    return history, reasons


def test_capacity_goes_up_fast_on_a_step_of_load_and_down_slowly_after():
    policy = scaling.CapacityPolicy(min_acu=0.5, max_acu=8)
    idle, busy = (0.01, 0.0), (1.2, 0.0)   # 1.2 cores wanted: 6.9 ACU at 70% of the share
    trace = [idle] * 5 + [busy] * 20 + [idle] * 200
    history, reasons = _replay(policy, 0.5, trace)
    assert history[:5] == [0.5] * 5
    # Up: within 3 ticks of the step, at the capacity that serves 1.2 cores at <= 70%.
    reached = next(i for i, acu in enumerate(history) if acu >= 7.0) - 5
    assert reached <= 2, (history[:12], reasons[:12])
    assert max(history) <= 8 and all(a * 2 == int(a * 2) for a in history)
    assert history[24] >= 7.0
    # Down: nothing for scale_down_delay_s, then 0.5 ACU per interval, to the minimum.
    after = history[25:]
    first_down = next(i for i, acu in enumerate(after) if acu < history[24])
    assert first_down >= policy.scale_down_delay_s - 1
    steps = [after[i] - after[i + 1] for i in range(len(after) - 1) if after[i] != after[i + 1]]
    assert all(s == 0.5 for s in steps)
    back = next(i for i, acu in enumerate(after) if acu == 0.5)
    expected = policy.scale_down_delay_s + (history[24] - 0.5) / 0.5 * policy.scale_down_interval_s
    assert back <= expected + 1 and back <= 180, (back, expected)


def test_capacity_holds_in_the_band_and_restarts_the_down_timer():
    policy = scaling.CapacityPolicy(min_acu=1, max_acu=4, scale_down_delay_s=10, scale_down_interval_s=2)
    state = scaling.CapacityState(4.0)
    # 50% of the share: between down (30%) and target (70%): hold.
    for t in range(30):
        d = scaling.decide_capacity(policy, state, scaling.LoadSample(t, 50.0))
        assert d.acu == 4.0 and d.reason == "hold"
        state = d.state
    # Low for 9 s, a busy blip, low again: the 10 s delay starts over.
    for t in range(30, 39):
        state = scaling.decide_capacity(policy, state, scaling.LoadSample(t, 5.0)).state
    state = scaling.decide_capacity(policy, state, scaling.LoadSample(39, 50.0)).state
    acus = []
    for t in range(40, 62):
        d = scaling.decide_capacity(policy, state, scaling.LoadSample(t, 5.0))
        state = d.state
        acus.append(d.acu)
    assert acus[:10] == [4.0] * 10 and acus[10] == 3.5 and acus[12] == 3.0 and acus[-1] == 1.0


def test_queueing_and_a_missing_pool_scale_up_too():
    policy = scaling.CapacityPolicy(min_acu=0.5, max_acu=4)
    d = scaling.decide_capacity(policy, scaling.CapacityState(1.0),
                                scaling.LoadSample(0, 20.0, queued_fraction=0.5))
    assert d.acu == 1.5 and "queued" in d.reason
    d = scaling.decide_capacity(policy, scaling.CapacityState(1.0),
                                scaling.LoadSample(0, 20.0, miss_per_s=1000, pool_full=True))
    assert d.acu == 1.5 and "misses" in d.reason
    # Misses with room left in the pool are a cold cache, not a small one.
    d = scaling.decide_capacity(policy, scaling.CapacityState(1.0),
                                scaling.LoadSample(0, 20.0, miss_per_s=1000, pool_full=False))
    assert d.acu == 1.0
    d = scaling.decide_capacity(policy, scaling.CapacityState(4.0), scaling.LoadSample(0, 500.0))
    assert d.acu == 4.0 and d.reason.startswith("at max_acu")


def test_a_changed_range_moves_capacity_into_it():
    policy = scaling.CapacityPolicy(min_acu=2, max_acu=2)
    d = scaling.decide_capacity(policy, scaling.CapacityState(0.5), scaling.LoadSample(0, 0.0))
    assert d.acu == 2.0
    d = scaling.decide_capacity(scaling.CapacityPolicy(0.5, 1), scaling.CapacityState(2.0),
                                scaling.LoadSample(0, 0.0))
    assert d.acu == 1.0
    with pytest.raises(ValueError):
        scaling.CapacityPolicy(4, 2).check()


# --- The replica autoscaling policy on load traces ----------------------------------------------


def test_replicas_scale_out_with_cooldown_and_in_one_at_a_time():
    policy = scaling.AutoscalePolicy(min_replicas=1, max_replicas=15, target_cpu_pct=70,
                                     scale_out_cooldown_s=60, scale_in_cooldown_s=300)
    policy.check(15)
    state, n = scaling.AutoscaleState(), 1
    total_cores_wanted = 0.0
    counts = []
    # A read load that needs 2.4 "replica shares" of CPU for 10 minutes, then nothing.
    for t in range(0, 1800, 5):
        total_cores_wanted = 2.4 if t < 600 else 0.05
        avg = 100.0 * total_cores_wanted / n
        d = scaling.decide_replicas(policy, state, float(t), n, avg)
        state = d.state
        if d.replicas != n:
            counts.append((t, d.replicas, d.reason))
        n = d.replicas
    outs = [c for c in counts if c[2].startswith("out")]
    ins = [c for c in counts if c[2].startswith("in")]
    assert outs[0][0] == 0 and outs[0][1] == 4          # ceil(1 * 240 / 70) = 4 at once
    assert all(b[0] - a[0] >= 60 for a, b in zip(outs, outs[1:]))
    assert max(c[1] for c in counts) == 4
    assert ins and ins[0][0] >= 600 and all(b[0] - a[0] >= 300 for a, b in zip(ins, ins[1:]))
    assert [c[1] for c in ins] == [3, 2, 1][:len(ins)] and n == 1


def test_replica_policy_bounds_and_refusals():
    policy = scaling.AutoscalePolicy(min_replicas=2, max_replicas=3, target_cpu_pct=50,
                                     scale_out_cooldown_s=0, scale_in_cooldown_s=0)
    assert scaling.decide_replicas(policy, scaling.AutoscaleState(), 0, 1, 0).replicas == 2
    assert scaling.decide_replicas(policy, scaling.AutoscaleState(), 0, 2, 400).replicas == 3
    assert scaling.decide_replicas(policy, scaling.AutoscaleState(), 0, 3, 0).replicas == 2
    assert scaling.decide_replicas(policy, scaling.AutoscaleState(), 0, 2, 0).replicas == 2
    for bad in (scaling.AutoscalePolicy(3, 2), scaling.AutoscalePolicy(1, 16),
                scaling.AutoscalePolicy(1, 2, target_cpu_pct=0)):
        with pytest.raises(ValueError):
            bad.check(15)
    assert scaling.AutoscalePolicy.from_dict(policy.to_dict()) == policy


def test_capacity_timeline_chart(tmp_path):
    pytest.importorskip("matplotlib")
    from engine.cli.common import CliError
    from engine.cli.replicas import write_capacity_chart
    csv_path = tmp_path / "capacity.csv"
    with pytest.raises(CliError, match="no capacity timeline"):
        write_capacity_chart(str(csv_path), str(tmp_path / "x.png"))
    csv_path.write_text("unix_time,instance,acu,min_acu,max_acu,cpu_pct,queued_fraction,miss_per_s,"
                        "buffer_pool_pages,admission_limit,reason\n"
                        "100.0,db1,2.0,0.5,8,244,0.9,0,2048,8,up\n"
                        "120.0,db1,1.5,0.5,8,1,0,0,1536,6,down\n")
    png = tmp_path / "c.png"
    assert write_capacity_chart(str(csv_path), str(png)) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_up_refuses_a_bad_range_before_starting_anything(tmp_path):
    import subprocess
    import sys
    data_dir = tmp_path / "aurora"
    result = subprocess.run([sys.executable, "-m", "engine.cli", "up", "--detach", "--serverless",
                             "--min-acu", "4", "--max-acu", "2", "--data-dir", str(data_dir)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "aurora-lite: --min-acu 4 is above --max-acu 2" in result.stderr, result.stderr
    assert not (data_dir / "control.json").exists()


def test_auto_pause_only_with_min_zero_after_the_idle_time():
    policy = scaling.CapacityPolicy(min_acu=0, max_acu=2, pause_after_s=10)
    state = scaling.CapacityState(0.5)
    acus = []
    for t in range(30):
        # Idle, except one request at t=5: the idle timer starts over.
        d = scaling.decide_capacity(policy, state, scaling.LoadSample(t, 1.0, requests=int(t == 5)))
        state = d.state
        acus.append(d.acu)
        if d.acu == 0:
            assert d.reason.startswith("pause: no request for 10s")
            break
    assert acus[-1] == 0 and len(acus) == 17, acus
    # A minimum of 0.5 never pauses, however idle.
    state = scaling.CapacityState(0.5)
    for t in range(1000):
        state = scaling.decide_capacity(scaling.CapacityPolicy(0.5, 2, pause_after_s=10), state,
                                        scaling.LoadSample(t, 0.0, requests=0)).state
    assert state.acu == 0.5


def test_fifteen_replicas_fit_the_port_plan():
    """`up --replicas 15` (Aurora's promise): db1..db16 with distinct --base-port offsets
    that collide with no other process's port, metrics port (+20) or PostgreSQL port."""
    from engine.cluster import launcher as lc
    topo = lc.Topology.initial(15)
    assert [i.name for i in topo.instances] == [f"db{n}" for n in range(1, 17)]
    with pytest.raises(ValueError):
        lc.Topology.initial(16)
    inst = [lc.instance_port_offset(n) for n in range(1, 17)]
    storage = [lc.STORAGE_PORT_OFFSET + i for i in range(6)]
    grpc_ports = [lc.CONTROL_PORT_OFFSET, *inst, *storage]
    http = [p + lc.METRICS_PORT_OFFSET for p in grpc_ports]
    pg = [lc.PG_CLUSTER_PORT_OFFSET, lc.PG_READER_PORT_OFFSET,
          *(lc.PG_INSTANCE_PORT_OFFSET + n - 1 for n in range(1, 17))]
    every = grpc_ports + http + pg
    assert len(set(every)) == len(every) and max(every) <= lc.PLAN_SPAN
    topo.instances = topo.instances[:15]
    assert topo.next_instance().name == "db16"
