"""A transport that offers `connect_many` (as verbs does) gives the client several data endpoints per server,
made in one handshake: a batch's READs and WRITEs go over all of them, round trips stay byte-exact, and one
endpoint failing costs that batch's requests on it (misses), then the whole connection is made afresh."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence

import pytest

from rdmapool.client import PoolClient, PutStatus
from rdmapool.config import ClientConfig, ServerConfig, TenantConfig
from rdmapool.errors import UsageError
from rdmapool.server import MemoryServer
from rdmapool.transport.base import Completion, EndpointState, Opcode, WcStatus, WorkRequest
from tests.support.localmem import LocalEndpoint, LocalTransport

TOKEN = "token-of-a"


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


class CountingEndpoint(LocalEndpoint):
    """Counts what is posted on it; `fail(status)` makes its next request fail and leaves it in ERROR (a queue
    pair whose retries ran out), so what follows is flushed."""

    def __init__(self, transport: LocalTransport) -> None:
        super().__init__(transport)
        self.posted: Counter[Opcode] = Counter()
        self._fail: WcStatus | None = None

    def fail(self, status: WcStatus) -> None:
        self._fail = status

    def post(self, wrs: Sequence[WorkRequest]) -> None:
        for wr in wrs:
            self.posted[wr.opcode] += 1
            if self._fail is not None and self._state is EndpointState.READY:
                self._state = EndpointState.ERROR
                self._done.append(Completion(wr.wr_id, self._fail, wr.opcode, wr.length))
                self._fail = None
                continue
            super().post([wr])


class ManyTransport(LocalTransport):
    """The in-process test transport with a verbs-like `connect_many`: `count` endpoints from one handshake
    (one `accept` on the server, which opens one numbered session)."""

    def __init__(self, qps_per_peer: int = 2) -> None:
        super().__init__()
        self.qps_per_peer = qps_per_peer
        self.opened: list[int] = []
        self.released: list[int] = []
        self.handshakes: list[dict] = []

    def accept(self, request: dict) -> dict:
        self.handshakes.append(request)
        self.opened.append(len(self.opened) + 1)
        return {"session": self.opened[-1]}

    def release(self, session: int) -> None:
        self.released.append(session)

    def connect_many(self, peer_info: dict, count: int | None = None, exchange=None,
                     timeout: float = 5.0) -> list[CountingEndpoint]:
        count = self.qps_per_peer if count is None else count
        if exchange is not None:
            exchange({"qps": list(range(count))})
        eps = [CountingEndpoint(self) for _ in range(count)]
        self.endpoints.extend(eps)
        return eps


@pytest.fixture
def pool():
    server_side = ManyTransport()
    cfg = ServerConfig(tenants=(TenantConfig("a", TOKEN, 16 << 20),), size_classes=(4096, 256 << 10))
    try:
        with MemoryServer(cfg, transport=server_side) as srv:
            yield srv, server_side
    finally:
        server_side.close()


def make_client(srv: MemoryServer, qps: int, per_server: int | None = None) -> tuple[PoolClient, ManyTransport]:
    t = ManyTransport(qps)
    cfg = ClientConfig(token=TOKEN, staging_bytes=4 << 20, retry_after_s=0.0, endpoints_per_server=per_server)
    return PoolClient([srv.address], cfg, transport=t), t


@pytest.mark.parametrize("qps", [2, 3])
def test_every_endpoint_carries_reads_and_writes_byte_exact(pool, qps: int) -> None:
    srv, server_side = pool
    c, t = make_client(srv, qps)
    try:
        with c:
            blobs = [os.urandom(n) for n in (100, 4000, 70_000, 250_000, 1, 3000, 200_000, 4096, 12_345)]
            keys = [key(i) for i in range(len(blobs))]
            assert c.put(keys, blobs) == [PutStatus.STORED] * len(blobs)
            bufs = [bytearray(len(b)) for b in blobs]
            assert c.get(keys, bufs) == [len(b) for b in blobs]
            assert [bytes(b) for b in bufs] == blobs
            conn = c._conn(c.router.servers[0])
            assert len(conn.endpoints) == qps and conn.endpoint is conn.endpoints[0]
            assert t.endpoints == conn.endpoints  # all of them from one connect_many
            assert server_side.opened == [1] and server_side.handshakes == [{"qps": list(range(qps))}]
            for ep in conn.endpoints:
                assert ep.posted[Opcode.WRITE] > 0 and ep.posted[Opcode.READ] > 0, ep.posted
            # round-robin: no endpoint carries more than its share (plus one)
            reads = [ep.posted[Opcode.READ] for ep in conn.endpoints]
            assert sum(reads) == len(blobs) and max(reads) - min(reads) <= 1
    finally:
        t.close()


def test_one_endpoint_failing_costs_misses_then_reconnects(pool) -> None:
    srv, server_side = pool
    c, t = make_client(srv, 2)
    try:
        with c:
            blobs = [os.urandom(5000 + i) for i in range(8)]
            keys = [key(i) for i in range(len(blobs))]
            assert c.put(keys, blobs) == [PutStatus.STORED] * len(blobs)
            conn = c._conn(c.router.servers[0])
            first = list(conn.endpoints)
            first[1].fail(WcStatus.RETRY_EXC_ERR)
            bufs = [bytearray(len(b)) for b in blobs]
            got = c.get(keys, bufs)
            misses = [i for i, g in enumerate(got) if g is None]
            # the failed request and every later one on that endpoint (flushed) are misses; the other endpoint's
            # reads are fine
            assert misses and len(misses) < len(blobs), got
            for i, g in enumerate(got):
                if g is not None:
                    assert g == len(blobs[i]) and bytes(bufs[i]) == blobs[i]
            assert c.counters["wc_retry_exc_err"] == 1
            # the whole connection was closed, not just the broken endpoint
            assert conn.endpoints == [] and all(ep.state is EndpointState.CLOSED for ep in first)
            bufs = [bytearray(len(b)) for b in blobs]
            assert c.get(keys, bufs) == [len(b) for b in blobs]  # reconnected: fresh endpoints
            assert [bytes(b) for b in bufs] == blobs
            assert len(conn.endpoints) == 2 and not set(map(id, conn.endpoints)) & set(map(id, first))
            assert server_side.opened == [1, 2]
            deadline = time.monotonic() + 5.0  # the server released the first connection's session
            while 1 not in server_side.released and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server_side.released == [1]
    finally:
        t.close()


def test_transports_without_connect_many_keep_one_endpoint(pool) -> None:
    srv, _ = pool
    t = LocalTransport()
    c = PoolClient([srv.address], ClientConfig(token=TOKEN, staging_bytes=1 << 20), transport=t)
    try:
        with c:
            assert c.put([key(1)], [b"y" * 300]) == [PutStatus.STORED]
            buf = bytearray(300)
            assert c.get([key(1)], [buf]) == [300] and bytes(buf) == b"y" * 300
            conn = c._conn(c.router.servers[0])
            assert conn.endpoints == t.endpoints and len(t.endpoints) == 1 and conn.endpoint is t.endpoints[0]
    finally:
        t.close()


def test_config_sets_the_endpoint_count_and_checks_it(pool) -> None:
    srv, _ = pool
    c, t = make_client(srv, 2, per_server=3)
    try:
        with c:
            assert c.put([key(1)], [b"z" * 5000]) == [PutStatus.STORED]
            assert len(c._conn(c.router.servers[0]).endpoints) == 3
    finally:
        t.close()
    for bad in (0, 17):
        with pytest.raises(UsageError, match="endpoints_per_server"):
            ClientConfig(token=TOKEN, endpoints_per_server=bad)
