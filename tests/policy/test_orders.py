"""Each policy's order of eviction on small hand-made sequences (what makes it that policy)."""

from __future__ import annotations

from rdmapool.policy import BlockInfo, create


def fill(policy, keys, now=0.0):
    for k in keys:
        policy.on_insert(BlockInfo(k), now)


def test_lru_order() -> None:
    p = create("lru")
    fill(p, "abc")
    p.on_access("a", 1.0)
    assert p.victim(2.0) == "b"


def test_lfu_keeps_frequent() -> None:
    p = create("lfu")
    fill(p, "abc")
    for _ in range(3):
        p.on_access("a", 1.0)
    p.on_access("c", 1.0)
    assert p.victim(2.0) == "b"
    p.on_remove("b")
    assert p.victim(2.0) == "c"


def test_ttl_bypasses_until_expiry() -> None:
    p = create("ttl", ttl=10.0)
    p.on_insert(BlockInfo("a"), 0.0)
    p.on_insert(BlockInfo("b"), 5.0)
    assert not p.admit(BlockInfo("c"), 9.0)
    assert p.admit(BlockInfo("c"), 10.0)
    assert p.victim(10.0) == "a"
    assert p.expired(12.0) == ["a"]


def test_sieve_spares_visited_once() -> None:
    p = create("sieve")
    fill(p, "abc")
    p.on_access("a", 1.0)
    assert p.victim(1.0) == "b"  # the hand clears a's bit and stops at b
    p.on_remove("b")
    assert p.victim(1.0) == "c"
    p.on_remove("c")
    assert p.victim(1.0) == "a"


def test_s3fifo_filters_one_hit_wonders() -> None:
    p = create("s3fifo")
    fill(p, range(10))  # new keys enter the small queue
    p.on_access(0, 1.0)
    v = p.victim(1.0)
    assert v != 0
    p.on_remove(v)
    p.on_insert(BlockInfo(v), 2.0)  # back from the ghost: straight to main
    assert v in p


def test_arc_moves_reused_keys_to_t2() -> None:
    p = create("arc")
    fill(p, "abcd")
    p.on_access("a", 1.0)
    assert p.victim(1.0) == "b"


def test_wtinylfu_admits_frequent_candidate() -> None:
    p = create("wtinylfu")
    for k in range(200):
        p.on_insert(BlockInfo(k), 0.0)
    hot = 199  # newest: still in the window or a candidate
    for _ in range(5):
        p.on_access(hot, 1.0)
    for _ in range(50):
        v = p.victim(1.0)
        assert v != hot
        p.on_remove(v)


def test_prefix_wrapper_evicts_tail_then_orphans() -> None:
    p = create("prefix-lru")
    chain = [BlockInfo("r", depth=0), BlockInfo("x1", parent="r", depth=1), BlockInfo("x2", parent="x1", depth=2)]
    for info in chain:
        p.on_insert(info, 0.0)
    p.on_insert(BlockInfo("y", depth=0), 1.0)
    assert p.victim(2.0) == "x2"  # LRU names r; the wrapper cuts the chain from its tail
    p.on_remove("x2")
    assert p.victim(2.0) == "x1"
    p.on_remove("r")  # r goes for another reason: x1 is orphaned and worthless
    assert p.victim(2.0) == "x1"
    assert not p.admit(BlockInfo("x9", parent="r", depth=1), 3.0)


def test_chainheat_turns_heat_and_partials() -> None:
    p = create("chainheat", beta=1.0)
    root = BlockInfo("s", depth=0, tokens=512)
    p.on_insert(root, 0.0)
    for c in "abcd":  # four conversations under one shared system block
        p.on_insert(BlockInfo(c + "1", parent="s", depth=1, tokens=512), 0.0)
        p.on_insert(BlockInfo(c + "2", parent=c + "1", depth=2, tokens=100), 0.0)
    assert p.victim(1.0) in {"a2", "b2", "c2", "d2"}  # partial tails first
    # conversation a comes back: its new turn's blocks inherit heat 2
    p.on_access("s", 5.0)
    p.on_access("a1", 5.0)
    p.on_insert(BlockInfo("a3", parent="a1", depth=2, tokens=512), 5.0)
    assert p._meta["a3"][0] == 2
    assert p._meta["b1"][0] == 1
    # evicted keys keep their heat in the ghost
    p.on_remove("a1")
    p.on_insert(BlockInfo("a1", parent="s", depth=1, tokens=512), 6.0)
    assert p._meta["a1"][0] == 3
