"""What the KV layer needs from a pool, and the connector that turns pool trouble into misses.

Theory of operation
-------------------
`KVPool` is the narrow protocol the KV layer is written against: the memory-pool client's batched calls on
16-byte keys (the tenant comes from the client's auth token, and is also inside every key's namespace). Anything
with these four methods works: the real `rdmapool.client` client, or a test double in tests/.

`PoolConnector` wraps a pool for an engine: it moves whole chunks between the pool and host staging buffers and
keeps byte and time counters. A pool that is down or a block that fails validation is a miss, never an engine
failure (errors.py): lookups then report 0, reads report how many leading chunks arrived intact, writes are
counted as failed. Caller mistakes (`UsageError`) still raise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from rdmapool.errors import CorruptBlock, ServerUnavailable, TransportError, UsageError
from rdmapool.kv.keys import ChunkKey

_MISS_ERRORS = (ServerUnavailable, CorruptBlock, TransportError)


@runtime_checkable
class KVPool(Protocol):
    def put(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> Any:
        """Store one buffer per key (all-or-nothing per key; existing keys may be kept as they are)."""

    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are present (stops at the first missing one)."""

    def get(self, keys: Sequence[bytes], into: Sequence[Any]) -> Any:
        """Read each key's block into the writable buffer of the same index. Returns one entry per key, None or
        False for a miss (the real client returns payload lengths), or a count of leading keys read."""

    def delete(self, keys: Sequence[bytes]) -> Any: ...


def leading_ok(result: Any, n: int) -> int:
    """Normalise a pool call's result to "how many leading items succeeded": an int is a count, an object with
    `refs` (the client's LookupResult) counts its refs, a sequence counts entries until the first None/False."""
    if result is None:
        return n
    if isinstance(result, bool):
        return n if result else 0
    if isinstance(result, int):
        return max(0, min(n, result))
    if hasattr(result, "refs"):
        return min(n, len(result.refs))
    count = 0
    for ok in result:
        if ok is None or ok is False or getattr(ok, "value", "stored") not in ("stored", "exists"):
            break
        count += 1
    return count


@dataclass
class PoolStats:
    lookups: int = 0
    chunks_hit: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    chunks_written: int = 0
    bytes_written: int = 0
    write_s: float = 0.0
    misses_from_errors: int = 0
    errors: list[str] = field(default_factory=list)

    def snapshot(self) -> dict:
        d = dict(self.__dict__)
        d["errors"] = list(self.errors[-5:])
        return d


class PoolConnector:
    """Chunk I/O between a `KVPool` and host staging buffers `[n, chunk_bytes]` (uint8), with counters."""

    def __init__(self, pool: KVPool, chunk_bytes: int, pin: bool = False, direct: str = "auto",
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not isinstance(pool, KVPool):
            raise UsageError(f"{type(pool).__name__} does not have the KVPool calls (put, lookup_prefix, get, delete)")
        self.pool = pool
        self.chunk_bytes = chunk_bytes
        self.pin = pin
        if direct not in ("auto", "on", "off"):
            raise UsageError(f"direct must be auto, on or off, got {direct!r}")
        self.direct = direct
        self.clock = clock
        self.stats = PoolStats()
        self._buffers: dict[str, torch.Tensor] = {}
        self._takes_hints: bool | None = None
        self._last_lookup: tuple[list[bytes], Any] | None = None

    def staging(self, role: str, n: int) -> torch.Tensor:
        """Host staging `[n, chunk_bytes]` (uint8) for `role` ("read"/"write"), reused across calls, pinned when
        the engine is on a GPU and registered with the pool when it can register memory (zero-copy transfers).
        It grows by doubling; the old buffer stays registered until the pool closes (bounded: < 2x)."""
        buf = self._buffers.get(role)
        if buf is None or buf.shape[0] < n:
            rows = max(n, 2 * (buf.shape[0] if buf is not None else 1))
            buf = torch.empty((rows, self.chunk_bytes), dtype=torch.uint8, pin_memory=self.pin)
            if hasattr(self.pool, "register"):
                try:
                    self.pool.register(buf.numpy())
                except _MISS_ERRORS + (UsageError,) as exc:  # unregistered buffers still work, through a copy
                    self.stats.errors.append(f"register: {type(exc).__name__}: {exc}")
            self._buffers[role] = buf
        return buf[:n]

    def _failed(self, what: str, exc: Exception) -> None:
        self.stats.misses_from_errors += 1
        self.stats.errors.append(f"{what}: {type(exc).__name__}: {exc}")

    def lookup(self, keys: Sequence[ChunkKey]) -> int:
        if not keys:
            return 0
        self.stats.lookups += 1
        raw = [k.raw for k in keys]
        try:
            result = self.pool.lookup_prefix(raw)
            n = leading_ok(result, len(keys))
        except _MISS_ERRORS as exc:
            self._failed("lookup", exc)
            return 0
        self._last_lookup = (raw, result)
        self.stats.chunks_hit += n
        return n

    def _views(self, staging: torch.Tensor) -> list[memoryview]:
        if staging.dtype != torch.uint8 or staging.dim() != 2 or staging.shape[1] != self.chunk_bytes:
            raise UsageError(f"staging must be uint8 [n, {self.chunk_bytes}]")
        if staging.device.type != "cpu" or not staging.is_contiguous():
            raise UsageError("staging must be contiguous host memory")
        arr = staging.numpy()
        return [memoryview(arr[i]) for i in range(arr.shape[0])]

    def _refs_for(self, raw: list[bytes]) -> Any:
        if self._last_lookup is None or not hasattr(self.pool, "read"):
            return None
        looked, result = self._last_lookup
        refs = getattr(result, "refs", None)
        if refs is None or len(refs) < len(raw) or looked[: len(raw)] != raw:
            return None
        return list(refs[: len(raw)])

    def read(self, keys: Sequence[ChunkKey], staging: torch.Tensor) -> int:
        """Read chunks into staging rows; returns how many leading chunks arrived intact."""
        if not keys:
            return 0
        views = self._views(staging)[: len(keys)]
        raw = [k.raw for k in keys]
        t0 = self.clock()
        try:
            refs = self._refs_for(raw)
            if refs is not None:  # read with the leases of the lookup: no second control round trip
                n = leading_ok(self.pool.read(refs, into=views), len(keys))
            else:
                n = leading_ok(self.pool.get(raw, into=views), len(keys))
        except _MISS_ERRORS as exc:
            self._failed("get", exc)
            n = 0
        self.stats.read_s += self.clock() - t0
        self.stats.chunks_read += n
        self.stats.bytes_read += n * self.chunk_bytes
        return n

    def direct_refs(self, keys: Sequence[ChunkKey], device: torch.device) -> list | None:
        """The last lookup's leased refs for `keys` when the direct path (`rdmapool.kv.direct`) applies to
        `device` (direct="auto" on CUDA, "on" anywhere), else None."""
        from rdmapool.kv import direct

        if not keys:
            return None
        use_direct = self.direct == "on" or (self.direct == "auto" and torch.device(device).type == "cuda")
        if not use_direct or not direct.supported(self.pool):
            return None
        return self._refs_for([k.raw for k in keys])

    def start_direct(self, refs: list, dst: torch.Tensor, parts: int = 1,
                     on_part: Callable[[int, Any], None] | None = None) -> Callable[[], int]:
        """Queue a direct read (`rdmapool.kv.direct.start_direct`); returns `finish() -> leading chunks intact`,
        which also counts them. A pool error before any copy is a miss (finish then answers 0)."""
        from rdmapool.kv import direct

        t0 = self.clock()
        try:
            read = direct.start_direct(self.pool, refs, dst, parts, on_part)
        except _MISS_ERRORS as exc:
            self._failed("direct", exc)
            read = None
        done: list[int] = []

        def finish() -> int:
            if not done:
                n = read.finish() if read is not None else 0
                self.stats.read_s += self.clock() - t0
                self.stats.chunks_read += n
                self.stats.bytes_read += n * self.chunk_bytes
                done.append(n)
            return done[0]

        return finish

    def read_blocks(self, keys: Sequence[ChunkKey], device: torch.device) -> tuple[torch.Tensor, int]:
        """Read chunks into a `[n, chunk_bytes]` uint8 tensor on `device`; returns it and how many leading chunks
        arrived intact. Device memory is filled straight from a co-located server's shm mapping when that path
        applies (`rdmapool.kv.direct`: direct="auto" on CUDA, "on" anywhere), else through host staging."""
        device = torch.device(device)
        refs = self.direct_refs(keys, device)
        if refs is not None:
            out = torch.empty((len(keys), self.chunk_bytes), dtype=torch.uint8, device=device)
            return out, self.start_direct(refs, out)()
        staging = self.staging("read", len(keys))
        n = self.read(keys, staging)
        if device.type == "cpu":
            return staging, n
        return staging[:n].to(device), n  # a blocking copy: the staging buffer is reused by the next read

    def _hints(self, keys: Sequence[ChunkKey], parent: ChunkKey | None, tokens: int) -> list | None:
        """Chain hints for the servers' eviction policy (parent key, depth, tokens), when the pool takes them."""
        if self._takes_hints is None:
            import inspect

            try:
                self._takes_hints = "hints" in inspect.signature(self.pool.put).parameters
            except (TypeError, ValueError):
                self._takes_hints = False
        if not self._takes_hints:
            return None
        from rdmapool.server.slots import BlockHint

        parents = [parent, *keys[:-1]]
        return [BlockHint(p.raw if p is not None else None, k.index, tokens) for p, k in zip(parents, keys, strict=True)]

    def write(self, keys: Sequence[ChunkKey], staging: torch.Tensor, parent: ChunkKey | None = None,
              tokens: int = 0) -> bool:
        """Put chunks from staging rows. `parent` is the key before `keys[0]` in its chain (None at the start),
        `tokens` the tokens per chunk: both only feed the servers' eviction hints."""
        if not keys:
            return True
        views = self._views(staging)[: len(keys)]
        hints = self._hints(keys, parent, tokens)
        t0 = self.clock()
        try:
            raw = [k.raw for k in keys]
            result = self.pool.put(raw, views, hints=hints) if hints is not None else self.pool.put(raw, views)
        except _MISS_ERRORS as exc:
            self._failed("put", exc)
            result = [False] * len(keys)
        self.stats.write_s += self.clock() - t0
        # the real client answers a PutStatus per key; "exists" (someone stored it first) is fine, not written
        status = ["stored"] * len(keys) if result is None else [
            "stored" if r is True else getattr(r, "value", "failed") for r in result]
        written = status.count("stored")
        self.stats.chunks_written += written
        self.stats.bytes_written += written * self.chunk_bytes
        return all(s in ("stored", "exists") for s in status)
