"""Payload checksums off the critical path: large payloads are hashed on worker threads.

The workers are native threads (`rdmapool._hashpool`) that never take the GIL: a payload's buffer is pinned
when it is submitted, a worker publishes the digest with one atomic store, and the caller polls `done()` for
free or waits with the GIL released. Python worker threads (the fallback, when the extension is not built)
took the GIL to start each hash, to set its future and to wake the waiter, and the caller's thread, which
drives the transport, queued behind them on every system call (docs/decisions.md). Either way a worker hashes
block i while the caller posts block i+1 or waits for the transport, so hashing overlaps the transfer instead
of adding to it. Small payloads are hashed inline (a hand-off costs more than the hash). Every result is
waited for with a timeout.
"""

from __future__ import annotations

import concurrent.futures
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from rdmapool.block import payload_checksum

try:
    from rdmapool import _hashpool
except ImportError:  # not built: Python worker threads
    _hashpool = None

#: payloads at least this large go to a worker thread
THREAD_MIN = 256 << 10


class PendingChecksum(Protocol):
    """A checksum being computed on a worker: `done()` never blocks (`Hasher.result` waits)."""

    def done(self) -> bool: ...


class _BatchItem:
    """Payload i of a native batch hashed on the workers (`Hasher.submit_many`)."""

    __slots__ = ("batch", "index")

    def __init__(self, batch: Any, index: int) -> None:
        self.batch, self.index = batch, index

    def done(self) -> bool:
        return self.batch.done(self.index)


class Hasher:
    def __init__(self, threads: int, native: bool = True) -> None:
        self.threads = threads
        self.native = native and _hashpool is not None
        self._pool: ThreadPoolExecutor | None = None
        self._started_in = 0  # the process that started the native pool (threads do not survive a fork)

    def submit(self, payload: Any) -> PendingChecksum | bytes:
        """The checksum now (small payload, or no threads) or a pending one."""
        if self.threads <= 0 or len(memoryview(payload)) < THREAD_MIN:
            return payload_checksum(payload)
        if self.native:
            self._start_native()
            return _hashpool.Batch((payload,))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="rdmapool-hash")
        return self._pool.submit(payload_checksum, payload)

    def submit_many(self, payloads: list) -> list[PendingChecksum | bytes]:
        """Checksums of several payloads, small ones included, in one hand-off to the native workers, which hash
        them in order, in parallel: one hand-off per small payload costs more than its hash, but this thread
        hashing a get's or put's every 64 KiB block in turn spent about a third of the call (docs/decisions.md).
        Without the native pool they are hashed here, now."""
        if self.threads <= 0 or not self.native or not payloads:
            return [payload_checksum(p) for p in payloads]
        self._start_native()
        batch = _hashpool.Batch(payloads)
        return [_BatchItem(batch, i) for i in range(len(payloads))]

    def _start_native(self) -> None:
        if self._started_in != os.getpid():
            _hashpool.start(self.threads)  # the process's pool grows to the largest client's count
            self._started_in = os.getpid()

    def submit_large(self, payload: Any) -> PendingChecksum | None:
        """`submit` for payloads that go to a worker; None for small ones (the caller hashes them when due)."""
        if self.threads <= 0 or len(memoryview(payload)) < THREAD_MIN:
            return None
        return self.submit(payload)  # type: ignore[return-value]

    @staticmethod
    def result(value: PendingChecksum | bytes, timeout: float) -> bytes:
        """Raises TimeoutError when the hash did not finish in time."""
        if isinstance(value, bytes):
            return value
        if isinstance(value, _BatchItem):
            return value.batch.wait(value.index, max(timeout, 0.0))
        if isinstance(value, Future):
            try:
                return value.result(timeout=max(timeout, 0.0))
            except concurrent.futures.TimeoutError:
                raise TimeoutError("payload checksum did not finish in time") from None
        return value.wait(0, max(timeout, 0.0))  # a native Batch: TimeoutError of its own

    def close(self) -> None:
        """Python workers are joined; the native pool's threads serve every client of the process and stay."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
