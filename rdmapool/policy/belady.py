"""Belady's MIN with bypass: the offline optimum for a block cache, used as the bound policies are judged by.

It needs the future, so it is built with a `future` object whose `next_use(key)` returns the position of
the key's next use after the current one (math.inf for never); the simulator's `FutureOracle` provides it and
advances it request by request. Servers cannot run it.

Order of eviction: the resident key used furthest in the future goes first; among equal next uses the
deepest block in its chain (a child is never needed before its parent, so this keeps prefixes whole).
A newcomer whose next use is later than the victim's is bypassed. A lazy max-heap: O(log n) per call."""

from __future__ import annotations

from typing import Protocol

from rdmapool.errors import UsageError
from rdmapool.policy._structs import LazyHeap
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key


class Future(Protocol):
    def next_use(self, key: Key) -> float: ...


class Belady(EvictionPolicy):
    name = "belady"

    def __init__(self, future: Future | None = None) -> None:
        if future is None or not hasattr(future, "next_use"):
            raise UsageError("belady needs the future: pass future=<object with next_use(key)>; "
                             "`rdmapool sim` builds one from the trace")
        self._future = future
        self._heap = LazyHeap()
        self._depth: dict[Key, int] = {}

    def _prio(self, key: Key, depth: int) -> tuple[float, int]:
        return (-self._future.next_use(key), -depth)

    def admit(self, info: BlockInfo, now: float) -> bool:
        top = self._heap.peek()
        return top is None or self._prio(info.key, info.depth) > top[1]

    def on_insert(self, info: BlockInfo, now: float) -> None:
        self._depth[info.key] = info.depth
        self._heap.push(info.key, self._prio(info.key, info.depth))

    def on_access(self, key: Key, now: float) -> None:
        depth = self._depth.get(key)
        if depth is not None:
            self._heap.push(key, self._prio(key, depth))

    def on_remove(self, key: Key) -> None:
        if self._depth.pop(key, None) is not None:
            self._heap.discard(key)

    def victim(self, now: float) -> Key | None:
        top = self._heap.peek()
        return None if top is None else top[0]

    def __len__(self) -> int:
        return len(self._depth)

    def __contains__(self, key: Key) -> bool:
        return key in self._depth
