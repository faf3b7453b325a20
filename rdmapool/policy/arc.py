"""ARC (Megiddo and Modha, FAST '03): two LRU lists, T1 (seen once recently) and T2 (seen at least twice),
with ghost lists B1 and B2 of keys recently evicted from each. A newcomer found in B1 grows T1's target p
(recency is paying off); found in B2 it shrinks p (frequency is). The victim is T1's LRU key while T1 is over
p, else T2's. The cache size c is the peak population. All O(1)."""

from __future__ import annotations

from collections import OrderedDict

from rdmapool.policy._structs import Peak
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key


class ARC(EvictionPolicy):
    name = "arc"

    def __init__(self) -> None:
        self._t1: OrderedDict[Key, None] = OrderedDict()
        self._t2: OrderedDict[Key, None] = OrderedDict()
        self._b1: OrderedDict[Key, None] = OrderedDict()
        self._b2: OrderedDict[Key, None] = OrderedDict()
        self.p = 0.0
        self._peak = Peak()

    def on_insert(self, info: BlockInfo, now: float) -> None:
        key = info.key
        if key in self:
            self.on_access(key, now)
            return
        c = self._peak.see(len(self) + 1)
        if key in self._b1:
            self.p = min(float(c), self.p + max(len(self._b2) / len(self._b1), 1.0))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self.p = max(0.0, self.p - max(len(self._b1) / len(self._b2), 1.0))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None

    def on_access(self, key: Key, now: float) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        c = self._peak.value
        if self._t1.pop(key, 0) is None:
            self._b1[key] = None
        elif self._t2.pop(key, 0) is None:
            self._b2[key] = None
        else:
            return
        while self._b1 and len(self._t1) + len(self._b1) > c:
            self._b1.popitem(last=False)
        while self._b2 and len(self._t1) + len(self._t2) + len(self._b1) + len(self._b2) > 2 * c:
            self._b2.popitem(last=False)

    def victim(self, now: float) -> Key | None:
        if self._t1 and (len(self._t1) > self.p or not self._t2):
            return next(iter(self._t1))
        return next(iter(self._t2 if self._t2 else self._t1), None)

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: Key) -> bool:
        return key in self._t1 or key in self._t2
