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
   bytes are in device memory, as for GPU pools: `validate(..., verify_checksum=False)`).

A block that fails is a miss, and so is every block after it (prefix semantics). It uses the client's and the shm
endpoint's internals (`_conn`, `endpoint._map`): an optimisation of one transport, kept in one place, with the
plain `get`/`read` path as the fallback whenever anything here does not apply.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from rdmapool import block
from rdmapool.errors import CorruptBlock, ServerUnavailable, TransportError

_MISS = (CorruptBlock, ServerUnavailable, TransportError, OSError, KeyError, AttributeError)


def supported(pool: Any) -> bool:
    return getattr(pool, "_transport_name", None) == "shm" and hasattr(pool, "_conn")


def _remote(endpoint: Any, rkey: int) -> Any:
    rem = endpoint._remotes.get(rkey)
    return rem if rem is not None else endpoint._map(rkey)


def read_direct(pool: Any, refs: list, dst: torch.Tensor) -> int:
    """Copy the payloads of `refs` (from the pool's `lookup_prefix`) into rows of `dst` (uint8 `[n, >= length]`,
    any device). Returns how many leading blocks arrived intact."""
    pending = []
    with pool._lock:
        now = pool.clock()
        for i, ref in enumerate(refs):
            try:
                if now >= ref.lease_until:
                    break
                conn = pool._conn(ref.server)
                conn.ensure()
                if ref.epoch != int(conn.hello.get("epoch", -1)):
                    break
                rem = _remote(conn.endpoint, ref.hit.rkey)
                start = ref.hit.addr - rem.addr
                total = block.HEADER_SIZE + ref.length + block.TRAILER_SIZE
                if start < 0 or ref.hit.addr + total > rem.end:
                    break
                mm = rem.seg.mm
                head = bytes(mm[start:start + block.HEADER_SIZE])
                with warnings.catch_warnings():  # a read-only mapping: torch warns that it is not writable
                    warnings.simplefilter("ignore", UserWarning)
                    src = torch.frombuffer(mm, dtype=torch.uint8, count=ref.length,
                                           offset=start + block.HEADER_SIZE)
                dst[i, : ref.length].copy_(src, non_blocking=True)
                pending.append((ref, mm, start, head, src))
            except _MISS:
                break
        if dst.device.type == "cuda":
            torch.cuda.current_stream(dst.device).synchronize()
        good = 0
        for ref, mm, start, head, _src in pending:
            at = start + block.HEADER_SIZE + ref.length
            tail = bytes(mm[at:at + block.TRAILER_SIZE])
            try:
                block.validate(head, None, tail, block.Expected(ref.key, ref.hit.generation, ref.length), False)
            except CorruptBlock:
                pool.counters.add("corrupt_blocks")
                break
            good += 1
        pool.counters.add("bytes_read", sum(r.length for r, *_ in pending[:good]))
        return good
