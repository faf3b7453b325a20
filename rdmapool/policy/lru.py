"""Least recently used: the baseline every other policy is measured against.

An OrderedDict is an intrusive doubly linked list with a hash index: O(1) insert, access, remove and victim.
The victim is the least recently inserted-or-accessed key."""

from __future__ import annotations

from collections import OrderedDict

from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def on_insert(self, info: BlockInfo, now: float) -> None:
        self._order[info.key] = None
        self._order.move_to_end(info.key)

    def on_access(self, key: Key, now: float) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, now: float) -> Key | None:
        return next(iter(self._order), None)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Key) -> bool:
        return key in self._order
