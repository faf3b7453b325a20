"""The moves bound at small scale against the exact constrained minimum (pure placement, fast), and the
minimum itself on cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rdmapool.cluster import minmoves
from rdmapool.cluster.placement import Node, _choose_spread, place

S = 2048


def moves(a, b) -> int:
    ia = np.array(a.ids + ("",), dtype=object)[a.table]
    ib = np.array(b.ids + ("",), dtype=object)[b.table]
    return sum(len(set(ib[s]) - set(ia[s]) - {""}) for s in range(ib.shape[0]))


def mins(a, b, nodes_b: list[Node]) -> tuple[int, int]:
    w = np.array([n.capacity for n in nodes_b])
    _, dom = _choose_spread(nodes_b, w, b.table.shape[1])
    usable = int((b.table >= 0).sum(axis=1).max())
    u = minmoves.unconstrained_min(a.ids, a.table, b.ids, b.quota)
    c = minmoves.constrained_min(a.ids, a.table, b.ids, b.quota, dom, usable)
    assert c is not None
    rb = minmoves.rack_bound(a.ids, a.table, b.ids, b.quota, dom, usable)
    assert rb is not None and u <= rb <= c  # both are lower bounds, the exact one the tightest
    return u, c


def ten(unequal: bool) -> list[Node]:
    rng = np.random.default_rng(1)
    caps = rng.choice([64, 128, 256, 512], size=10) if unequal else np.full(10, 256)
    return [Node(f"s{i}", float(caps[i]), rack=f"r{i % 4}", host=f"h{i}") for i in range(10)]


@pytest.mark.parametrize("unequal", [False, True])
@pytest.mark.parametrize("R", [1, 2, 3])
def test_ten_servers_join_and_leave_within_1_2x_constrained_minimum(R: int, unequal: bool) -> None:
    nodes = ten(unequal)
    p = place(nodes, S, R)
    cases = [[*nodes, Node("new", 256.0, rack="r1", host="hnew")]]
    cases += [[n for n in nodes if n.id != gone] for gone in ("s0", "s3", "s6")]
    for after in cases:
        q = place(after, S, R, (p.ids, p.table))
        u, c = mins(p, q, after)
        assert c >= u
        assert moves(p, q) >= c  # no placement beats the exact minimum, ours included
        # goal: 1.2x; the planned fill meets the exact minimum here, so hold it to 1.05x to catch regressions
        assert moves(p, q) <= 1.05 * c, (R, unequal, [n.id for n in after][-1], moves(p, q), u, c)


def test_capped_rack_forces_moves_beyond_the_unconstrained_minimum() -> None:
    # R = 3 over 4 racks of 3, 3, 2, 2 equal servers; one server of a 2-server rack leaves: racks 0 and 1 now
    # hold exactly 1/3 of the capacity each, so each must be in every shard, and every shard that lacked one
    # of them has to change a replica although no server is over its quota
    nodes = [Node(f"s{i}", 1.0, rack=f"r{i % 4}", host=f"h{i}") for i in range(10)]
    p = place(nodes, S, 3)
    after = [n for n in nodes if n.id != "s3"]
    q = place(after, S, 3, (p.ids, p.table))
    u, c = mins(p, q, after)
    held = p.loads()[[i for i, n in enumerate(nodes) if n.rack in ("r0", "r1")]].sum()
    assert c >= 2 * S - held  # shards must gain racks r0/r1 up to S each
    assert c > 1.15 * u, (c, u)  # the unconstrained minimum misses that
    assert moves(p, q) <= 1.05 * c


@pytest.mark.parametrize("unequal", [False, True])
@pytest.mark.parametrize("R", [2, 3])
def test_hundred_servers_join_and_leave_near_the_unconstrained_minimum(R: int, unequal: bool) -> None:
    rng = np.random.default_rng(2)
    caps = rng.choice([64, 128, 256, 512], size=100) if unequal else np.full(100, 256)
    nodes = [Node(f"s{i}", float(caps[i]), rack=f"r{i % 5}", host=f"h{i}") for i in range(100)]
    p = place(nodes, S, R)
    for after in ([*nodes, Node("new", 256.0, rack="r2", host="hnew")], nodes[1:], nodes[:50] + nodes[51:]):
        q = place(after, S, R, (p.ids, p.table))
        u = minmoves.unconstrained_min(p.ids, p.table, q.ids, q.quota)
        assert u <= moves(p, q) <= 1.2 * u  # the constrained minimum lies in between


def test_max_flow_small() -> None:
    from rdmapool.cluster.plan import max_flow

    # source 0 -> 2 (3), 0 -> 3 (2); 2 -> 4 (2), 2 -> 5 (2), 3 -> 4 (2); 4 -> 1 (3), 5 -> 1 (1)
    cap = {0: {2: 3, 3: 2}, 2: {4: 2, 5: 2}, 3: {4: 2}, 4: {1: 3}, 5: {1: 1}}
    f = max_flow(cap, 0, 1)
    assert f[4][1] + f[5][1] == 4
    assert f[0][2] + f[0][3] == 4 and f[5][1] == 1


def test_plan_fills_rows_the_greedy_fill_would_strand() -> None:
    from rdmapool.cluster.plan import plan_fill
    from rdmapool.cluster.scores import server_seed

    # servers 0, 1 in rack 0 (room 2 and 0), server 2 in rack 1 (room 2), server 3 in rack 2 (room 0).
    # Rows 1 and 2 hold rack 0, so only server 2 can serve them; rows 0 and 3 hold rack 2 and must then take
    # server 0, whatever their rendezvous preference: the plan sees that, a row-by-row greedy may not
    dom = np.array([0, 0, 1, 2])
    quota = np.array([3, 1, 2, 2])
    table = np.array([[3, -1], [0, -1], [1, -1], [3, -1]], dtype=np.int32)
    w = np.ones(4)
    seeds = np.array([server_seed(f"s{i}") for i in range(4)], dtype=np.uint64)
    assert plan_fill(table, quota, seeds, w, dom, 2)
    assert (table >= 0).all()
    d = dom[table]
    assert (d[:, 0] != d[:, 1]).all()
    assert (np.bincount(table.ravel(), minlength=4) == quota).all()


def test_constrained_minimum_by_hand() -> None:
    # two shards, R = 1, servers a and b (one rack each); old: both shards on a; new quotas 1 and 1: one moves
    ids, table = ("a",), np.array([[0], [0]])
    dom = np.array([0, 1])
    assert minmoves.constrained_min(ids, table, ("a", "b"), np.array([1, 1]), dom, 1) == 1
    # R = 2, servers a, b in rack 0 and c in rack 1: a shard may not hold both a and b
    ids, table = ("a", "b", "c"), np.array([[0, 2], [1, 2]])
    dom = np.array([0, 0, 1])
    assert minmoves.constrained_min(ids, table, ids, np.array([1, 1, 2]), dom, 2) == 0
    # c leaves: quotas a 2, b 2 over 2 shards, but a and b share a rack: only 1 replica per shard, usable R 1
    assert minmoves.constrained_min(ids, table, ("a", "b"), np.array([1, 1]), np.array([0, 0]), 1) == 0
    assert minmoves.unconstrained_min(ids, table, ("a", "b", "c", "d"), np.array([1, 1, 1, 1])) == 1
