"""Fill planning for clusters with few failure domains: which domain each vacancy goes to, by max flow.

Theory of operation
-------------------
Once `placement` has decided what each row keeps, every vacancy is one move, so the fill must only be
*feasible*: a row needing m more replicas takes m servers with quota left in m distinct domains its row does not
use yet. The greedy fill (`placement._fill`) can strand rows whose only domains with room are the ones they
already use; each stranded row then costs a swap, i.e. an extra move. With few domains that happens often
(10 servers in 4 racks), so here the domain of every vacancy is planned first:

1. Rows are grouped by the set of domains they use (at most 2^D types, far fewer in practice).
2. A max flow source -> type (cap count x need) -> domain not in the type (cap count) -> sink (cap the domain's
   quota left) fills as many vacancies as any assignment can; integral, exact for the domain level.
3. Each type's flow f[d] is dealt to its rows, domain by domain, to the rows that still need the most
   (ties: the row's best rendezvous score in d), which realises any feasible f (the Gale-Ryser construction).
4. Within a domain any server with quota left will do: rows propose to their best-scoring server there
   (deferred acceptance, as in the greedy fill). New replicas of a row are ordered by score.
Rows the flow cannot serve keep their vacancies for the greedy fill and its swaps. Pure numpy + a small
Edmonds-Karp over the aggregated graph (types x domains).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from rdmapool.cluster.scores import rendezvous_scores

MAX_DOMAINS = 16  # plan only when at most this many domains exist (2^D types bound the graph)
MAX_TYPES = 2000
_CHUNK_CELLS = 1 << 22


def max_flow(cap: dict[int, dict[int, int]], src: int, sink: int) -> dict[int, dict[int, int]]:
    """Edmonds-Karp; `cap[u][v]` capacities (mutated into residuals). Returns the flow on each original edge."""
    orig = {u: dict(vs) for u, vs in cap.items()}
    for u, vs in list(cap.items()):
        for v in vs:
            cap.setdefault(v, {}).setdefault(u, 0)
    while True:
        parent = {src: src}
        q = deque([src])
        while q and sink not in parent:
            u = q.popleft()
            for v, c in cap[u].items():
                if c > 0 and v not in parent:
                    parent[v] = u
                    q.append(v)
        if sink not in parent:
            break
        v, b = sink, None
        while v != src:
            u = parent[v]
            b = cap[u][v] if b is None else min(b, cap[u][v])
            v = u
        v = sink
        while v != src:
            u = parent[v]
            cap[u][v] -= b
            cap[v][u] += b
            v = u
    return {u: {v: c - cap[u][v] for v, c in vs.items()} for u, vs in orig.items()}


def plan_fill(table: np.ndarray, quota: np.ndarray, seeds: np.ndarray, w: np.ndarray, dom: np.ndarray,
              usable_R: int) -> bool:
    """Fill as many vacancies as the domain-level max flow allows, in place. False if not applicable (too
    many domains or row types); rows left with vacancies are for the greedy fill."""
    N = len(quota)
    S, R = table.shape
    D = int(dom.max()) + 1 if N else 0
    if D > MAX_DOMAINS or D == 0:
        return False
    load = np.bincount(table[table >= 0], minlength=N)
    room_s = np.where(w > 0, np.maximum(quota - load, 0), 0).astype(np.int64)
    count = (table >= 0).sum(axis=1)
    rows = np.nonzero(count < usable_R)[0]
    if not len(rows):
        return True
    sub = table[rows]
    bits = np.zeros(len(rows), dtype=np.int64)
    for j in range(R):
        ok = sub[:, j] >= 0
        bits[ok] |= np.int64(1) << dom[sub[ok, j]].astype(np.int64)
    types, inv, cnt = np.unique(bits, return_inverse=True, return_counts=True)
    if len(types) > MAX_TYPES:
        return False
    room_d = np.bincount(dom, weights=room_s, minlength=D).astype(np.int64)
    need_t = usable_R - np.array([bin(int(t)).count("1") for t in types])
    # nodes: 0 source, 1 sink, 2.. types, then domains
    src, snk, t0, d0 = 0, 1, 2, 2 + len(types)
    cap: dict[int, dict[int, int]] = {src: {}}
    for i, t in enumerate(types):
        cap[src][t0 + i] = int(cnt[i] * need_t[i])
        cap[t0 + i] = {d0 + d: int(cnt[i]) for d in range(D) if room_d[d] > 0 and not (int(t) >> d) & 1}
    for d in range(D):
        cap[d0 + d] = {snk: int(room_d[d])}
    flow = max_flow(cap, src, snk)

    # preference of each row for each domain: its best score among the domain's servers with room
    pref = np.full((len(rows), D), np.inf)
    chunk = max(1, _CHUNK_CELLS // max(N, 1))
    for a in range(0, len(rows), chunk):
        sc = rendezvous_scores(rows[a:a + chunk], seeds, w)
        sc[:, room_s <= 0] = np.inf
        for d in range(D):
            members = dom == d
            if members.any():
                pref[a:a + chunk, d] = sc[:, members].min(axis=1)
    assign = np.zeros((len(rows), D), dtype=bool)
    for i in range(len(types)):
        members = np.nonzero(inv == i)[0]
        need = np.full(len(members), int(need_t[i]))
        f = flow[t0 + i]
        for d in sorted(f, key=lambda v: (-f[v], v)):
            n = f[d]
            if n <= 0:
                continue
            dd = d - d0
            order = np.lexsort((pref[members, dd], -need))[:n]
            assign[members[order], dd] = True
            need[order] -= 1

    new_rows, new_srv, new_sc = [], [], []
    for d in range(D):
        rr = np.nonzero(assign[:, d])[0]
        if not len(rr):
            continue
        srv = np.nonzero((dom == d) & (room_s > 0))[0]
        sc = rendezvous_scores(rows[rr], seeds, w)[:, srv]
        rem = room_s[srv].copy()
        pending = np.arange(len(rr))
        while len(pending):
            s2 = np.where(rem[None, :] > 0, sc[pending], np.inf)
            choice = np.argmin(s2, axis=1)
            best = s2[np.arange(len(pending)), choice]
            if not np.isfinite(best).any():
                break  # cannot happen when the flow respected room_d; leave them to the greedy fill
            order = np.lexsort((best, choice))
            c_sorted = choice[order]
            starts = np.searchsorted(c_sorted, c_sorted, side="left")
            acc = order[((np.arange(len(order)) - starts) < rem[c_sorted]) & np.isfinite(best[order])]
            new_rows.append(rows[rr[pending[acc]]])
            new_srv.append(srv[choice[acc]])
            new_sc.append(best[acc])
            np.subtract.at(rem, choice[acc], 1)
            keep = np.ones(len(pending), dtype=bool)
            keep[acc] = False
            pending = pending[keep]
    if not new_rows:
        return True
    r_all = np.concatenate(new_rows)
    s_all = np.concatenate(new_srv)
    sc_all = np.concatenate(new_sc)
    order = np.lexsort((sc_all, r_all))
    r_all, s_all = r_all[order], s_all[order]
    starts = np.searchsorted(r_all, r_all, side="left")
    pos = count[r_all] + (np.arange(len(r_all)) - starts)
    table[r_all, pos] = s_all
    return True
