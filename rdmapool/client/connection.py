"""One control connection to one server (blocking socket, every wait bounded) plus its data endpoints.

Theory of operation
-------------------
`ServerConnection.call` sends one framed request and reads until the reply with its id arrives, within the
request timeout; `call_many` pipelines several requests (to one server) in one write. `send` / `receive` split
a call in two, so the caller can work (post WRITEs) while the server answers; replies come back in request order,
so a `call` made meanwhile first collects the replies still owed (kept for `receive`). Any failure (refused,
reset, timeout, malformed reply) closes the socket and the endpoint and raises `ServerUnavailable`; the next
call after `retry_after_s` reconnects, says `hello` again and connects a fresh transport endpoint (a restarted
server has a new epoch and new regions). Until then calls fail at once: a dead server costs misses, not waits.

A transport that offers `connect_many` (verbs) gets several data endpoints per server
(`ClientConfig.endpoints_per_server`, else the transport's default `qps_per_peer`; made in one handshake): `endpoints` holds them, the data path spreads a batch's independent
requests over them, and any one failing closes the whole connection. Other transports get one. `endpoint` is
the first (for callers that need just one, and for properties every endpoint of a transport shares).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable

from rdmapool.client.protocol import ClientSession, check_reply
from rdmapool.config import ClientConfig, ServerAddress
from rdmapool.errors import AuthError, ProtocolError, ServerUnavailable, UsageError
from rdmapool.transport.base import Endpoint, Transport

log = logging.getLogger(__name__)

RECV_CHUNK = 256 << 10
#: a wait for the reply may use the socket's timeout while it ends at most this long after the call's deadline
#: (saves a settimeout system call per call)
TIMEOUT_SLACK_S = 0.001


class ServerConnection:
    def __init__(self, address: ServerAddress, config: ClientConfig,
                 transport_for: Callable[[str], Transport | None], clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.config = config
        self._transport_for = transport_for
        self._clock = clock
        self._sock: socket.socket | None = None
        self._session: ClientSession | None = None
        self.endpoints: list[Endpoint] = []
        self.hello: dict = {}
        self._down_until = 0.0
        self.connects = 0
        self._sock_timeout: float | None = None
        # replies are received into one reused buffer: `recv(n)` allocated (and for 1 MiB, mapped) n bytes a call
        self._rbuf = bytearray(RECV_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._owed: list[int] = []  # ids of requests sent by `send` whose replies are not read yet
        self._kept: dict[int, dict] = {}  # their replies, read by a call made before `receive`

    @property
    def endpoint(self) -> Endpoint | None:
        """The first data endpoint, or None while there is none."""
        return self.endpoints[0] if self.endpoints else None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def ensure(self) -> None:
        """Connected and said hello, or ServerUnavailable (at once while inside the retry pause)."""
        if self._sock is not None:
            return
        if self._clock() < self._down_until:
            raise ServerUnavailable(f"{self.address} marked down")
        try:
            self._connect()
        except AuthError as exc:
            self.close(mark_down=True)
            self._warn(exc)
            raise
        except (OSError, ProtocolError, ServerUnavailable, UsageError) as exc:
            self.close(mark_down=True)
            self._warn(exc)
            raise ServerUnavailable(f"{self.address}: {type(exc).__name__}: {exc}") from None

    def _warn(self, exc: Exception) -> None:
        """Say why a server's keys are about to be misses (once per retry pause, not per call): a refused token or
        a transport mismatch otherwise shows up only as `unavailable` counts."""
        log.warning("rdmapool: server %s unavailable, its keys are misses for the next %.1f s: %s: %s", self.address,
                    self.config.retry_after_s, type(exc).__name__, exc)

    def _connect(self) -> None:
        cfg = self.config
        self._sock = socket.create_connection((self.address.host, self.address.port), timeout=cfg.connect_timeout_s)
        self._sock_timeout = cfg.connect_timeout_s
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._session = ClientSession(cfg.max_frame)
        self.hello = self._call_raw([("hello", {"token": cfg.token})])[0]
        transport = self._transport_for(str(self.hello.get("transport")))
        self.connects += 1
        if transport is None:  # a control-only connection (stats)
            return
        peer_info = self.hello.get("peer_info")
        if not isinstance(peer_info, dict):
            raise ProtocolError("hello reply lacks peer_info")
        connect_many = getattr(transport, "connect_many", None)
        if callable(connect_many):
            endpoints = list(connect_many(peer_info, cfg.endpoints_per_server, exchange=self._exchange,
                                          timeout=cfg.connect_timeout_s))
            if not endpoints:
                raise ProtocolError("connect_many made no endpoint")
            self.endpoints = endpoints
        else:
            self.endpoints = [transport.connect(peer_info, exchange=self._exchange, timeout=cfg.connect_timeout_s)]

    def _exchange(self, request: dict) -> dict:
        reply = self._call_raw([("accept", {"request": request})])[0].get("reply")
        if not isinstance(reply, dict):
            raise ProtocolError("accept reply lacks a map")
        return reply

    def call(self, op: str, **fields: object) -> dict:
        return self.call_many([(op, fields)])[0]

    @property
    def owes(self) -> bool:
        """Whether replies of a `send` are still to be received."""
        return bool(self._owed)

    def send(self, requests: list[tuple[str, dict]]) -> list[int]:
        """Send requests without waiting for their replies; `receive(ids)` collects them (bounded by the request
        timeout from then). One `send` may be owed at a time."""
        if self._owed:
            raise UsageError("receive the replies of the last send first")
        self.ensure()
        try:
            ids = self._send(requests)
        except OSError as exc:
            self.close(mark_down=True)
            raise ServerUnavailable(f"{self.address}: {type(exc).__name__}: {exc}") from None
        self._owed = ids
        return ids

    def receive(self, ids: list[int]) -> list[dict]:
        """The replies of a `send`, in request order (ServerUnavailable if the connection failed meanwhile)."""
        if ids != self._owed:
            if self._sock is None or not self._owed:  # closed since: the replies went with the socket
                raise ServerUnavailable(f"{self.address}: connection closed before the reply arrived")
            raise UsageError("receive takes the ids of the last send")
        try:
            if not self._kept:
                self._collect_owed()
            return [self._kept[i] for i in ids]
        finally:
            self._owed, self._kept = [], {}

    def abandon(self) -> None:
        """A caller giving up with replies still owed: they would arrive ahead of the next call's, so the
        connection goes (reconnected on the next call; not marked down, the server did nothing wrong)."""
        if self._owed:
            self.close()

    def drop_broken_data_path(self) -> None:
        """A data endpoint failed (one in error is never repaired): close the connection, so the next call
        reconnects with new endpoints. Replies a `send` still owes are read first and kept for `receive`: the
        control socket is healthy, and an early commit's reply says which blocks are stored (lost with the
        socket, they would be reported unavailable)."""
        if self._owed and not self._kept:
            with contextlib.suppress(ServerUnavailable):
                self._collect_owed()
        owed, kept = self._owed, self._kept
        self.close()
        if kept:
            self._owed, self._kept = owed, kept

    def _collect_owed(self) -> None:
        if self._sock is None:
            raise ServerUnavailable(f"{self.address}: connection closed before the reply arrived")
        try:
            replies = self._receive(self._owed)
        except (OSError, ProtocolError) as exc:
            self.close(mark_down=True)
            raise ServerUnavailable(f"{self.address}: {type(exc).__name__}: {exc}") from None
        self._kept = dict(zip(self._owed, replies, strict=True))

    def call_many(self, requests: list[tuple[str, dict]]) -> list[dict]:
        if self._owed and not self._kept:
            self._collect_owed()  # replies come in order: the owed ones first (kept for `receive`)
        reused = self._sock is not None
        self.ensure()
        try:
            return self._call_raw(requests)
        except ConnectionError as exc:
            # a reused connection the server closed meanwhile (idle timeout, restart): reconnect once
            if not reused:
                self.close(mark_down=True)
                raise ServerUnavailable(f"{self.address}: {type(exc).__name__}: {exc}") from None
        except (OSError, ProtocolError) as exc:
            self.close(mark_down=True)
            raise ServerUnavailable(f"{self.address}: {type(exc).__name__}: {exc}") from None
        self.close()
        self.ensure()
        try:
            return self._call_raw(requests)
        except (OSError, ProtocolError) as exc:
            self.close(mark_down=True)
            raise ServerUnavailable(f"{self.address}: {type(exc).__name__}: {exc}") from None

    def _call_raw(self, requests: list[tuple[str, dict]]) -> list[dict]:
        return self._receive(self._send(requests))

    def _send(self, requests: list[tuple[str, dict]]) -> list[int]:
        ids, out = [], bytearray()
        for op, fields in requests:
            rid, data = self._session.request(op, **fields)
            ids.append(rid)
            out += data
        self._timeout(self.config.request_timeout_s)
        self._sock.sendall(out)
        return ids

    def _receive(self, ids: list[int]) -> list[dict]:
        sock, limit = self._sock, self.config.request_timeout_s
        deadline = self._clock() + limit
        replies: list[dict] = []
        while len(replies) < len(ids):
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise TimeoutError(f"no reply within {limit}s")
            if remaining < self._sock_timeout - TIMEOUT_SLACK_S:
                self._timeout(remaining)
            n = sock.recv_into(self._rbuf)
            if not n:
                raise ConnectionResetError("server closed the connection")
            replies.extend(self._session.receive(self._rview[:n]))
        return [check_reply(r, rid) for r, rid in zip(replies, ids, strict=True)]

    def _timeout(self, seconds: float) -> None:
        """settimeout is a system call each time: only when the value changes."""
        if seconds != self._sock_timeout:
            self._sock.settimeout(seconds)
            self._sock_timeout = seconds

    def close(self, mark_down: bool = False) -> None:
        self._owed, self._kept = [], {}  # replies still owed are lost with the socket
        endpoints, self.endpoints = self.endpoints, []
        for ep in endpoints:
            with contextlib.suppress(Exception):  # a broken endpoint may fail to close; dropped either way
                ep.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if mark_down:
            self._down_until = self._clock() + self.config.retry_after_s
