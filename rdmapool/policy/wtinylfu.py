"""W-TinyLFU (Einziger, Friedman, Manes; Caffeine): a small LRU window in front of a segmented LRU main
(probation + protected), with a count-min sketch deciding admission from the window into the main.

Order of eviction: keys that overflow the window (1% of the peak population) become candidates for the main.
The oldest candidate enters probation if the sketch says it is used more often than the main's LRU key
(probation's, else protected's), which is then the victim; otherwise the candidate itself is the victim. A probation key that is accessed moves to
protected (at most 80% of the main); protected's overflow goes back to probation. All O(1)."""

from __future__ import annotations

from collections import OrderedDict

from rdmapool.policy._structs import Peak
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key
from rdmapool.policy.sketch import CountMinSketch


class WTinyLFU(EvictionPolicy):
    name = "wtinylfu"

    def __init__(self, window: float = 0.01, protected: float = 0.8) -> None:
        self.window_share = window
        self.protected_share = protected
        self._window: OrderedDict[Key, None] = OrderedDict()
        self._candidates: OrderedDict[Key, None] = OrderedDict()
        self._probation: OrderedDict[Key, None] = OrderedDict()
        self._protected: OrderedDict[Key, None] = OrderedDict()
        self._sketch = CountMinSketch(1024)
        self._peak = Peak()

    def on_insert(self, info: BlockInfo, now: float) -> None:
        key = info.key
        if key in self:
            self.on_access(key, now)
            return
        self._sketch.add(key)
        self._window[key] = None
        peak = self._peak.see(len(self))
        target = self._window_target()
        while len(self._window) > target:
            overflow, _ = self._window.popitem(last=False)
            self._candidates[overflow] = None
        if peak * 8 > self._sketch.width * 2:
            self._sketch.resize(peak * 8)

    def on_access(self, key: Key, now: float) -> None:
        self._sketch.add(key)
        if key in self._window:
            self._window.move_to_end(key)
        elif key in self._probation or key in self._candidates:
            if key in self._probation:
                del self._probation[key]
            else:
                del self._candidates[key]
            self._protected[key] = None
            limit = max(1, int(self.protected_share * (self._peak.value - self._window_target())))
            while len(self._protected) > limit:
                demoted, _ = self._protected.popitem(last=False)
                self._probation[demoted] = None
        elif key in self._protected:
            self._protected.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        for seg in (self._window, self._candidates, self._probation, self._protected):
            if seg.pop(key, 0) is None:
                return

    def _window_target(self) -> int:
        return max(1, int(self.window_share * self._peak.value))

    def victim(self, now: float) -> Key | None:
        main_lru = next(iter(self._probation if self._probation else self._protected), None)
        candidate = next(iter(self._candidates), None)
        if candidate is None:
            return main_lru if main_lru is not None else next(iter(self._window), None)
        if main_lru is None:
            return candidate
        if self._sketch.estimate(candidate) > self._sketch.estimate(main_lru):
            del self._candidates[candidate]
            self._probation[candidate] = None
            return main_lru
        return candidate

    def __len__(self) -> int:
        return len(self._window) + len(self._candidates) + len(self._probation) + len(self._protected)

    def __contains__(self, key: Key) -> bool:
        return (key in self._window or key in self._candidates or key in self._probation
                or key in self._protected)
