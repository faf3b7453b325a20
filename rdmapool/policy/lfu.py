"""Least frequently used, ties broken by least recent: a baseline that shows why pure frequency fails on
conversation traces (a chain is read once per turn, so old hot chains crowd out new ones).

Priority (access count, last touch sequence) in a lazy heap: O(log n) per call."""

from __future__ import annotations

import itertools

from rdmapool.policy._structs import LazyHeap
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key


class LFU(EvictionPolicy):
    name = "lfu"

    def __init__(self) -> None:
        self._heap = LazyHeap()
        self._count: dict[Key, int] = {}
        self._seq = itertools.count()

    def on_insert(self, info: BlockInfo, now: float) -> None:
        self._count[info.key] = 1
        self._heap.push(info.key, (1, next(self._seq)))

    def on_access(self, key: Key, now: float) -> None:
        c = self._count.get(key)
        if c is not None:
            self._count[key] = c + 1
            self._heap.push(key, (c + 1, next(self._seq)))

    def on_remove(self, key: Key) -> None:
        if self._count.pop(key, None) is not None:
            self._heap.discard(key)

    def victim(self, now: float) -> Key | None:
        top = self._heap.peek()
        return None if top is None else top[0]

    def __len__(self) -> int:
        return len(self._count)

    def __contains__(self, key: Key) -> bool:
        return key in self._count
