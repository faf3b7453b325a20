"""HitDensity: least hit density (LHD, Beckmann et al. NSDI '18) over the classes a prefix pool can see.

Theory of operation
-------------------
Rank each resident block by its expected hits per block-second still to be spent on it, learned online per
class and age, and evict the lowest of a random sample. A block's class is what chainheat knows of its chain:
- heat: requests that have touched the chain (inherited by a new turn's blocks from their parent unless the
  parent is shared by many children, remembered across eviction in a keys-only ghost), capped at `turns`;
- the chain's previous return gap (the age at which it was last hit, inherited like heat), in coarse buckets;
- the block's depth bucket (a deep block needs every ancestor resident to be a hit).
Per class and coarsened age (buckets of `granule` seconds, doubled when too many lives outlast the last
bucket) the policy counts hits (an access ends a life at that age) and evictions (a removal ends it). Every
`period` events the counts are aged (x `decay`) and each class's density table is rebuilt:
  density(c, a) = sum_{x>=a} hits(c, x) / sum_{x>=a} events(c, x) * (x - a + 1/2) buckets,
i.e. the chance a block of class c that has reached age a is hit before it is evicted, per unit of expected
remaining lifetime. Sparse classes are pulled toward the pooled table (`prior` pseudo-events).

Eviction: partial blocks (fewer tokens than the largest block seen; a chain's last block, re-hashed by the
next turn) go first, oldest first. Otherwise `samples` resident blocks are drawn at random (seeded, so runs
are deterministic) and the one of least density goes, deeper first among equals. Admission: when the pool is
full a partial newcomer is bypassed, and a full block is bypassed when its class's density at age 0 is below
the victim's. Cost: O(samples) per eviction, O(1) per insert and access, O(classes x buckets) per rebuild
(amortised over `period` events).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from math import log2

from rdmapool.errors import UsageError
from rdmapool.policy._chains import ChainMemory
from rdmapool.policy._structs import Peak
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key

_PG_EDGES = (30.0, 90.0, 240.0)  # previous return gap buckets (s); 0 = never returned


def _pg_bucket(gap: float) -> int:
    if gap <= 0:
        return 0
    for i, e in enumerate(_PG_EDGES):
        if gap < e:
            return i + 1
    return len(_PG_EDGES) + 1


def _depth_bucket(depth: int) -> int:
    if depth < 1:
        return 0
    return min(4, 1 + int(log2(depth)) // 2)  # 1, 2-3 | 4-15 | 16-63 | 64+


class HitDensity(ChainMemory, EvictionPolicy):
    name = "hitdensity"

    def __init__(self, turns: int = 5, granule: float = 4.0, buckets: int = 128, samples: int = 64,
                 period: int = 4000, decay: float = 0.9, prior: float = 20.0, ghost: float = 8.0,
                 shared_children: int = 4, depth_classes: bool = True, gap_classes: bool = True,
                 admit_by_density: bool = True, whole_chains: bool = True, seed: int = 1) -> None:
        if (turns < 1 or granule <= 0 or buckets < 2 or samples < 1 or period < 1 or not 0 < decay <= 1
                or prior < 0 or ghost < 0 or shared_children < 1):
            raise UsageError("hitdensity: bad options")
        self.turns, self.granule, self.nb, self.samples = turns, float(granule), buckets, samples
        self.period, self.decay, self.prior, self.ghost_factor = period, decay, prior, ghost
        self.shared_children = shared_children
        self.depth_classes, self.gap_classes, self.admit_by_density = depth_classes, gap_classes, admit_by_density
        self.whole_chains = whole_chains
        self._rng = random.Random(seed)
        self._ncls = (turns + 1) * (len(_PG_EDGES) + 2) * 5
        self._hits = [[0.0] * buckets for _ in range(self._ncls)]
        self._evs = [[0.0] * buckets for _ in range(self._ncls)]
        self._dens: list[list[float]] | None = None
        self._events = 0
        # resident full blocks: key -> [heat, gapbucket, depth, touch, index in _keys, touches]
        self._meta: dict[Key, list] = {}
        self._keys: list[Key] = []
        self._partials: OrderedDict[Key, None] = OrderedDict()
        self._children: dict[Key, int] = {}
        self._kid: dict[Key, Key] = {}  # full block -> its latest full child (to find a chain's tail)
        self._doomed: list[tuple[Key, int]] = []  # a chain chosen for eviction, tail last
        self._ghost: OrderedDict[Key, tuple[int, float]] = OrderedDict()
        self._full_tokens = 0
        self._peak = Peak()

    # -- classes and ages ---------------------------------------------------------------------------------
    def _cls(self, heat: int, gb: int, depth: int) -> int:
        h = min(heat, self.turns)
        g = gb if self.gap_classes else 0
        d = _depth_bucket(depth) if self.depth_classes else 0
        return (h * (len(_PG_EDGES) + 2) + g) * 5 + d

    def _age(self, touch: float, now: float) -> int:
        a = int((now - touch) / self.granule)
        return a if a < self.nb else self.nb - 1

    def _count(self, table: list[list[float]], m: list, now: float) -> None:
        table[self._cls(m[0], m[1], m[2])][self._age(m[3], now)] += 1.0
        self._events += 1
        if self._events >= self.period:
            self._rebuild()

    def _rebuild(self) -> None:
        self._events = 0
        nb, hits, evs = self.nb, self._hits, self._evs
        # too many lives reach the last bucket: coarsen ages (merge bucket pairs, double the granule)
        tail = sum(h[-1] + e[-1] for h, e in zip(hits, evs, strict=True))
        total = sum(sum(h) + sum(e) for h, e in zip(hits, evs, strict=True))
        if total > 0 and tail > 0.05 * total:
            for table in (hits, evs):
                for row in table:
                    merged = [row[2 * i] + row[2 * i + 1] for i in range(nb // 2)]
                    row[:] = merged + [0.0] * (nb - len(merged))
            self.granule *= 2
        pool_h = [sum(h[a] for h in hits) for a in range(nb)]
        pool_e = [sum(e[a] for e in evs) for a in range(nb)]
        pool_n = sum(pool_h) + sum(pool_e)
        w = self.prior / pool_n if pool_n > 0 else 0.0
        dens = []
        for c in range(self._ncls):
            hc, ec = hits[c], evs[c]
            row = [0.0] * nb
            h_above = ev_above = life_above = 0.0
            for a in range(nb - 1, -1, -1):
                h = hc[a] + w * pool_h[a]
                n = h + ec[a] + w * pool_e[a]
                life_above += ev_above + 0.5 * n  # each event above a lives one more bucket from a
                h_above += h
                ev_above += n
                row[a] = h_above / life_above if life_above > 0 else 0.0
            dens.append(row)
        self._dens = dens
        for table in (hits, evs):
            for row in table:
                for a in range(nb):
                    row[a] *= self.decay

    def _density(self, m: list, now: float) -> float:
        if self._dens is None:  # nothing learned yet: LRU order
            return -(now - m[3])
        return self._dens[self._cls(m[0], m[1], m[2])][self._age(m[3], now)]

    # -- what a newcomer would be -------------------------------------------------------------------------
    def _partial(self, info: BlockInfo) -> bool:
        if info.tokens > self._full_tokens:
            self._full_tokens = info.tokens
        return 0 < info.tokens < self._full_tokens

    def _inherit(self, info: BlockInfo, now: float) -> tuple[int, int]:
        ghost = self._ghost.get(info.key)
        if ghost is not None:
            return ghost[0] + 1, _pg_bucket(now - ghost[1])
        p = info.parent
        if p is not None:
            m = self._meta.get(p)
            if m is not None and self._children.get(p, 0) < self.shared_children:
                return m[0], m[1]
        return 1, 0

    def _sample_victim(self, now: float) -> tuple[Key, float] | None:
        keys = self._keys
        if not keys:
            return None
        rng, meta, best, best_d = self._rng, self._meta, None, 0.0
        n = len(keys)
        for _ in range(min(self.samples, n)):
            k = keys[rng.randrange(n)]
            m = meta[k]
            d = self._density(m, now)
            if best is None or d < best_d or (d == best_d and m[2] > meta[best][2]):
                best, best_d = k, d
        return best, best_d

    # -- the interface --------------------------------------------------------------------------------------
    def admit(self, info: BlockInfo, now: float) -> bool:
        partial = self._partial(info)
        if partial or self._partials:
            return not partial
        if not self.admit_by_density or self._dens is None:
            return True
        vic = self._sample_victim(now)
        if vic is None:
            return True
        heat, gb = self._inherit(info, now)
        if self._dens[self._cls(heat, gb, info.depth)][0] >= vic[1]:
            return True
        self._remember(info.key, heat, now)
        return False

    def on_insert(self, info: BlockInfo, now: float) -> None:
        key = info.key
        if key in self._meta or key in self._partials:
            self.on_access(key, now)
            return
        if info.parent is not None and info.parent in self._meta:
            self._children[info.parent] = self._children.get(info.parent, 0) + 1
        if self._partial(info):
            self._partials[key] = None
        else:
            heat, gb = self._inherit(info, now)
            self._meta[key] = [heat, gb, info.depth, now, len(self._keys), 0]
            self._keys.append(key)
            if info.parent is not None and info.parent in self._meta:
                self._kid[info.parent] = key
        self._ghost.pop(key, None)
        self._peak.see(len(self))

    def on_access(self, key: Key, now: float) -> None:
        m = self._meta.get(key)
        if m is None:
            if key in self._partials:
                self._partials.move_to_end(key)
            return
        if now > m[3]:  # a new request came back to this block: one life ends in a hit
            self._count(self._hits, m, now)
            m[1] = _pg_bucket(now - m[3])
            m[0] += 1
            m[3] = now
        m[5] += 1  # any touch (a leased victim moved out of the way too) takes a block off the doomed list

    def on_remove(self, key: Key) -> None:
        if key in self._partials:
            del self._partials[key]
            return
        m = self._meta.pop(key, None)
        if m is None:
            return
        # the last time seen is the removal's "now": the touch plus its age is unknown here, so count the
        # eviction at the age it had when it was chosen (recorded by victim) or at its last known age
        age_now = self._victim_now if self._victim_key == key else m[3]
        self._count(self._evs, m, age_now)
        i, last = m[4], self._keys.pop()
        if last != key:
            self._keys[i] = last
            self._meta[last][4] = i
        self._children.pop(key, None)
        self._kid.pop(key, None)
        self._remember(key, m[0], m[3])

    _victim_key: Key | None = None
    _victim_now: float = 0.0

    def victim(self, now: float) -> Key | None:
        if self._partials:
            return next(iter(self._partials))
        meta, doomed = self._meta, self._doomed
        while doomed:  # the rest of a chain chosen before, tail first, unless touched since
            k, seq = doomed[-1]
            m = meta.get(k)
            if m is not None and m[5] == seq:
                self._victim_key, self._victim_now = k, now
                return k
            doomed.pop()
        vic = self._sample_victim(now)
        if vic is None:
            return None
        k = vic[0]
        if self.whole_chains:
            path, seen = [k], {k}
            while (c := self._kid.get(path[-1])) is not None and c in meta and c not in seen:
                path.append(c)
                seen.add(c)
            doomed.extend((p, meta[p][5]) for p in path)
            k = path[-1]
        self._victim_key, self._victim_now = k, now
        return k


    def __len__(self) -> int:
        return len(self._meta) + len(self._partials)

    def __contains__(self, key: Key) -> bool:
        return key in self._meta or key in self._partials
