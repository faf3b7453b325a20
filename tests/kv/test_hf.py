"""HF engine with the pool (a test double here; tests/kv/test_real_server.py uses real servers): prefill and
decode engines share KV through the pool and answer exactly as a run without the pool does."""

from __future__ import annotations

import pytest
import torch

from rdmapool.errors import ServerUnavailable
from rdmapool.kv.hf import HFEngine
from rdmapool.kv.models import ModelSpec, fingerprint, load_model
from tests.kv.fake_pool import FakePool

CHUNK = 16
#: First-token logits with and without the pool agree to this absolute tolerance (float32, logits of order 1).
#: Not zero: a cached prefix's KV was computed in another forward pass (the prefill worker's whole prompt, or
#: decode steps of one token) than the baseline's single pass over the prompt, and matmuls of other shapes sum in
#: another order, so float32 results differ in the last bits (~1e-7 measured here).
LOGIT_ATOL = 1e-4

_MODELS: dict[str, tuple] = {}


def model(arch: str):
    if arch not in _MODELS:
        spec = ModelSpec(arch, "micro", seed=3)
        _MODELS[arch] = (load_model(spec), *fingerprint(spec, "cpu", torch.float32))
    return _MODELS[arch]


def engine(arch: str, pool, **kw) -> HFEngine:
    m, mid, rev = model(arch)
    return HFEngine(m, kw.pop("model_id", mid), kw.pop("revision", rev), pool, chunk_tokens=CHUNK, **kw)


def conversation_turns(seed: int, n_conv: int = 3, turns: int = 3, system: int = 40):
    g = torch.Generator().manual_seed(seed)
    sys_prompt = torch.randint(0, 512, (system,), generator=g).tolist()
    msgs = [[torch.randint(0, 512, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n_conv)] for _ in range(turns)]
    return sys_prompt, msgs


def run_conversations(arch: str, pool, seed: int = 1, new_tokens: int = 20, turns: int = 3):
    sys_prompt, msgs = conversation_turns(seed, turns=turns)
    prefill, decode = engine(arch, pool), engine(arch, pool)
    baseline = engine(arch, None)
    pooled = [list(sys_prompt) for _ in msgs[0]]
    plain = [list(sys_prompt) for _ in msgs[0]]
    results = []
    for turn in msgs:
        for a, b, m in zip(pooled, plain, turn, strict=True):
            a += m
            b += m
        prefill.run_batch(pooled, 0)
        got = decode.run_batch(pooled, new_tokens)
        want = baseline.run_batch(plain, new_tokens)
        results.append((got, want))
        for a, b, g, w in zip(pooled, plain, got.outputs, want.outputs, strict=True):
            a += g
            b += w
    return results


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_outputs_identical_over_turns(arch: str) -> None:
    results = run_conversations(arch, FakePool())
    for turn, (got, want) in enumerate(results):
        assert got.outputs == want.outputs, f"turn {turn}"
        assert len(got.outputs[0]) == 20
        assert (got.first_logits - want.first_logits).abs().max() <= LOGIT_ATOL
        # the pool really served: every request read every full chunk, and all of it but the last token
        assert all(c == min(n // CHUNK * CHUNK, n - 1)
                   for c, n in zip(got.cached_tokens, got.prompt_tokens, strict=True))
        assert got.bytes_read > 0
    # from turn 1 on, the prompt includes the previous answer: the decode engine stored its generated KV
    assert results[1][0].cached_tokens[0] > results[0][0].prompt_tokens[0]


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_hit_and_agree(arch: str) -> None:
    (got, want), *_ = run_conversations(arch, FakePool(), turns=1)
    assert got.outputs == want.outputs and sum(got.cached_tokens) > 0


def test_other_tenant_or_fingerprint_never_hits() -> None:
    pool = FakePool("alice")
    prompt = list(range(1, 70))
    engine("llama", pool).run_batch([prompt], 0)
    # paired: the same tenant and model hit ...
    assert engine("llama", pool).run_batch([prompt], 1).cached_tokens == [64]
    # ... another tenant does not (a client authenticated as bob, and bob's namespace) ...
    other = engine("llama", pool.for_tenant("bob"), tenant="bob")
    assert other.run_batch([prompt], 1).cached_tokens == [0]
    # ... not even when it claims alice's namespace through a client authenticated as bob
    assert engine("llama", pool.for_tenant("bob"), tenant="alice").run_batch([prompt], 1).cached_tokens == [0]
    # ... and neither does another weights revision of the same model id for alice
    assert engine("llama", pool, revision="other-rev").run_batch([prompt], 1).cached_tokens == [0]


class DownPool(FakePool):
    def lookup_prefix(self, keys):
        raise ServerUnavailable("pool down (test)")

    def put(self, keys, buffers):
        raise ServerUnavailable("pool down (test)")


def test_pool_down_is_a_miss_not_a_failure() -> None:
    prompt = list(range(1, 70))
    eng = engine("llama", DownPool())
    got = eng.run_batch([prompt], 5)
    assert got.cached_tokens == [0]
    assert got.outputs == engine("llama", None).run_batch([prompt], 5).outputs
    assert eng.conn.stats.misses_from_errors >= 2


class TornPool(FakePool):
    def get(self, keys, into):
        ok = super().get(keys, into)
        return ok[:1] + [False] * (len(ok) - 1)  # only the first block validates


def test_partial_read_recomputes_the_rest() -> None:
    prompt = list(range(1, 70))
    pool = TornPool()
    engine("llama", pool).run_batch([prompt], 0)
    got = engine("llama", pool).run_batch([prompt], 5)
    assert got.cached_tokens == [CHUNK]
    assert got.outputs == engine("llama", None).run_batch([prompt], 5).outputs
