"""A local, always-readable copy of an etcd prefix, kept current by a resumable watch.

Theory of operation
-------------------
List the prefix (remember the list's revision), then watch from revision + 1 and apply events. When the watch
breaks (member died, etcd restarted, silence past the idle timeout), watch again from the last revision this
mirror is complete up to: the last event's mod revision, or a progress notification's header revision. If
that revision was compacted meanwhile, etcd says so (`WatchCompacted`) and the mirror re-lists. While etcd is
unreachable the mirror keeps serving its last state (`connected` is False): clients keep routing by the last
map they saw. Readers wait for changes with `wait_changed(version, timeout)`; no callbacks run in our thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rdmapool.cluster.etcd import Etcd, KeyValue, WatchCompacted
from rdmapool.errors import ServerUnavailable


class PrefixMirror:
    def __init__(self, etcd: Etcd, prefix: bytes, idle_timeout: float = 3.0, retry_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.idle_timeout = idle_timeout
        self.retry_s = retry_s
        self.clock = clock
        self._state: dict[bytes, KeyValue] = {}
        self._revision = 0
        self._version = 0  # bumps on every change of _state
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._watch = None
        self._thread: threading.Thread | None = None
        self.connected = False
        self.listed = threading.Event()
        self.relists = 0  # lists after the first (compaction)
        self.reconnects = 0

    def start(self, timeout: float = 10.0) -> PrefixMirror:
        self._thread = threading.Thread(target=self._run, name=f"mirror-{self.prefix!r}", daemon=True)
        self._thread.start()
        if timeout and not self.listed.wait(timeout):
            raise ServerUnavailable(f"could not list {self.prefix!r} from etcd within {timeout}s")
        return self

    # -- readers ------------------------------------------------------------------------------------------
    def snapshot(self) -> tuple[dict[bytes, KeyValue], int, int]:
        """(key -> KeyValue, revision the copy is complete up to, change counter)."""
        with self._cond:
            return dict(self._state), self._revision, self._version

    @property
    def version(self) -> int:
        return self._version

    @property
    def revision(self) -> int:
        return self._revision

    def wait_changed(self, since_version: int, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._version != since_version or self._stop.is_set(), timeout)
            return self._version

    def wait_revision(self, revision: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._revision >= revision, timeout)

    # -- the thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    kvs, rev = self.etcd.get_prefix(self.prefix)
                    with self._cond:
                        if self.listed.is_set():
                            self.relists += 1
                        self._state = {kv.key: kv for kv in kvs}
                        self._revision = rev
                        self._version += 1
                        self._cond.notify_all()
                    self.listed.set()
                    need_list = False
                self._watch = self.etcd.watch_prefix(self.prefix, self._revision + 1, self.idle_timeout)
                if self._stop.is_set():
                    break
                for batch in self._watch:
                    self.connected = True
                    self._apply(batch)
            except WatchCompacted:
                need_list = True
            except ServerUnavailable:
                self.connected = False
                self.reconnects += 1
                self._stop.wait(self.retry_s)
            finally:
                w, self._watch = self._watch, None
                if w is not None:
                    w.close()

    def _apply(self, batch) -> None:
        with self._cond:
            if batch.events:
                for ev in batch.events:
                    if ev.kind == "put":
                        self._state[ev.kv.key] = ev.kv
                    else:
                        self._state.pop(ev.kv.key, None)
                self._revision = max(self._revision, max(ev.kv.mod_revision for ev in batch.events))
                self._version += 1
            else:  # progress notification: complete up to the header revision
                self._revision = max(self._revision, batch.revision)
            self._cond.notify_all()

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.close()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.idle_timeout + 2)
