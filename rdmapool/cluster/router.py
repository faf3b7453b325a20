"""Client-side routing by the shard map: key -> the servers to write to and the order to read from.

Theory of operation
-------------------
The router mirrors two things from etcd: the members prefix (who is alive, their endpoints) and the map key.
`route(key)` gives the shard's replicas in map order, skipping servers that are not members any more (their
lease expired: the client reroutes as soon as it sees the deletion, before the coordinator rewrites the map)
and moving servers this client saw fail recently (`report_failure`, held down for `down_s`) to the end.
Writers write to every replica returned; readers try them in order and fail over on error.

Correctness does not depend on the map being current: blocks are content-addressed and validated on read, so a
stale or moved replica can only miss, never return wrong bytes. While etcd is down the mirrors keep their last
state, so routing continues on the last map seen.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rdmapool.cluster.coordinator import read_members
from rdmapool.cluster.etcd import Etcd
from rdmapool.cluster.keys import ClusterKeys
from rdmapool.cluster.membership import MemberRecord
from rdmapool.cluster.mirror import PrefixMirror
from rdmapool.cluster.shardmap import ShardMap
from rdmapool.errors import ProtocolError, ServerUnavailable


@dataclass(frozen=True, slots=True)
class Route:
    shard: int
    epoch: int
    #: healthy replicas in map order, then replicas this client saw fail recently
    replicas: tuple[MemberRecord, ...]


class ShardRouter:
    def __init__(self, etcd: Etcd, keys: ClusterKeys, down_s: float = 2.0, idle_timeout: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.etcd, self.keys, self.down_s, self.clock = etcd, keys, down_s, clock
        self._members = PrefixMirror(etcd, keys.members, idle_timeout)
        self._map_mirror = PrefixMirror(etcd, keys.shard_map, idle_timeout)
        self._lock = threading.Lock()
        self._down: dict[str, float] = {}
        self._cache: tuple[int, int, ShardMap | None, dict[str, MemberRecord]] = (-1, -1, None, {})

    def start(self, timeout: float = 10.0) -> ShardRouter:
        self._members.start(timeout)
        self._map_mirror.start(timeout)
        return self

    def stop(self) -> None:
        self._members.stop()
        self._map_mirror.stop()

    @property
    def connected(self) -> bool:
        return self._members.connected and self._map_mirror.connected

    def _view(self) -> tuple[ShardMap | None, dict[str, MemberRecord]]:
        mv, pv = self._members.version, self._map_mirror.version
        c = self._cache
        if (c[0], c[1]) == (mv, pv):
            return c[2], c[3]
        kvs, _, mv = self._members.snapshot()
        members = {m.id: m for m in read_members(kvs, self.keys)}
        mkvs, _, pv = self._map_mirror.snapshot()
        smap = self._cache[2]
        kv = mkvs.get(self.keys.shard_map)
        if kv is not None:
            with contextlib.suppress(ProtocolError):  # keep the last good map
                smap = ShardMap.decode(kv.value)
        self._cache = (mv, pv, smap, members)
        return smap, members

    @property
    def shard_map(self) -> ShardMap | None:
        return self._view()[0]

    def members(self) -> dict[str, MemberRecord]:
        return dict(self._view()[1])

    def route(self, key: bytes | int) -> Route:
        smap, members = self._view()
        if smap is None:
            raise ServerUnavailable("no shard map yet (no coordinator has written one)")
        shard = smap.shard_of(key)
        now = self.clock()
        healthy, down = [], []
        with self._lock:
            for sid in smap.replicas_of_shard(shard):
                m = members.get(sid)
                if m is None:
                    continue  # lease expired: not a member any more
                (down if self._down.get(sid, 0.0) > now else healthy).append(m)
        return Route(shard, smap.epoch, tuple(healthy + down))

    def down_now(self) -> frozenset[str]:
        """Members this client saw fail within `down_s` (cheap when none)."""
        if not self._down:
            return frozenset()
        now = self.clock()
        with self._lock:
            for sid in [s for s, until in self._down.items() if until <= now]:
                del self._down[sid]
            return frozenset(self._down)

    def report_failure(self, member_id: str) -> None:
        with self._lock:
            self._down[member_id] = self.clock() + self.down_s

    def report_success(self, member_id: str) -> None:
        with self._lock:
            self._down.pop(member_id, None)

    def wait_epoch(self, epoch: int, timeout: float) -> bool:
        deadline = self.clock() + timeout
        while True:
            smap = self.shard_map
            if smap is not None and smap.epoch >= epoch:
                return True
            left = deadline - self.clock()
            if left <= 0:
                return False
            self._map_mirror.wait_changed(self._map_mirror.version, min(left, 0.5))
