"""The pool client: `PoolClient` (batched put / lookup_prefix / get / read / delete), its routing, control
connections, registered buffers and counters."""

from rdmapool.client.buffers import RegionSlice
from rdmapool.client.client import BlockRef, LookupResult, PoolClient, PutStatus
from rdmapool.client.routing import RendezvousRouter, Router
from rdmapool.server.slots import BlockHint

__all__ = ["BlockHint", "BlockRef", "LookupResult", "PoolClient", "PutStatus", "RegionSlice", "RendezvousRouter", "Router"]
