"""The vLLM-shaped connector driven as vLLM's scheduler and a worker would (vLLM itself is not installed):
request A's KV is saved from its paged blocks; request B with the same prefix, in other blocks, loads it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from rdmapool.kv.keys import Namespace
from rdmapool.kv.vllm import RdmapoolConnector
from tests.kv.fake_pool import FakePool

BS, CHUNK, LAYERS, NB, H, D = 4, 8, 3, 32, 2, 5


@dataclass
class Req:
    request_id: str
    prompt_token_ids: list[int]
    all_token_ids: list[int]


def caches(layout: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, NB, BS, H, D) if layout == "vllm-nhd" else (NB, 2, BS, H, D)
    return {f"layer.{i}": torch.randn(shape, generator=g) for i in range(LAYERS)}


def token_kv(c: dict[str, torch.Tensor], layout: str, blocks: list[int], n: int) -> torch.Tensor:
    """[layers, 2, n, H, D] for the first n tokens of a request in `blocks`."""
    out = []
    for t in c.values():
        planes = (t[0], t[1]) if layout == "vllm-nhd" else (t[:, 0], t[:, 1])
        out.append(torch.stack([torch.cat([p[b] for b in blocks])[:n] for p in planes]))
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["vllm-nhd", "flashinfer-nhd"])
def test_save_then_load_through_the_pool(layout: str) -> None:
    pool = FakePool()
    ns = Namespace("m", "r", layout, "float32", chunk_tokens=CHUNK)
    sched = RdmapoolConnector("scheduler", pool, ns, BS, layout)
    worker_a = RdmapoolConnector("worker", pool, ns, BS, layout)
    cache_a = caches(layout, 1)
    worker_a.register_kv_caches(cache_a)

    prompt = list(range(100, 121))  # 21 tokens: 2 full chunks of 8
    a = Req("A", prompt, prompt + [7, 8, 9, 6])  # 4 generated: KV exists for 24 tokens = 3 chunks
    blocks_a = [5, 9, 2, 30, 11, 17, 3]  # scattered, as vLLM allocates
    assert sched.get_num_new_matched_tokens(a, 0) == (0, False)
    delay, _ = sched.request_finished(a, blocks_a)
    assert delay
    worker_a.bind_connector_metadata(sched.build_connector_meta(None))
    worker_a.wait_for_save()
    assert worker_a.get_finished(set()) == ({"A"}, None)

    # request B: A's conversation plus a new message, on another worker with other block ids
    b = Req("B", a.all_token_ids + [1, 2], a.all_token_ids + [1, 2])
    matched, is_async = sched.get_num_new_matched_tokens(b, 0)
    assert (matched, is_async) == (3 * CHUNK, False)
    blocks_b = [0, 1, 4, 6, 7, 8, 10]
    sched.update_state_after_alloc(b, blocks_b, matched)
    worker_b = RdmapoolConnector("worker", pool, ns, BS, layout)
    cache_b = caches(layout, 2)
    worker_b.register_kv_caches(cache_b)
    worker_b.bind_connector_metadata(sched.build_connector_meta(None))
    worker_b.start_load_kv(None)
    for name in cache_b:
        worker_b.wait_for_layer_load(name)
    assert torch.equal(token_kv(cache_b, layout, blocks_b, matched), token_kv(cache_a, layout, blocks_a, matched))
    assert worker_b.get_block_ids_with_load_errors() == set()


def test_failed_read_reports_blocks_to_recompute() -> None:
    class Flaky(FakePool):
        def get(self, keys, into):
            ok = super().get(keys, into)
            return ok[:1] + [False] * (len(ok) - 1)

    pool = Flaky()
    ns = Namespace("m", "r", "vllm-nhd", "float32", chunk_tokens=CHUNK)
    sched = RdmapoolConnector("scheduler", pool, ns, BS)
    w = RdmapoolConnector("worker", pool, ns, BS)
    w.register_kv_caches(caches("vllm-nhd", 1))
    prompt = list(range(50, 75))
    sched.request_finished(Req("A", prompt, prompt), list(range(7)))
    w.bind_connector_metadata(sched.build_connector_meta())
    w.wait_for_save()
    b = Req("B", prompt, prompt)
    n, _ = sched.get_num_new_matched_tokens(b, 0)
    assert n == 3 * CHUNK
    sched.update_state_after_alloc(b, [10, 11, 12, 13, 14, 15, 16], n)
    w.bind_connector_metadata(sched.build_connector_meta())
    w.start_load_kv()
    # chunk 0 arrived; chunks 1-2 (tokens 8-23) did not: their blocks are B's blocks 2..5
    assert w.get_block_ids_with_load_errors() == {12, 13, 14, 15}
