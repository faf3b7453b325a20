"""TEST DOUBLE: an in-memory stand-in for the memory-pool client, for unit tests of the KV layer only.

It keeps blocks in a dict per tenant and implements the `KVPool` calls with the client's semantics (batched,
16-byte keys, lookups stop at the first missing key, tenant from the constructor as the client takes it from its
auth token). It has no transport, no server and no eviction: the demo and the integration tests never use it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class FakePool:
    def __init__(self, tenant: str = "t0", store: dict | None = None) -> None:
        self.tenant = tenant
        self.store: dict[tuple[str, bytes], bytes] = {} if store is None else store
        self.calls: list[tuple[str, int]] = []

    def for_tenant(self, tenant: str) -> FakePool:
        """Another client of the same pool, authenticated as `tenant`."""
        return FakePool(tenant, self.store)

    @staticmethod
    def _check(keys: Sequence[bytes]) -> None:
        for k in keys:
            if not isinstance(k, bytes) or len(k) != 16:
                raise ValueError("keys are 16 bytes")

    def put(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> None:
        self._check(keys)
        self.calls.append(("put", len(keys)))
        for k, buf in zip(keys, buffers, strict=True):
            self.store.setdefault((self.tenant, k), bytes(memoryview(buf).cast("B")))

    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        self._check(keys)
        self.calls.append(("lookup_prefix", len(keys)))
        n = 0
        for k in keys:
            if (self.tenant, k) not in self.store:
                break
            n += 1
        return n

    def get(self, keys: Sequence[bytes], into: Sequence[Any]) -> list[bool]:
        self._check(keys)
        self.calls.append(("get", len(keys)))
        ok = []
        for k, buf in zip(keys, into, strict=True):
            data = self.store.get((self.tenant, k))
            view = memoryview(buf).cast("B")
            if data is None or len(data) != len(view):
                ok.append(False)
                continue
            view[:] = data
            ok.append(True)
        return ok

    def delete(self, keys: Sequence[bytes]) -> None:
        for k in keys:
            self.store.pop((self.tenant, k), None)
