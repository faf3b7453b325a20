"""The memory server's pure core: per-tenant index, reservations, read leases, TTL and eviction.

Theory of operation
-------------------
Each tenant owns one registered region (its quota), split into size classes of fixed slots (`slots.py`), an
index `key -> Slot` and one eviction policy per class. Tenants share nothing: a key is looked up only in the
caller's own index and a slot is only ever reused by the same tenant, so no bytes cross tenants and slots need
no clearing. The core never sees block bytes and never reads a clock: every call takes `now`.

- `allocate` reserves a slot (FREE -> WRITING, new generation, reservation deadline) and indexes the key at
  once, so a second writer of the same key is told it exists. A full class first sweeps expiries, then asks its
  policy for a victim: only an unleased RESIDENT slot (last lease + grace passed) is evicted, and only if the
  policy admits the newcomer.
- `commit` makes a reservation RESIDENT if the generation matches and the reservation has not expired.
- `lookup` returns the longest present prefix and extends each hit's read lease (`lease_until`); hits and
  `touch` report accesses to the policy and refresh the idle TTL.
- `abort`, `delete`, eviction and TTL retire a slot: it leaves the index at once and becomes FREE when its last
  lease + grace has passed. Deadlines live in lazy heaps (stale entries are skipped by generation), so sweeping
  costs O(expired), never a scan of all slots. A heap is rebuilt without its stale entries when it outgrows twice
  the slot count (a committed block's reservation entry, an evicted block's TTL entry): at most one entry per slot
  is live, so memory stays bounded by the pool under any put rate, at amortised O(1) a push.
"""

from __future__ import annotations

import enum
import heapq
import operator
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from rdmapool.config import ServerConfig, TenantConfig
from rdmapool.errors import UsageError
from rdmapool.policy import BlockInfo
from rdmapool.policy import create as create_policy
from rdmapool.server.lifecycle import SlotState
from rdmapool.server.slots import NEVER, NO_HINT, BlockHint, Slot, SlotClass, plan_classes
from rdmapool.server.wire import GRANT, HIT
from rdmapool.transport.base import RegionDescriptor

#: how many leased victims the policy may name before an allocate gives up on a full class
EVICT_TRIES = 16
#: deadline heaps may hold this many entries beyond twice the slot count before they are rebuilt
HEAP_SLACK = 1024
_MISS = bytes(HIT.size)  # a miss on the wire (generation 0)
_wire = operator.attrgetter("wire")
_first = operator.itemgetter(0)


class AllocStatus(enum.IntEnum):
    OK = 0  # reserved: write the block, then commit
    EXISTS = 1  # the key is resident or another writer holds a reservation for it
    FULL = 2  # no free slot and nothing evictable (or the policy did not admit the newcomer)
    TOO_BIG = 3  # larger than the largest size class
    REFUSED = 4  # the server takes no writes now (e.g. it lost its cluster membership: Handler.write_gate)


class SlotRef(NamedTuple):
    """Where a block lives, as a client needs it for its one-sided operation. (A NamedTuple, not a dataclass:
    lookups build one per hit, and this is 3x cheaper; see docs/decisions.md.)"""

    addr: int
    rkey: int
    generation: int
    length: int  # payload bytes (lookup) or reserved payload bytes (allocate)
    capacity: int


@dataclass(frozen=True, slots=True)
class Grant:
    status: AllocStatus
    slot: SlotRef | None = None


_EXISTS, _TOO_BIG, _FULL = ((s, None) for s in (AllocStatus.EXISTS, AllocStatus.TOO_BIG, AllocStatus.FULL))
#: a grant without a slot on the wire, and the counter each status adds to
_NO_GRANT = {s: GRANT.pack(s.value, 0, 0, 0, 0) for s in AllocStatus}
_ALLOC_COUNTER = {s: f"allocate_{s.name.lower()}" for s in AllocStatus}


class TenantPool:
    """One tenant's region, classes, index and policies."""

    def __init__(self, tenant: TenantConfig, region: RegionDescriptor, config: ServerConfig) -> None:
        self.name = tenant.name
        self.region = region
        layouts = plan_classes(region.length, config.size_classes, config.class_weights)
        if not layouts:
            raise UsageError(f"tenant {tenant.name}: quota {region.length} is too small for any size class")
        self.classes = [SlotClass(layout, create_policy(config.policy, **config.policy_options)) for layout in layouts]
        self.index: dict[bytes, Slot] = {}

    def class_for(self, length: int) -> int | None:
        for i, cls in enumerate(self.classes):
            if length <= cls.capacity:
                return i
        return None

    def ref(self, slot: Slot) -> SlotRef:
        return SlotRef(self.region.addr + slot.offset, self.region.rkey, slot.generation, slot.length,
                       slot.cls.capacity)


class PoolCore:
    """All tenants of one server. Not thread-safe: the driver serialises calls."""

    def __init__(self, config: ServerConfig, regions: dict[str, RegionDescriptor], epoch: int = 1) -> None:
        self.config = config
        self.tenants = {t.name: TenantPool(t, regions[t.name], config) for t in config.tenants}
        # generations are unique per server run: a restarted server never repeats one
        self._next_generation = (epoch & 0xFFFFFFFF) << 32
        self._reservations: list[tuple[float, int, str, Slot]] = []
        self._retired: list[tuple[float, int, str, Slot]] = []
        self._ttl: list[tuple[float, int, str, Slot]] = []
        self._ttl_on = config.ttl_s is not None or config.idle_ttl_s is not None
        #: a deadline heap longer than this holds stale entries: it is rebuilt without them (`_push`)
        self._heap_limit = 2 * self.total_slots() + HEAP_SLACK
        self.counters: Counter[str] = Counter()
        #: when set (the server driver sets it), lookups queue their access reports to the eviction policy and
        #: `flush_access` applies them once the reply is sent (the driver: in idle moments, a chunk at a time).
        #: Every operation but lookup flushes all first; a report whose slot has since left RESIDENT (or been
        #: reused) is dropped, so the policy never hears of a key it does not track. A slot has at most one
        #: report queued (`Slot.report_gen` = the generation it is queued for): a later lookup of it only moves
        #: its `last_access`, and the report, when applied, carries that latest time. So while lookups outpace
        #: the policy, repeated accesses of a key merge into one and the backlog stays below the resident slot
        #: count; a server that keeps up sees every access on its own (see docs/decisions.md)
        self.defer_access = False
        # A deque of the (frozen) slots themselves, not a tuple per report: a report allocates nothing, where 512
        # GC-tracked tuples per lookup made the server's cyclic GC pause the loop for ms; and a chunked flush pops
        # from the left in O(chunk) (see docs/decisions.md).
        self._deferred: deque[Slot] = deque()

    # ---- operations -------------------------------------------------------------------------------------
    def lookup(self, tenant: str, keys: Sequence[bytes], now: float, prefix: bool = True) -> list[SlotRef | None]:
        """Hits for the longest present prefix (or per key with `prefix=False`), each with a read lease."""
        pool = self._pool(tenant)
        base, rkey = pool.region.addr, pool.region.rkey
        return [None if s is None else SlotRef(base + s.offset, rkey, s.generation, s.length, s.cls.layout.capacity)
                for s in self._lookup_slots(pool, keys, now, prefix)]

    def lookup_wire(self, tenant: str, keys: Sequence[bytes], now: float, prefix: bool = True) -> bytes:
        """`lookup` packed as the protocol sends it (`wire.HIT` records, generation 0 for a miss), from each
        slot's record packed at commit: this is the server's hottest path."""
        slots = self._lookup_slots(self._pool(tenant), keys, now, prefix)
        if prefix:  # a prefix has no misses
            return b"".join(map(_wire, slots))
        return b"".join([_MISS if s is None else s.wire for s in slots])

    @property
    def access_backlog(self) -> int:
        """Access reports queued by lookups (`defer_access`) and not yet applied."""
        return len(self._deferred)

    def flush_access(self, limit: int | None = None) -> None:
        """Apply the queued access reports in order: all of them, or the oldest `limit`."""
        queue = self._deferred
        if limit is None or limit >= len(queue):
            self._deferred = deque()
        else:
            queue = [queue.popleft() for _ in range(limit)]
        resident = SlotState.RESIDENT
        for slot in queue:
            # a slot retired and reused since keeps a report_gen of its old use: its old report is dropped
            if slot.report_gen == slot.generation and slot.state is resident:
                slot.report_gen = 0
                slot.cls.policy.on_access(slot.key, slot.last_access)

    def _lookup_slots(self, pool: TenantPool, keys: Sequence[bytes], now: float, prefix: bool) -> list[Slot | None]:
        self.sweep(now)
        slots: list[Slot | None] = list(map(pool.index.get, keys))
        lease_until = now + self.config.lease_s
        check_ttl = self.config.ttl_s is not None or self.config.idle_ttl_s is not None
        resident = SlotState.RESIDENT
        defer = self.defer_access
        reported: list[Slot] = []
        report = reported.append
        misses = 0
        for i, slot in enumerate(slots):
            if slot is not None and slot.state is resident and check_ttl and self._expired(slot, now):
                self._retire(pool, slot, now, "expired_ttl")
                slot = None
            if slot is None or slot.state is not resident:
                misses += 1
                if prefix:
                    del slots[i:]
                    break
                slots[i] = None
                continue
            if slot.lease_until < lease_until:
                slot.lease_until = lease_until
            if slot.last_access != now:
                # one access report per key and call (a request naming a key 4096 times is one access), and
                # none while one is queued: that one will carry this newer last_access
                slot.last_access = now
                if slot.report_gen != slot.generation:
                    report(slot)
                    if defer:
                        slot.report_gen = slot.generation
        if defer:
            self._deferred.extend(reported)
        else:
            for slot in reported:
                slot.cls.policy.on_access(slot.key, now)
        hits = len(slots) - misses if not prefix else len(slots)
        self.counters["lookup_hits"] += hits
        self.counters["leases_granted"] += hits
        self.counters["lookup_misses"] += misses
        return slots

    def allocate(self, tenant: str, keys: Sequence[bytes], lengths: Sequence[int], now: float,
                 hints: Sequence[BlockHint] | None = None) -> list[Grant]:
        """Reserve a slot per key (see the module docstring): one `Grant` per key, in order."""
        pool = self._pool(tenant)
        return [Grant(status) if slot is None else Grant(status, pool.ref(slot))
                for status, slot in self._allocate_all(pool, keys, lengths, now, hints)]

    def allocate_wire(self, tenant: str, keys: Sequence[bytes], lengths: Sequence[int], now: float,
                      hints: Sequence[BlockHint] | None = None) -> bytes:
        """`allocate` packed as the protocol sends it (`wire.GRANT` records), with no object per grant."""
        pool = self._pool(tenant)
        base, rkey, pack = pool.region.addr, pool.region.rkey, GRANT.pack
        return b"".join([_NO_GRANT[status] if slot is None else
                         pack(0, base + slot.offset, rkey, slot.generation, slot.cls.layout.capacity)
                         for status, slot in self._allocate_all(pool, keys, lengths, now, hints)])

    def _allocate_all(self, pool: TenantPool, keys: Sequence[bytes], lengths: Sequence[int], now: float,
                      hints: Sequence[BlockHint] | None) -> list[tuple[AllocStatus, Slot | None]]:
        self.flush_access()
        if len(keys) != len(lengths) or (hints is not None and len(hints) != len(keys)):
            raise UsageError("allocate needs one length (and one hint, if any) per key")
        self.sweep(now)
        one = self._allocate_one
        if hints is None:
            out = [one(pool, key, length, NO_HINT, now) for key, length in zip(keys, lengths, strict=True)]
        else:
            out = [one(pool, key, length, hint, now) for key, length, hint in zip(keys, lengths, hints, strict=True)]
        for status, count in Counter(map(_first, out)).items():
            self.counters[_ALLOC_COUNTER[status]] += count
        return out

    def commit(self, tenant: str, items: Sequence[tuple[bytes, int]], now: float) -> list[bool]:
        self.flush_access()
        pool = self._pool(tenant)
        self.sweep(now)
        index, base, rkey, pack = pool.index, pool.region.addr, pool.region.rkey, HIT.pack
        writing, resident = SlotState.WRITING, SlotState.RESIDENT
        results = []
        for key, generation in items:
            slot = index.get(key)
            ok = (slot is not None and slot.state is writing and slot.generation == generation
                  and now < slot.deadline)
            if ok:
                slot.move(resident)
                slot.wire = pack(base + slot.offset, rkey, generation, slot.length)
                slot.committed_at = slot.last_access = now
                slot.cls.policy.on_insert(_info(key, slot.length, slot.hint, tenant), now)
                if self._ttl_on:
                    self._push_ttl(pool, slot, now)
            results.append(ok)
        stored = sum(results)
        if stored:
            self.counters["commits"] += stored
        if stored < len(results):
            self.counters["commit_rejected"] += len(results) - stored
        return results

    def abort(self, tenant: str, items: Sequence[tuple[bytes, int]], now: float) -> list[bool]:
        self.flush_access()
        pool = self._pool(tenant)
        results = []
        for key, generation in items:
            slot = pool.index.get(key)
            ok = slot is not None and slot.state is SlotState.WRITING and slot.generation == generation
            if ok:
                self._retire(pool, slot, now, "aborts")
            results.append(ok)
        return results

    def delete(self, tenant: str, keys: Sequence[bytes], now: float) -> list[bool]:
        self.flush_access()
        pool = self._pool(tenant)
        results = []
        for key in keys:
            slot = pool.index.get(key)
            ok = slot is not None and slot.state is SlotState.RESIDENT
            if ok:
                self._retire(pool, slot, now, "deletes")
            results.append(ok)
        return results

    def touch(self, tenant: str, keys: Sequence[bytes], now: float) -> int:
        self.flush_access()
        pool = self._pool(tenant)
        n = 0
        for key in keys:
            slot = pool.index.get(key)
            if slot is not None and slot.state is SlotState.RESIDENT:
                if slot.last_access != now:  # one access report per key and call
                    slot.last_access = now
                    slot.cls.policy.on_access(key, now)
                n += 1
        self.counters["touches"] += n
        return n

    def sweep(self, now: float) -> None:
        """Reclaim expired reservations, expire TTLs, free retired slots whose leases and grace have passed."""
        while self._reservations and self._reservations[0][0] <= now:
            _, gen, tenant, slot = heapq.heappop(self._reservations)
            if slot.state is SlotState.WRITING and slot.generation == gen:
                self._retire(self.tenants[tenant], slot, now, "reservations_expired")
        while self._ttl and self._ttl[0][0] <= now:
            _, gen, tenant, slot = heapq.heappop(self._ttl)
            if slot.state is SlotState.RESIDENT and slot.generation == gen:
                if self._expired(slot, now):
                    self._retire(self.tenants[tenant], slot, now, "expired_ttl")
                else:
                    self._push_ttl(self.tenants[tenant], slot, now)
        while self._retired and self._retired[0][0] <= now:
            _, gen, tenant, slot = heapq.heappop(self._retired)
            if slot.state is SlotState.RETIRED and slot.generation == gen:
                slot.cls.release(slot)

    # ---- internals --------------------------------------------------------------------------------------
    def _pool(self, tenant: str) -> TenantPool:
        try:
            return self.tenants[tenant]
        except KeyError:
            raise UsageError(f"unknown tenant {tenant!r}") from None

    def _allocate_one(self, pool: TenantPool, key: bytes, length: int, hint: BlockHint,
                      now: float) -> tuple[AllocStatus, Slot | None]:
        if key in pool.index:
            return _EXISTS
        ci = pool.class_for(length)
        if ci is None:
            return _TOO_BIG
        cls = pool.classes[ci]
        slot = cls.take_free() or self._evict_for(pool, ci, _info(key, length, hint, pool.name), now)
        if slot is None:
            return _FULL
        slot.move(SlotState.WRITING)
        slot.generation = self._next_generation
        self._next_generation += 1
        slot.key, slot.length, slot.hint = key, length, hint
        slot.lease_until = NEVER
        slot.deadline = now + self.config.reservation_s
        pool.index[key] = slot
        self._push(self._reservations, (slot.deadline, slot.generation, pool.name, slot), SlotState.WRITING)
        return AllocStatus.OK, slot

    def _evict_for(self, pool: TenantPool, ci: int, info: BlockInfo, now: float) -> Slot | None:
        """Free one slot of class `ci` by evicting an unleased resident block, if the policy admits `info`."""
        cls = pool.classes[ci]
        policy = cls.policy
        if not policy.admit(info, now):
            self.counters["admission_rejected"] += 1
            return None
        grace = self.config.grace_s
        for _ in range(min(EVICT_TRIES, len(policy))):
            victim_key = policy.victim(now)
            if victim_key is None:
                break
            slot = pool.index.get(victim_key)
            if slot is None or slot.state is not SlotState.RESIDENT or slot.cls is not cls:
                policy.on_remove(victim_key)  # the policy tracked a key we no longer hold: drop it
                continue
            if not slot.unleased(now, grace):
                policy.on_access(victim_key, now)  # leased: move it out of the way, ask again
                continue
            self._retire(pool, slot, now, "evictions")
            return cls.take_free()
        return None

    def _retire(self, pool: TenantPool, slot: Slot, now: float, reason: str) -> None:
        """Out of the index now; FREE once the last lease + grace has passed."""
        was_resident = slot.state is SlotState.RESIDENT
        slot.move(SlotState.RETIRED)
        if pool.index.get(slot.key) is slot:
            del pool.index[slot.key]
        if was_resident:
            slot.cls.policy.on_remove(slot.key)
        self.counters[reason] += 1
        # a retired reservation also waits out the grace: a slow writer's bytes may still be landing
        slot.free_at = max(slot.lease_until, now) + self.config.grace_s
        if was_resident and slot.unleased(now, self.config.grace_s):
            slot.cls.release(slot)  # nobody can be reading it: reuse at once
        else:
            heapq.heappush(self._retired, (slot.free_at, slot.generation, pool.name, slot))

    def _expired(self, slot: Slot, now: float) -> bool:
        return now >= self._ttl_deadline(slot)

    def _ttl_deadline(self, slot: Slot) -> float:
        deadline = float("inf")
        if self.config.ttl_s is not None:
            deadline = slot.committed_at + self.config.ttl_s
        if self.config.idle_ttl_s is not None:
            deadline = min(deadline, slot.last_access + self.config.idle_ttl_s)
        return deadline

    def _push_ttl(self, pool: TenantPool, slot: Slot, now: float) -> None:
        deadline = self._ttl_deadline(slot)
        if deadline != float("inf"):
            self._push(self._ttl, (deadline, slot.generation, pool.name, slot), SlotState.RESIDENT)

    def _push(self, heap: list[tuple[float, int, str, Slot]], entry: tuple[float, int, str, Slot],
              live_state: SlotState) -> None:
        """Push a deadline; past `_heap_limit`, first drop the entries whose slot has left `live_state` or been
        reused (what `sweep` would skip when they came due)."""
        if len(heap) >= self._heap_limit:
            heap[:] = [e for e in heap if e[3].state is live_state and e[3].generation == e[1]]
            heapq.heapify(heap)
            self.counters["deadline_heap_rebuilds"] += 1
        heapq.heappush(heap, entry)

    # ---- observability ----------------------------------------------------------------------------------
    def snapshot(self, now: float, count_leases: bool = True) -> dict:
        """Slots by state, resident bytes, per tenant and class (O(classes), kept incrementally), the operation
        counters, and with `count_leases` the slots under an unexpired lease (a scan of all slots)."""
        self.flush_access()
        tenants = {}
        for pool in self.tenants.values():
            classes = []
            for cls in pool.classes:
                classes.append({
                    "capacity": cls.capacity,
                    "slots": len(cls.slots),
                    **{st.name.lower(): cls.counts[st] for st in SlotState},
                    "resident_bytes": cls.resident_bytes,
                    "leased": cls.leased(now) if count_leases else None,
                })
            tenants[pool.name] = {"region_bytes": pool.region.length, "keys": len(pool.index), "classes": classes}
        return {"tenants": tenants, "counters": dict(self.counters)}

    def total_slots(self) -> int:
        return sum(len(cls.slots) for pool in self.tenants.values() for cls in pool.classes)


def _info(key: bytes, length: int, hint: BlockHint, tenant: str) -> BlockInfo:
    return BlockInfo(key, length, parent=hint.parent, depth=hint.depth, tenant=tenant, tokens=hint.tokens)
