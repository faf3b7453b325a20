"""Fluid: per-class retention deadlines chosen online by the fluid (knapsack) model of `bench/eviction_bound.py`.

Theory of operation
-------------------
The fluid bound says the best a policy knowing a class and an age can do is: keep each class c for a
retention time tau_c (0 = bypass), choosing the taus where every class's marginal hits per block-second are
equal, within capacity x time. This policy estimates that online and acts on it:
- Class = heat as chainheat defines it (requests that touched the chain, inherited by a new turn's blocks from
  an unshared parent, remembered across eviction by a keys-only ghost), capped at `turns`.
- Every insert or access starts a block "life" in its class; the life ends in a return when the block is
  accessed again by a later request or re-inserted from the ghost, after gap g. Per class the policy counts
  lives and a histogram of return gaps in log-spaced buckets; counts are aged (x `decay`) at each rebuild, as
  is the time span they cover.
- Rebuild (every `period` events): per class, hits(tau) and block-seconds cost(tau) for each bucket edge tau,
  the upper concave hull; then the Lagrange multiplier whose per-class choices fill the pool (peak population
  x span) by bisection. Result: tau_c per class.
- Eviction order: priority = last touch + tau_c, earliest deadline first, deeper block first on ties; partial
  blocks (a chain's re-hashed last block) first. A newcomer is bypassed when the pool is full and its deadline
  is not later than the victim's. Before the first rebuild tau_c = 0 for all (LRU).
A lazy heap, rebuilt with new deadlines at each rebuild: O(log n) per call, O(n) per `period` events.
"""

from __future__ import annotations

from collections import OrderedDict
from math import log2

from rdmapool.errors import UsageError
from rdmapool.policy._chains import ChainMemory
from rdmapool.policy._structs import LazyHeap, Peak
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key

_PARTIAL_SHIFT = 1e12
_BPO = 4  # gap buckets per octave


def _bucket(gap: float, nb: int) -> int:
    b = int(_BPO * log2(1.0 + max(gap, 0.0)))
    return b if b < nb else nb - 1


def _edge(b: int) -> float:
    return 2.0 ** ((b + 1) / _BPO) - 1.0


class Fluid(ChainMemory, EvictionPolicy):
    name = "fluid"

    def __init__(self, turns: int = 5, period: int = 4000, decay: float = 0.99, ghost: float = 8.0,
                 shared_children: int = 4, max_gap: float = 4096.0) -> None:
        if turns < 1 or period < 1 or not 0 < decay <= 1 or ghost < 0 or shared_children < 1 or max_gap <= 1:
            raise UsageError("fluid: bad options")
        self.turns, self.period, self.decay, self.ghost_factor = turns, period, decay, ghost
        self.shared_children = shared_children
        self._nb = _bucket(max_gap, 10**9) + 1
        self._lives = [0.0] * (turns + 1)
        self._ret = [[0.0] * self._nb for _ in range(turns + 1)]
        self.tau = [0.0] * (turns + 1)
        self._events = 0
        self._span = 0.0
        self._last_rebuild: float | None = None
        self._heap = LazyHeap()
        self._meta: dict[Key, list] = {}  # key -> [heat, depth, partial, touch]
        self._children: dict[Key, int] = {}
        self._ghost: OrderedDict[Key, tuple[int, float]] = OrderedDict()
        self._full_tokens = 0
        self._peak = Peak()

    # -- learning ---------------------------------------------------------------------------------------------
    def _start(self, heat: int, now: float) -> None:
        self._lives[min(heat, self.turns)] += 1.0
        self._events += 1
        if self._events >= self.period:
            self._rebuild(now)

    def _returned(self, heat: int, gap: float) -> None:
        if gap > 0:
            self._ret[min(heat, self.turns)][_bucket(gap, self._nb)] += 1.0

    def _rebuild(self, now: float) -> None:
        self._events = 0
        if self._last_rebuild is None:
            self._last_rebuild = now
        self._span += now - self._last_rebuild
        self._last_rebuild = now
        budget = self._peak.value * self._span
        if budget > 0:
            self.tau = self._solve(budget)
            heap, prio = LazyHeap(), self._prio
            for k, m in self._meta.items():
                heap.push(k, prio(m[0], m[1], m[2], m[3]))
            self._heap = heap
        self._span *= self.decay
        self._lives = [x * self.decay for x in self._lives]
        for row in self._ret:
            for b in range(self._nb):
                row[b] *= self.decay

    def _solve(self, budget: float) -> list[float]:
        hulls = []
        for c in range(self.turns + 1):
            n, row = self._lives[c], self._ret[c]
            pts, hits, paid = [(0.0, 0.0, 0.0)], 0.0, 0.0  # (cost, hits, tau)
            for b in range(self._nb):
                tau = _edge(b)
                hits += row[b]
                paid += row[b] * (tau + (_edge(b - 1) if b else 0.0)) / 2
                pts.append((paid + max(n - hits, 0.0) * tau, hits, tau))
            hull: list[tuple[float, float, float]] = []
            for p in sorted(pts):
                while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])
                                          <= (p[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
                    hull.pop()
                hull.append(p)
            hulls.append(hull)

        def pick(lam: float) -> tuple[float, list[float]]:
            cost, taus = 0.0, []
            for hull in hulls:
                best = max(hull, key=lambda p: p[1] - lam * p[0])
                cost += best[0]
                taus.append(best[2])
            return cost, taus

        lo, hi = 0.0, 1.0
        while pick(hi)[0] > budget and hi < 1e9:
            hi *= 4
        for _ in range(50):
            mid = (lo + hi) / 2
            if pick(mid)[0] > budget:
                lo = mid
            else:
                hi = mid
        return pick(hi)[1]

    # -- what a newcomer would be -------------------------------------------------------------------------
    def _prio(self, heat: int, depth: int, partial: bool, touch: float) -> tuple[float, int]:
        if partial:
            return (touch - _PARTIAL_SHIFT, -depth)
        return (touch + self.tau[min(heat, self.turns)], -depth)

    # -- the interface --------------------------------------------------------------------------------------
    def admit(self, info: BlockInfo, now: float) -> bool:
        top = self._heap.peek()
        heat = self._new_heat(info)
        if top is None or self._prio(heat, info.depth, self._partial(info), now) > top[1]:
            return True
        ghost = self._ghost.get(info.key)
        if ghost is not None:
            self._returned(ghost[0], now - ghost[1])
        self._start(heat, now)
        self._remember(info.key, heat, now)
        return False

    def on_insert(self, info: BlockInfo, now: float) -> None:
        key = info.key
        if key in self._meta:
            self.on_access(key, now)
            return
        heat = self._new_heat(info)
        partial = self._partial(info)
        ghost = self._ghost.pop(key, None)
        if ghost is not None:
            self._returned(ghost[0], now - ghost[1])
        if not partial:
            self._start(heat, now)
        self._meta[key] = [heat, info.depth, partial, now]
        if info.parent is not None and info.parent in self._meta:
            self._children[info.parent] = self._children.get(info.parent, 0) + 1
        self._heap.push(key, self._prio(heat, info.depth, partial, now))
        self._peak.see(len(self._meta))

    def on_access(self, key: Key, now: float) -> None:
        m = self._meta.get(key)
        if m is None:
            return
        if now > m[3] and not m[2]:
            self._returned(m[0], now - m[3])
            m[0] += 1
            self._start(m[0], now)
        m[3] = now
        self._heap.push(key, self._prio(m[0], m[1], m[2], now))

    def on_remove(self, key: Key) -> None:
        m = self._meta.pop(key, None)
        if m is None:
            return
        self._heap.discard(key)
        self._children.pop(key, None)
        if not m[2]:
            self._remember(key, m[0], m[3])

    def victim(self, now: float) -> Key | None:
        top = self._heap.peek()
        return None if top is None else top[0]


    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, key: Key) -> bool:
        return key in self._meta
