"""The least number of replica moves a membership change needs, with and without the placement's constraints.

Theory of operation
-------------------
A move is a replica slot of the new table whose server did not hold that shard before (`scale_sim.moved`).

*Unconstrained minimum* (per server): a server whose new quota exceeds what it held must receive the
difference, so moves >= sum_s max(0, q_new[s] - held_old[s]). It ignores failure domains.

*Constrained minimum* (exact): the least moves of any table that meets the placement's hard constraints: every
server holds exactly its quota (the placement's targets: capacity share, racks capped at 1/R, rounded to one
slot), every shard has usable_R replicas in distinct failure domains. It is a min-cost flow, exact because
network flows with integer capacities have integral optima:

    shard -> (shard, domain) [cap 1] -> old server of the shard in that domain [cost -1: kept]
                                     -> domain pool [cost 0: a new server] -> server s [total = quota]

Shards with the same set of surviving old servers are interchangeable, so they are aggregated into one type
with capacities multiplied by their count; an integral aggregated flow splits back into shards (a domain used
f <= count times by a type is dealt round-robin over its shards). Moves = S * usable_R - max kept. Solved with
networkx's network simplex (pure Python), so it is computed only where the aggregated graph is small (small
clusters, where domains are tight and the question matters); `rack_bound` gives a cheaper rack-level
relaxation (rows aggregated by old rack set, per-rack keeps capped by sum_s min(held, quota)), a valid lower
bound between the two.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def unconstrained_min(old_ids: Sequence[str], old_table: np.ndarray, new_ids: Sequence[str],
                      quota: np.ndarray) -> int:
    t = np.asarray(old_table)
    held = np.bincount(t[t >= 0], minlength=len(old_ids))
    old = dict(zip(old_ids, held, strict=True))
    return int(sum(max(0, int(q) - int(old.get(i, 0))) for i, q in zip(new_ids, quota, strict=True)))


def surviving(old_ids: Sequence[str], old_table: np.ndarray, new_ids: Sequence[str], quota: np.ndarray,
              dom: np.ndarray) -> np.ndarray:
    """Old rows mapped to new server indices; servers gone or with quota 0 are -1, and of two old replicas in one
    (new) domain only the first is kept (the old table may predate a spread-level change)."""
    index = {sid: i for i, sid in enumerate(new_ids)}
    remap = np.array([index.get(sid, -1) for sid in old_ids] + [-1], dtype=np.int64)
    t = np.asarray(old_table)
    m = remap[np.where(t >= 0, t, len(old_ids))]
    m[(m >= 0) & (np.asarray(quota)[np.maximum(m, 0)] <= 0)] = -1
    for k in range(1, m.shape[1]):
        for j in range(k):
            clash = (m[:, k] >= 0) & (m[:, j] >= 0) & (dom[np.maximum(m[:, k], 0)] == dom[np.maximum(m[:, j], 0)])
            m[clash, k] = -1
    return m


def _solve(types: Counter, R: int, quota_by_sink: dict, keep_cap: dict, slack: dict) -> int | None:
    """Max kept units of the aggregated flow (see module doc), each sink taking its quota +- its slack; None if
    no flow meets the quotas."""
    import networkx as nx

    g = nx.DiGraph()
    total = 0
    for ti, (key, c) in enumerate(types.items()):
        olds, domains = key
        g.add_node(("t", ti), demand=-c * R)
        total += c * R
        old_domains = {d for _, d in olds}
        for d in domains:
            if d not in old_domains:
                g.add_edge(("t", ti), ("pool", d), capacity=c, weight=0)
        for s, d in olds:
            g.add_edge(("t", ti), ("td", ti, d), capacity=c, weight=0)
            g.add_edge(("td", ti, d), ("keep", s), capacity=c, weight=-1)
            g.add_edge(("td", ti, d), ("pool", d), capacity=c, weight=0)
    low = 0
    for (s, d), q in quota_by_sink.items():
        g.add_edge(("keep", s), ("sink", s), capacity=keep_cap[s] + slack[s], weight=0)
        g.add_edge(("pool", d), ("sink", s), weight=0)
        lo = max(0, int(q) - slack[s])
        g.add_node(("sink", s), demand=lo)
        low += lo
        if int(q) + slack[s] > lo:
            g.add_edge(("sink", s), "spare", capacity=int(q) + slack[s] - lo, weight=0)
    if total != sum(int(q) for q in quota_by_sink.values()):
        raise ValueError("quotas do not add up to shards x replicas")
    g.add_node("spare", demand=total - low)
    try:
        cost, _ = nx.network_simplex(g)
    except nx.NetworkXUnfeasible:
        return None
    return -int(cost)


def constrained_min(old_ids: Sequence[str], old_table: np.ndarray, new_ids: Sequence[str], quota: np.ndarray,
                    dom: np.ndarray, usable_R: int, max_types: int = 4000) -> int | None:
    """Exact least moves under quotas + distinct domains, or None where the aggregated graph is too large.
    Where quota rounding makes exact quotas infeasible (a capped rack's servers rounded up past S), every
    server may take its quota +- 1 slot (the placement then overflows by a slot, too)."""
    m = surviving(old_ids, old_table, new_ids, quota, dom)
    keys = Counter(tuple(sorted(int(s) for s in row if s >= 0)) for row in m)
    if len(keys) > max_types:
        return None
    doms = sorted({int(d) for d, q in zip(dom, quota, strict=True) if q > 0})
    types: Counter = Counter()
    for olds, c in keys.items():
        types[(tuple((s, int(dom[s])) for s in olds), tuple(doms))] += c
    sinks = {(s, int(dom[s])): int(q) for s, q in enumerate(quota) if q > 0}
    for slack in (0, 1):
        kept = _solve(types, usable_R, sinks, {s: int(quota[s]) for s, _ in sinks},
                      {s: slack for s, _ in sinks})
        if kept is not None:
            return int(m.shape[0] * usable_R - kept)
    return None


def rack_bound(old_ids: Sequence[str], old_table: np.ndarray, new_ids: Sequence[str], quota: np.ndarray,
               dom: np.ndarray, usable_R: int, max_types: int = 4000) -> int | None:
    """A lower bound on constrained moves from the domain-level relaxation: each domain is one server with the
    domain's quota, and its keeps are capped by sum over its servers of min(held, quota). With the same +-1 slot
    per server fallback as `constrained_min`."""
    m = surviving(old_ids, old_table, new_ids, quota, dom)
    held = np.bincount(m[m >= 0], minlength=len(quota))
    d_of = np.where(m >= 0, dom[np.maximum(m, 0)], -1)
    keys = Counter(tuple(sorted(int(d) for d in row if d >= 0)) for row in d_of)
    if len(keys) > max_types:
        return None
    nd = int(dom.max()) + 1
    dq = np.bincount(dom, weights=quota, minlength=nd).astype(np.int64)
    n_in = np.bincount(dom, weights=(np.asarray(quota) > 0), minlength=nd).astype(np.int64)
    dkeep = np.bincount(dom, weights=np.minimum(held, quota), minlength=nd).astype(np.int64)
    doms = [d for d in range(nd) if dq[d] > 0]
    types: Counter = Counter()
    for olds, c in keys.items():
        types[(tuple((d, d) for d in olds), tuple(doms))] += c
    sinks = {(d, d): int(dq[d]) for d in doms}
    for slack in (0, 1):
        kept = _solve(types, usable_R, sinks, {d: int(dkeep[d]) for d in doms},
                      {d: slack * int(n_in[d]) for d in doms})
        if kept is not None:
            return int(m.shape[0] * usable_R - kept)
    return None
