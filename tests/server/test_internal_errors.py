"""A bug of ours hit while serving one request ends that client's session, not the server: the request fails
with an InternalError reply, it is counted and logged, and other clients are served. Should the serving loop
itself fail, `rdmapool server` exits non-zero instead of living on without serving."""

from __future__ import annotations

import logging
import threading

import pytest

from rdmapool.client import PoolClient, PutStatus
from rdmapool.config import ClientConfig, ServerConfig, TenantConfig
from rdmapool.errors import ServerUnavailable
from rdmapool.server import MemoryServer
from rdmapool.server.core import PoolCore

TOKEN = "token-a-secret"


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


@pytest.fixture
def server():
    cfg = ServerConfig(tenants=(TenantConfig("a", TOKEN, 1 << 20),), size_classes=(4096,), transport="tcp")
    with MemoryServer(cfg) as srv:
        yield srv


def client(srv: MemoryServer) -> PoolClient:
    return PoolClient([srv.address], ClientConfig(token=TOKEN, staging_bytes=1 << 20, request_timeout_s=2.0),
                      transport_name="tcp")


def test_a_handler_bug_fails_that_request_only(server, caplog) -> None:
    def broken(tenant, msg, now):
        raise KeyError("a bug")

    with client(server) as bystander, client(server) as victim:
        assert bystander.put([key(1)], [b"kept"]) == [PutStatus.STORED]
        server.handler.ops["stats"] = broken
        with caplog.at_level(logging.ERROR, logger="rdmapool.server.protocol"), \
                pytest.raises(ServerUnavailable, match="InternalError: internal server error \\(KeyError\\)"):
            victim.server_stats(server.address)
        assert "internal error serving 'stats'" in caplog.text and "KeyError: 'a bug'" in caplog.text
        assert server.core.counters["internal_errors"] == 1 and server.core.counters["protocol_errors"] == 0
        buf = bytearray(16)
        assert bystander.get([key(1)], [buf]) == [4] and bytes(buf[:4]) == b"kept"
        assert server._thread is not None and server._thread.is_alive() and server.failure is None


def test_a_bug_servicing_a_connection_closes_it_and_the_loop_goes_on(server, monkeypatch) -> None:
    with client(server) as bystander, client(server) as victim:
        assert bystander.put([key(1)], [b"kept"]) == [PutStatus.STORED]
        before = {c.peer for c in server._conns.values()}
        assert len(victim.lookup_prefix([key(1)])) == 1  # connected
        (victim_peer,) = {c.peer for c in server._conns.values()} - before
        real = server._service
        hit = threading.Event()

        def service(conn, mask):
            if conn.peer == victim_peer and not hit.is_set():
                hit.set()
                raise RuntimeError("a bug")
            return real(conn, mask)

        monkeypatch.setattr(server, "_service", service)
        # its connection is closed under it: the client connects again and is served (as after an idle close)
        assert len(victim.lookup_prefix([key(1)])) == 1
        assert hit.is_set() and server.core.counters["internal_errors"] == 1
        assert victim_peer not in {c.peer for c in server._conns.values()}
        assert [c.connects for c in victim._conns.values()] == [2]
        buf = bytearray(16)
        assert bystander.get([key(1)], [buf]) == [4]
        assert server._thread.is_alive() and server.failure is None


def test_a_failed_loop_is_reported_and_the_command_exits_non_zero(monkeypatch, capsys) -> None:
    from rdmapool.cli import build_parser
    from rdmapool.commands.server import run

    monkeypatch.setenv("RDMAPOOL_TENANTS", f"a:{TOKEN}:1MiB")
    calls = []

    def sweep(self, now):
        calls.append(now)
        if len(calls) > 2:
            raise RuntimeError("sweep bug")

    monkeypatch.setattr(PoolCore, "sweep", sweep)
    args = build_parser().parse_args(["server", "--listen", "127.0.0.1:0", "--transport", "tcp"])
    assert run(args) == 1
    err = capsys.readouterr().err
    assert "the serving loop failed (RuntimeError: sweep bug)" in err


def test_refused_clients_are_logged_without_flooding_the_log(server, caplog) -> None:
    """A wrong token is the client's error reply, and the operator's log line, at most one per REFUSAL_LOG_S."""
    from rdmapool.client import PutStatus

    bad = PoolClient([server.address], ClientConfig(token="not-the-token", staging_bytes=1 << 20,
                                                    request_timeout_s=2.0, retry_after_s=0.0), transport_name="tcp")
    with caplog.at_level(logging.WARNING, logger="rdmapool.server.driver"), bad:
        for _ in range(3):
            assert bad.put([key(1)], [b"x"]) == [PutStatus.UNAVAILABLE]
    lines = [r.getMessage() for r in caplog.records if r.name == "rdmapool.server.driver"]
    assert len(lines) == 1 and "refused 127.0.0.1:" in lines[0] and "AuthError: unknown token" in lines[0]
    assert server.core.counters["auth_failures"] == 3
