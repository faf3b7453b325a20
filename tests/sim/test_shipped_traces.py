"""On the shipped Mooncake traces (skipped if absent): LRU reproduces the traces README's figures, the
bound holds, and the default beats LRU where the lab claims it does."""

from __future__ import annotations

import pytest

from rdmapool.policy import DEFAULT
from rdmapool.sim import MODELS, load_trace, make_policy, replay

M = MODELS["llama-3-8b"]


def run(path, name: str, share: float):
    trace = load_trace(path)
    pol, oracle = make_policy(name, trace)
    return replay(trace, pol, int(share * trace.unique_blocks()), model=M, oracle=oracle)


@pytest.mark.parametrize(("share", "lru", "opt"), [(0.05, 0.103, 0.320), (0.10, 0.196, 0.340)])
def test_conversation_reference_figures(shipped_trace, share, lru, opt) -> None:
    path = shipped_trace("conversation_first_half.jsonl")
    assert run(path, "lru", share).hit_ratio == pytest.approx(lru, abs=0.001)
    bound = run(path, "belady", share)
    assert bound.hit_ratio >= opt - 0.001
    assert bound.seconds < 10
    assert run(path, DEFAULT, share).hit_ratio > run(path, "lru", share).hit_ratio


@pytest.mark.parametrize("share", [0.01, 0.05, 0.10, 0.25])
def test_default_no_worse_than_lru_on_synthetic(shipped_trace, share) -> None:
    path = shipped_trace("synthetic_trace.jsonl")
    assert run(path, DEFAULT, share).hit_ratio >= run(path, "lru", share).hit_ratio


@pytest.mark.parametrize(("start", "end"), [(0.0, 0.5), (0.5, 1.0)])
def test_sampled_admission_helps_on_both_halves(shipped_trace, start, end) -> None:
    """The default's sampled admission of first turns beats chainheat without it (share=1) at 5% on the half
    it was tuned on and on the half held out."""
    trace = load_trace(shipped_trace("conversation_first_half.jsonl")).span(start, end)
    cap = int(0.05 * trace.unique_blocks())
    with_it = replay(trace, make_policy("chainheat", trace)[0], cap, model=M).hit_ratio
    without = replay(trace, make_policy("chainheat", trace, {"share": 1.0})[0], cap, model=M).hit_ratio
    assert with_it > without + 0.002
