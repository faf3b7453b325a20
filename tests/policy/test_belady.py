"""Belady (MIN with bypass) against brute force on tiny traces: with single-block requests the prefix
accounting is plain block caching, where MIN with bypass is optimal."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rdmapool.sim import MODELS, Request, Trace, make_policy, replay


def brute_force(seq: list[int], cap: int) -> int:
    """Most hits any (bypassing) policy can get on `seq` with `cap` slots: search over all choices."""
    states = {frozenset(): 0}
    for key in seq:
        nxt: dict[frozenset, int] = {}
        for state, hits in states.items():
            if key in state:
                cands = [(state, hits + 1)]
            else:
                cands = [(state, hits)]  # bypass
                if len(state) < cap:
                    cands.append((state | {key}, hits))
                else:
                    cands += [((state - {v}) | {key}, hits) for v in state]
            for s, h in cands:
                if nxt.get(s, -1) < h:
                    nxt[s] = h
        states = nxt
    return max(states.values())


def trace_of(seq: list[int]) -> Trace:
    return Trace(tuple(Request(float(i), (k,), 512) for i, k in enumerate(seq)), 512)


@settings(max_examples=80, deadline=None)
@given(seq=st.lists(st.integers(0, 5), min_size=1, max_size=14), cap=st.integers(1, 3))
def test_belady_matches_brute_force(seq: list[int], cap: int) -> None:
    trace = trace_of(seq)
    pol, oracle = make_policy("belady", trace)
    res = replay(trace, pol, cap, model=MODELS["llama-3-8b"], oracle=oracle, check=True)
    assert res.block_hits == brute_force(seq, cap)


@settings(max_examples=40, deadline=None)
@given(seq=st.lists(st.integers(0, 6), min_size=1, max_size=40), cap=st.integers(1, 4))
def test_no_online_policy_beats_belady(seq: list[int], cap: int) -> None:
    trace = trace_of(seq)
    pol, oracle = make_policy("belady", trace)
    bound = replay(trace, pol, cap, model=MODELS["llama-3-8b"], oracle=oracle).block_hits
    for name in ("lru", "chainheat", "s3fifo", "arc", "wtinylfu", "sieve", "lfu", "ttl"):
        pol, _ = make_policy(name, trace)
        assert replay(trace, pol, cap, model=MODELS["llama-3-8b"]).block_hits <= bound, name


def test_brute_force_sanity() -> None:
    assert brute_force([1, 2, 1, 2], 1) == 1
    assert brute_force([1, 2, 1, 2], 2) == 2
    assert brute_force([1, 1, 1], 1) == 2
