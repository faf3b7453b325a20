"""The pool client routed by the cluster's shard map: write to all R replicas, read from the first healthy one,
fail over on error.

Theory of operation
-------------------
`ClusterRouter` adapts `ShardRouter` (mirrors of membership and the map in etcd) to the client's `Router`
seam: `servers` are the members' control addresses, `route(key)` the first replica, and
`replicas(key)` every replica in preference order (members whose lease expired are gone; servers this client
saw fail recently come last). `ReplicatedPoolClient` is `PoolClient` with one more dimension, the replica rank:
its `_groups` (the seam through which `PoolClient` batches keys per server) groups by the rank-`r` replica.

- put: one pass per rank; a key is STORED if any replica stored it (statuses of the other passes are counted).
- lookup/get: rank 0 first; keys whose server failed (unreachable, marked down, transport error) are looked up
  on the next rank, and so on. A miss is a miss (it does not fail over): after a map change the new first
  replica may simply not hold the block yet; this is a cache.
- delete: every replica.

Reads are safe against every map race: a block is found by its content key and validated on read (key,
generation, checksum), so a replica that is stale, moved or half-written yields a miss, never wrong bytes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence

from xxhash import xxh3_64_intdigest

from rdmapool.client.client import BlockRef, PoolClient, PutStatus
from rdmapool.cluster.router import ShardRouter
from rdmapool.cluster.shardmap import key_hash
from rdmapool.config import ClientConfig, ServerAddress
from rdmapool.errors import ServerUnavailable, UsageError
from rdmapool.transport.base import Transport

_RANK = {PutStatus.STORED: 0, PutStatus.EXISTS: 1, PutStatus.FULL: 2, PutStatus.TOO_BIG: 3, PutStatus.FAILED: 4,
         PutStatus.UNAVAILABLE: 5}


class ClusterRouter:
    """`rdmapool.client.routing.Router` over the shard map, plus `replicas(key)`."""

    def __init__(self, shard_router: ShardRouter) -> None:
        self.shard_router = shard_router
        self._version: tuple[int, int] | None = None
        self._servers: tuple[ServerAddress, ...] = ()
        self._index: dict[str, int] = {}
        self._by_addr: dict[ServerAddress, str] = {}
        self._ids: tuple[str, ...] = ()
        self._rows: dict[int, tuple[int, ...]] = {}  # shard -> replica indices, filled lazily per view
        self._smap = None

    def _refresh(self) -> None:
        sr = self.shard_router
        version = (sr._members.version, sr._map_mirror.version)
        if version == self._version:
            return
        members = sr.members()
        addrs: list[ServerAddress] = []
        index, by_addr = {}, {}
        for mid in sorted(members):
            m = members[mid]
            if not m.control:
                continue
            try:
                addr = ServerAddress.parse(m.control)
            except UsageError:
                continue  # a record with a bad address is skipped, as a bad record is
            index[mid] = len(addrs)
            by_addr[addr] = mid
            addrs.append(addr)
        self._servers, self._index, self._by_addr, self._version = tuple(addrs), index, by_addr, version
        self._ids = tuple(sorted(index, key=index.__getitem__))
        self._rows = {}
        self._smap = sr.shard_map

    @property
    def servers(self) -> Sequence[ServerAddress]:
        self._refresh()
        return self._servers

    def replicas(self, key: bytes) -> tuple[int, ...]:
        """Indices into `servers` of the key's replicas: map order, members only, recently failed ones last."""
        self._refresh()
        smap = self._smap
        if smap is None:
            return ()
        shard = key_hash(key) % smap.num_shards
        row = self._rows.get(shard)
        if row is None:
            row = self._rows[shard] = tuple(self._index[s] for s in smap.replicas_of_shard(shard) if s in self._index)
        down = self.shard_router.down_now()
        if down and len(row) > 1:
            ids = self._ids
            row = tuple(i for i in row if ids[i] not in down) + tuple(i for i in row if ids[i] in down)
        return row

    def replicas_many(self, keys: Sequence[bytes]) -> dict[bytes, tuple[int, ...]]:
        """`replicas` for a batch (one view check, one down-set check): the client's per-call plan."""
        self._refresh()
        smap = self._smap
        if smap is None:
            return {k: () for k in keys}
        S, rows, index = smap.num_shards, self._rows, self._index
        down = self.shard_router.down_now()
        ids = self._ids
        out = {}
        for k in keys:
            shard = xxh3_64_intdigest(k) % S
            row = rows.get(shard)
            if row is None:
                row = rows[shard] = tuple(index[s] for s in smap.replicas_of_shard(shard) if s in index)
            if down and len(row) > 1:
                row = tuple(i for i in row if ids[i] not in down) + tuple(i for i in row if ids[i] in down)
            out[k] = row
        return out

    def route(self, key: bytes) -> int:
        reps = self.replicas(key)
        if not reps:
            return -1
        return reps[0]

    def member_of(self, addr: ServerAddress) -> str | None:
        return self._by_addr.get(addr)

    @property
    def replication(self) -> int:
        smap = self.shard_router.shard_map
        return smap.replicas if smap is not None else 1


class ReplicatedPoolClient(PoolClient):
    def __init__(self, router: ClusterRouter, config: ClientConfig, transport: Transport | None = None,
                 transport_name: str = "tcp", clock: Callable[[], float] | None = None) -> None:
        kwargs = {} if clock is None else {"clock": clock}
        super().__init__(router, config, transport=transport, transport_name=transport_name, **kwargs)
        self.cluster_router = router
        self._rank = 0
        self._failed: set[ServerAddress] = set()
        self._last_refs: list[BlockRef | None] = []
        self._plan: tuple[Sequence[ServerAddress], dict[bytes, tuple[int, ...]]] | None = None
        self._owned_router: ShardRouter | None = None  # made by `from_etcd`: stopped by `close`

    @classmethod
    def from_etcd(cls, etcd: Sequence[str], config: ClientConfig, cluster: str = "default",
                  transport_name: str = "tcp", min_servers: int = 1, timeout: float = 30.0) -> ReplicatedPoolClient:
        """The usual way in: mirror cluster `cluster`'s membership and shard map from the etcd endpoints (waiting,
        at most `timeout` s, until the map names at least `min_servers` servers) and route by them. `close()`
        also stops the mirrors."""
        from rdmapool.cluster.gateway import GatewayEtcd
        from rdmapool.cluster.keys import ClusterKeys

        if isinstance(etcd, str):
            raise UsageError(f"etcd must be a list of endpoints, got one str: write [{etcd!r}]")
        router = ShardRouter(GatewayEtcd(list(etcd)), ClusterKeys(cluster)).start(timeout)
        deadline = time.monotonic() + timeout
        while True:
            smap = router.shard_map
            if smap is not None and len(smap.servers) >= min_servers:
                break
            if time.monotonic() >= deadline:
                router.stop()
                raise ServerUnavailable(f"cluster {cluster!r}: the shard map in etcd did not name {min_servers} "
                                        f"server(s) within {timeout:g} s (are the servers started with --etcd "
                                        f"and --cluster {cluster}?)")
            time.sleep(0.05)
        client = cls(ClusterRouter(router), config, transport_name=transport_name)
        client._owned_router = router
        return client

    def close(self) -> None:
        super().close()
        router, self._owned_router = self._owned_router, None
        if router is not None:
            router.stop()

    # -- the seam: PoolClient batches keys per server through _groups ------------------------------------
    def _groups(self, keys: Sequence[bytes]) -> dict[ServerAddress, list[int]]:
        plan = self._plan
        if plan is None:  # a call that did not go through the replication below (e.g. touch): plan now
            plan = self._make_plan(keys)
        servers = plan[0]
        groups: dict[ServerAddress, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            reps = plan[1].get(key, ())
            if self._rank < len(reps):
                groups[servers[reps[self._rank]]].append(i)
        return groups

    def _make_plan(self, keys: Sequence[bytes]) -> tuple[Sequence[ServerAddress], dict[bytes, tuple[int, ...]]]:
        """One snapshot of servers and replica lists for a whole call: failures reported during the call
        reorder later routes, but must not move a key's rank-r replica between passes."""
        return self.cluster_router.servers, self.cluster_router.replicas_many(keys)

    def _degraded(self, conn, exc: Exception) -> None:
        self._failed.add(conn.address)
        member = self.cluster_router.member_of(conn.address)
        if member is not None:
            self.cluster_router.shard_router.report_failure(member)
        super()._degraded(conn, exc)

    def _passes(self, keys: Sequence[bytes]) -> int:
        self._plan = self._make_plan(keys)
        return max((len(r) for r in self._plan[1].values()), default=0)

    # -- replication ----------------------------------------------------------------------------------------
    def put(self, keys: Sequence[bytes], buffers: Sequence) -> list[PutStatus]:
        with self._lock:
            best: list[PutStatus] | None = None
            try:
                for rank in range(self._passes(keys)):
                    self._rank = rank
                    got = super().put(keys, buffers)
                    best = got if best is None else [min(a, b, key=_RANK.__getitem__) for a, b in zip(best, got,
                                                                                                    strict=True)]
            finally:
                self._rank, self._plan = 0, None
            return best if best is not None else super().put(keys, buffers)

    def _lookup(self, keys: list[bytes], prefix: bool) -> list[BlockRef | None]:
        refs: list[BlockRef | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        outer = self._plan is None
        try:
            passes = self._passes(keys)
            servers, plan = self._plan
            for rank in range(passes):
                if not todo:
                    break
                self._rank = rank
                self._failed = set()
                got = super()._lookup([keys[i] for i in todo], prefix)
                retry = []
                for i, ref in zip(todo, got, strict=True):
                    if ref is not None:
                        refs[i] = ref
                        continue
                    reps = plan.get(keys[i], ())
                    if rank + 1 < len(reps) and servers[reps[rank]] in self._failed:
                        retry.append(i)  # its server failed: try the next replica
                todo = retry
                if todo:
                    self.counters.add("replica_failovers", len(todo))
        finally:
            self._rank = 0
            if outer:
                self._plan = None
        self._last_refs = refs
        return refs

    def get(self, keys: Sequence[bytes], into: Sequence) -> list[int | None]:
        """As `PoolClient.get`, plus failover in the read phase: a key found on a server whose READ then failed
        (the server died between lookup and read) is looked up and read again on its other replicas."""
        with self._lock:
            out = super().get(keys, into)
            refs = self._last_refs
            retry = [i for i, (ref, n) in enumerate(zip(refs, out, strict=True)) if ref is not None and n is None]
            if retry:
                for addr in {refs[i].server for i in retry}:
                    member = self.cluster_router.member_of(addr)
                    if member is not None:  # suspect: route its keys elsewhere for down_s
                        self.cluster_router.shard_router.report_failure(member)
                sub = [keys[i] for i in retry]
                again = self._read(self._lookup([bytes(k) for k in sub], prefix=False), [into[i] for i in retry])
                for i, n in zip(retry, again, strict=True):
                    out[i] = n
                self.counters.add("replica_read_retries", len(retry))
            return out

    def delete(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            out = [False] * len(keys)
            try:
                for rank in range(self._passes(keys)):
                    self._rank = rank
                    out = [a or b for a, b in zip(out, super().delete(keys), strict=True)]
            finally:
                self._rank, self._plan = 0, None
            return out
