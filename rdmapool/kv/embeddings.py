"""Reused embeddings: the pool caches any tensor keyed by content, not only KV chunks.

A multimodal engine computes, say, an image encoder's output; the same image in another request (another process
or host) should not run the encoder again. `TensorCache.get_or_compute(source, compute, shape, dtype)` keys the
*source* bytes (`content_key`, in the engine's namespace, so tenants and models never share), reads the result
from the pool when present, else computes and stores it. The result's shape and dtype are the caller's (they
follow from the model), so a read needs no second round trip for metadata; a block of the wrong size is a miss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rdmapool.errors import UsageError
from rdmapool.kv.keys import Namespace, content_key
from rdmapool.kv.pool import KVPool, PoolConnector


class TensorCache:
    def __init__(self, pool: KVPool, ns: Namespace, kind: str = "embedding") -> None:
        self.pool, self.ns, self.kind = pool, ns, kind
        self.hits = 0
        self.misses = 0

    def _connector(self, nbytes: int) -> PoolConnector:
        return PoolConnector(self.pool, nbytes)

    def get_or_compute(self, source: Any, compute: Callable[[], torch.Tensor], shape: tuple[int, ...],
                       dtype: torch.dtype, device: Any = "cpu") -> torch.Tensor:
        key = content_key(self.ns, source, self.kind)
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        conn = self._connector(nbytes)
        staging = torch.empty((1, nbytes), dtype=torch.uint8)
        if conn.lookup([key]) and conn.read([key], staging):
            self.hits += 1
            return staging.view(dtype).view(shape).to(device)
        self.misses += 1
        out = compute()
        if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
            raise UsageError(f"compute() returned {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(shape)}")
        conn.write([key], out.detach().contiguous().cpu().reshape(-1).view(torch.uint8).reshape(1, -1))
        return out
