"""Hit accounting on hand-made traces, trace formats, capacities, and the oracle."""

from __future__ import annotations

import math

import pytest

from rdmapool.errors import UsageError
from rdmapool.policy import create
from rdmapool.sim import MODELS, FutureOracle, Request, Trace, make_policy, parse_capacity, replay
from rdmapool.sim.replay import PolicyViolation
from rdmapool.sim.trace import dump_trace, load_trace, parse_lines

M = MODELS["llama-3-8b"]


def T(*reqs: tuple, bt: int = 4) -> Trace:
    return Trace(tuple(Request(float(i), tuple(keys), tokens) for i, (keys, tokens) in enumerate(reqs)), bt)


def test_prefix_contiguous_hits_and_tokens() -> None:
    # block size 4 tokens; request 2 shares a,b; c is resident but after a miss, so it does not count
    trace = T((["a", "b", "c"], 12), (["a", "x", "c"], 10), (["a", "b", "y"], 9))
    r = replay(trace, create("lru"), 100, model=M)
    assert r.block_hits == 0 + 1 + 2
    assert r.block_accesses == 9
    assert r.token_hits == 0 + 4 + 8
    assert r.input_tokens == 12 + 10 + 9
    assert r.hit_ratio == pytest.approx(3 / 9)
    assert r.token_hit_ratio == pytest.approx(12 / 31)
    assert 0 < r.compute_saved_ratio < 1


def test_hits_counted_before_inserting() -> None:
    # a request that repeats a block of its own never hits itself
    trace = T((["a", "a"], 8))
    assert replay(trace, create("lru"), 10, model=M).block_hits == 0


def test_capacity_and_eviction_order() -> None:
    trace = T((["a", "b"], 8), (["c"], 4), (["a", "b"], 8))
    r = replay(trace, create("lru"), 2, model=M)  # c evicts a (LRU): the third request misses a
    assert (r.block_hits, r.evictions) == (0, 3)
    r = replay(trace, create("prefix-lru"), 2, model=M)  # tail first: b goes, a stays and hits
    assert r.block_hits == 1


def test_belady_on_hand_trace() -> None:
    trace = T((["a"], 4), (["b"], 4), (["c"], 4), (["a"], 4), (["b"], 4))
    pol, oracle = make_policy("belady", trace)
    r = replay(trace, pol, 2, model=M, oracle=oracle)
    assert r.block_hits == 2  # c is bypassed
    assert r.bypassed == 1


def test_oracle_next_use() -> None:
    o = FutureOracle(T((["a", "b"], 8), (["b"], 4), (["a"], 4)))
    o.advance(0)
    assert (o.next_use("a"), o.next_use("b"), o.next_use("z")) == (2, 1, math.inf)
    o.advance(2)
    assert o.next_use("a") == math.inf


def test_bad_policy_is_caught() -> None:
    class Liar(type(create("lru"))):
        name = "liar"

        def victim(self, now):
            return "not-resident"

    with pytest.raises(PolicyViolation):
        replay(T((["a"], 4), (["b"], 4)), Liar(), 1, model=M)


@pytest.mark.parametrize(("text", "blocks"), [("0.05", 50), ("5%", 50), ("1", 1000), ("300blocks", 300),
                                              ("1MiB", 4)])
def test_parse_capacity(text: str, blocks: int) -> None:
    assert parse_capacity(text, 1000, 2**18) == blocks


@pytest.mark.parametrize("text", ["2", "abc", "0", "-1%", "10kb"])
def test_parse_capacity_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_capacity(text, 1000, 2**18)


def test_mooncake_and_own_format_roundtrip(tmp_path) -> None:
    lines = ['{"timestamp": 0, "input_length": 700, "output_length": 5, "hash_ids": [0, 1]}',
             '{"timestamp": 1500, "input_length": 600, "output_length": 5, "hash_ids": [0, 2]}']
    tr = parse_lines(lines, "m")
    assert tr.block_tokens == 512 and tr.requests[1].time == 1.5 and tr.requests[0].tokens == 700
    out = tmp_path / "t.jsonl"
    dump_trace(tr, out)
    back = load_trace(out)
    assert back.requests == tr.requests and back.block_tokens == 512
    assert tr.span(0.0, 0.5).requests == tr.requests[:1]


@pytest.mark.parametrize("lines", [["not json"], ['{"timestamp": 0}'], ['[1]'],
                                   ['{"format": "rdmapool-trace", "version": 9, "block_tokens": 4}'],
                                   ['{"t": 5, "keys": [1], "tokens": 4}', '{"t": 1, "keys": [1], "tokens": 4}']])
def test_bad_traces_are_rejected(lines) -> None:
    with pytest.raises(UsageError):
        parse_lines(lines, "bad")
