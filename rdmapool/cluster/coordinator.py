"""The coordinator: one elected process computes the shard map and writes it, fenced.

Theory of operation
-------------------
Election: a candidate creates the coordinator key attached to its own lease in a transaction that requires the
key not to exist (create revision 0). The winner's *fencing token* is the create revision of that key. Every
map write is one transaction with two compares:

    create_revision(coordinator key) == token     (I am still the coordinator that was elected)
    mod_revision(map key)            == base      (the map is still the one I computed from)

so a coordinator that lost its lease (paused, partitioned, or simply slow) can never overwrite a newer map,
even if it still believes it leads, and two coordinators that race produce exactly one winning map. After a
failed write the coordinator re-reads: if the token no longer matches it steps down, else it recomputes.

While leading, it mirrors the members prefix and the map key and recomputes the map whenever membership
changes (join, leave, lease expiry, drain, capacity change), from the previous table so that few shards move.
Candidates that lose watch the coordinator key and campaign again when it disappears. Any server can run one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rdmapool.cluster.etcd import Compare, Etcd, Get, Put
from rdmapool.cluster.keys import ClusterKeys
from rdmapool.cluster.lease import LeaseKeeper
from rdmapool.cluster.membership import MemberRecord
from rdmapool.cluster.mirror import PrefixMirror
from rdmapool.cluster.placement import place
from rdmapool.cluster.shardmap import ShardMap
from rdmapool.errors import ProtocolError, ServerUnavailable


@dataclass(frozen=True, slots=True)
class WriteResult:
    ok: bool
    revision: int  # the map's new mod revision when ok
    still_coordinator: bool


def write_map(etcd: Etcd, keys: ClusterKeys, new: ShardMap, base_revision: int, token: int) -> WriteResult:
    """The only way a map is written: fenced on the coordinator token and the previous map revision."""
    res = etcd.txn(
        [Compare(keys.coordinator, "create", "==", token), Compare(keys.shard_map, "mod", "==", base_revision)],
        [Put(keys.shard_map, new.encode())],
        [Get(keys.coordinator)],
    )
    if res.succeeded:
        return WriteResult(True, res.revision, True)
    coord = res.results[0] if res.results else []
    still = bool(coord) and coord[0].create_revision == token
    return WriteResult(False, 0, still)


def read_members(kvs: dict, keys: ClusterKeys) -> list[MemberRecord]:
    out = []
    for kv in sorted(kvs.values(), key=lambda kv: kv.key):
        try:
            out.append(MemberRecord.decode(kv.value))
        except ProtocolError:
            continue  # a bad record is ignored, not fatal
    return out


def compute_map(members: list[MemberRecord], previous: ShardMap | None, num_shards: int, replicas: int,
                coordinator: str, token: int, members_revision: int) -> ShardMap:
    prev = None
    if previous is not None and previous.num_shards == num_shards:
        prev = (previous.servers, previous.table)
    p = place([m.node() for m in members], num_shards, replicas, prev)
    # keep only servers that appear, so the map does not grow with every server ever seen
    used = np.unique(p.table[p.table >= 0])
    remap = np.full(len(p.ids) + 1, -1, dtype=np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    table = remap[np.where(p.table >= 0, p.table, len(p.ids))]
    epoch = (previous.epoch + 1) if previous is not None else 1
    return ShardMap(epoch, num_shards, replicas, tuple(p.ids[i] for i in used), table, coordinator, token,
                    members_revision)


class Coordinator:
    """Campaign, and while elected keep the map in line with membership. Runs one daemon thread."""

    def __init__(self, etcd: Etcd, keys: ClusterKeys, member_id: str, num_shards: int = 65536,
                 replicas: int = 2, ttl: int = 5, clock: Callable[[], float] = time.monotonic,
                 idle_timeout: float = 3.0) -> None:
        self.etcd, self.keys, self.member_id = etcd, keys, member_id
        self.num_shards, self.replicas, self.ttl, self.clock = num_shards, replicas, ttl, clock
        self.idle_timeout = idle_timeout
        self.token = 0
        self.leading = threading.Event()
        self.maps_written = 0
        self.fence_rejections = 0
        self.last_write_at = 0.0
        self._keeper: LeaseKeeper | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._members: PrefixMirror | None = None
        self._map: PrefixMirror | None = None
        self._coord: PrefixMirror | None = None
        self._computed: tuple[int, int, int] | None = None

    def start(self) -> Coordinator:
        self._members = PrefixMirror(self.etcd, self.keys.members, self.idle_timeout).start()
        self._map = PrefixMirror(self.etcd, self.keys.shard_map, self.idle_timeout).start()
        self._coord = PrefixMirror(self.etcd, self.keys.coordinator, self.idle_timeout).start()
        self._thread = threading.Thread(target=self._run, name=f"coordinator-{self.member_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, resign: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl + 5)
        if self._keeper is not None:
            self._keeper.stop(revoke=resign)
        for m in (self._members, self._map, self._coord):
            if m is not None:
                m.stop()
        self.leading.clear()

    # -- election -----------------------------------------------------------------------------------------
    def campaign(self) -> bool:
        keeper = LeaseKeeper(self.etcd, self.ttl, self.clock)
        lease = keeper.grant()
        res = self.etcd.txn([Compare(self.keys.coordinator, "create", "==", 0)],
                            [Put(self.keys.coordinator, self.member_id.encode(), lease=lease)],
                            [Get(self.keys.coordinator)])
        if not res.succeeded:
            keeper.stop(revoke=True)
            return False
        self._keeper = keeper
        self.token = res.revision  # the coordinator key's create revision
        self.leading.set()
        return True

    def _step_down(self) -> None:
        self.leading.clear()
        if self._keeper is not None:
            self._keeper.stop(revoke=True)
            self._keeper = None
        self.token = 0

    # -- main loop ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.leading.is_set():
                    coord_kvs, _, cv = self._coord.snapshot()
                    if coord_kvs or not self.campaign():
                        self._coord.wait_changed(cv, 0.5)
                        continue
                self._lead_once()
            except ServerUnavailable:
                self._stop.wait(0.2)

    def _lead_once(self) -> None:
        keeper = self._keeper
        if keeper is None or keeper.lost.is_set() or not keeper.alive():
            self._step_down()
            return
        members_kvs, members_rev, mv = self._members.snapshot()
        map_kvs, _, mapv = self._map.snapshot()
        if (mv, mapv, self.token) == self._computed:
            self._members.wait_changed(mv, min(0.5, self.ttl / 4))
            return
        current, base = self._current_map(map_kvs)
        members = read_members(members_kvs, self.keys)
        # the map's geometry is fixed when the cluster's first map is written: a coordinator started with other
        # --shards/--replicas adopts it rather than reshuffling every shard
        shards, replicas = (current.num_shards, current.replicas) if current else (self.num_shards, self.replicas)
        new = compute_map(members, current, shards, replicas, self.member_id, self.token, members_rev)
        self._computed = (mv, mapv, self.token)
        if current is None or not new.same_placement(current):
            res = write_map(self.etcd, self.keys, new, base, self.token)
            if res.ok:
                self.maps_written += 1
                self.last_write_at = self.clock()
                self._map.wait_revision(res.revision, 2.0)
            else:
                self.fence_rejections += 1
                if not res.still_coordinator:
                    self._step_down()
                else:  # someone changed the map under us: wait for our mirror to see it, recompute
                    self._map.wait_changed(mapv, 1.0)
                self._computed = None
                return
        self._members.wait_changed(mv, min(0.5, self.ttl / 4))

    def _current_map(self, map_kvs: dict) -> tuple[ShardMap | None, int]:
        kv = map_kvs.get(self.keys.shard_map)
        if kv is None:
            return None, 0
        try:
            return ShardMap.decode(kv.value), kv.mod_revision
        except ProtocolError:
            return None, kv.mod_revision  # overwrite a corrupt map (still fenced on its revision)
