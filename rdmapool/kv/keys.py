"""Content keys for KV chunks: chained prefix hashes over fixed-size token chunks, namespaced.

Theory of operation
-------------------
A prompt's tokens are cut into chunks of `Namespace.chunk_tokens` (default 256). Chunk i's key is

    key_0 = root(namespace)
    key_i = XXH3-128(key_{i-1} || tokens of chunk i as little-endian uint32, seed=KEY_SEED)   (i >= 1)

so a key names the whole prefix up to the end of its chunk, never a chunk in isolation: two prompts share a key
exactly when they share every token up to there (and the namespace). A trailing partial chunk gets no key and is
never stored.

The root is XXH3-128 of `KEY_DOMAIN` plus the namespace's canonical bytes (msgpack of a fixed-order list of
fields): model id, weights revision, KV layout, dtype, TP rank and size, tenant and chunk size. Anything that
changes the bytes of a block, or who may read it, is in the namespace, so different namespaces never share a
block. The seed and domain are constants in this file: the same tokens give the same keys in every process, host
and restart (no per-process hash randomisation, the failure LMCache users reported).

128 bits: at a billion stored blocks the chance of any collision is ~1e-21. XXH3 is not a cryptographic hash; the
tenant boundary does not rest on it (servers scope every lookup by the authenticated tenant), it only has to make
accidental collisions impossible in practice. `content_key` keys any other tensor ("reused embeddings") by its
bytes, dtype and shape in the same namespace.

`ChunkKey` is the one typed key; `chunk_keys` is the one function that makes chains. Pools take `key.raw` (16 bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import xxhash

from rdmapool.errors import UsageError

#: Fixed, documented seed of every chain hash. Changing it invalidates every stored block (bump KEY_DOMAIN too).
KEY_SEED = 0x7264_6D61_706F_6F6C  # "rdmapool"
#: Version tag mixed into every root: a new key scheme gets a new tag and never meets old blocks.
KEY_DOMAIN = b"rdmapool.kv.v1"
KEY_BYTES = 16
DEFAULT_CHUNK_TOKENS = 256
_TOKEN_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that must match for two processes to share a KV block."""

    model_id: str
    revision: str
    layout: str
    dtype: str
    tp_rank: int = 0
    tp_size: int = 1
    tenant: str = ""
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        for name in ("model_id", "revision", "layout", "dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UsageError(f"namespace field {name} must be a non-empty string")
        if not isinstance(self.tenant, str):
            raise UsageError("namespace tenant must be a string")
        if not (isinstance(self.tp_size, int) and self.tp_size >= 1):
            raise UsageError(f"tp_size must be an integer >= 1, got {self.tp_size!r}")
        if not (isinstance(self.tp_rank, int) and 0 <= self.tp_rank < self.tp_size):
            raise UsageError(f"tp_rank must be in [0, {self.tp_size}), got {self.tp_rank!r}")
        if not (isinstance(self.chunk_tokens, int) and self.chunk_tokens >= 1):
            raise UsageError(f"chunk_tokens must be an integer >= 1, got {self.chunk_tokens!r}")

    def canonical(self) -> bytes:
        """Canonical bytes: msgpack of the fields in a fixed order (strings as UTF-8, ints as ints)."""
        fields = [self.model_id, self.revision, self.layout, self.dtype, self.tp_rank, self.tp_size,
                  self.tenant, self.chunk_tokens]
        return msgpack.packb(fields, use_bin_type=True)

    def root(self) -> ChunkKey:
        return ChunkKey(xxhash.xxh3_128_digest(KEY_DOMAIN + self.canonical(), seed=KEY_SEED), -1)


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """A 128-bit key naming a whole prefix up to the end of chunk `index` (-1 for a namespace's root)."""

    raw: bytes
    index: int

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_BYTES:
            raise UsageError(f"a chunk key is {KEY_BYTES} bytes")

    def hex(self) -> str:
        return self.raw.hex()


def token_bytes(tokens: Any) -> bytes:
    """Canonical bytes of token ids: little-endian uint32, whatever container or integer type they came in."""
    arr = np.asarray(tokens.cpu() if hasattr(tokens, "cpu") else tokens)
    if arr.ndim != 1:
        raise UsageError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise UsageError(f"tokens must be integers, got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _TOKEN_MAX):
        raise UsageError("token ids must be in [0, 2**32)")
    return arr.astype("<u4", copy=False).tobytes()


def next_key(parent: ChunkKey, chunk: Any) -> ChunkKey:
    return ChunkKey(xxhash.xxh3_128_digest(parent.raw + token_bytes(chunk), seed=KEY_SEED), parent.index + 1)


def chunk_keys(ns: Namespace, tokens: Sequence[int] | Any, start: ChunkKey | None = None) -> list[ChunkKey]:
    """Keys of every full chunk of `tokens` (a trailing partial chunk gets none).

    With `start` (the key of the chunk just before `tokens`), continues an existing chain: that is how tokens that
    stream in during generation get keys without rehashing the prompt.
    """
    data = token_bytes(tokens)
    n_full = len(data) // 4 // ns.chunk_tokens
    step = ns.chunk_tokens * 4
    key = start if start is not None else ns.root()
    keys = []
    for i in range(n_full):
        key = ChunkKey(xxhash.xxh3_128_digest(key.raw + data[i * step:(i + 1) * step], seed=KEY_SEED), key.index + 1)
        keys.append(key)
    return keys


def _tensor_bytes(tensor: Any) -> tuple[str, list[int], bytes]:
    if isinstance(tensor, np.ndarray):
        arr = np.ascontiguousarray(tensor)
        return str(arr.dtype), list(arr.shape), arr.tobytes()
    if hasattr(tensor, "detach"):
        import torch

        t = tensor.detach().contiguous().cpu()
        return str(t.dtype), list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()
    raise UsageError(f"content_key takes a torch tensor or numpy array, got {type(tensor).__name__}")


def content_key(ns: Namespace, tensor: Any, kind: str = "tensor") -> ChunkKey:
    """Key for any tensor by content ("reused embeddings": an encoder's output for an image, ...).

    Covers the bytes, dtype and shape, so equal bytes with another shape or dtype never collide."""
    dtype, shape, raw = _tensor_bytes(tensor)
    h = xxhash.xxh3_128(seed=KEY_SEED)
    h.update(ns.root().raw)
    h.update(msgpack.packb(["content", kind, dtype, shape], use_bin_type=True))
    h.update(raw)
    return ChunkKey(h.digest(), -1)
