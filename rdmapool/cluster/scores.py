"""Hashing primitives shared by placement: weighted rendezvous scores and largest-remainder quotas (pure)."""

from __future__ import annotations

import numpy as np
import xxhash

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
GOLD = np.uint64(0x9E3779B97F4A7C15)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def server_seed(server_id: str) -> int:
    return xxhash.xxh64_intdigest(server_id.encode())


def rendezvous_scores(shards: np.ndarray, seeds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted rendezvous score for every (shard, server): -ln(u)/w, lower is preferred; inf where w == 0."""
    with np.errstate(over="ignore"):
        h = mix(shards.astype(np.uint64)[:, None] * GOLD ^ seeds[None, :])
    u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
    with np.errstate(divide="ignore"):
        return -np.log(u) / weights[None, :]


def quotas(w: np.ndarray, slots: int) -> np.ndarray:
    if w.sum() <= 0:
        return np.zeros(len(w), dtype=np.int64)
    exact = w / w.sum() * slots
    q = np.floor(exact).astype(np.int64)
    short = slots - int(q.sum())
    if short > 0:
        order = np.lexsort((np.arange(len(w)), -(exact - q)))
        q[order[:short]] += 1
    return q
