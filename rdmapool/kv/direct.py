"""Reads from a memory server on the same host straight into device memory (shm transport).

Theory of operation
-------------------
The shm transport maps a server's region into the client process (and `cudaHostRegister`s the mapping when a GPU
is there). A normal READ is a CPU memcpy from that mapping into registered staging, then a copy to the GPU: the
CPU memcpy bounds the rate. Here the copy engine pulls each block's payload from the mapping directly into the
destination tensor (`dst.copy_(view_of_mapping, non_blocking=True)`: a DMA at pinned speed from registered
memory), with the block's framing checked as the client checks it:

1. each ref comes from `lookup_prefix` and still holds its read lease (the server will not reuse the slot while
   the lease runs), and the server's epoch is the one of the lookup;
2. the header is copied before the payload copy starts, the trailer after it finished (synchronize), and
   `block.validate` checks key, generation at both ends and length. The payload checksum is not verified (the
   bytes are in device memory, as for GPU pools: `validate(..., verify_checksum=False)`);
3. after the copies finished, each lease must STILL be valid (client clock, `lease_until` already holds the
   client's safety margin): with no payload checksum, the lease is what guarantees that the server did not reuse
   the slot while the copy engine read it. A block whose lease ran out during the copy is a miss
   (`lease_expired`).

A block that fails is a miss, and so is every block after it (prefix semantics).

Pipelining: `start_direct` issues the copies on a side stream and returns a `DirectRead` at once; `finish()`
waits for them and runs the checks. A payload may be cut into `parts` equal slices (an engine uses one per layer)
copied part-major into `dst[part, row]`, with `on_part(p, event)` called once part p of every row is queued: the
caller can make other streams wait on `event` and consume that part (scatter it, run a layer) while later parts
are still in flight. Nothing consumed before `finish()` may be trusted until `finish()` says how many rows are
good. `read_direct` is the blocking form.

It uses the client's and the shm endpoint's internals (`_conn`, `endpoint._map`): an optimisation of one
transport, kept in one place, with the plain `get`/`read` path as the fallback whenever anything here does not
apply.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch

from rdmapool import block
from rdmapool.errors import CorruptBlock, ServerUnavailable, TransportError, UsageError

_MISS = (CorruptBlock, ServerUnavailable, TransportError, OSError, KeyError, AttributeError)
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def supported(pool: Any) -> bool:
    return getattr(pool, "_transport_name", None) == "shm" and hasattr(pool, "_conn")


def _remote(endpoint: Any, rkey: int) -> Any:
    rem = endpoint._remotes.get(rkey)
    return rem if rem is not None else endpoint._map(rkey)


def _mapping_tensor(rem: Any, made: dict) -> torch.Tensor:
    """One uint8 tensor over a remote's whole mapping per read (slicing it is cheaper than a `frombuffer` per
    block). Not kept past the read: an exported buffer would stop the endpoint from closing the mapping."""
    t = made.get(id(rem))
    if t is None:
        with warnings.catch_warnings():  # a read-only mapping: torch warns that it is not writable
            warnings.simplefilter("ignore", UserWarning)
            t = made[id(rem)] = torch.frombuffer(rem.seg.mm, dtype=torch.uint8)
    return t


def side_stream(device: torch.device) -> torch.cuda.Stream:
    s = _STREAMS.get(device)
    if s is None:
        s = _STREAMS[device] = torch.cuda.Stream(device)
    return s


class DirectRead:
    """Copies in flight (see `start_direct`); `finish()` once, to learn how many leading rows are good."""

    def __init__(self, pool: Any, pending: list, stream: torch.cuda.Stream | None) -> None:
        self.pool = pool
        self.pending = pending  # (ref, mm, start, head)
        self.stream = stream
        self.queued = len(pending)
        self._good: int | None = None

    def finish(self) -> int:
        if self._good is not None:
            return self._good
        if self.stream is not None:
            self.stream.synchronize()
        pool = self.pool
        good = 0
        with pool._lock:
            now = pool.clock()  # after the copies: every lease must have outlived them
            for ref, mm, start, head in self.pending:
                if now >= ref.lease_until:
                    pool.counters.add("lease_expired")
                    break
                at = start + block.HEADER_SIZE + ref.length
                tail = bytes(mm[at:at + block.TRAILER_SIZE])
                try:
                    block.check_header_trailer(head, tail, block.Expected(ref.key, ref.hit.generation, ref.length))
                except CorruptBlock:
                    pool.counters.add("corrupt_blocks")
                    break
                good += 1
            pool.counters.add("bytes_read", sum(r.length for r, *_ in self.pending[:good]))
        self._good = good
        return good


def start_direct(pool: Any, refs: list, dst: torch.Tensor, parts: int = 1,
                 on_part: Callable[[int, Any], None] | None = None) -> DirectRead:
    """Queue copies of the payloads of `refs` (from `lookup_prefix`) into `dst`: uint8 `[n, >= length]` (or
    `[1, n, >= length]`) when `parts == 1`, else `[parts, n, >= length // parts]` (slice p of row i's payload into
    `dst[p, i]`). On CUDA the copies run on a side stream that first waits for the current one."""
    if parts < 1:
        raise UsageError(f"parts must be >= 1, got {parts}")
    rows = dst.unsqueeze(0) if dst.dim() == 2 and parts == 1 else dst
    if rows.dim() != 3 or rows.shape[0] != parts or rows.shape[1] < len(refs) or rows.dtype != torch.uint8:
        raise UsageError(f"dst must be uint8 [{parts}, >= {len(refs)}, part bytes], got {tuple(dst.shape)}")
    srcs = []
    made: dict[int, torch.Tensor] = {}
    with pool._lock:
        now = pool.clock()
        for ref in refs:
            try:
                if now >= ref.lease_until:
                    pool.counters.add("lease_expired")
                    break
                conn = pool._conn(ref.server)
                conn.ensure()
                if ref.epoch != int(conn.hello.get("epoch", -1)):
                    break
                rem = _remote(conn.endpoint, ref.hit.rkey)
                start = ref.hit.addr - rem.addr
                total = block.HEADER_SIZE + ref.length + block.TRAILER_SIZE
                if start < 0 or ref.hit.addr + total > rem.end or ref.length % parts \
                        or ref.length // parts > rows.shape[2]:
                    break
                mm = rem.seg.mm
                head = bytes(mm[start:start + block.HEADER_SIZE])
                base = start + block.HEADER_SIZE
                srcs.append(((ref, mm, start, head), _mapping_tensor(rem, made)[base:base + ref.length]))
            except _MISS:
                break
    cuda = dst.device.type == "cuda"
    stream = side_stream(dst.device) if cuda else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(dst.device))
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        # a copy per (part, row): keep the Python work per copy small, it is paid thousands of times per request
        views = [src.view(parts, -1) for _, src in srcs]
        same = len({v.shape[1] for v in views}) == 1
        for p in range(parts):
            rp = rows[p, :, : views[0].shape[1]] if views and same else rows[p]
            for i, v in enumerate(views):
                (rp[i] if same else rp[i, : v.shape[1]]).copy_(v[p], non_blocking=cuda)
            if on_part is not None:
                event = None
                if stream is not None:
                    event = torch.cuda.Event()
                    event.record(stream)
                on_part(p, event)
    if stream is not None:
        dst.record_stream(stream)
    return DirectRead(pool, [s[0] for s in srcs], stream)


def read_direct(pool: Any, refs: list, dst: torch.Tensor) -> int:
    """Copy the payloads of `refs` (from the pool's `lookup_prefix`) into rows of `dst` (uint8 `[n, >= length]`,
    any device). Returns how many leading blocks arrived intact."""
    return start_direct(pool, refs, dst).finish()
