"""The pure server core, driven with a fake clock: lifecycle, leases, reservations, TTL, eviction, tenants."""

from __future__ import annotations

import pytest

from rdmapool.config import ServerConfig, TenantConfig
from rdmapool.errors import UsageError
from rdmapool.server.core import AllocStatus, PoolCore
from rdmapool.server.lifecycle import MOVES, IllegalMove, SlotState, check_move
from rdmapool.server.slots import stride_for
from rdmapool.transport.base import RegionDescriptor

CAP = 1024
STRIDE = stride_for(CAP)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def make_core(slots: int = 4, tenants: tuple[str, ...] = ("a", "b"), policy: str = "lru", **options) -> PoolCore:
    cfg = ServerConfig(
        tenants=tuple(TenantConfig(t, f"token-{t}-secret", slots * STRIDE) for t in tenants), policy=policy,
        size_classes=(CAP,), lease_s=10.0, grace_s=1.0, reservation_s=5.0, **options,
    )
    regions = {t: RegionDescriptor(0x10000 * (i + 1) * 1000, slots * STRIDE, 100 + i) for i, t in enumerate(tenants)}
    return PoolCore(cfg, regions, epoch=7)


def check_invariants(core: PoolCore) -> None:
    """Every indexed key points at a live slot holding that key; free lists hold exactly the FREE slots;
    each policy tracks exactly the RESIDENT keys of its class."""
    for pool in core.tenants.values():
        for k, slot in pool.index.items():
            assert slot.key == k and slot.state in (SlotState.WRITING, SlotState.RESIDENT)
        for cls in pool.classes:
            assert sorted(cls.free) == [s.index for s in cls.slots if s.state is SlotState.FREE]
            resident = [s for s in cls.slots if s.state is SlotState.RESIDENT]
            assert len(cls.policy) == len(resident)
            assert all(s.key in cls.policy for s in resident)
            assert cls.counts == [sum(1 for s in cls.slots if s.state is st) for st in SlotState]
            assert cls.resident_bytes == sum(s.length for s in resident)


def put(core: PoolCore, tenant: str, k: bytes, now: float, length: int = 100) -> int:
    (grant,) = core.allocate(tenant, [k], [length], now)
    assert grant.status is AllocStatus.OK
    assert core.commit(tenant, [(k, grant.slot.generation)], now) == [True]
    return grant.slot.generation


def test_lifecycle_table_is_closed_and_enforced() -> None:
    assert set(MOVES) == set(SlotState)
    check_move(SlotState.FREE, SlotState.WRITING)
    with pytest.raises(IllegalMove):
        check_move(SlotState.FREE, SlotState.RESIDENT)
    with pytest.raises(IllegalMove):
        check_move(SlotState.RETIRED, SlotState.RESIDENT)


def test_two_phase_write_uncommitted_is_invisible() -> None:
    core = make_core()
    (grant,) = core.allocate("a", [key(1)], [100], 0.0)
    assert grant.status is AllocStatus.OK and grant.slot.length == 100 and grant.slot.capacity == CAP
    assert core.lookup("a", [key(1)], 0.1) == []
    assert core.commit("a", [(key(1), grant.slot.generation)], 0.2) == [True]
    (hit,) = core.lookup("a", [key(1)], 0.3)
    assert (hit.addr, hit.rkey, hit.generation, hit.length) == (grant.slot.addr, 100, grant.slot.generation, 100)
    check_invariants(core)


def test_lookup_returns_longest_present_prefix_and_per_key_mode() -> None:
    core = make_core()
    for i in (1, 2, 4):
        put(core, "a", key(i), 0.0)
    hits = core.lookup("a", [key(1), key(2), key(3), key(4)], 1.0)
    assert len(hits) == 2
    per_key = core.lookup("a", [key(1), key(3), key(4)], 1.0, prefix=False)
    assert [h is not None for h in per_key] == [True, False, True]


def test_tenants_are_isolated_pairwise() -> None:
    core = make_core()
    put(core, "a", key(1), 0.0)
    assert len(core.lookup("a", [key(1)], 1.0)) == 1  # same tenant hits
    assert core.lookup("b", [key(1)], 1.0) == []  # other tenant misses
    assert core.delete("b", [key(1)], 1.0) == [False]  # and cannot delete it
    # b may store the same key independently; its slot lives in b's own region (other rkey, other range)
    put(core, "b", key(1), 1.0)
    (ha,) = core.lookup("a", [key(1)], 2.0)
    (hb,) = core.lookup("b", [key(1)], 2.0)
    assert ha.rkey != hb.rkey
    ra, rb = core.tenants["a"].region, core.tenants["b"].region
    assert ra.contains(ha.addr, STRIDE) and rb.contains(hb.addr, STRIDE)
    assert not ra.contains(hb.addr, 1)
    with pytest.raises(UsageError):
        core.lookup("nobody", [key(1)], 0.0)


def test_concurrent_writers_one_stores_others_told_exists() -> None:
    core = make_core()
    g1, g2 = core.allocate("a", [key(1)], [10], 0.0)[0], core.allocate("a", [key(1)], [10], 0.0)[0]
    assert g1.status is AllocStatus.OK and g2.status is AllocStatus.EXISTS
    core.commit("a", [(key(1), g1.slot.generation)], 0.1)
    assert core.allocate("a", [key(1)], [10], 0.2)[0].status is AllocStatus.EXISTS


def test_commit_with_wrong_generation_or_after_expiry_is_rejected() -> None:
    core = make_core()
    (g,) = core.allocate("a", [key(1)], [10], 0.0)
    assert core.commit("a", [(key(1), g.slot.generation + 1)], 0.1) == [False]
    assert core.commit("b", [(key(1), g.slot.generation)], 0.1) == [False]
    assert core.commit("a", [(key(1), g.slot.generation)], 5.0) == [False]  # reservation_s = 5
    check_invariants(core)


def test_expired_reservation_is_reclaimed_and_generation_changes() -> None:
    core = make_core(slots=1)
    (g,) = core.allocate("a", [key(1)], [10], 0.0)
    assert core.allocate("a", [key(2)], [10], 1.0)[0].status is AllocStatus.FULL
    core.sweep(5.0)  # reservation expired -> retired, free after grace
    assert core.counters["reservations_expired"] == 1
    assert core.allocate("a", [key(2)], [10], 5.5)[0].status is AllocStatus.FULL  # still in grace
    (g2,) = core.allocate("a", [key(2)], [10], 6.1)
    assert g2.status is AllocStatus.OK and g2.slot.addr == g.slot.addr
    assert g2.slot.generation != g.slot.generation
    check_invariants(core)


def test_leased_slot_is_not_reused_until_lease_plus_grace() -> None:
    core = make_core(slots=1)
    gen = put(core, "a", key(1), 0.0)
    core.lookup("a", [key(1)], 1.0)  # lease until 11.0
    assert core.delete("a", [key(1)], 2.0) == [True]
    assert core.lookup("a", [key(1)], 2.0) == []  # invisible at once
    for t in (2.0, 11.5):
        assert core.allocate("a", [key(2)], [10], t)[0].status is AllocStatus.FULL
    (g,) = core.allocate("a", [key(2)], [10], 12.0)  # 11 + grace 1
    assert g.status is AllocStatus.OK and g.slot.generation > gen
    check_invariants(core)


def test_capacity_eviction_skips_leased_and_evicts_lru() -> None:
    core = make_core(slots=2)
    put(core, "a", key(1), 0.0)
    put(core, "a", key(2), 0.0)
    core.lookup("a", [key(1)], 1.0)  # key 1 leased until 11 and most recent
    (g,) = core.allocate("a", [key(3)], [10], 2.0)
    assert g.status is AllocStatus.OK
    assert core.counters["evictions"] == 1
    assert len(core.lookup("a", [key(1)], 2.0)) == 1 and core.lookup("a", [key(2)], 2.0) == []
    # now key 1 is leased, key 3 is writing: nothing evictable
    assert core.allocate("a", [key(4)], [10], 3.0)[0].status is AllocStatus.FULL
    check_invariants(core)


def test_eviction_in_one_tenant_never_touches_another() -> None:
    core = make_core(slots=2)
    put(core, "b", key(100), 0.0)
    for i in range(10):
        put(core, "a", key(i), float(i))
    assert len(core.lookup("b", [key(100)], 20.0)) == 1
    check_invariants(core)


def test_policy_admission_is_honoured() -> None:
    core = make_core(slots=1)
    put(core, "a", key(1), 0.0)
    policy = core.tenants["a"].classes[0].policy
    policy.admit = lambda info, now: False  # type: ignore[method-assign]
    assert core.allocate("a", [key(2)], [10], 1.0)[0].status is AllocStatus.FULL
    assert core.counters["admission_rejected"] == 1
    assert len(core.lookup("a", [key(1)], 1.0)) == 1


def test_absolute_ttl_expires() -> None:
    core = make_core(ttl_s=30.0)
    put(core, "a", key(1), 0.0)
    assert len(core.lookup("a", [key(1)], 29.0)) == 1
    assert core.lookup("a", [key(1)], 30.0) == []
    assert core.counters["expired_ttl"] == 1


def test_idle_ttl_refreshed_by_lookup_and_touch() -> None:
    core = make_core(idle_ttl_s=10.0)
    put(core, "a", key(1), 0.0)
    core.lookup("a", [key(1)], 8.0)
    assert core.touch("a", [key(1), key(9)], 16.0) == 1
    core.sweep(25.0)
    assert len(core.lookup("a", [key(1)], 25.0)) == 1
    core.sweep(36.0)
    assert core.lookup("a", [key(1)], 36.0) == []
    check_invariants(core)


def test_too_big_and_abort() -> None:
    core = make_core()
    assert core.allocate("a", [key(1)], [CAP + 1], 0.0)[0].status is AllocStatus.TOO_BIG
    (g,) = core.allocate("a", [key(1)], [CAP], 0.0)
    assert core.abort("a", [(key(1), g.slot.generation)], 0.1) == [True]
    assert core.lookup("a", [key(1)], 0.2) == []
    assert core.allocate("a", [key(1)], [10], 0.3)[0].status is AllocStatus.OK  # key free again
    check_invariants(core)


def test_flood_stays_bounded() -> None:
    core = make_core(slots=8)
    for i in range(2000):
        (g,) = core.allocate("a", [key(i)], [10], i * 0.01)
        assert g.status is AllocStatus.OK
        core.commit("a", [(key(i), g.slot.generation)], i * 0.01)
    pool = core.tenants["a"]
    assert len(pool.index) <= 8 and len(core._retired) <= 8
    check_invariants(core)


def test_deadline_heaps_stay_bounded_under_a_flood_and_keep_their_live_entries() -> None:
    """Each put leaves a reservation entry (stale once committed) and, with a TTL, a TTL entry (stale once the
    block is evicted): a flood far faster than those deadlines must not grow the heaps without bound."""
    from rdmapool.server.core import HEAP_SLACK

    core = make_core(slots=8, ttl_s=3600.0, idle_ttl_s=1800.0)
    limit = 2 * 16 + HEAP_SLACK  # two tenants of 8 slots
    n = 3 * limit
    for i in range(n):  # all within 0.3 s: no reservation (5 s) or TTL comes due
        (g,) = core.allocate("a", [key(i)], [10], i * 1e-4)
        assert g.status is AllocStatus.OK
        assert core.commit("a", [(key(i), g.slot.generation)], i * 1e-4) == [True]
    assert len(core._reservations) <= limit and len(core._ttl) <= limit
    assert core.counters["deadline_heap_rebuilds"] >= 2
    check_invariants(core)
    # the live entries survived the rebuilds: a pending reservation still expires, resident blocks still age out
    (pending,) = core.allocate("a", [key(n)], [10], 1.0)
    resident = [k for k in map(key, range(n)) if k in core.tenants["a"].index]
    assert len(resident) == 7
    core.sweep(7.0)
    assert core.counters["reservations_expired"] == 1 and key(n) not in core.tenants["a"].index
    core.sweep(1801.0)
    assert core.counters["expired_ttl"] == 7 and not core.tenants["a"].index
    check_invariants(core)


def test_snapshot_counts_states() -> None:
    core = make_core(slots=4)
    put(core, "a", key(1), 0.0)
    core.allocate("a", [key(2)], [10], 0.0)
    core.lookup("a", [key(1)], 0.0)
    (cls,) = core.snapshot(0.5)["tenants"]["a"]["classes"]
    assert (cls["resident"], cls["writing"], cls["free"], cls["leased"]) == (1, 1, 2, 1)


def test_hints_reach_the_policy() -> None:
    from rdmapool.server.slots import BlockHint

    seen = []
    core = make_core(slots=2)
    policy = core.tenants["a"].classes[0].policy
    original = policy.on_insert
    policy.on_insert = lambda info, now: (seen.append(info), original(info, now))  # type: ignore[method-assign]
    (g,) = core.allocate("a", [key(2)], [10], 0.0, [BlockHint(key(1), 1, 16)])
    core.commit("a", [(key(2), g.slot.generation)], 0.0)
    (info,) = seen
    assert (info.parent, info.depth, info.tokens, info.tenant) == (key(1), 1, 16, "a")


def test_default_policy_runs_the_flood_with_chain_hints() -> None:
    """Whatever `default` names (it may refuse newcomers), the core stays consistent."""
    from rdmapool.server.slots import BlockHint

    core = make_core(slots=4, policy="default")
    statuses = []
    for i in range(200):
        hint = BlockHint(key(i - 1) if i % 5 else None, i % 5, 16 if i % 5 < 4 else 3)
        (g,) = core.allocate("a", [key(i)], [10], i * 0.1, [hint])
        statuses.append(g.status)
        if g.status is AllocStatus.OK:
            core.commit("a", [(key(i), g.slot.generation)], i * 0.1)
        check_invariants(core)
    assert statuses.count(AllocStatus.OK) >= 4
    assert set(statuses) <= {AllocStatus.OK, AllocStatus.FULL}


def test_repeated_key_in_one_request_is_one_access() -> None:
    """A request naming one key 4096 times must not cost 4096 policy updates (with a lazy-heap policy at one
    timestamp that was quadratic: a client could stall the server)."""
    import time

    core = make_core(slots=4, policy="default")
    put(core, "a", key(1), 0.0)
    t = time.perf_counter()
    for i in range(20):
        assert len(core.lookup("a", [key(1)] * 4096, 1.0 + i)) == 4096
        assert core.touch("a", [key(1)] * 4096, 1.0 + i) == 4096
    assert time.perf_counter() - t < 5.0
    check_invariants(core)


def test_lookup_wire_matches_lookup() -> None:
    from rdmapool.server.wire import HIT

    core = make_core()
    put(core, "a", key(1), 0.0)
    put(core, "a", key(3), 0.0)
    keys = [key(1), key(2), key(3)]
    refs = core.lookup("a", keys, 1.0, prefix=False)
    packed = core.lookup_wire("a", keys, 2.0, prefix=False)
    records = list(HIT.iter_unpack(packed))
    assert [r[2] != 0 for r in records] == [True, False, True]
    assert [tuple(r) for r in records if r[2]] == [tuple(ref[:4]) for ref in refs if ref is not None]
    assert len(core.lookup_wire("a", keys, 3.0)) == HIT.size  # prefix: stops at the first miss


def _record_accesses(core: PoolCore, tenant: str = "a") -> list[tuple[bytes, float]]:
    seen: list[tuple[bytes, float]] = []
    for cls in core.tenants[tenant].classes:
        real = cls.policy.on_access

        def spy(k: bytes, now: float, real=real) -> None:
            seen.append((k, now))
            real(k, now)

        cls.policy.on_access = spy  # type: ignore[method-assign]
    return seen


def test_deferred_access_reports_arrive_in_order_after_flush() -> None:
    core = make_core(slots=8)
    for i in range(4):
        put(core, "a", key(i), 0.0)
    seen = _record_accesses(core)
    core.defer_access = True
    assert len(core.lookup("a", [key(0), key(1)], 1.0)) == 2
    assert len(core.lookup("a", [key(2)], 2.0)) == 1
    assert seen == [] and core.access_backlog == 3
    core.flush_access(limit=2)
    assert seen == [(key(0), 1.0), (key(1), 1.0)] and core.access_backlog == 1
    core.flush_access()
    assert seen[-1] == (key(2), 2.0) and core.access_backlog == 0
    check_invariants(core)


def test_deferred_access_flushed_before_other_ops_and_dropped_for_gone_slots() -> None:
    core = make_core(slots=8, policy="lru")
    for i in range(3):
        put(core, "a", key(i), 0.0)
    seen = _record_accesses(core)
    core.defer_access = True
    core.lookup("a", [key(0), key(1)], 1.0)
    core.touch("a", [key(2)], 1.5)  # every op but lookup applies the backlog first, in order
    assert seen == [(key(0), 1.0), (key(1), 1.0), (key(2), 1.5)]
    core.lookup("a", [key(0), key(1)], 2.0)
    core.defer_access = False
    assert core.delete("a", [key(0)], 2.5) == [True]  # flushed before the delete: key(0)'s report counts
    core.defer_access = True
    core.lookup("a", [key(1)], 3.0)
    core._retire(core.tenants["a"], core.tenants["a"].index[key(1)], 3.0, "deletes")  # gone before the flush
    core.flush_access()
    assert seen[3:] == [(key(0), 2.0), (key(1), 2.0)]  # the report of a retired slot is dropped
    check_invariants(core)


def test_deferred_access_reports_leave_no_gc_tracked_objects_behind() -> None:
    # A queued report must not be a GC-tracked container per hit: a backlog of those made the server's cyclic
    # GC pause its loop for several ms in front of lookups (lookup p99, docs/decisions.md).
    import gc

    core = make_core(slots=256)
    keys = [key(i) for i in range(256)]
    for k in keys:
        put(core, "a", k, 0.0)
    core.defer_access = True
    core.lookup_wire("a", keys, 1.0)  # the queue grows to its size once
    core.flush_access()
    gc.collect()
    before = len(gc.get_objects())
    for t in range(2, 6):
        core.lookup_wire("a", keys, float(t))
        assert core.access_backlog == 256  # re-queued: the keys flushed meanwhile
        core.flush_access(limit=100)
    assert len(gc.get_objects()) - before < 64
    core.flush_access()
    check_invariants(core)


def _deferring_core_with_16_blocks():
    """A core holding 16 blocks of tenant a, its access reports queued (as the server driver sets it) and
    recorded."""
    core = make_core(slots=16)
    keys = [key(i) for i in range(16)]
    for k in keys:
        put(core, "a", k, 0.0)
    seen = _record_accesses(core)
    core.defer_access = True
    return core, keys, seen


def test_a_server_that_keeps_up_reports_every_access() -> None:
    core, keys, seen = _deferring_core_with_16_blocks()
    for t in range(1, 6):
        core.lookup("a", keys, float(t))
        core.flush_access()
    assert seen == [(k, float(t)) for t in range(1, 6) for k in keys]


def test_chunked_flush_interleaved_with_lookups_merges_repeats_into_the_latest_access() -> None:
    core, keys, seen = _deferring_core_with_16_blocks()
    for t in range(1, 41):  # lookups keep arriving while the backlog drains 5 at a time
        core.lookup("a", keys, float(t))
        assert core.access_backlog <= len(keys)  # at most one queued report per key
        core.flush_access(limit=5)
    while core.access_backlog:
        core.flush_access(limit=7)
    assert len(seen) < 40 * len(keys)  # repeats merged while reports waited
    for k in keys:
        times = [w for kk, w in seen if kk == k]
        assert times == sorted(set(times)) and times[-1] == 40.0  # in order, each once, the latest included
    check_invariants(core)


def test_a_queued_report_of_a_reused_slot_is_dropped_and_the_new_use_is_reported() -> None:
    core = make_core(slots=1)
    put(core, "a", key(1), 0.0)
    seen = _record_accesses(core)
    core.defer_access = True
    core.lookup("a", [key(1)], 1.0)  # queued for key(1)'s use of the slot
    pool = core.tenants["a"]
    core._retire(pool, pool.index[key(1)], 1.0, "deletes")
    core.sweep(20.0)  # lease + grace passed: the slot is FREE
    put(core, "a", key(2), 20.0)  # flushes the stale report (dropped), reuses the slot
    core.lookup("a", [key(2)], 21.0)
    assert core.access_backlog == 1
    core.flush_access()
    assert seen == [(key(2), 21.0)]
    check_invariants(core)
