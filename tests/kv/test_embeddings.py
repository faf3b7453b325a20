"""Reused embeddings: the second request for the same content is served from the pool, other content is not."""

from __future__ import annotations

import pytest
import torch

from rdmapool.errors import UsageError
from rdmapool.kv.embeddings import TensorCache
from rdmapool.kv.keys import Namespace
from tests.kv.fake_pool import FakePool

NS = Namespace("vision-enc", "r1", "embedding", "bfloat16", tenant="alice")


def test_same_content_hits_other_content_misses() -> None:
    calls = []

    def encode(img: torch.Tensor):
        def run() -> torch.Tensor:
            calls.append(1)
            return (img.float().mean() + torch.arange(12, dtype=torch.float32)).to(torch.bfloat16).reshape(3, 4)
        return run

    pool = FakePool("alice")
    img = torch.randint(0, 255, (8, 8, 3), dtype=torch.uint8)
    first = TensorCache(pool, NS).get_or_compute(img, encode(img), (3, 4), torch.bfloat16)
    cache = TensorCache(pool, NS)  # another process would build its own
    again = cache.get_or_compute(img.clone(), encode(img), (3, 4), torch.bfloat16)
    assert torch.equal(first, again) and len(calls) == 1 and cache.hits == 1
    other = img.clone()
    other[0, 0, 0] ^= 1
    cache.get_or_compute(other, encode(other), (3, 4), torch.bfloat16)
    assert len(calls) == 2 and cache.misses == 1


def test_wrong_result_shape_is_loud() -> None:
    with pytest.raises(UsageError, match="expected"):
        TensorCache(FakePool(), NS).get_or_compute(torch.zeros(2), lambda: torch.zeros(3), (2,), torch.float32)
