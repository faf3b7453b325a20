"""Connections cost a client nothing to open: ones that never authenticate must not hold the server's
connection slots (a thousand silent sockets locked every real client out)."""

from __future__ import annotations

import socket
import time

from rdmapool.client import PoolClient, PutStatus
from rdmapool.config import ClientConfig, ServerConfig, TenantConfig
from rdmapool.server import MemoryServer, driver

TOKEN = "token-a-secret"


def _config(**options) -> ServerConfig:
    return ServerConfig(tenants=(TenantConfig("a", TOKEN, 1 << 20),), size_classes=(4096,), transport="tcp",
                        **options)


def _client(srv: MemoryServer) -> PoolClient:
    return PoolClient([srv.address], ClientConfig(token=TOKEN, staging_bytes=1 << 20, request_timeout_s=2.0),
                      transport_name="tcp")


def test_a_connection_that_never_says_hello_is_closed_after_the_hello_timeout() -> None:
    with MemoryServer(_config(hello_timeout_s=0.3)) as srv, socket.create_connection((srv.info.host, srv.info.port)) as s:
        s.settimeout(5.0)
        started = time.monotonic()
        assert s.recv(1) == b""  # closed by the server, long before the 300 s idle timeout
        assert 0.25 < time.monotonic() - started < 3.0
        assert srv.core.counters["hello_timeouts"] == 1


def test_silent_connections_at_the_limit_make_room_for_clients(monkeypatch) -> None:
    monkeypatch.setattr(driver, "MAX_CONNECTIONS", 8)
    with MemoryServer(_config()) as srv:
        silent = [socket.create_connection((srv.info.host, srv.info.port)) for _ in range(8)]
        try:
            deadline = time.monotonic() + 5
            while len(srv._conns) < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(srv._conns) == 8
            with _client(srv) as c:  # the oldest silent connection goes; the client is served
                assert c.put([b"k" * 16], [b"v"]) == [PutStatus.STORED]
                assert len(c.lookup_prefix([b"k" * 16])) == 1
            assert srv.core.counters["hello_timeouts"] >= 1 and srv.core.counters["connections_refused"] == 0
        finally:
            for s in silent:
                s.close()


def test_authenticated_clients_are_not_displaced(monkeypatch) -> None:
    monkeypatch.setattr(driver, "MAX_CONNECTIONS", 2)
    with MemoryServer(_config()) as srv, _client(srv) as a, _client(srv) as b:
        assert a.put([b"a" * 16], [b"1"]) == [PutStatus.STORED]
        assert b.put([b"b" * 16], [b"2"]) == [PutStatus.STORED]
        with socket.create_connection((srv.info.host, srv.info.port)) as extra:  # full of authenticated clients: refused
            extra.settimeout(5.0)
            assert extra.recv(1) == b""
        assert srv.core.counters["connections_refused"] == 1
        assert len(a.lookup_prefix([b"a" * 16])) == 1 and len(b.lookup_prefix([b"b" * 16])) == 1
