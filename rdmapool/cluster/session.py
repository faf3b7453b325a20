"""A memory server's membership: register under a lease, keep it alive, re-register after losing it.

Theory of operation
-------------------
`MembershipSession.start()` grants a lease and puts the server's record attached to it. From then on
`accepting_writes()` is the seam the server checks before taking a write: it is true only while this process
can be sure its lease is alive (local clock, see `lease.py`). A server cut off from etcd therefore stops
accepting writes no later than one TTL after its last successful refresh — about when etcd deletes its record
and the coordinator moves its shards — so clients with a stale map cannot keep filling a server that the rest
of the cluster has written off. When etcd is reachable again the session re-registers with a new lease (state
the record it last published), and the coordinator places shards on it again.

Events ("registered", "lost", "state") are queued; the owner drains them with `take_events()`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rdmapool.cluster.etcd import Etcd
from rdmapool.cluster.keys import ClusterKeys
from rdmapool.cluster.lease import LeaseKeeper
from rdmapool.cluster.membership import MemberRecord, MemberState
from rdmapool.errors import ServerUnavailable, UsageError


class MembershipSession:
    def __init__(self, etcd: Etcd, keys: ClusterKeys, record: MemberRecord, ttl: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.etcd = etcd
        self.keys = keys
        self.record = record
        self.ttl = ttl
        self.clock = clock
        self._keeper: LeaseKeeper | None = None
        self._events: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_count = 0

    # -- owner API ----------------------------------------------------------------------------------------
    def start(self) -> MembershipSession:
        if self._thread is not None:
            raise UsageError("membership session already started")
        self._register()
        self._thread = threading.Thread(target=self._run, name=f"member-{self.record.id}", daemon=True)
        self._thread.start()
        return self

    def accepting_writes(self) -> bool:
        k = self._keeper
        return k is not None and k.alive()

    @property
    def lease_id(self) -> int:
        return self._keeper.lease_id if self._keeper else 0

    def set_state(self, state: MemberState) -> None:
        self.record = self.record.with_state(state)
        if self._keeper is not None and self._keeper.alive():
            self.etcd.put(self.keys.member(self.record.id), self.record.encode(), lease=self._keeper.lease_id)
        self._emit("state", state)

    def update(self, record: MemberRecord) -> None:
        """Publish a changed record (e.g. capacity); the coordinator rebalances on it."""
        if record.id != self.record.id:
            raise UsageError("a session cannot change its member id")
        self.record = record
        if self._keeper is not None and self._keeper.alive():
            self.etcd.put(self.keys.member(record.id), record.encode(), lease=self._keeper.lease_id)
        self._emit("updated", record.capacity)

    def take_events(self) -> list[tuple[str, object]]:
        with self._lock:
            ev, self._events = self._events, []
            return ev

    def close(self, leave: bool = True) -> None:
        """Stop; `leave` revokes the lease, which deletes the record at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl + 2)
        if self._keeper is not None:
            self._keeper.stop(revoke=leave)

    # -- internals ----------------------------------------------------------------------------------------
    def _emit(self, kind: str, detail: object) -> None:
        with self._lock:
            self._events.append((kind, detail))

    def _register(self) -> None:
        keeper = LeaseKeeper(self.etcd, self.ttl, self.clock)
        lease = keeper.grant()
        try:
            self.etcd.put(self.keys.member(self.record.id), self.record.encode(), lease=lease)
        except Exception:
            keeper.stop(revoke=True)
            raise
        self._keeper = keeper
        self._emit("registered", lease)

    def _run(self) -> None:
        while not self._stop.is_set():
            keeper = self._keeper
            if keeper is not None and not keeper.lost.wait(0.1):
                continue
            if keeper is not None and self._keeper is keeper:
                self.lost_count += 1
                keeper.stop(revoke=False)
                self._emit("lost", keeper.lease_id)
                self._keeper = None
            try:
                self._register()
            except ServerUnavailable:
                self._stop.wait(min(1.0, self.ttl / 4))
