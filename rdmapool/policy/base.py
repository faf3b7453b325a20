"""The eviction-policy interface that memory servers and the trace simulator share (the same objects).

Theory of operation
-------------------
A policy tracks the keys of resident blocks and answers "which one goes next?". It is pure: no sockets, no
clock of its own (time is passed in), O(1) or O(log n) per call, no scan over every entry per eviction.

With one-sided reads a server never sees reads; it learns about accesses only from `lookup` (a read lease
granted) and `touch` (clients' access reports). Those arrive here as `on_access`.

Call order, as the server and the simulator drive it:
- `admit(info, now)` before inserting when the pool is full: False bypasses the newcomer (admission filter).
- `on_insert(info, now)` once a block is committed (resident).
- `on_access(key, now)` on each lookup hit or touch.
- `victim(now)` names the next key to evict, or None when nothing is tracked. It does not remove the key: the
  owner calls `on_remove(key)` once the block is really gone. A caller that cannot evict the named key right
  now (it is leased) calls `on_access(key, now)` to move it out of the way and asks again, a bounded number
  of times.
- `on_remove(key)` when a block leaves for any reason (evicted, deleted, expired).

`now` is in seconds (any epoch; only differences matter). Policies never learn the pool's capacity: those that
size internal segments (W-TinyLFU's window, S3-FIFO's small queue, ARC's ghosts) size them against the largest
number of keys they have tracked, which is the capacity once the pool has filled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import NamedTuple

Key = Hashable


class BlockInfo(NamedTuple):
    """What a server knows of a block when it becomes resident. (A NamedTuple: the server builds one per
    commit, at half a dataclass's cost.)"""

    key: Key
    size: int = 1
    #: key of the previous block in the prefix chain (None for a chain's first block or when unknown)
    parent: Key | None = None
    #: position in the chain, 0 for the first block (-1 when unknown)
    depth: int = -1
    tenant: str = ""
    #: tokens the block holds (a chain's last block is often partial); 0 when unknown
    tokens: int = 0


class EvictionPolicy(ABC):
    name: str = "abstract"

    def admit(self, info: BlockInfo, now: float) -> bool:
        """Is the newcomer worth more than what it would displace? Default: always admit."""
        return True

    @abstractmethod
    def on_insert(self, info: BlockInfo, now: float) -> None: ...

    @abstractmethod
    def on_access(self, key: Key, now: float) -> None: ...

    @abstractmethod
    def on_remove(self, key: Key) -> None: ...

    @abstractmethod
    def victim(self, now: float) -> Key | None: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def __contains__(self, key: Key) -> bool:
        raise NotImplementedError
