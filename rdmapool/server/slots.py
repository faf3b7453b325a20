"""Slots of one size class inside one tenant's region: fixed-stride records and an O(1) free list.

Theory of operation
-------------------
A tenant's region (one registration) is cut at start into size classes; each class is a run of equal slots
of `stride` bytes (payload capacity + block overhead, rounded up to 64). Nothing is allocated per block: a
slot is a record naming its offset, and the free list is a deque of slot indices. A slot is on the free list
exactly when its state is FREE. Every state change goes through `Slot.move`, which checks the lifecycle table.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from rdmapool.block import OVERHEAD
from rdmapool.policy import EvictionPolicy
from rdmapool.server.lifecycle import SlotState, check_move

ALIGN = 64
NEVER = float("-inf")  # lease_until of a slot no lookup has leased


def stride_for(capacity: int) -> int:
    return -(-(capacity + OVERHEAD) // ALIGN) * ALIGN


@dataclass(frozen=True, slots=True)
class BlockHint:
    """What a writer may tell about a block for the eviction policy: its parent key in a prefix chain, its depth
    in the chain (-1 unknown) and how many tokens it holds (0 unknown). Keys stay opaque: a parent is just
    another key of the same tenant."""

    parent: bytes | None = None
    depth: int = -1
    tokens: int = 0


NO_HINT = BlockHint()


class Slot:
    """One slot's metadata (the server never reads or writes the slot's bytes)."""

    __slots__ = ("cls", "index", "offset", "state", "generation", "key", "length", "lease_until",
                 "deadline", "committed_at", "last_access", "free_at", "hint", "wire", "report_gen")

    def __init__(self, cls: SlotClass, index: int, offset: int) -> None:
        self.cls = cls
        self.index = index
        self.offset = offset  # from the start of the tenant's region
        self.state = SlotState.FREE
        self.generation = 0
        self.key = b""
        self.length = 0
        self.lease_until = NEVER  # latest read lease granted on this use of the slot
        self.deadline = 0.0  # WRITING: reservation expiry
        self.committed_at = 0.0
        self.last_access = 0.0
        self.free_at = 0.0  # RETIRED: when it may become FREE
        self.hint: BlockHint = NO_HINT  # chain position the writer reported, for the eviction policy
        #: RESIDENT: this slot's lookup hit as the protocol sends it (`wire.HIT`), packed once at commit
        self.wire = b""
        #: the generation for which an access report (PoolCore.defer_access) is queued; 0: none
        self.report_gen = 0

    def move(self, dst: SlotState) -> None:
        check_move(self.state, dst)
        counts = self.cls.counts
        counts[self.state] -= 1
        counts[dst] += 1
        if dst is SlotState.RESIDENT:
            self.cls.resident_bytes += self.length
        elif self.state is SlotState.RESIDENT:
            self.cls.resident_bytes -= self.length
        self.state = dst

    def unleased(self, now: float, grace: float) -> bool:
        return now >= self.lease_until + grace


@dataclass(frozen=True, slots=True)
class ClassLayout:
    capacity: int  # largest payload
    stride: int
    offset: int  # of the first slot, from the start of the region
    count: int


def plan_classes(region_len: int, capacities: tuple[int, ...], weights: tuple[float, ...] | None) -> list[ClassLayout]:
    """Split a region among size classes by byte weight; every class with a non-zero weight gets >= 1 slot if it
    fits at all. Classes that get no slot are left out."""
    weights = weights or tuple(1.0 for _ in capacities)
    total = sum(weights)
    layouts: list[ClassLayout] = []
    offset = 0
    for cap, w in zip(capacities, weights, strict=True):
        stride = stride_for(cap)
        share = int(region_len * w / total) if w else 0
        count = share // stride
        if w and count == 0 and region_len - offset >= stride:
            count = 1
        count = min(count, (region_len - offset) // stride)
        if count:
            layouts.append(ClassLayout(cap, stride, offset, count))
            offset += count * stride
    return layouts


class SlotClass:
    """All slots of one capacity in one tenant's region."""

    def __init__(self, layout: ClassLayout, policy: EvictionPolicy) -> None:
        self.layout = layout
        self.policy = policy  # eviction order among this class's resident blocks
        self.slots = [Slot(self, i, layout.offset + i * layout.stride) for i in range(layout.count)]
        self.free: deque[int] = deque(range(layout.count))
        #: slots per state (indexed by SlotState) and payload bytes resident, kept by Slot.move: O(1) stats
        self.counts = [layout.count, 0, 0, 0]
        self.resident_bytes = 0

    @property
    def capacity(self) -> int:
        return self.layout.capacity

    def take_free(self) -> Slot | None:
        return self.slots[self.free.popleft()] if self.free else None

    def release(self, slot: Slot) -> None:
        slot.move(SlotState.FREE)
        slot.key = b""
        slot.length = 0
        slot.lease_until = NEVER
        self.free.append(slot.index)

    def leased(self, now: float) -> int:
        """Slots with an unexpired read lease: a scan (O(slots)), for scrapes, not for the hot path."""
        return sum(1 for s in self.slots if s.lease_until > now and s.state is not SlotState.FREE)
