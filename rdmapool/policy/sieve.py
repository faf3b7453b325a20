"""SIEVE (Zhang et al., NSDI '24): a FIFO queue with one visited bit per key and a hand that moves from the
oldest key toward the newest. An access only sets the bit (no list move: cheap under concurrency). To evict,
the hand clears the bits of visited keys it passes and stops at the first unvisited one; it keeps its place
between evictions. Amortised O(1): each pass over a key is paid for by the access that set its bit."""

from __future__ import annotations

from rdmapool.policy._structs import DList
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key


class Sieve(EvictionPolicy):
    name = "sieve"

    def __init__(self) -> None:
        self._queue = DList()
        self._visited: dict[Key, bool] = {}
        self._hand: Key | None = None

    def on_insert(self, info: BlockInfo, now: float) -> None:
        if info.key in self._visited:
            self.on_access(info.key, now)
            return
        self._queue.push_head(info.key)
        self._visited[info.key] = False

    def on_access(self, key: Key, now: float) -> None:
        if key in self._visited:
            self._visited[key] = True

    def on_remove(self, key: Key) -> None:
        if self._visited.pop(key, None) is None:
            return
        if self._hand == key:
            self._hand = self._queue.toward_head(key)
        self._queue.remove(key)

    def victim(self, now: float) -> Key | None:
        if not self._visited:
            return None
        q, visited = self._queue, self._visited
        h = self._hand if self._hand is not None else q.tail()
        while visited[h]:
            visited[h] = False
            h = q.toward_head(h)
            if h is None:
                h = q.tail()
        self._hand = h
        return h

    def __len__(self) -> int:
        return len(self._visited)

    def __contains__(self, key: Key) -> bool:
        return key in self._visited
