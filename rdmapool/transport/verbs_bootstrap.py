"""A minimal TCP side channel that carries one verbs handshake per connection, for processes that have no
control protocol of their own (the conformance suite, `bench verbs`). Memory servers do not use it: their
control protocol calls `Transport.accept` and carries the reply.

Frame: 4-byte big-endian length + msgpack map; one request, one reply, close. Replies carrying an "error" key
report a refusal. Every socket operation has a timeout; a bad frame never stops the listener.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

import msgpack

from rdmapool.errors import ProtocolError, ServerUnavailable
from rdmapool.transport.verbs_conn import timeout_scale

MAX_FRAME = 1 << 20
_LEN = struct.Struct(">I")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ProtocolError("bootstrap peer closed the connection mid-frame")
        buf += part
    return bytes(buf)


def send_frame(sock: socket.socket, obj: dict) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_frame(sock: socket.socket) -> dict:
    (n,) = _LEN.unpack(_recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise ProtocolError(f"bootstrap frame of {n} bytes exceeds {MAX_FRAME}")
    try:
        obj = msgpack.unpackb(_recv_exact(sock, n), raw=False)
    except Exception as exc:
        raise ProtocolError(f"bootstrap frame is not msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("bootstrap frame must be a map")
    return obj


class BootstrapServer:
    """Listens on (host, port) and answers each request with `handler(request)`."""

    def __init__(self, host: str, handler: Callable[[dict], dict], io_timeout: float = 10.0) -> None:
        self._handler = handler
        self._io_timeout = io_timeout * timeout_scale()
        self._sock = socket.create_server((host, 0))
        self._sock.settimeout(0.2)
        self.address = (host, self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="verbs-bootstrap", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(self._io_timeout)
                try:
                    request = recv_frame(conn)
                    try:
                        reply = self._handler(request)
                    except Exception as exc:  # a bad request is refused, the listener lives on
                        reply = {"error": f"{type(exc).__name__}: {exc}"}
                    send_frame(conn, reply)
                except (OSError, ProtocolError):
                    continue

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._thread.join(timeout=5)


def exchange(address: tuple[str, int], request: dict, timeout: float) -> dict:
    """Send `request` to a BootstrapServer and return its reply."""
    timeout *= timeout_scale()
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.settimeout(timeout)
            send_frame(sock, request)
            reply = recv_frame(sock)
    except OSError as exc:
        raise ServerUnavailable(f"verbs bootstrap at {address[0]}:{address[1]} unreachable: {exc}") from exc
    if "error" in reply:
        raise ServerUnavailable(f"peer refused the verbs handshake: {reply['error']}")
    return reply
