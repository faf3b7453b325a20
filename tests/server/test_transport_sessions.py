"""A transport's per-client state opened through the control protocol (`accept`: verbs queue pairs) lives as
long as that client's control connection: closing the connection releases it, so a server leaks no QPs."""

from __future__ import annotations

import time

from rdmapool.client import PoolClient
from rdmapool.config import ClientConfig, ServerConfig, TenantConfig
from rdmapool.server import MemoryServer
from tests.support.localmem import LocalTransport


class HandshakeTransport(LocalTransport):
    """The in-process test transport plus a verbs-like handshake: `accept` opens a numbered session."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[int] = []
        self.released: list[int] = []

    def accept(self, request: dict) -> dict:
        self.opened.append(len(self.opened) + 1)
        return {"session": self.opened[-1]}

    def release(self, session: int) -> None:
        self.released.append(session)

    def connect(self, peer_info: dict, exchange=None, timeout: float = 5.0):
        if exchange is not None:
            exchange({"qps": []})
        return super().connect(peer_info, exchange, timeout)


def test_closing_the_control_connection_releases_its_transport_sessions() -> None:
    server_side = HandshakeTransport()
    cfg = ServerConfig(tenants=(TenantConfig("a", "token-of-a", 1 << 20),), size_classes=(4096,))
    try:
        with MemoryServer(cfg, transport=server_side) as srv:
            client = PoolClient([srv.address], ClientConfig(token="token-of-a", staging_bytes=1 << 16),
                                transport=HandshakeTransport())
            with client:
                assert client.put([bytes(16)], [b"x" * 100]) is not None
                assert server_side.opened == [1] and server_side.released == []
            deadline = time.monotonic() + 5.0
            while server_side.released != [1] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server_side.released == [1]
    finally:
        server_side.close()
