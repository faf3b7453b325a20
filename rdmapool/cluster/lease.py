"""Leases with our own keep-alive loop, and a local clock that says when a lease may already have expired.

Theory of operation
-------------------
A lease is a liveness hint, not a lock: etcd may expire it late (a leader change resets every lease's TTL) but
never early relative to the *grant or refresh request's send time*. So the holder's conservative view is
`expires_at = send time of the last successful refresh + granted TTL` on its own monotonic clock; past that
moment it must behave as if the lease were gone (a server stops accepting writes, a coordinator stops writing
maps). Correctness never rests on this: map writes are fenced by revisions in etcd; the local view only makes
a cut-off process stop early.

`LeaseClock` is the pure core (clock values passed in); `LeaseKeeper` is the thread that refreshes every
TTL/4 and records when refreshes fail or the lease is reported gone.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rdmapool.cluster.etcd import Etcd, LeaseNotFound
from rdmapool.errors import ServerUnavailable, UsageError


@dataclass
class LeaseClock:
    ttl: float
    expires_at: float = float("-inf")
    gone: bool = False  # etcd said the lease no longer exists

    def refreshed(self, sent_at: float, granted_ttl: float) -> None:
        if granted_ttl <= 0:
            self.gone = True
        else:
            self.expires_at = max(self.expires_at, sent_at + granted_ttl)

    def alive(self, now: float) -> bool:
        return not self.gone and now < self.expires_at


#: the shortest lease etcd keeps reliably with its default election timing (seconds)
MIN_TTL = 2


class LeaseKeeper:
    """Grant a lease and keep it alive from a daemon thread until `stop()` or until it is lost."""

    def __init__(self, etcd: Etcd, ttl: int, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < MIN_TTL:
            raise UsageError(f"lease TTL must be >= {MIN_TTL} s (etcd's floor with default election timing)")
        self.etcd = etcd
        self.ttl = ttl
        self.clock = clock
        self.state = LeaseClock(float(ttl))
        self.lease_id = 0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def grant(self) -> int:
        sent = self.clock()
        self.lease_id = self.etcd.lease_grant(self.ttl)
        self.state = LeaseClock(float(self.ttl))
        self.state.refreshed(sent, self.ttl)
        self.lost.clear()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.lease_id:x}", daemon=True)
        self._thread.start()
        return self.lease_id

    def alive(self) -> bool:
        return self.state.alive(self.clock())

    def _run(self) -> None:
        interval = self.ttl / 4
        while not self._stop.wait(interval):
            sent = self.clock()
            try:
                granted = self.etcd.lease_keepalive(self.lease_id)
            except LeaseNotFound:
                granted = 0
            except ServerUnavailable:
                granted = None
            if granted is not None:
                self.state.refreshed(sent, granted)
            if not self.state.alive(self.clock()):
                self.lost.set()
                return

    def stop(self, revoke: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)
        if revoke and self.lease_id and not self.lost.is_set():
            with contextlib.suppress(ServerUnavailable):  # it expires on its own
                self.etcd.lease_revoke(self.lease_id)
        self.state.gone = True
