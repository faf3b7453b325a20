"""Payload checksums off the critical path: large payloads are hashed on worker threads.

xxhash releases the GIL while it hashes a large buffer, so a worker can hash block i while the caller's thread
posts block i+1 or waits (GIL released) for the transport to land the next READ: hashing overlaps the transfer
instead of adding to it. Small payloads are hashed inline (a thread hand-off costs more than the hash).
Every result is waited for with a timeout.
"""

from __future__ import annotations

import concurrent.futures
from concurrent.futures import Future, ThreadPoolExecutor

from rdmapool.block import payload_checksum

#: payloads at least this large go to a worker thread
THREAD_MIN = 256 << 10


class Hasher:
    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, payload: object) -> Future | bytes:
        """The checksum now (small payload, or no threads) or a future of it."""
        if self.threads <= 0 or len(memoryview(payload)) < THREAD_MIN:
            return payload_checksum(payload)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="rdmapool-hash")
        return self._pool.submit(payload_checksum, payload)

    def submit_large(self, payload: object) -> Future | None:
        """`submit` for payloads that go to a worker; None for small ones (the caller hashes them when due)."""
        if self.threads <= 0 or len(memoryview(payload)) < THREAD_MIN:
            return None
        return self.submit(payload)

    @staticmethod
    def result(value: Future | bytes, timeout: float) -> bytes:
        """Raises TimeoutError when the hash did not finish in time."""
        if isinstance(value, bytes):
            return value
        try:
            return value.result(timeout=max(timeout, 0.0))
        except concurrent.futures.TimeoutError:
            raise TimeoutError("payload checksum did not finish in time") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
