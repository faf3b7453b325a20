"""Small O(1)/O(log n) building blocks the policies share.

- `LazyHeap`: a min-heap of (priority, key) with lazy deletion. A key's priority is replaced by pushing a new
  entry; stale entries are dropped when they reach the top. Once stale entries outnumber live ones the heap is
  compacted a few entries per push (the old list is scanned by index while new pushes go to a fresh heap), so
  no single push pays for rebuilding the whole heap: a server applies access reports in idle moments between
  requests, and a rebuild of a few thousand entries (~4 ms) in one `on_access` landed in front of a lookup.
  Anything that reads the order (`peek`) first finishes a compaction in progress.
- `DList`: an intrusive doubly linked list over hashable keys (two dicts of links and a sentinel), for policies
  that need a cursor that survives removals from the middle (SIEVE's hand).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterator
from typing import Any

_SENTINEL = object()


#: old entries a push moves while a compaction is in progress
COMPACT_STEP = 8


class LazyHeap:
    __slots__ = ("_heap", "_prio", "_seq", "_old", "_old_at")

    def __init__(self) -> None:
        self._heap: list[tuple[Any, int, Hashable]] = []
        self._prio: dict[Hashable, Any] = {}
        self._seq = 0
        self._old: list[tuple[Any, int, Hashable] | None] | None = None  # being compacted: scanned in order
        self._old_at = 0

    def push(self, key: Hashable, prio: Any) -> None:
        """Insert `key` or change its priority."""
        self._prio[key] = prio
        self._seq += 1
        heapq.heappush(self._heap, (prio, self._seq, key))
        if self._old is not None:
            self._compact(COMPACT_STEP)
        elif len(self._heap) > 2 * len(self._prio) + 64:
            self._old, self._old_at, self._heap = self._heap, 0, []
            self._compact(COMPACT_STEP)

    def _compact(self, n: int) -> None:
        """Move the live entries among the next `n` of the old list to the heap (entries keep their sequence
        numbers, so the order of equal priorities is unchanged)."""
        old, at, prio, heap = self._old, self._old_at, self._prio, self._heap
        end = min(at + n, len(old))
        for i in range(at, end):
            entry = old[i]
            old[i] = None  # freed here, a step at a time: dropping the whole list at the end cost ~0.4 ms
            if prio.get(entry[2], _SENTINEL) == entry[0]:
                heapq.heappush(heap, entry)
        if end == len(old):
            self._old = None
        else:
            self._old_at = end

    def discard(self, key: Hashable) -> None:
        self._prio.pop(key, None)

    def peek(self) -> tuple[Hashable, Any] | None:
        """The key with the smallest priority and that priority, or None when empty."""
        if self._old is not None:
            self._compact(len(self._old))
        heap, prio = self._heap, self._prio
        while heap:
            p, _, k = heap[0]
            if prio.get(k, _SENTINEL) == p:
                return k, p
            heapq.heappop(heap)
        return None

    def priority(self, key: Hashable) -> Any:
        return self._prio.get(key)

    def __len__(self) -> int:
        return len(self._prio)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._prio


class DList:
    """Keys in order from head (newest) to tail (oldest)."""

    __slots__ = ("_next", "_prev")

    def __init__(self) -> None:
        self._next: dict[Any, Any] = {_SENTINEL: _SENTINEL}
        self._prev: dict[Any, Any] = {_SENTINEL: _SENTINEL}

    def push_head(self, key: Hashable) -> None:
        first = self._next[_SENTINEL]
        self._next[_SENTINEL] = key
        self._prev[key] = _SENTINEL
        self._next[key] = first
        self._prev[first] = key

    def remove(self, key: Hashable) -> None:
        p = self._prev.pop(key)
        n = self._next.pop(key)
        self._next[p] = n
        self._prev[n] = p

    def tail(self) -> Hashable | None:
        k = self._prev[_SENTINEL]
        return None if k is _SENTINEL else k

    def toward_head(self, key: Hashable) -> Hashable | None:
        """The key inserted after `key` (None past the head)."""
        k = self._prev[key]
        return None if k is _SENTINEL else k

    def __contains__(self, key: Hashable) -> bool:
        return key in self._prev and key is not _SENTINEL

    def __len__(self) -> int:
        return len(self._prev) - 1

    def __iter__(self) -> Iterator[Hashable]:
        k = self._next[_SENTINEL]
        while k is not _SENTINEL:
            yield k
            k = self._next[k]


class Peak:
    """The largest size a policy has tracked: the pool's capacity once it has filled."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def see(self, n: int) -> int:
        if n > self.value:
            self.value = n
        return self.value
