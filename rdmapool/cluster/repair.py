"""Placement repairs: swaps when racks leave a vacancy no server with quota can take, and first-replica
balancing by reordering rows (no data moves). Pure numpy; used by `placement.place`."""

from __future__ import annotations

import numpy as np

from rdmapool.cluster.scores import GOLD, mix, quotas


def overflow_fill(table: np.ndarray, rows: np.ndarray, k: int, load: np.ndarray, quota: np.ndarray,
                  w: np.ndarray, dom: np.ndarray) -> int:
    """Rows needing replica k whose eligible servers are all at quota (the servers with quota left share a
    domain with the row).

    Swaps first: a server X with quota left is ineligible for row r; another row r2 holds a server Y that r can
    take and can take X in Y's place: r gets Y, r2 gets X (one extra move, quotas kept). Rows are handled in
    batches that share the same set of domains, so the search is vectorised. Rows left over take the least
    loaded eligible server, one slot over quota. Returns the number of slots placed over quota."""
    dom_table = np.where(table >= 0, dom[np.maximum(table, 0)], -1)
    pending = np.asarray(rows, dtype=np.int64)
    busy = np.zeros(table.shape[0], dtype=bool)
    busy[pending] = True  # stuck rows and rows changed in this repair are not used as r2
    has_room = np.nonzero((quota - load > 0) & (w > 0))[0]
    for x in has_room[np.argsort(load[has_room] - quota[has_room], kind="stable")]:
        if not len(pending):
            break
        room = int(quota[x] - load[x])
        ok_row = ~(dom_table == dom[x]).any(axis=1) & ~busy  # rows that can take x
        groups: dict[tuple, list[int]] = {}
        for r in pending:
            groups.setdefault(tuple(sorted(dom_table[r, :k])), []).append(int(r))
        done: list[int] = []
        for used, rs in groups.items():
            if room <= 0:
                break
            ok = ok_row[:, None] & (table >= 0) & ~np.isin(dom_table, np.array(used, dtype=np.int64))
            cand_rows = np.nonzero(ok.any(axis=1))[0]
            n = min(len(rs), room, len(cand_rows))
            if n == 0:
                continue
            r2 = cand_rows[:n]
            # change the last eligible replica of r2, so first replicas stay where they are if possible
            j = (ok[r2].shape[1] - 1) - np.argmax(ok[r2][:, ::-1], axis=1)
            r1 = np.array(rs[:n], dtype=np.int64)
            y = table[r2, j]
            table[r1, k], dom_table[r1, k] = y, dom[y]
            table[r2, j], dom_table[r2, j] = x, dom[x]
            busy[r2] = True
            ok_row[r2] = False
            load[x] += n
            room -= n
            done.extend(rs[:n])
        if done:
            pending = np.setdiff1d(pending, np.array(done, dtype=np.int64))
    overflow = 0
    for r in pending:
        used = dom_table[r, :k]
        ok = (w > 0) & ~np.isin(dom, used)
        if not ok.any():
            continue
        ratio = np.where(ok, (load + 1) / np.maximum(quota, 1).astype(np.float64), np.inf)
        s_ = int(np.argmin(ratio))
        table[r, k] = s_
        dom_table[r, k] = dom[s_]
        load[s_] += 1
        overflow += 1
    return overflow


def balance_primaries(table: np.ndarray, kept: np.ndarray, w: np.ndarray, seeds: np.ndarray) -> None:
    """Reorder rows (no data moves) so each server is first replica of about its capacity share of shards:
    reads go to the first replica. With e = first-replica count - share, a row's first replica A swaps with
    a later replica B of the same row only if e[B] < e[A] - 1, so the sum of e^2 falls with every swap and
    excess flows along chains (A -> B -> C). Replicas that already held the shard are promoted first."""
    S, R = table.shape
    quota = quotas(np.where(w > 0, w, 0.0), S)
    for _ in range(64):
        prim = table[:, 0]
        e = np.bincount(prim[prim >= 0], minlength=len(w)) - quota
        if not (e > 0).any():
            return
        rows = np.nonzero((prim >= 0) & (e[np.maximum(prim, 0)] > 0))[0]
        ea = e[table[rows, 0]]
        best_j = np.full(len(rows), -1)
        best_key = np.full(len(rows), np.inf)
        for j in range(1, R):
            cand = table[rows, j]
            eb = e[np.maximum(cand, 0)]
            ok = (cand >= 0) & (eb < ea - 1)
            key = np.where(kept[rows, j], 0.0, 1e9) + eb  # holds the data first, then the most under
            better = ok & (key < best_key)
            best_j[better], best_key[better] = j, key[better]
        sel = best_j >= 0
        rows, best_j, key = rows[sel], best_j[sel], best_key[sel]
        if not len(rows):
            return
        to = table[rows, best_j].astype(np.int64)
        frm = table[rows, 0].astype(np.int64)
        room = np.maximum(-e, 0) + 1
        h = mix(rows.astype(np.uint64) * GOLD ^ seeds[to])  # deterministic tie-break
        order = np.lexsort((h, key, to))
        t_sorted = to[order]
        starts = np.searchsorted(t_sorted, t_sorted, side="left")
        order = order[(np.arange(len(order)) - starts) < room[t_sorted]]
        f = frm[order]
        o2 = np.lexsort((key[order], f))
        f_sorted = f[o2]
        starts = np.searchsorted(f_sorted, f_sorted, side="left")
        pick = order[o2[(np.arange(len(o2)) - starts) < e[f_sorted]]]
        if not len(pick):
            return
        r, j = rows[pick], best_j[pick]
        first, other = table[r, 0].copy(), table[r, j].copy()
        table[r, 0], table[r, j] = other, first
        k0, kj = kept[r, 0].copy(), kept[r, j].copy()
        kept[r, 0], kept[r, j] = kj, k0
