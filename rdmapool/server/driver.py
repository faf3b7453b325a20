"""The memory server process: allocates and registers the pool, then drives `ServerSession`s over TCP.

Theory of operation
-------------------
`MemoryServer.start()` allocates one region per tenant through the transport (one registration each, hugepages
where the backend can), builds the `PoolCore`, binds the control port and runs one selector thread. That thread
owns every control socket (non-blocking), feeds bytes to each connection's sans-IO session, writes replies back,
sweeps expiries every `tick_s`, and closes connections that misbehave, stall or idle: a bad peer costs only its
own connection. One lock serialises the core between this thread and metrics scrapes. The server never reads or
writes block bytes: clients move them with one-sided operations on the transport.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable

from rdmapool.config import WILDCARD_HOSTS, ServerConfig, advertised_host, format_size
from rdmapool.errors import UsageError
from rdmapool.server.core import PoolCore
from rdmapool.server.protocol import Handler, ServerInfo, ServerSession, SessionState
from rdmapool.transport.base import MemoryKind, MemoryRegion, Transport

log = logging.getLogger(__name__)

READ_CHUNK = 256 << 10
MAX_CONNECTIONS = 1024
#: refused clients (bad token, malformed requests) are logged at most once per this many seconds
REFUSAL_LOG_S = 10.0
#: queued access reports are applied once no request has come for ACCESS_IDLE_S, then a chunk at a time until
#: the next request (which waits for at most one chunk); beyond ACCESS_BACKLOG_MAX at once (the core queues at
#: most one report per resident slot, so only a pool of more resident slots than this reaches it). Not while
#: requests keep coming: a loop that spent every gap between requests on the policy was always runnable, and
#: the scheduler then made it wait behind other processes (lookup p99 0.9-4.7 ms vs 0.35 ms; docs/decisions.md)
ACCESS_IDLE_S = 0.0005
ACCESS_CHUNK = 16  # ~13 us of the default policy here
ACCESS_BACKLOG_MAX = 1 << 18


def prefault(region: MemoryRegion) -> None:
    """Touch every page of a fresh host region once, at start, so the first block written into each slot does
    not pay for page faults and zeroing on the server (RDMA registration pins pages the same way). This writes
    zeros into memory that holds no block yet: the server still never touches block bytes."""
    if region.view is None:
        return
    import numpy as np

    np.frombuffer(region.view, dtype=np.uint8)[::4096] = 0


class _Conn:
    __slots__ = ("sock", "session", "out", "last_active", "opened", "peer", "transport_sessions", "events")

    def __init__(self, sock: socket.socket, session: ServerSession, now: float, peer: str) -> None:
        self.sock = sock
        self.session = session
        self.out = bytearray()
        self.events = selectors.EVENT_READ  # what the selector waits for on this socket
        self.last_active = self.opened = now
        self.peer = peer
        #: handshakes this client's `accept` ops opened in the transport (verbs queue pairs), released on close
        self.transport_sessions: list[int] = []


class MemoryServer:
    """start() -> ServerInfo; stop() releases everything. Usable as a context manager."""

    def __init__(self, config: ServerConfig, transport: Transport | None = None,
                 clock: Callable[[], float] = time.monotonic, server_id: str | None = None) -> None:
        self.config = config
        self.clock = clock
        self.server_id = server_id or uuid.uuid4().hex[:12]
        self._transport = transport
        self._own_transport = transport is None
        self.regions: dict[str, MemoryRegion] = {}
        self.core: PoolCore | None = None
        self.handler: Handler | None = None
        self.lock = threading.Lock()
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._conns: dict[int, _Conn] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: why the serving loop ended on its own (None while it serves or after a clean stop)
        self.failure: BaseException | None = None
        self._wake_r, self._wake_w = -1, -1
        self._servicing: _Conn | None = None
        self._refusal_log_at, self._refusals_unlogged = 0.0, 0  # see `_log_refusal`
        # every connection's bytes are received into this one buffer (the loop is one thread; sessions copy what
        # they keep): `recv(n)` allocated n bytes per read
        self._rbuf = bytearray(READ_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._metrics = None
        self.info: ServerInfo | None = None
        self.started_at = 0.0

    # ---- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> ServerInfo:
        if self._thread is not None:
            raise UsageError("server already started")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self.info

    def _start(self) -> None:
        from rdmapool import transport as transports

        cfg = self.config
        advertise = advertised_host(cfg.host, cfg.advertise)  # what clients are told: never 0.0.0.0
        if cfg.memory == "host" and cfg.prefault:
            check_host_memory(sum(t.quota for t in cfg.tenants))
        if self._transport is None:
            options = dict(cfg.transport_options)
            if cfg.transport == "tcp" and options.get("host") in WILDCARD_HOSTS:
                options.setdefault("advertise", advertise)
            try:
                self._transport = transports.create(cfg.transport, **options)
            except OSError as exc:
                where = f" on {cfg.transport_options['host']}" if "host" in cfg.transport_options else ""
                if cfg.transport_options.get("port"):
                    where += f" port {cfg.transport_options['port']}"
                raise UsageError(f"cannot start the {cfg.transport} transport{where}: {exc.strerror or exc}") from None
        for tenant in cfg.tenants:
            if cfg.memory == "cuda":
                from rdmapool.server.gpumem import allocate_cuda

                self.regions[tenant.name] = allocate_cuda(self._transport, tenant.quota)
            else:
                try:
                    self.regions[tenant.name] = self._transport.allocate(tenant.quota, MemoryKind.HOST)
                except (OSError, MemoryError) as exc:
                    raise UsageError(f"cannot allocate tenant {tenant.name}'s pool of {tenant.quota} bytes: "
                                     f"{getattr(exc, 'strerror', None) or exc or type(exc).__name__}") from None
                if cfg.prefault:
                    prefault(self.regions[tenant.name])
        epoch = int.from_bytes(os.urandom(4), "little") | 1
        self.core = PoolCore(cfg, {n: r.descriptor for n, r in self.regions.items()}, epoch=epoch)
        for name, pool in self.core.tenants.items():
            dropped = [c for c in cfg.size_classes if c not in {k.layout.capacity for k in pool.classes}]
            if dropped:
                log.warning("tenant %s: size classes %s get no slot in its %s quota (split %d ways); blocks of "
                            "those sizes are refused as too big or go to a larger class", name,
                            ",".join(map(format_size, dropped)), format_size(pool.region.length),
                            len(cfg.size_classes))
        self.core.defer_access = True  # replies first, eviction-policy bookkeeping after (flushed in _loop)
        # one Slot record per slot lives as long as the server: keep them out of the cyclic GC's full scans,
        # which otherwise pause the loop for tens of ms on a pool of a million slots (lookup p99)
        gc.collect()
        gc.freeze()
        try:
            self._listener = socket.create_server((cfg.host, cfg.port), backlog=128)
        except OSError as exc:
            raise UsageError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
        self._listener.setblocking(False)
        port = self._listener.getsockname()[1]
        self.info = ServerInfo(self.server_id, advertise, port, self._transport.name, epoch,
                               self._transport.peer_info(), None, sum(t.quota for t in cfg.tenants))
        self.handler = Handler(self.core, cfg, self.info)
        if hasattr(self._transport, "accept"):
            self.handler.ops["accept"] = self._accept_transport
        if cfg.metrics_port is not None:
            from rdmapool.server.metrics import MetricsServer

            try:
                self._metrics = MetricsServer(self, cfg.metrics_host, cfg.metrics_port)
            except OSError as exc:
                raise UsageError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: "
                                 f"{exc.strerror or exc}") from None
            self.info = ServerInfo(**{**self.info.to_dict(), "metrics_port": self._metrics.port})
            self.handler.info = self.info
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._loop, name=f"rdmapool-server-{self.server_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close every connection, deregister the pool, close the transport. Idempotent."""
        self._stop.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for conn in list(self._conns.values()):
            self._close(conn)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._transport is not None:
            for region in self.regions.values():
                with contextlib.suppress(Exception):
                    self._transport.deregister(region)
            if self._own_transport:
                self._transport.close()
        self.regions.clear()

    def __enter__(self) -> MemoryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.info.host}:{self.info.port}"

    def snapshot(self) -> dict:
        """For scrapes: exact counts under the lock; leased slots by a scan outside it (approximate while
        the loop runs, never stalling it for the length of the scan)."""
        now = self.clock()
        with self.lock:
            snap = self.core.snapshot(now, count_leases=False)
            connections = len(self._conns)
        for pool, t in zip(self.core.tenants.values(), snap["tenants"].values(), strict=True):
            for cls, c in zip(pool.classes, t["classes"], strict=True):
                c["leased"] = cls.leased(now)
        return {"server": self.info.to_dict(), "connections": connections, **snap}

    def _accept_transport(self, tenant: str, msg: dict, now: float) -> dict:
        request = msg.get("request")
        if not isinstance(request, dict):
            from rdmapool.errors import ProtocolError

            raise ProtocolError("accept: field 'request' must be a map")
        reply = self._transport.accept(request)
        # The transport's per-client state (verbs queue pairs) lives as long as this control connection: the
        # loop is single-threaded, so the connection being serviced is the one that asked.
        session = reply.get("session") if isinstance(reply, dict) else None
        if isinstance(session, int) and self._servicing is not None:
            self._servicing.transport_sessions.append(session)
        return {"reply": reply}

    # ---- the selector loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        """The serving loop; should it ever fail (a bug of ours outside any one connection), `failure` says why
        and `rdmapool server` exits non-zero instead of living on without serving."""
        try:
            self._serve()
        except BaseException as exc:
            self.failure = exc
            log.critical("server loop failed; the server stops serving", exc_info=True)

    def _serve(self) -> None:
        cfg = self.config
        next_sweep = 0.0
        draining = False  # idle for ACCESS_IDLE_S with reports queued: apply them until a request comes
        while not self._stop.is_set():
            backlog = self.core.access_backlog
            events = self._sel.select(timeout=(0 if draining else ACCESS_IDLE_S) if backlog else cfg.tick_s)
            draining = bool(backlog) and not events
            for key, mask in events:
                if key.data is None:
                    self._accept()
                elif key.data == "wake":
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                else:
                    try:
                        self._service(key.data, mask)
                    except Exception:  # a bug of ours: that client's connection ends, the loop goes on
                        log.exception("internal error servicing %s; closing its connection", key.data.peer)
                        self.core.counters["internal_errors"] += 1
                        with contextlib.suppress(Exception):
                            self._close(key.data)
            backlog = self.core.access_backlog
            if backlog and (draining or backlog > ACCESS_BACKLOG_MAX):
                # the lookups' access reports for the eviction policy, now that their replies are out: a chunk
                # at a time while idle; beyond the cap, the excess now
                with self.lock:
                    self.core.flush_access(ACCESS_CHUNK + max(0, backlog - ACCESS_BACKLOG_MAX))
            now = self.clock()
            if now >= next_sweep:
                with self.lock:
                    self.core.sweep(now)
                for conn in list(self._conns.values()):
                    if now - conn.last_active > cfg.idle_timeout_s:
                        self._close(conn)
                    elif conn.session.state is SessionState.AWAIT_HELLO and now - conn.opened > cfg.hello_timeout_s:
                        self.core.counters["hello_timeouts"] += 1  # connections cost nothing to open: a
                        self._close(conn)  # client gets hello_timeout_s to authenticate, not idle_timeout_s
                next_sweep = now + cfg.tick_s

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(self._conns) >= MAX_CONNECTIONS and not self._close_oldest_unauthenticated():
                self.core.counters["connections_refused"] += 1
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, ServerSession(self.handler), self.clock(), f"{peer[0]}:{peer[1]}")
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _log_refusal(self, conn: _Conn) -> None:
        """A client refused (bad token, malformed request) is told why in its error reply; the operator sees it
        here, at most once per `REFUSAL_LOG_S` so a flood of bad clients cannot flood the log."""
        now = self.clock()
        if now < self._refusal_log_at:
            self._refusals_unlogged += 1
            return
        more = f" ({self._refusals_unlogged} more refused since the last report)" if self._refusals_unlogged else ""
        log.warning("refused %s: %s%s", conn.peer, conn.session.close_reason, more)
        self._refusal_log_at, self._refusals_unlogged = now + REFUSAL_LOG_S, 0

    def _close_oldest_unauthenticated(self) -> bool:
        """At the connection limit, room for a newcomer: the oldest connection still waiting for its `hello`
        goes (so connections opened and left silent cannot lock authenticated clients out). False if none."""
        waiting = [c for c in self._conns.values() if c.session.state is SessionState.AWAIT_HELLO]
        if not waiting:
            return False
        self.core.counters["hello_timeouts"] += 1
        self._close(min(waiting, key=lambda c: c.opened))
        return True

    def _service(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ and not conn.out:
            try:
                n = conn.sock.recv_into(self._rbuf)
            except (BlockingIOError, InterruptedError):
                n = None
            except OSError:
                self._close(conn)
                return
            if n == 0:
                conn.session.eof()
                self._close(conn)
                return
            if n:
                now = self.clock()
                conn.last_active = now
                with self.lock:
                    self._servicing = conn
                    try:
                        reply = conn.session.receive(self._rview[:n], now)
                    finally:
                        self._servicing = None
                if reply:
                    # sent from the reply itself; only what the socket does not take now is buffered
                    try:
                        sent = conn.sock.send(reply)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        self._close(conn)
                        return
                    conn.out += memoryview(reply)[sent:]
        elif conn.out:
            try:
                sent = conn.sock.send(conn.out)
                del conn.out[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(conn)
                return
        if conn.session.closed and not conn.out:
            self._close(conn)
            return
        # while replies are pending, wait for writability and stop reading (backpressure on a slow reader)
        events = selectors.EVENT_WRITE if conn.out else selectors.EVENT_READ
        if events != conn.events:  # a system call: only when it changes (a reply sent whole does not)
            conn.events = events
            with contextlib.suppress(KeyError, ValueError):
                self._sel.modify(conn.sock, events, conn)

    def _close(self, conn: _Conn) -> None:
        if conn.session.close_reason.startswith(("AuthError", "ProtocolError")):
            self._log_refusal(conn)
        self._conns.pop(conn.sock.fileno(), None)
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
        conn.sock.close()
        release = getattr(self._transport, "release", None)
        while conn.transport_sessions and release is not None:
            session = conn.transport_sessions.pop()
            try:
                release(session)
            except Exception as exc:  # a transport failing to free one client's QPs must not stop the server
                log.warning("releasing transport session %s of %s failed: %s", session, conn.peer, exc)


def memory_available() -> int | None:
    """Bytes of memory the kernel can give without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_host_memory(total: int) -> None:
    """Refuse quotas this host cannot hold. The pool is touched page by page at start (`prefault`), so a quota
    beyond the available memory would not fail cleanly: it would drive the host into swap or its OOM killer,
    which may kill other processes (a 1 TiB shm quota on a 24 GiB host did)."""
    available = memory_available()
    if available is not None and total > available:
        raise UsageError(f"the tenants' quotas total {total} bytes ({total / 2**30:.1f} GiB), more than the "
                         f"{available / 2**30:.1f} GiB of memory available on this host (MemAvailable); "
                         "lower the quotas")
