"""Our etcd interface: the few operations rdmapool's control plane needs, independent of any client library.

Theory of operation
-------------------
Everything the cluster layer does with etcd is one of: read a key or a prefix (with the store revision the read
saw), put or delete, a transaction whose compares are on revisions, leases (grant, one keep-alive round trip,
revoke: the keep-alive *loop* is ours, see `lease.py`), and a watch over a prefix that starts at a revision.
Watches here are plain streams that end loudly: a stream that breaks raises `EtcdUnavailable`, a start revision
that was compacted raises `WatchCompacted` (the caller re-lists and watches again from the list's revision).
Resuming and re-listing is done once, in `mirror.py`, not by each caller.

Errors: anything that means "etcd did not answer in time" is `EtcdUnavailable` (a `ServerUnavailable`), so the
pool degrades (keeps the last map) rather than fails. Why our own interface: see docs/decisions.md (cluster).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from rdmapool.errors import RdmapoolError, ServerUnavailable, UsageError


class EtcdUnavailable(ServerUnavailable):
    """No etcd member answered in time (or the answering member has no leader)."""


class WatchCompacted(RdmapoolError):
    """The watch's start revision is older than etcd's compacted history: re-list, then watch again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch start revision compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


class LeaseNotFound(RdmapoolError):
    """The lease named in a put or keep-alive no longer exists (it expired or was revoked)."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["put", "delete"]
    kv: KeyValue  # for deletes: key and mod_revision (the deletion's revision) only


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response: its events, and the store revision up to which this stream is complete."""

    revision: int
    events: tuple[Event, ...] = ()


CompareTarget = Literal["create", "mod", "version", "value", "lease"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """`target(key) op value`, e.g. Compare(b"/x", "mod", "==", 42). A missing key has revisions 0."""

    key: bytes
    target: CompareTarget
    op: CompareOp
    value: int | bytes

    def __post_init__(self) -> None:
        if self.target not in ("create", "mod", "version", "value", "lease"):
            raise UsageError(f"compare target must be create/mod/version/value/lease, got {self.target!r}")
        if self.op not in ("==", "!=", "<", ">"):
            raise UsageError(f"compare op must be ==, !=, < or >, got {self.op!r}")


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    key: bytes
    prefix: bool = False


Op = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    #: one entry per op of the branch that ran: list[KeyValue] for a Get, None otherwise
    results: tuple[list[KeyValue] | None, ...] = field(default=())


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix`."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"


class WatchStream(ABC):
    """An open watch. Iterate for batches; `close()` may be called from another thread."""

    @abstractmethod
    def __iter__(self) -> Iterator[WatchBatch]: ...

    @abstractmethod
    def close(self) -> None: ...


class Etcd(ABC):
    """The operations rdmapool uses. Implementations must be safe to call from several threads."""

    @abstractmethod
    def get(self, key: bytes) -> tuple[KeyValue | None, int]:
        """The key (or None) and the store revision of the read."""

    @abstractmethod
    def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under `prefix`, sorted by key, and the store revision of the read (watch from +1)."""

    @abstractmethod
    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Returns the revision of the write."""

    @abstractmethod
    def delete(self, key: bytes, prefix: bool = False) -> int:
        """Returns the revision after the delete."""

    @abstractmethod
    def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """All compares hold -> run `success`, else `failure`; atomically."""

    @abstractmethod
    def lease_grant(self, ttl: int) -> int:
        """A new lease id with `ttl` seconds (etcd's floor is ~2 s with default timing)."""

    @abstractmethod
    def lease_keepalive(self, lease_id: int) -> int:
        """Refresh once; returns the TTL granted, or <= 0 when the lease no longer exists."""

    @abstractmethod
    def lease_revoke(self, lease_id: int) -> None:
        """Delete the lease and every key attached to it."""

    @abstractmethod
    def watch_prefix(self, prefix: bytes, start_revision: int, idle_timeout: float) -> WatchStream:
        """Stream of changes under `prefix` from `start_revision` on. Iterating ends by raising:
        `WatchCompacted`, or `EtcdUnavailable` when the stream breaks, its member loses its leader, or it stays
        silent for `idle_timeout` seconds (members send progress notifications while idle)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent."""

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
