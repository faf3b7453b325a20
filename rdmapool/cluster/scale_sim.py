"""Scale simulation of the real placement code (`rdmapool cluster scale`): writes docs/scale.md and plots.

For 10, 100 and 1,000 servers, equal and unequal capacities, R = 1, 2, 3, it measures load balance (max over
servers of load / capacity-weighted mean), replica slots moved per join and per leave against the minimum
(sum over servers of max(0, new quota - old load)), replica spread over racks, and the share of keys lost
when the worst single server or the worst rack dies. Baselines: a consistent-hash ring with ~1,000 virtual
nodes per server (weighted by capacity), and rendezvous top-R ignoring racks.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rdmapool.cluster import minmoves
from rdmapool.cluster.placement import Node, Placement, _choose_spread, place
from rdmapool.cluster.scores import rendezvous_scores, server_seed

GIB = 1 << 30
CAPS_UNEQUAL = np.array([64, 128, 256, 512]) * GIB


def make_cluster(n: int, unequal: bool, seed: int) -> list[Node]:
    rng = np.random.default_rng(seed)
    racks = max(4, n // 20)
    caps = rng.choice(CAPS_UNEQUAL, size=n) if unequal else np.full(n, 256 * GIB)
    return [Node(f"srv{i:04d}", float(caps[i]), rack=f"rack{i % racks:02d}", host=f"host{i:04d}")
            for i in range(n)]


def balance(p: Placement, nodes: list[Node]) -> float:
    w = np.array([n.capacity for n in nodes])
    expected = p.table.size * w / w.sum()
    loads = np.bincount(p.table[p.table >= 0], minlength=len(nodes))
    return float((loads / expected).max())


def primary_balance(p: Placement, nodes: list[Node]) -> float:
    """Max over servers of (shards where it is the first replica) / (its capacity share of all shards)."""
    w = np.array([n.capacity for n in nodes])
    first = np.bincount(p.table[:, 0][p.table[:, 0] >= 0], minlength=len(nodes))
    return float((first / (p.table.shape[0] * w / w.sum())).max())


def moved(a: Placement, b: Placement) -> int:
    ia = np.array(a.ids + ("",), dtype=object)[a.table]
    ib = np.array(b.ids + ("",), dtype=object)[b.table]
    S, R = ia.shape
    same = np.zeros(ib.shape, dtype=bool)
    for j in range(R):
        same |= ib == ia[:, j:j + 1]
    return int((~same & (ib != "")).sum())


def minimum_moves(a: Placement, b: Placement) -> int:
    old = dict(zip(a.ids, a.loads(), strict=True))
    return int(sum(max(0, int(q) - int(old.get(i, 0))) for i, q in zip(b.ids, b.quota, strict=True)))


def constrained_minimum(a: Placement, b: Placement, nodes_b: list[Node]) -> tuple[int, str]:
    """The least moves any table meeting b's quotas and distinct domains needs: exact (min-cost flow) where the
    aggregated graph is small, else the rack-level flow bound, else the unconstrained minimum (a lower bound)."""
    w = np.array([x.capacity for x in nodes_b], dtype=np.float64)
    _, dom = _choose_spread(nodes_b, w, b.table.shape[1])
    usable_r = int((b.table >= 0).sum(axis=1).max())
    exact = minmoves.constrained_min(a.ids, a.table, b.ids, b.quota, dom, usable_r, max_types=5000)
    if exact is not None:
        return exact, "exact"
    bound = minmoves.rack_bound(a.ids, a.table, b.ids, b.quota, dom, usable_r, max_types=500)
    if bound is not None:
        return bound, "rack bound"
    return minimum_moves(a, b), "unconstrained"


def loss_shares(table: np.ndarray, rack_of: np.ndarray) -> tuple[float, float, float]:
    """(spread: share of shards over distinct racks, worst server loss share, worst rack loss share)."""
    S, R = table.shape
    racks = rack_of[table]
    distinct = np.ones(S, dtype=bool)
    for k in range(R):
        for j in range(k):
            distinct &= racks[:, k] != racks[:, j]
    if R == 1:
        server_loss = np.bincount(table[:, 0]).max() / S
    else:
        all_same = (table == table[:, :1]).all(axis=1)
        server_loss = np.bincount(table[all_same, 0], minlength=1).max() / S if all_same.any() else 0.0
    same_rack = (racks == racks[:, :1]).all(axis=1)
    rack_loss = np.bincount(racks[same_rack, 0]).max() / S if same_rack.any() else 0.0
    return float(distinct.mean()), float(server_loss), float(rack_loss)


def rendezvous_top_r(nodes: list[Node], S: int, R: int) -> np.ndarray:
    seeds = np.array([server_seed(n.id) for n in nodes], dtype=np.uint64)
    w = np.array([n.capacity for n in nodes])
    out = np.empty((S, R), dtype=np.int32)
    step = max(1, (1 << 22) // len(nodes))
    for a in range(0, S, step):
        sc = rendezvous_scores(np.arange(a, min(S, a + step)), seeds, w)
        part = np.argpartition(sc, R - 1, axis=1)[:, :R] if len(nodes) > R else np.argsort(sc, axis=1)[:, :R]
        order = np.take_along_axis(sc, part, axis=1).argsort(axis=1)
        out[a:a + step] = np.take_along_axis(part, order, axis=1)
    return out


def ring_balance(nodes: list[Node], S: int, vnodes: int = 1000) -> float:
    """Consistent hashing: each server gets ~vnodes points (scaled by capacity); shard -> next point."""
    w = np.array([n.capacity for n in nodes])
    counts = np.maximum(1, np.round(vnodes * w / w.mean())).astype(int)
    owner = np.repeat(np.arange(len(nodes)), counts)
    rng = np.random.default_rng(12345)
    points = rng.random(len(owner))
    order = np.argsort(points)
    points, owner = points[order], owner[order]
    shard_pos = np.random.default_rng(7).random(S * 16)  # many keys: the ring's arc lengths decide
    idx = np.searchsorted(points, shard_pos) % len(points)
    loads = np.bincount(owner[idx], minlength=len(nodes))
    return float((loads / (loads.sum() * w / w.sum())).max())


def run_case(n: int, unequal: bool, R: int, S: int, seed: int = 1) -> dict:
    nodes = make_cluster(n, unequal, seed)
    rack_code = {r: i for i, r in enumerate(sorted({x.rack for x in nodes}))}
    t = time.perf_counter()
    p = place(nodes, S, R)
    fresh_s = time.perf_counter() - t
    rack_of = np.array([rack_code[x.rack] for x in nodes])
    spread, server_loss, rack_loss = loss_shares(p.table, rack_of)
    rng = np.random.default_rng(seed + 100)
    join_ratio, leave_ratio, inc_s, prim_after, bal_after = [], [], [], [], []
    join_c, leave_c, kinds, gap = [], [], set(), []
    for trial in range(3):
        cap = float(np.median([x.capacity for x in nodes]))
        newcomer = Node(f"new{trial}", cap, rack=nodes[int(rng.integers(n))].rack, host=f"newhost{trial}")
        t = time.perf_counter()
        j = place([*nodes, newcomer], S, R, (p.ids, p.table))
        inc_s.append(time.perf_counter() - t)
        join_ratio.append(moved(p, j) / max(1, minimum_moves(p, j)))
        cmin, kind = constrained_minimum(p, j, [*nodes, newcomer])
        join_c.append(moved(p, j) / max(1, cmin))
        gap.append(cmin / max(1, minimum_moves(p, j)))
        kinds.add(kind)
        prim_after.append(primary_balance(j, [*nodes, newcomer]))
        bal_after.append(balance(j, [*nodes, newcomer]))
        gone = int(rng.integers(n))
        t = time.perf_counter()
        lv = place([x for i, x in enumerate(nodes) if i != gone], S, R, (p.ids, p.table))
        inc_s.append(time.perf_counter() - t)
        leave_ratio.append(moved(p, lv) / max(1, minimum_moves(p, lv)))
        cmin, kind = constrained_minimum(p, lv, [x for i, x in enumerate(nodes) if i != gone])
        leave_c.append(moved(p, lv) / max(1, cmin))
        gap.append(cmin / max(1, minimum_moves(p, lv)))
        kinds.add(kind)
        bal_after.append(balance(lv, [x for i, x in enumerate(nodes) if i != gone]))
    base = rendezvous_top_r(nodes, S, R)
    b_spread, _, b_rack_loss = loss_shares(base, rack_of)
    w = np.array([x.capacity for x in nodes])
    b_loads = np.bincount(base.ravel(), minlength=n)
    b_balance = float((b_loads / (base.size * w / w.sum())).max())
    return {
        "servers": n, "capacities": "unequal" if unequal else "equal", "R": R, "shards": S,
        "racks": len(rack_code), "spread_level": p.spread,
        "balance": round(balance(p, nodes), 4),
        "balance_after_changes": round(float(np.max(bal_after)), 4),
        "primary_balance": round(primary_balance(p, nodes), 4),
        "primary_balance_after_join": round(float(np.max(prim_after)), 4),
        "join_moves_over_min": round(float(np.mean(join_ratio)), 4),
        "join_moves_over_min_max": round(float(np.max(join_ratio)), 4),
        "leave_moves_over_min": round(float(np.mean(leave_ratio)), 4),
        "leave_moves_over_min_max": round(float(np.max(leave_ratio)), 4),
        "join_moves_over_cmin": round(float(np.mean(join_c)), 4),
        "join_moves_over_cmin_max": round(float(np.max(join_c)), 4),
        "leave_moves_over_cmin": round(float(np.mean(leave_c)), 4),
        "leave_moves_over_cmin_max": round(float(np.max(leave_c)), 4),
        "cmin_kind": " + ".join(sorted(kinds)),
        "cmin_over_min_max": round(float(np.max(gap)), 4),
        "distinct_rack_share": round(spread, 4), "worst_server_loss": round(server_loss, 5),
        "worst_rack_loss": round(rack_loss, 5),
        "baseline_rendezvous_balance": round(b_balance, 4),
        "baseline_rendezvous_distinct_rack_share": round(b_spread, 4),
        "baseline_rendezvous_worst_rack_loss": round(b_rack_loss, 5),
        "baseline_ring1000_balance_R1": round(ring_balance(nodes, S), 4) if R == 1 else None,
        "fresh_placement_s": round(fresh_s, 2), "incremental_placement_s": round(float(np.mean(inc_s)), 3),
    }


def plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    sizes = sorted({r["servers"] for r in rows})

    def series(metric: str, caps: str, R: int) -> list[float]:
        return [next(r[metric] for r in rows if r["servers"] == n and r["capacities"] == caps and r["R"] == R)
                for n in sizes]

    def fig(metric: str, title: str, ylabel: str, fname: str, baseline: str | None = None, goal: float | None = None,
            logy: bool = False) -> None:
        f, ax = plt.subplots(figsize=(6.4, 4.0))
        for caps, style in (("equal", "-"), ("unequal", "--")):
            for R, color in ((1, "C0"), (2, "C1"), (3, "C2")):
                ax.plot(sizes, series(metric, caps, R), style, color=color, marker="o", label=f"R={R} {caps}")
                if baseline:
                    vals = series(baseline, caps, R)
                    if all(v is not None for v in vals):
                        ax.plot(sizes, vals, ":", color=color, marker="x", alpha=0.6,
                                label=f"{'cmin' if 'cmin' in baseline else 'baseline'} R={R} {caps}")
        if goal is not None:
            ax.axhline(goal, color="k", lw=0.8, ls="-.", label=f"goal {goal}")
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("servers")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6, ncol=2)
        f.tight_layout()
        f.savefig(out / fname, dpi=110)
        plt.close(f)
        names.append(fname)

    fig("balance", "Load balance: max(load / capacity share); dotted: rendezvous top-R", "max / weighted mean",
        "scale-balance.png", "baseline_rendezvous_balance", goal=1.10)
    fig("join_moves_over_min", "Moves per join / unconstrained minimum; dotted: / constrained minimum",
        "moves / minimum", "scale-moves-join.png", "join_moves_over_cmin", goal=1.2)
    fig("leave_moves_over_min", "Moves per leave / unconstrained minimum; dotted: / constrained minimum",
        "moves / minimum", "scale-moves-leave.png", "leave_moves_over_cmin", goal=1.2)
    fig("distinct_rack_share", "Shards with replicas in distinct racks; dotted: rendezvous top-R ignoring racks",
        "share of shards", "scale-spread.png", "baseline_rendezvous_distinct_rack_share")
    fig("worst_rack_loss", "Keys lost when the worst rack dies; dotted: rendezvous top-R ignoring racks",
        "share of keys", "scale-rack-loss.png", "baseline_rendezvous_worst_rack_loss", logy=True)
    fig("worst_server_loss", "Keys lost when the worst single server dies", "share of keys",
        "scale-server-loss.png", logy=True)
    return names


def render(rows: list[dict], figures: list[str], meta: dict) -> str:
    lines = [
        "# Placement at scale (simulation)",
        "",
        "Generated by `rdmapool cluster scale` (source: `rdmapool/cluster/scale_sim.py`); it runs the real",
        "placement code (`rdmapool/cluster/placement.py`) on simulated clusters. Do not edit by hand.",
        "",
        f"- {meta['shards']} shards; racks = max(4, servers / 20), one server per host; unequal capacities drawn",
        "  from {64, 128, 256, 512} GiB, equal = 256 GiB each.",
        "- *balance*: max over servers of load / (capacity share x all replica slots); goal <= 1.10 at 1,000.",
        "- *first-replica balance*: the same for the shards a server is read first for (reads go to the first",
        "  healthy replica); after a join the newcomer is promoted to first replica for its share at once.",
        "- *moves / min*: replica slots whose server changed, over the *unconstrained* minimum, sum over servers of",
        "  max(0, new quota - old load), which ignores racks; mean of 3 joins (a median-capacity server into a random",
        "  rack) and 3 leaves (a random server); goal <= 1.2.",
        "- *moves / cmin*: the same over the *constrained* minimum: the least moves of any table that gives every",
        "  server exactly its quota (the placement's targets, racks capped at 1/R) with replicas in distinct racks",
        "  (`rdmapool/cluster/minmoves.py`: a min-cost flow over shards grouped by their surviving servers, exact",
        "  by flow integrality). *cmin* says how it was computed: `exact`; `rack bound` (a rack-level relaxation,",
        "  still a lower bound) where the exact graph is too big for networkx; `unconstrained` where both are (then",
        "  moves/cmin = moves/min is an upper bound on the true ratio, since cmin >= min).",
        "- *worst rack / server loss*: share of keys with every replica in the dead rack / on the dead server.",
        "- Baselines: rendezvous top-R ignoring racks (same scores, no quotas), and a consistent-hash ring with",
        "  ~1,000 virtual nodes per server scaled by capacity (R = 1 balance only).",
        f"- Machine: {meta['machine']}; {meta['date']}; total {meta['seconds']:.0f} s.",
        "",
        "| servers | caps | R | balance (after join/leave) | first-replica balance (after a join) | join moves/min (max) | leave moves/min (max) |"
        " join moves/cmin (max) | leave moves/cmin (max) | cmin | distinct racks |"
        " worst server loss | worst rack loss | rendezvous: balance / distinct / rack loss | ring balance |"
        " fresh s | incr s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        ring = "-" if r["baseline_ring1000_balance_R1"] is None else f"{r['baseline_ring1000_balance_R1']:.3f}"
        lines.append(
            f"| {r['servers']} | {r['capacities']} | {r['R']} | {r['balance']:.4f} ({r['balance_after_changes']:.4f}) | "
            f"{r['primary_balance']:.3f} ({r['primary_balance_after_join']:.3f}) | "
            f"{r['join_moves_over_min']:.3f} ({r['join_moves_over_min_max']:.3f}) | "
            f"{r['leave_moves_over_min']:.3f} ({r['leave_moves_over_min_max']:.3f}) | "
            f"{r['join_moves_over_cmin']:.3f} ({r['join_moves_over_cmin_max']:.3f}) | "
            f"{r['leave_moves_over_cmin']:.3f} ({r['leave_moves_over_cmin_max']:.3f}) | {r['cmin_kind']} | "
            f"{r['distinct_rack_share']:.4f} | {r['worst_server_loss']:.5f} | {r['worst_rack_loss']:.5f} | "
            f"{r['baseline_rendezvous_balance']:.3f} / {r['baseline_rendezvous_distinct_rack_share']:.3f} / "
            f"{r['baseline_rendezvous_worst_rack_loss']:.4f} | {ring} | {r['fresh_placement_s']} | "
            f"{r['incremental_placement_s']} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{f}]({f})" for f in figures]
    lines += ["", "## Reading", "", meta["reading"], ""]
    return "\n".join(lines)


def reading(rows: list[dict]) -> str:
    big = [r for r in rows if r["servers"] == max(x["servers"] for x in rows)]
    worst_bal = max(max(r["balance"], r["balance_after_changes"]) for r in big)
    ring = [r["baseline_ring1000_balance_R1"] for r in big if r["baseline_ring1000_balance_R1"] is not None]

    def worst_moves(sel) -> float:
        return max(max(r["join_moves_over_min_max"], r["leave_moves_over_min_max"]) for r in sel)
    ge100 = [r for r in rows if r["servers"] >= 100]
    small = [r for r in rows if r["servers"] < 100]
    over = [r for r in rows if max(r["join_moves_over_min"], r["leave_moves_over_min"]) > 1.2]
    over_c = [r for r in rows if max(r["join_moves_over_cmin_max"], r["leave_moves_over_cmin_max"]) > 1.2]

    def worst_cmoves(sel) -> float:
        return max(max(r["join_moves_over_cmin_max"], r["leave_moves_over_cmin_max"]) for r in sel)
    r2_rack = max(r["worst_rack_loss"] for r in rows if r["R"] >= 2)
    base_r2 = max(r["baseline_rendezvous_worst_rack_loss"] for r in rows if r["R"] == 2)
    capped = [r for r in rows if r["balance"] > 1.05]
    lines = [
        f"- Balance at {big[0]['servers']} servers, fresh and after each join/leave: worst {worst_bal:.4f} (goal 1.10); the ring baseline gives "
        f"{max(ring) if ring else float('nan'):.3f}, rendezvous top-R without quotas up to "
        f"{max(r['baseline_rendezvous_balance'] for r in big):.3f}. What is left is quota rounding (one slot "
        "in ~S*R/N).",
        f"- Moves against the unconstrained minimum: worst {worst_moves(ge100):.3f} at 100 and 1,000 servers, "
        f"{worst_moves(small):.3f} at 10 (goal 1.2; over it on average: "
        + (", ".join(f"{r['servers']} {r['capacities']} R={r['R']}" for r in over) or "none") + "). "
        f"Against the constrained minimum: worst {worst_cmoves(rows):.3f} over all cases (over 1.2: "
        + (", ".join(f"{r['servers']} {r['capacities']} R={r['R']}" for r in over_c) or "none") + "). "
        "The constrained minimum exceeds the unconstrained one where a rack reaches its cap (with R = 3 over 4 "
        "racks a rack holding 1/3 of the capacity must be in every shard, so after a leave every shard lacking "
        "it must change a replica): cmin/min up to "
        + (", ".join(f"{r['cmin_over_min_max']:.3f} ({r['servers']} {r['capacities']} R={r['R']})"
                     for r in rows if r["cmin_over_min_max"] > 1.001) or "1.000 everywhere")
        + "; elsewhere the two are equal (to 0.1%).",
        f"- With R >= 2 no rack loss loses a key (worst {r2_rack:.5f}), and no single server loss either; "
        f"rendezvous top-2 ignoring racks loses up to {base_r2:.4f} of keys to one rack (more with fewer racks).",
        "- Balance above 1.05 only where a rack holds more than 1/R of the capacity and is capped: "
        + (", ".join(f"{r['servers']} {r['capacities']} R={r['R']}: {r['balance']}" for r in capped) or "none")
        + ". The capped rack's servers get less than their capacity share; that is the rack constraint.",
        "- Placement time (fresh s, incr s: mean of the 6 joins/leaves): a fresh map for 1,000 servers x 65,536 "
        f"shards takes up to {max(r['fresh_placement_s'] for r in big):.1f} s (numpy, one core); an incremental "
        f"map after a join or leave up to {max(r['incremental_placement_s'] for r in big) * 1000:.0f} ms at "
        f"{big[0]['servers']} servers and up to {max(r['incremental_placement_s'] for r in rows):.2f} s anywhere "
        "(small clusters, where many rows change: the greedy fill's candidate search over all servers and, "
        "where it would strand rows, the domain plan).",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = (10, 100) if args.quick else (10, 100, 1000)
    t0 = time.perf_counter()
    rows = []
    for n in sizes:
        for unequal in (False, True):
            for R in (1, 2, 3):
                row = run_case(n, unequal, R, args.shards)
                rows.append(row)
                print(json.dumps(row), flush=True)
    figures = plots(rows, out)
    meta = {"shards": args.shards, "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "seconds": time.perf_counter() - t0,
            "reading": reading(rows)}
    (out / "scale.md").write_text(render(rows, figures, meta))
    (out / "scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps({"written": str(out / "scale.md"), "figures": figures, "seconds": round(meta["seconds"], 1)}))
    return 0
