"""Which server holds a key. Rendezvous (highest random weight) hashing: adding or removing a server moves
only the keys that must move. The router is replaceable: the membership layer supplies its own (shard map)
through the same two calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import xxhash

from rdmapool.config import ServerAddress
from rdmapool.errors import UsageError


class Router(Protocol):
    @property
    def servers(self) -> Sequence[ServerAddress]: ...

    def route(self, key: bytes) -> int:
        """Index into `servers` of the server that owns `key`."""
        ...


class RendezvousRouter:
    def __init__(self, servers: Sequence[ServerAddress]) -> None:
        self.set_servers(servers)

    @property
    def servers(self) -> Sequence[ServerAddress]:
        return self._servers

    def set_servers(self, servers: Sequence[ServerAddress]) -> None:
        if not servers:
            raise UsageError("a client needs at least one server")
        self._servers = tuple(servers)
        self._seeds = [xxhash.xxh3_64_intdigest(str(s).encode()) for s in self._servers]

    def route(self, key: bytes) -> int:
        if len(self._servers) == 1:
            return 0
        return max(range(len(self._seeds)), key=lambda i: xxhash.xxh3_64_intdigest(key, seed=self._seeds[i]))
