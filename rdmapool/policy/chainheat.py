"""ChainHeat: rdmapool's own policy for prefix caches of multi-turn conversations (the servers' default).

What a pool sees online, and what this policy makes of it:
- A new turn of a conversation looks up its old chain (accesses) and then inserts blocks whose parent is the
  chain's last block. The new blocks inherit the chain's *heat*: how many requests have touched the chain.
  A conversation that has come back before is more likely to come back again (on the Mooncake conversation
  trace: 30% of first turns get a next turn, 48% of third turns, 60%+ from the fifth). Plain frequency
  (LFU, TinyLFU) misses this: a new turn's blocks are new keys with a count of one.
- Heat survives eviction in a ghost table of recently evicted or bypassed keys (keys only, bounded to
  `ghost` times the peak population), so a conversation whose chain was evicted before it came back is
  still known as hot when it does. Most returns come after the chain was evicted in a small pool: without
  the ghost, heat would be lost exactly where it matters.
- A block under a *shared* parent (one with many children, like a system prompt) starts a new chain with
  heat one rather than inheriting the shared block's popularity.
- A chain's last block is usually partial (fewer tokens than a full block); the next turn re-hashes it, so it
  is almost never hit again (1.4% of requests on the conversation trace). Partial blocks are evicted first and
  bypassed when nothing cheaper can go.

- Sampled admission of first turns. In a small pool every first-turn chain is evicted before its user comes
  back (think times are minutes); keeping a share q of them (chosen by a stable hash of the chain's first
  block, followed by its descendants) for longer gets more of them back than keeping all briefly. q adapts:
  when a first-turn block is evicted younger than the target retention T* it drops (x (1 - step)), else it
  rises, between `min_share` and 1. T* maximises F(T)/T, F the observed return-gap distribution of
  first-turn blocks (hits and ghost returns): with a share q admitted into room c, each is held T = c/q and
  the returns are c F(T)/T, so T* is the tangent from the origin to F (until F is known, the return
  period). In a large pool first turns outlive T* and q stays 1. `share` fixes q instead (1 = off).

Order of eviction: priority = (last touch time + bonus(heat), -depth); the smallest goes first. The bonus is
`beta * (min(heat, cap) - 1)` return periods, where the return period is learned online: the geometric mean
of the gaps after which blocks of conversations (heat <= cap) were touched again, seen through hits and
through ghost returns. So the policy carries no time scale of its own: on a service whose users think twice as
long, the bonus doubles. Within one touch time the deepest block goes first: chains are cut from the tail,
keeping their prefixes useful. A newcomer is admitted only if its priority beats the victim's (in practice:
partial blocks are bypassed when the pool is full). A lazy heap: O(log n) per call; ghost and counters O(1).

Defaults (beta=1.5, cap=3, ghost=8, memory=10000; sampled admission min_share=0.1, step=0.003) were chosen on the first half of the conversation trace,
under the constraint of not losing to LRU on synthetic_trace.jsonl; docs/eviction.md has the search and the
check on the second half. The period must be a long-run mean (`memory` gaps): a fast-moving estimate let the
bonus swing and lost to LRU on the synthetic trace.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from math import exp, log

from rdmapool.errors import UsageError
from rdmapool.policy._chains import ChainMemory
from rdmapool.policy._structs import LazyHeap, Peak
from rdmapool.policy.base import BlockInfo, EvictionPolicy, Key

_PARTIAL_SHIFT = 1e12
_GAP_PER_OCTAVE = 4
_GAP_BUCKETS = 4 * 14  # up to 2^14 s


class ChainHeat(ChainMemory, EvictionPolicy):
    name = "chainheat"

    def __init__(self, beta: float = 1.5, cap: int = 3, ghost: float = 8.0, shared_children: int = 4,
                 period: float = 0.0, memory: int = 10000, share: float = 0.0,
                 min_share: float = 0.1, step: float = 0.003) -> None:
        if (beta < 0 or cap < 1 or ghost < 0 or shared_children < 1 or not 0 <= share <= 1
                or not 0 < min_share <= 1 or not 0 < step < 1):
            raise UsageError(f"chainheat: bad options beta={beta} cap={cap} ghost={ghost} "
                             f"shared_children={shared_children} share={share} min_share={min_share} "
                             f"step={step}")
        self.beta, self.cap, self.ghost_factor, self.shared_children = beta, cap, ghost, shared_children
        self._heap = LazyHeap()
        self._meta: dict[Key, list] = {}  # key -> [heat, depth, partial, last touch]
        self._children: dict[Key, int] = {}
        self._ghost: OrderedDict[Key, tuple[int, float, int]] = OrderedDict()  # key -> (heat, touch, children)
        self._full_tokens = 0
        self._scale = float(period)  # the workload's return period, seconds: fixed if given, else learned
        self._learn = not period > 0
        self.memory = memory
        self._log_gap = 0.0
        self._gaps = 0
        self._peak = Peak()
        self.min_share, self.step = min_share, step
        self.share = share  # a fixed share of first-turn chains admitted; 0 = adapt it (below)
        self._q = 1.0 if share <= 0 else share
        self._first_gaps = [0.0] * _GAP_BUCKETS  # return gaps of first-turn blocks, log-spaced
        self._target = 0.0  # retention that maximises first-turn returns per block-second (0 = unknown)
        self._seen_gaps = 0
        self._vkey: Key | None = None
        self._vnow = 0.0
        self._out: OrderedDict[Key, None] = OrderedDict()  # chains sampled out of admission (bounded)

    # -- what a newcomer would be -------------------------------------------------------------------------
    def _prio(self, heat: int, depth: int, partial: bool, now: float) -> tuple[float, int]:
        if partial:
            return (now - _PARTIAL_SHIFT, -depth)
        return (now + self.beta * self._scale * (min(heat, self.cap) - 1), -depth)

    # -- the interface --------------------------------------------------------------------------------------
    def _sampled_out(self, info: BlockInfo, heat: int) -> bool:
        """First-turn chains are admitted for a `share` of chains only (decided at the chain's first block by
        a stable hash, followed by its descendants), so the admitted ones can be kept long enough to return."""
        if self._q >= 1.0 or heat != 1:
            return False
        p = info.parent
        if p is not None and p in self._out:
            out = True
        elif p is not None and p in self._meta and self._children.get(p, 0) < self.shared_children:
            return False
        else:
            out = (zlib.crc32(repr(info.key).encode()) % 10007) >= self._q * 10007
        if out:
            self._out[info.key] = None
            while len(self._out) > max(64, int(self.ghost_factor * self._peak.value)):
                self._out.popitem(last=False)
        return out

    def admit(self, info: BlockInfo, now: float) -> bool:
        top = self._heap.peek()
        heat = self._new_heat(info)
        if self._sampled_out(info, heat):
            self._remember(info.key, heat, now, 0)
            return False
        if top is None or self._prio(heat, info.depth, self._partial(info), now) > top[1]:
            return True
        self._remember(info.key, heat, now, 0)
        return False

    def on_insert(self, info: BlockInfo, now: float) -> None:
        key = info.key
        if key in self._meta:
            self.on_access(key, now)
            return
        heat = self._new_heat(info)
        ghost = self._ghost.pop(key, None)
        if ghost is not None:
            self._saw_return(now - ghost[1])
            if ghost[0] == 1:
                self._first_return(now - ghost[1])
            if ghost[2]:
                self._children[key] = ghost[2]
        m = [heat, info.depth, self._partial(info), now]
        self._meta[key] = m
        if info.parent is not None and info.parent in self._meta:
            self._children[info.parent] = self._children.get(info.parent, 0) + 1
        self._heap.push(key, self._prio(heat, m[1], m[2], now))
        self._peak.see(len(self._meta))

    def on_access(self, key: Key, now: float) -> None:
        m = self._meta.get(key)
        if m is not None:
            if m[0] == 1 and not m[2] and now > m[3]:
                self._first_return(now - m[3])
            m[0] += 1
            if m[0] <= self.cap:  # a conversation's return, not a shared prefix's next reader
                self._saw_return(now - m[3])
            m[3] = now
            self._heap.push(key, self._prio(m[0], m[1], m[2], now))

    def on_remove(self, key: Key) -> None:
        m = self._meta.pop(key, None)
        if m is None:
            return
        self._heap.discard(key)
        self._remember(key, m[0], m[3], self._children.pop(key, 0))
        target = self._target or (self._scale if self._gaps else 0.0)
        if self.share <= 0 and key == self._vkey and m[0] == 1 and not m[2] and target > 0:
            # adapt the share: first-turn blocks evicted younger than the target retention -> admit fewer
            # chains (each then stays longer); older -> admit more, up to all
            if self._vnow - m[3] < target:
                self._q = max(self.min_share, self._q * (1 - self.step))
            else:
                self._q = min(1.0, self._q * (1 + self.step))

    def _first_return(self, gap: float) -> None:
        """A first-turn block came back after `gap` s. The target retention T* maximises F(T)/T, F the
        return-gap distribution of first-turn blocks: with a share q of chains admitted, a pool that holds
        each for T = c/q gets c * F(T)/T returns, so the best T is the tangent from the origin to F."""
        if gap <= 0 or self.share > 0:
            return
        g = self._first_gaps
        g[min(_GAP_BUCKETS - 1, int(_GAP_PER_OCTAVE * log(1.0 + gap, 2)))] += 1.0
        self._seen_gaps += 1
        if self._seen_gaps % 256 == 0:
            cum, best, target = 0.0, 0.0, 0.0
            for b in range(_GAP_BUCKETS - 1):  # the last bucket holds everything longer: not a candidate
                cum += g[b]
                edge = 2.0 ** ((b + 1) / _GAP_PER_OCTAVE) - 1.0
                if cum / edge > best:
                    best, target = cum / edge, edge
            self._target = target
            if self._seen_gaps % 4096 == 0:
                self._first_gaps = [x / 2 for x in g]

    def victim(self, now: float) -> Key | None:
        top = self._heap.peek()
        self._vkey, self._vnow = (None if top is None else top[0]), now
        return None if top is None else top[0]

    def _saw_return(self, gap: float) -> None:
        """A block came back after `gap` seconds: learn the workload's return period (geometric mean)."""
        if not self._learn or gap <= 0:
            return
        self._gaps += 1
        self._log_gap += (log(gap) - self._log_gap) / min(self._gaps, self.memory)
        self._scale = exp(self._log_gap)


    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, key: Key) -> bool:
        return key in self._meta
