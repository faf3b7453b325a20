"""Memory-aware shard placement: quotas proportional to capacity, rendezvous preference, distinct domains.

Theory of operation
-------------------
Keys hash to one of S shards; each shard has an ordered list of R servers (the first is read first). Placement
turns (servers with capacity and failure domain, previous table) into a new table. It is pure: no I/O, no
clock, deterministic for equal inputs, vectorised with numpy so 1,000 servers x 65,536 shards take seconds.

1. *Spread level.* Replicas of a shard go to distinct failure domains (racks by default). When fewer than R
   domains have capacity, spread falls back to hosts, then to servers (reported in `Placement.spread`).
2. *Quotas.* Each server's share of the S*R replica slots is its capacity share, after capping every domain at
   1/R of the total (a domain can hold at most one replica of each shard), rounded by largest remainder.
   Balance is therefore exact up to one slot; a draining server has capacity 0.
3. *Keep.* Assignments of the previous table stay where the server is still placeable and the row keeps
   distinct domains; rows are compacted in order, so surviving replicas move up (a secondary that holds the
   data becomes the primary when the primary leaves: reads keep hitting).
4. *Shed.* A server above its new quota gives up its excess slots, those where its rendezvous score is worst,
   preferring slots a server with room can take and rows that have no vacancy yet (a row that lost two
   replicas after a join has one receiver, the newcomer, for two vacancies: a swap, an extra move).
   Steps 3 and 4 move only what must move: the minimum for a join or leave, plus rounding.
5. *Plan* (few domains, `plan.py`). When an update's greedy fill (6) would strand rows and there are at most 16
   domains, the domain of every vacancy is chosen instead by a max flow over rows grouped by the domains they
   use, so no row is stranded; each planned vacancy takes its best-scoring server with room in its domain,
   and (6) places what is left. Moves then equal the constrained minimum (`minmoves.py`) in nearly every
   simulated small case. (Not used when the greedy fill succeeds: its rendezvous choices spread rack pairs
   more evenly, which first-replica balancing needs.)
6. *Fill.* Vacant slots left (all of them with many domains), rank by rank, by deferred acceptance: each vacant row proposes to its best-scoring
   server (weighted rendezvous score -ln(u)/w, u = hash(shard, server)) among those with quota left and a domain
   not yet in the row; a server over-asked keeps its best-scoring proposals up to its quota and is then full.
   A row whose every eligible server is full takes the eligible server with the lowest load/quota (quota
   exceeded by one slot; rare, counted in `Placement.overflow`). A row with no eligible server at all keeps
   fewer than R replicas (-1 entries): only possible when there are fewer domains than R.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rdmapool.cluster.plan import MAX_DOMAINS as PLAN_MAX_DOMAINS
from rdmapool.cluster.plan import plan_fill
from rdmapool.cluster.repair import balance_primaries, overflow_fill
from rdmapool.cluster.scores import GOLD, mix, quotas, rendezvous_scores, server_seed
from rdmapool.errors import UsageError

EMPTY = -1
_CHUNK_CELLS = 1 << 22  # score-matrix cells per chunk (32 MiB of float64)
_TOP_K = 24  # candidate servers remembered per vacant row


@dataclass(frozen=True, slots=True)
class Node:
    """A placeable server: id, capacity (any unit; bytes in practice) and failure-domain labels."""

    id: str
    capacity: float
    rack: str = ""
    host: str = ""
    zone: str = ""


@dataclass(frozen=True)
class Placement:
    """The result: `table[s]` lists indices into `ids` for shard s, -1 where no replica could be placed."""

    ids: tuple[str, ...]
    table: np.ndarray  # (S, R) int32
    quota: np.ndarray  # (N,) int64 target slots per server
    spread: str  # "rack", "host" or "server"
    overflow: int  # slots placed above quota because of domain constraints

    def loads(self) -> np.ndarray:
        t = self.table[self.table >= 0]
        return np.bincount(t, minlength=len(self.ids))

    def rows_as_ids(self, shard: int) -> list[str]:
        return [self.ids[i] for i in self.table[shard] if i >= 0]


def _domain_codes(nodes: Sequence[Node], level: str) -> np.ndarray:
    if level == "server":
        return np.arange(len(nodes), dtype=np.int64)
    labels = [(n.zone, n.rack) if level == "rack" else (n.zone, n.rack, n.host) for n in nodes]
    if level == "host":
        labels = [(n.host or n.id,) for n in nodes]
    codes: dict[tuple, int] = {}
    return np.array([codes.setdefault(lab, len(codes)) for lab in labels], dtype=np.int64)


def _choose_spread(nodes: Sequence[Node], w: np.ndarray, replicas: int) -> tuple[str, np.ndarray]:
    for level in ("rack", "host", "server"):
        dom = _domain_codes(nodes, level)
        if len(np.unique(dom[w > 0])) >= replicas or level == "server":
            return level, dom
    raise AssertionError("unreachable")


def _cap_domains(w: np.ndarray, dom: np.ndarray, replicas: int) -> np.ndarray:
    """Scale servers so that no domain holds more than 1/R of the total weight (water-filling)."""
    w = w.astype(np.float64).copy()
    n_dom = int(dom.max()) + 1 if len(dom) else 0
    for _ in range(n_dom + 1):
        dw = np.bincount(dom, weights=w, minlength=n_dom)
        total = dw.sum()
        live = int((dw > 0).sum())
        if total <= 0 or live <= replicas:
            # each live domain holds at most one replica per shard: equalise them
            if live:
                scale = np.where(dw > 0, total / max(live, 1) / np.where(dw > 0, dw, 1), 0.0)
                w = w * scale[dom]
            return w
        over = dw > total / replicas * (1 + 1e-12)
        if not over.any():
            return w
        # capped domains get exactly c each, where c = rest / (R - k) and rest is the uncapped weight
        k = int(over.sum())
        rest = dw[~over].sum()
        c = rest / (replicas - k) if replicas > k else 0.0
        scale = np.where(over, c / np.where(dw > 0, dw, 1), 1.0)
        w = w * scale[dom]
    return w


def _compact_rows(table: np.ndarray) -> np.ndarray:
    """Move each row's valid entries to the front, keeping their order."""
    valid = table >= 0
    order = np.argsort(~valid, axis=1, kind="stable")
    return np.take_along_axis(table, order, axis=1)


def _drop_domain_conflicts(table: np.ndarray, dom: np.ndarray) -> None:
    R = table.shape[1]
    for k in range(1, R):
        dk = np.where(table[:, k] >= 0, dom[np.maximum(table[:, k], 0)], -1)
        for j in range(k):
            dj = np.where(table[:, j] >= 0, dom[np.maximum(table[:, j], 0)], -2)
            table[dk == dj, k] = EMPTY


def place(
    nodes: Sequence[Node],
    num_shards: int,
    replicas: int,
    previous: tuple[Sequence[str], np.ndarray] | None = None,
) -> Placement:
    """Place `num_shards` shards with `replicas` each on `nodes`, moving as little as possible from
    `previous` = (ids, table) when given. Nodes with capacity 0 (draining) receive nothing."""
    if num_shards < 1 or replicas < 1:
        raise UsageError(f"need num_shards >= 1 and replicas >= 1, got {num_shards}, {replicas}")
    ids = tuple(n.id for n in nodes)
    if len(set(ids)) != len(ids):
        raise UsageError("duplicate server ids in placement input")
    if any(not (n.capacity >= 0) for n in nodes):
        raise UsageError("server capacity must be a number >= 0")
    N, S, R = len(nodes), num_shards, replicas
    if previous is not None and np.asarray(previous[1]).shape[0] != S:
        raise UsageError(f"previous table has {np.asarray(previous[1]).shape[0]} shards, expected {S}")
    if N == 0:
        return Placement((), np.full((S, R), EMPTY, dtype=np.int32), np.zeros(0, dtype=np.int64), "server", 0)
    w_raw = np.array([float(n.capacity) for n in nodes], dtype=np.float64)
    spread, dom = _choose_spread(nodes, w_raw, R)
    w = _cap_domains(w_raw, dom, R)
    placeable = w > 0
    usable_R = min(R, len(np.unique(dom[placeable]))) if placeable.any() else 0
    quota = quotas(w, S * usable_R)
    seeds = np.array([server_seed(i) for i in ids], dtype=np.uint64)

    table = np.full((S, R), EMPTY, dtype=np.int32)
    kept = np.zeros((S, R), dtype=bool)
    if previous is not None:
        old_ids, old_table = previous
        old_table = np.asarray(old_table)
        if old_table.shape[0] != S:
            raise UsageError(f"previous table has {old_table.shape[0]} shards, expected {S}")
        index = {sid: i for i, sid in enumerate(ids)}
        remap = np.array([index.get(sid, EMPTY) for sid in old_ids] + [EMPTY], dtype=np.int32)
        cols = min(R, old_table.shape[1])
        old = old_table[:, :cols]
        mapped = remap[np.where(old >= 0, old, len(old_ids))]
        mapped[(mapped >= 0) & ~placeable[np.maximum(mapped, 0)]] = EMPTY
        table[:, :cols] = mapped
        _drop_domain_conflicts(table, dom)
        table = _compact_rows(table)
        _shed(table, quota, seeds, w, dom)
        table = _compact_rows(table)
    kept = (table >= 0) if previous is not None else kept  # entries that hold data already
    overflow = 0
    if usable_R:
        # the greedy fill first; if it strands rows and there are few domains, plan the domains by max flow
        # instead (a stranded row costs a swap, i.e. an extra move)
        trial = table.copy()
        few = previous is not None and len(np.unique(dom)) <= PLAN_MAX_DOMAINS  # a fresh map moves nothing
        overflow = _fill(trial, quota, seeds, w, dom, usable_R, repair=not few)
        if overflow >= 0:
            table = trial
        else:
            plan_fill(table, quota, seeds, w, dom, usable_R)
            overflow = _fill(table, quota, seeds, w, dom, usable_R)
    if R > 1 and usable_R:
        balance_primaries(table, kept, w, seeds)
    return Placement(ids, table, quota, spread, overflow)


def _receivable(table: np.ndarray, rows: np.ndarray, cols: np.ndarray, quota: np.ndarray, load: np.ndarray,
                w: np.ndarray, dom: np.ndarray) -> np.ndarray:
    """For candidate slots to shed: could a server with quota left take the slot without a domain clash?
    Shedding such slots first keeps fills inside quotas (a join's new server shares a rack with some rows)."""
    rem = np.where(w > 0, np.maximum(quota - load, 0), 0)
    rem_dom = np.bincount(dom, weights=rem)
    order = np.argsort(-rem_dom, kind="stable")
    cum = np.cumsum(rem_dom[order])
    if cum[-1] <= 0:
        return np.ones(len(rows), dtype=bool)
    # the domains that will take ~90% of the vacancies (a join: the new server's rack)
    recv_dom = order[: int(np.searchsorted(cum, 0.9 * cum[-1])) + 1]
    if len(recv_dom) > 16:
        return np.ones(len(rows), dtype=bool)
    dom_table = np.where(table >= 0, dom[np.maximum(table, 0)], -1)[rows]  # (n, R)
    dom_table[np.arange(len(rows)), cols] = -1  # the slot itself is being vacated
    clash = (dom_table[:, :, None] == recv_dom[None, None, :]).any(axis=1)  # (n, m)
    return ~clash.all(axis=1)


def _shed(table: np.ndarray, quota: np.ndarray, seeds: np.ndarray, w: np.ndarray, dom: np.ndarray) -> None:
    """Drop each over-quota server's worst-scoring slots until it is at quota, preferring slots that a server
    with quota left can take."""
    rows, cols = np.nonzero(table >= 0)
    servers = table[rows, cols].astype(np.int64)
    load = np.bincount(servers, minlength=len(quota))
    over = load > quota
    if not over.any():
        return
    sel = over[servers]
    rows, cols, servers = rows[sel], cols[sel], servers[sel]
    h = mix(rows.astype(np.uint64) * GOLD ^ seeds[servers])
    u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
    score = -np.log(u) / w[servers]
    receivable = _receivable(table, rows, cols, quota, load, w, dom)
    order = np.lexsort((score, receivable, servers))  # kept first: not receivable, best score
    s_sorted = servers[order]
    starts = np.searchsorted(s_sorted, s_sorted, side="left")
    rank_in_server = np.arange(len(order)) - starts
    dropped = np.zeros(len(order), dtype=bool)
    dropped[order[rank_in_server >= quota[s_sorted]]] = True
    _spread_drops(table, rows, receivable, order, s_sorted, dropped)
    table[rows[dropped], cols[dropped]] = EMPTY


def _spread_drops(table: np.ndarray, rows: np.ndarray, receivable: np.ndarray, order: np.ndarray,
                  s_sorted: np.ndarray, dropped: np.ndarray) -> None:
    """At most one vacancy per row where possible: a row that loses two replicas needs two receivers in distinct
    domains, but after a join the only receiver is the newcomer, and each such row costs a swap (an extra move).
    A server with a drop in a row that already has a vacancy (another drop, or a replica that left) drops
    instead its least-preferred kept slot in an untouched receivable row, if it has one."""
    S = table.shape[0]
    vacant_before = (table < 0).any(axis=1)
    for _ in range(4):
        per_row = np.bincount(rows[dropped], minlength=S) + vacant_before
        first = np.zeros(len(rows), dtype=bool)
        idx = np.nonzero(dropped)[0]
        _, first_of_row = np.unique(rows[idx], return_index=True)
        first[idx[first_of_row]] = True
        # a drop conflicts if its row has another vacancy: the row's first drop is allowed when it had none
        conflict = dropped & (per_row[rows] > 1) & ~(first & ~vacant_before[rows])
        if not conflict.any():
            return
        changed = False
        pos = np.empty(len(order), dtype=np.int64)
        pos[order] = np.arange(len(order))
        for srv in np.unique(s_sorted[pos[np.nonzero(conflict)[0]]]):
            a, b = np.searchsorted(s_sorted, [srv, srv + 1])
            seg = order[a:b]  # this server's slots, most wanted first
            bad = seg[conflict[seg]]
            free = seg[~dropped[seg] & receivable[seg] & (per_row[rows[seg]] == 0)][::-1]  # least wanted first
            # one replacement per untouched row
            _, u = np.unique(rows[free], return_index=True)
            free = free[np.sort(u)]
            n = min(len(bad), len(free))
            if n:
                dropped[bad[:n]] = False
                dropped[free[:n]] = True
                per_row[rows[free[:n]]] += 1
                changed = True
        if not changed:
            return


def _candidates(table: np.ndarray, rows: np.ndarray, k: int, rem: np.ndarray, seeds: np.ndarray, w: np.ndarray,
                dom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best `_TOP_K` servers for replica k, by score, among servers with quota left and a domain not
    yet in the row: (servers, scores), ascending; inf marks "no more eligible servers"."""
    N = len(rem)
    K = min(_TOP_K, N)
    cand = np.empty((len(rows), K), dtype=np.int64)
    cs = np.empty((len(rows), K), dtype=np.float64)
    chunk = max(1, _CHUNK_CELLS // max(N, 1))
    for a in range(0, len(rows), chunk):
        r = rows[a:a + chunk]
        sc = rendezvous_scores(r, seeds, w)
        sc[:, rem <= 0] = np.inf
        for j in range(k):
            sc[dom[None, :] == dom[table[r, j]][:, None]] = np.inf
        part = np.argpartition(sc, K - 1, axis=1)[:, :K] if K < N else np.tile(np.arange(N), (len(r), 1))
        ps = np.take_along_axis(sc, part, axis=1)
        o = np.argsort(ps, axis=1, kind="stable")
        cand[a:a + chunk] = np.take_along_axis(part, o, axis=1)
        cs[a:a + chunk] = np.take_along_axis(ps, o, axis=1)
    return cand, cs


def _fill(table: np.ndarray, quota: np.ndarray, seeds: np.ndarray, w: np.ndarray, dom: np.ndarray,
          usable_R: int, repair: bool = True) -> int:
    """Greedy fill (step 6); returns the slots placed over quota, or -1 (table half filled) when rows were
    stranded and `repair` is off."""
    N = len(quota)
    load = np.bincount(table[table >= 0], minlength=N).astype(np.int64)
    count = (table >= 0).sum(axis=1)
    overflow = 0
    for k in range(usable_R):
        vacant = np.nonzero(count == k)[0]
        # quota only shrinks during a fill, so candidate lists stay valid: a full server is skipped, and a
        # row whose listed servers all filled up is scored again against every server
        cand, cs = _candidates(table, vacant, k, quota - load, seeds, w, dom)
        while len(vacant):
            rem = quota - load
            ok = np.isfinite(cs) & (rem[cand] > 0)
            again = ~ok.any(axis=1) & np.isfinite(cs[:, -1])
            if again.any():
                cand[again], cs[again] = _candidates(table, vacant[again], k, rem, seeds, w, dom)
                ok[again] = np.isfinite(cs[again]) & (rem[cand[again]] > 0)
            stuck = ~ok.any(axis=1)
            if stuck.all():
                if not repair:
                    return -1
                # only rows no server with quota left can take: repair them together (swaps), once the others
                # are placed; a row left unfilled had no eligible server at all
                overflow += overflow_fill(table, vacant, k, load, quota, w, dom)
                count[vacant] = (table[vacant] >= 0).sum(axis=1)
                break
            live = ~stuck
            first = np.argmax(ok[live], axis=1)
            idx = np.nonzero(live)[0]
            rows, choice, best = vacant[live], cand[idx, first], cs[idx, first]
            alternatives = ok[live].sum(axis=1)
            # an over-asked server keeps the most constrained rows first (fewest servers they could still
            # use), then its best scores: fewer rows end up with no eligible server (each such row costs a swap)
            order = np.lexsort((best, alternatives, choice))
            c_sorted = choice[order]
            starts = np.searchsorted(c_sorted, c_sorted, side="left")
            accept = order[(np.arange(len(order)) - starts) < rem[c_sorted]]
            table[rows[accept], k] = choice[accept]
            np.add.at(load, choice[accept], 1)
            count[rows[accept]] = k + 1
            done = np.zeros(len(rows), dtype=bool)
            done[accept] = True
            keep = np.concatenate([idx[~done], np.nonzero(stuck)[0]])
            vacant, cand, cs = vacant[keep], cand[keep], cs[keep]
    return overflow
