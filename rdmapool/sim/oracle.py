"""The future, for the offline optimum: the simulator advances it request by request, and `next_use(key)`
answers the index of the next request after the current one that uses `key` (math.inf if none).
Per key, a sorted list of the requests that use it and a cursor that only moves forward: O(1) amortised."""

from __future__ import annotations

import math
from collections.abc import Hashable

from rdmapool.sim.trace import Trace


class FutureOracle:
    def __init__(self, trace: Trace) -> None:
        uses: dict[Hashable, list[int]] = {}
        for i, r in enumerate(trace.requests):
            for k in r.keys:
                lst = uses.get(k)
                if lst is None:
                    uses[k] = [i]
                elif lst[-1] != i:
                    lst.append(i)
        self._uses = uses
        self._cursor: dict[Hashable, int] = {}
        self.current = -1

    def advance(self, request_index: int) -> None:
        self.current = request_index

    def next_use(self, key: Hashable) -> float:
        uses = self._uses.get(key)
        if uses is None:
            return math.inf
        c = self._cursor.get(key, 0)
        cur = self.current
        while c < len(uses) and uses[c] <= cur:
            c += 1
        self._cursor[key] = c
        return uses[c] if c < len(uses) else math.inf
