"""S3-FIFO (Yang et al., SOSP '23): a small FIFO (10% of the peak population) that filters one-hit wonders,
a main FIFO with lazy reinsertion, and a ghost FIFO of keys recently evicted from the small queue.

Order of eviction: while the small queue is over its share, its oldest key moves to the main queue if it was
accessed since insertion, else it is the victim (and is remembered in the ghost). Otherwise the main queue's
oldest key is reinserted if its frequency (capped at 3) is non-zero, which is decremented, else it is the
victim. A newcomer found in the ghost goes straight to the main queue. Amortised O(1)."""

from __future__ import annotations

from collections import OrderedDict

from rdmapool.policy._structs import Peak
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key


class S3FIFO(EvictionPolicy):
    name = "s3fifo"

    def __init__(self, small: float = 0.1) -> None:
        self.small_share = small
        self._small: OrderedDict[Key, None] = OrderedDict()
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}
        self._peak = Peak()

    def on_insert(self, info: BlockInfo, now: float) -> None:
        key = info.key
        if key in self._freq:
            self.on_access(key, now)
            return
        self._freq[key] = 0
        if self._ghost.pop(key, 0) is None:
            self._main[key] = None
        else:
            self._small[key] = None
        self._peak.see(len(self._freq))

    def on_access(self, key: Key, now: float) -> None:
        f = self._freq.get(key)
        if f is not None and f < 3:
            self._freq[key] = f + 1

    def on_remove(self, key: Key) -> None:
        if self._freq.pop(key, None) is None:
            return
        if self._small.pop(key, 0) is None:
            self._ghost[key] = None
            while len(self._ghost) > self._peak.value:
                self._ghost.popitem(last=False)
        else:
            self._main.pop(key, None)

    def victim(self, now: float) -> Key | None:
        freq = self._freq
        while self._small and (len(self._small) > self.small_share * self._peak.value or not self._main):
            key = next(iter(self._small))
            if freq[key] == 0:
                return key
            del self._small[key]
            freq[key] = 0
            self._main[key] = None
        while self._main:
            key = next(iter(self._main))
            f = freq[key]
            if f == 0:
                return key
            freq[key] = f - 1
            self._main.move_to_end(key)
        return next(iter(self._small), None)

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: Key) -> bool:
        return key in self._freq
