"""Client against a server driver in the same process over the in-process test transport: round trips,
prefix lookups, tenants, torn reads, corruption, reuse under a slow reader, unavailable servers."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from rdmapool import transport as transports
from rdmapool.client import PoolClient, PutStatus
from rdmapool.config import ClientConfig, ServerConfig, TenantConfig
from rdmapool.errors import UsageError
from rdmapool.server import MemoryServer, wire
from rdmapool.server.slots import stride_for
from rdmapool.transport.base import Opcode, Transport, WorkRequest
from tests.support.localmem import LocalTransport

TOKENS = {"a": "token-a-secret", "b": "token-b-secret"}


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


TRANSPORTS = ["local", "tcp", "shm"]


_MADE: list[Transport] = []


def new_transport(name: str) -> Transport:
    """A transport for a server or client of this test; closed after the test (injected transports belong to
    the caller, not to the server or client they are given to)."""
    t = LocalTransport() if name == "local" else transports.create(name)
    _MADE.append(t)
    return t


def _made(t: Transport) -> Transport:
    _MADE.append(t)
    return t


@pytest.fixture(autouse=True)
def _close_transports():
    yield
    while _MADE:
        _MADE.pop().close()


@pytest.fixture(params=TRANSPORTS)
def server(request):
    cfg = ServerConfig(tenants=tuple(TenantConfig(t, tok, 8 << 20) for t, tok in TOKENS.items()),
                       size_classes=(4096, 256 << 10), lease_s=0.5, grace_s=0.2, reservation_s=2.0)
    with MemoryServer(cfg, transport=new_transport(request.param)) as srv:
        srv.transport_name = request.param
        yield srv


def make_client(server, tenant="a", **options) -> PoolClient:
    cfg = ClientConfig(token=TOKENS[tenant], staging_bytes=1 << 20, request_timeout_s=2.0, **options)
    return PoolClient([server.address], cfg, transport=new_transport(server.transport_name))


def test_round_trip_byte_exact(server) -> None:
    with make_client(server) as c:
        payloads = [os.urandom(n) for n in (0, 1, 4000, 100_000)]
        assert c.put([key(i) for i in range(4)], payloads) == [PutStatus.STORED] * 4
        bufs = [bytearray(200_000) for _ in payloads]
        assert c.get([key(i) for i in range(4)], bufs) == [len(p) for p in payloads]
        assert all(bytes(b[: len(p)]) == p for b, p in zip(bufs, payloads, strict=True))
        assert c.put([key(0)], [b"x"]) == [PutStatus.EXISTS]


def test_registered_buffers_are_zero_copy_and_round_trip(server, monkeypatch) -> None:
    """Buffers inside regions registered with the client move in place: once the first batch made the staging
    arena (headers, trailers), puts and gets register and allocate nothing more with the transport, and every
    payload's SGE is the user's own buffer (a WRITE's gather source, a READ's scatter target), not a staged
    copy."""
    from rdmapool.client import datapath

    posted: list[WorkRequest] = []  # every request the data path posts, whichever way it posts them
    post, post_many = datapath._Batch.post, datapath._Batch.post_many
    monkeypatch.setattr(datapath._Batch, "post", lambda self, wr: posted.append(wr) or post(self, wr))
    monkeypatch.setattr(datapath._Batch, "post_many",
                        lambda self, wrs: posted.extend(wrs) or post_many(self, wrs))
    size = 4096
    with make_client(server) as c:
        src = np.frombuffer(os.urandom(6 * size), dtype=np.uint8).copy()
        dst = np.zeros(6 * size, dtype=np.uint8)
        src_region, dst_region = c.register(src), c.register(dst)
        parts = [src[i * size : (i + 1) * size] for i in range(6)]
        outs = [dst[i * size : (i + 1) * size] for i in range(6)]
        assert c.put([key(i) for i in range(3)], parts[:3]) == [PutStatus.STORED] * 3  # makes the arena
        assert c.get([key(i) for i in range(3)], outs[:3]) == [size] * 3

        made: list[str] = []
        for name in ("register", "register_pointer", "allocate"):
            real = getattr(c.transport, name)
            monkeypatch.setattr(c.transport, name, lambda *a, _name=name, _real=real, **kw:
                                made.append(_name) or _real(*a, **kw))
        posted.clear()
        keys = [key(i) for i in range(3, 6)]
        assert c.put(keys, parts[3:]) == [PutStatus.STORED] * 3
        assert c.get(keys, outs[3:]) == [size] * 3
        assert np.array_equal(src, dst)
        assert made == []  # no registration, no allocation: the arena and the user's regions serve it all

        def payload_sges(opcode: Opcode) -> set[tuple[int, int, int]]:
            return {(sge.addr, sge.length, sge.lkey) for wr in posted if wr.opcode is opcode
                    for sge in wr.sgl if sge.length == size}

        def inside(region) -> set[tuple[int, int, int]]:
            return {(region.addr + i * size, size, region.lkey) for i in (3, 4, 5)}

        assert payload_sges(Opcode.WRITE) == inside(src_region)  # gathered straight from `src`
        assert payload_sges(Opcode.READ) == inside(dst_region)  # scattered straight into `dst`


def test_lookup_prefix_and_read(server) -> None:
    with make_client(server) as c:
        c.put([key(1), key(2), key(4)], [b"one", b"two", b"four"])
        res = c.lookup_prefix([key(1), key(2), key(3), key(4)])
        assert len(res) == 2
        bufs = [bytearray(8), bytearray(8)]
        assert c.read(res.refs, bufs) == [3, 3] and bytes(bufs[1][:3]) == b"two"


def test_tenants_pairwise_same_hits_other_misses(server) -> None:
    with make_client(server, "a") as a, make_client(server, "b") as b:
        a.put([key(1)], [b"secret of a"])
        assert len(a.lookup_prefix([key(1)])) == 1
        assert len(b.lookup_prefix([key(1)])) == 0
        assert b.get([key(1)], [bytearray(64)]) == [None]
        assert b.delete([key(1)]) == [False]
        assert a.get([key(1)], [bytearray(64)]) == [11]


# Only the in-process test transport has a byte-level read filter; real transports race real rewrites
# (test_races.py) and the fault wrapper's torn reads (test_faults.py).
@pytest.mark.parametrize("server", ["local"], indirect=True)
def test_torn_read_is_a_miss_never_data(server) -> None:
    with make_client(server) as c:
        c.put([key(1)], [os.urandom(4000)])
        ep = c._conn(c.router.servers[0]).endpoint

        def tear(wr, data: bytes) -> bytes:  # the middle of the payload from some other write
            mid = len(data) // 2
            return data[:mid] + bytes(64) + data[mid + 64 :]

        ep.read_filter = tear
        assert c.get([key(1)], [bytearray(4096)]) == [None]
        assert c.counters["corrupt_blocks"] == 1
        ep.read_filter = None
        assert c.get([key(1)], [bytearray(4096)]) == [4000]


@pytest.mark.parametrize("server", ["local"], indirect=True)
def test_unhashed_read_counts_only_if_its_lease_outlived_it(server) -> None:
    """Without a checksum of what landed (device memory, or verify_checksum off) nothing but the read lease
    says the slot was not reused during the READ: a block whose lease ran out while it was read is a miss."""
    now = [1000.0]
    cfg = ClientConfig(token=TOKENS["a"], staging_bytes=1 << 20, request_timeout_s=2.0, verify_checksum=False)
    with PoolClient([server.address], cfg, transport=new_transport("local"), clock=lambda: now[0]) as c:
        c.put([key(1), key(2)], [b"a" * 4000, b"b" * 4000])
        refs = c.lookup_prefix([key(1), key(2)]).refs
        assert c.read(refs, [bytearray(4096), bytearray(4096)]) == [4000, 4000]
        ep = c._conn(c.router.servers[0]).endpoint

        def slow(wr, data: bytes) -> bytes:  # the READ outlasts the lease (client clock)
            now[0] = refs[0].lease_until + 0.001
            return data

        ep.read_filter = slow
        assert c.read(refs, [bytearray(4096), bytearray(4096)]) == [None, None]
        assert c.counters["lease_expired"] == 2


@pytest.mark.parametrize("server", ["tcp"], indirect=True)
def test_why_a_server_is_unavailable_is_logged_once_per_pause(server, caplog) -> None:
    """A configuration mistake (a transport the server does not speak, a refused token) costs misses like an outage;
    the log says which it is, once per retry pause, not on every call."""
    cfg = ClientConfig(token=TOKENS["a"], request_timeout_s=2.0, retry_after_s=30.0)
    with caplog.at_level("WARNING", logger="rdmapool.client.connection"):
        with PoolClient([server.address], cfg, transport=new_transport("shm")) as c:
            assert c.put([key(1)], [b"x"]) == [PutStatus.UNAVAILABLE]
            assert c.get([key(1)], [bytearray(8)]) == [None]
        with PoolClient([server.address], ClientConfig(token="not-a-token", request_timeout_s=2.0),
                        transport=new_transport("tcp")) as c:
            assert c.put([key(1)], [b"x"]) == [PutStatus.UNAVAILABLE]
    messages = [r.getMessage() for r in caplog.records if r.name == "rdmapool.client.connection"]
    assert len(messages) == 2, messages
    assert "server speaks transport 'tcp', this client 'shm'" in messages[0]
    assert "AuthError" in messages[1]


def _worker_hashes(c, monkeypatch) -> list[int]:
    """The lengths of the payloads `c` hands to its hash workers from now on (small ones in batches)."""
    lengths: list[int] = []
    submit, submit_many = c.hasher.submit, c.hasher.submit_many
    monkeypatch.setattr(c.hasher, "submit", lambda p: lengths.append(len(p)) or submit(p))
    monkeypatch.setattr(c.hasher, "submit_many", lambda ps: lengths.extend(map(len, ps)) or submit_many(ps))
    return lengths


@pytest.mark.parametrize("size", [1000, 256 << 10])  # under THREAD_MIN (batched) / over it
@pytest.mark.parametrize("spare", [False, True], ids=["two-cores", "spare-cores"])
def test_corrupted_slot_detected(server, size: int, spare: bool, monkeypatch) -> None:
    """Reads hash inline on two CPUs and on worker threads with more (`datapath.spare_cores`): both reject.
    With spare cores an asynchronous endpoint (shm) takes the workers instead of its own READ digest."""
    from rdmapool.client import datapath
    from rdmapool.transport import Opcode

    monkeypatch.setattr(datapath, "spare_cores", lambda: spare)
    with make_client(server) as c:
        c.put([key(1)], [b"x" * size])
        (ref,) = c.lookup_prefix([key(1)]).refs
        region = server.regions["a"]
        off = ref.hit.addr - region.descriptor.addr
        region.view[off + 100 + size // 2] ^= 1  # payload byte
        on_workers = _worker_hashes(c, monkeypatch)
        assert c.get([key(1)], [bytearray(size)]) == [None]
        endpoint = c._conn(c.router.servers[0]).endpoint
        transport_digest = Opcode.READ in endpoint.digests and not (spare and endpoint.asynchronous)
        assert bool(on_workers) == (spare and not transport_digest)
        region.view[off + 100 + size // 2] ^= 1
        region.view[off + 30] ^= 1  # header key byte
        assert c.get([key(1)], [bytearray(size)]) == [None]
        region.view[off + 30] ^= 1
        assert c.get([key(1)], [bytearray(size)]) == [size]
        assert c.counters["corrupt_blocks"] == 2


def test_large_last_block_of_a_get_is_hashed_while_it_moves(server, monkeypatch) -> None:
    """With spare cores the blocks of an asynchronous endpoint's get (shm) are hashed by the workers once they
    landed, except a large last block, whose hash nothing would overlap: it takes the transport's digest. Either
    way a corrupted payload is a miss (tcp digests every block as it lands; `local` has no digests)."""
    from rdmapool.client import datapath
    from rdmapool.transport import Opcode

    monkeypatch.setattr(datapath, "spare_cores", lambda: True)
    monkeypatch.setattr(datapath, "TAIL_DIGEST_MIN", 200_000)
    size = 250_000
    data = [os.urandom(size) for _ in range(3)]
    keys = [key(i) for i in (1, 2, 3)]
    with make_client(server) as c:
        assert c.put(keys, data) == [PutStatus.STORED] * 3
        on_workers = _worker_hashes(c, monkeypatch)
        outs = [bytearray(size) for _ in range(3)]
        assert c.get(keys, outs) == [size] * 3 and [bytes(o) for o in outs] == data
        endpoint = c._conn(c.router.servers[0]).endpoint
        digests = Opcode.READ in endpoint.digests
        assert len(on_workers) == (2 if digests and endpoint.asynchronous else 0 if digests else 3)
        refs = c.lookup_prefix(keys).refs
        region = server.regions["a"]
        for n in (0, 2):  # a block the workers hash, and the last one
            at = refs[n].hit.addr - region.descriptor.addr + 64 + size // 3  # a payload byte
            region.view[at] ^= 0x10
            assert c.get(keys, [bytearray(size) for _ in range(3)]) == [None if i == n else size for i in range(3)]
            region.view[at] ^= 0x10
        assert c.counters["corrupt_blocks"] == 2


@pytest.mark.parametrize("server", ["tcp", "shm"], indirect=True)
@pytest.mark.parametrize("fused", [True, False], ids=["transport-digest", "client-hash"])
def test_fused_digest_detects_corruption_like_the_client_hash(server, fused: bool, monkeypatch) -> None:
    """The transport's digest (shm: hashed while copying; tcp: as the READ lands) and the client's own hash
    accept and reject exactly the same blocks; `fused=False` strips every digest, as a backend without them."""

    from rdmapool.client import datapath

    # a two-CPU process's path, wherever the test runs (with spare cores landed blocks go to the workers, as
    # test_large_last_block_of_a_get_is_hashed_while_it_moves checks)
    monkeypatch.setattr(datapath, "spare_cores", lambda: False)
    if not fused:
        reap = datapath._Batch._reap
        monkeypatch.setattr(datapath._Batch, "_reap",
                            lambda self, i, cs: reap(self, i, [tuple(c[:4]) for c in cs]))  # digests dropped
    size = 250_000  # the largest size class is 256 KiB
    data = os.urandom(size)
    with make_client(server) as c:
        hashed = []  # payload sizes the client hashed itself (on its Hasher's workers or inline)
        submit = c.hasher.submit
        monkeypatch.setattr(c.hasher, "submit", lambda p: hashed.append(len(p)) or submit(p))
        checksum = datapath.block.payload_checksum
        monkeypatch.setattr(datapath.block, "payload_checksum", lambda p: hashed.append(len(p)) or checksum(p))
        assert c.put([key(1), key(2)], [data, data[:1000]]) == [PutStatus.STORED] * 2
        endpoint = c._conn(c.router.servers[0]).endpoint
        # with digests on, only what the transport cannot digest is hashed by the client; an asynchronous
        # endpoint (shm's Mover) gets each payload first and the client hashes it while it moves
        from rdmapool.transport import Opcode

        if fused:  # (stripped digests: the write path hashes the payload itself)
            assert (size in hashed) == (Opcode.WRITE not in endpoint.digests or endpoint.asynchronous)
        hashed.clear()
        out = bytearray(size)
        assert c.get([key(1)], [out]) == [size] and out == data
        assert (size in hashed) == (not fused or Opcode.READ not in endpoint.digests)
        (ref,) = c.lookup_prefix([key(1)]).refs
        region = server.regions["a"]
        off = ref.hit.addr - region.descriptor.addr + 64  # payload start
        for at in (0, size // 2, size - 1):
            region.view[off + at] ^= 0x01
            assert c.get([key(1)], [bytearray(size)]) == [None]
            region.view[off + at] ^= 0x01
        assert c.counters["corrupt_blocks"] == 3
        assert c.get([key(1), key(2)], [bytearray(size), bytearray(1000)]) == [size, 1000]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slot_reused_under_slow_reader_gives_miss(transport: str) -> None:
    """Two slots only. A reader holds a ref; the block is deleted; while the lease runs the slot is not reused;
    once lease + grace pass it is, and the slow reader's READ then gets a miss, never the new bytes."""
    stride = stride_for(4096)
    cfg = ServerConfig(tenants=(TenantConfig("a", TOKENS["a"], 2 * stride),), size_classes=(4096,),
                       lease_s=0.5, grace_s=0.2)
    with MemoryServer(cfg, transport=new_transport(transport)) as srv:
        srv.transport_name = transport
        with make_client(srv) as c:
            _reuse_under_slow_reader(c)


def _reuse_under_slow_reader(c: PoolClient) -> None:
    c.put([key(1)], [b"old" * 100])
    (ref,) = c.lookup_prefix([key(1)]).refs
    assert c.delete([key(1)]) == [True]
    assert c.put([key(2), key(3)], [b"new" * 100] * 2) == [PutStatus.STORED, PutStatus.FULL]
    time.sleep(0.75)  # lease 0.5 + grace 0.2
    assert c.put([key(3)], [b"new" * 100]) == [PutStatus.STORED]  # the old slot, new generation
    stale = type(ref)(ref.key, ref.server, ref.epoch, ref.hit, time.monotonic() + 10)  # a stalled READ
    assert c.read([stale], [bytearray(300)]) == [None]
    assert c.counters["corrupt_blocks"] == 1
    assert c.get([key(3)], [bytearray(300)]) == [300]


def test_unavailable_server_gives_misses_fast() -> None:
    cfg = ClientConfig(token="token-a-secret", connect_timeout_s=0.5, retry_after_s=5.0)
    with PoolClient(["127.0.0.1:1"], cfg, transport=_made(LocalTransport())) as c:
        t = time.monotonic()
        assert c.put([key(1)], [b"x"]) == [PutStatus.UNAVAILABLE]
        assert len(c.lookup_prefix([key(1)])) == 0
        assert c.get([key(1)], [bytearray(4)]) == [None]
        assert time.monotonic() - t < 1.0
        assert c.counters["unavailable"] >= 1


def test_bad_token_is_misses_not_exception(server) -> None:
    cfg = ClientConfig(token="not-a-known-token")
    with PoolClient([server.address], cfg, transport=_made(LocalTransport())) as c:
        assert c.put([key(1)], [b"x"]) == [PutStatus.UNAVAILABLE]
        assert c.counters["error_AuthError"] == 1


def test_batches_larger_than_server_max_keys_are_split() -> None:
    cfg = ServerConfig(tenants=(TenantConfig("a", TOKENS["a"], 1 << 20),), size_classes=(4096,), max_keys=8)
    with MemoryServer(cfg, transport=_made(LocalTransport())) as srv:
        srv.transport_name = "local"
        with make_client(srv) as c:
            keys = [key(i) for i in range(50)]
            assert c.put(keys, [bytes([i]) * 10 for i in range(50)]) == [PutStatus.STORED] * 50
            assert len(c.lookup_prefix(keys + [key(999)])) == 50
            c.delete([key(20)])
            assert len(c.lookup_prefix(keys)) == 20
            bufs = [bytearray(10) for _ in keys]
            got = c.get(keys, bufs)
            assert got == [10] * 20 + [None] + [10] * 29 and bufs[49] == bytes([49]) * 10


def test_put_with_chain_hints(server) -> None:
    from rdmapool.client import BlockHint

    with make_client(server) as c:
        keys = [key(i) for i in range(3)]
        hints = [BlockHint(None, 0, 16), BlockHint(keys[0], 1, 16), BlockHint(keys[1], 2, 5)]
        assert c.put(keys, [b"a", b"b", b"c"], hints) == [PutStatus.STORED] * 3
        assert len(c.lookup_prefix(keys)) == 3
        with pytest.raises(UsageError):
            c.put(keys, [b"a", b"b", b"c"], hints[:2])


def test_connection_closed_by_server_idle_timeout_is_reopened_transparently() -> None:
    cfg = ServerConfig(tenants=(TenantConfig("a", TOKENS["a"], 1 << 20),), size_classes=(4096,),
                       idle_timeout_s=0.2, tick_s=0.02)
    with MemoryServer(cfg, transport=_made(LocalTransport())) as srv:
        srv.transport_name = "local"
        with make_client(srv) as c:
            assert c.put([key(1)], [b"x"]) == [PutStatus.STORED]
            time.sleep(0.5)  # the server closes the idle control connection
            assert len(c.lookup_prefix([key(1)])) == 1
            assert c.counters["unavailable"] == 0
            assert c._conn(c.router.servers[0]).connects == 2


class HandshakeTransport(LocalTransport):
    """A backend that needs a connection handshake (as verbs does for QP numbers)."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted: list[dict] = []
        self.replies: list[dict] = []

    def accept(self, request: dict) -> dict:
        self.accepted.append(request)
        return {"qpn": 42, "echo": request.get("qpn")}

    def connect(self, peer_info: dict, exchange=None, timeout: float = 5.0):
        self.replies.append(exchange({"qpn": 7}))
        return super().connect(peer_info, exchange, timeout)


def test_transport_handshake_goes_through_the_control_connection() -> None:
    cfg = ServerConfig(tenants=(TenantConfig("a", TOKENS["a"], 1 << 20),), size_classes=(4096,))
    server_side = HandshakeTransport()
    _MADE.append(server_side)
    with MemoryServer(cfg, transport=server_side) as srv:
        client_side = HandshakeTransport()
        _MADE.append(client_side)
        with PoolClient([srv.address], ClientConfig(token=TOKENS["a"]), transport=client_side) as c:
            assert c.put([key(1)], [b"x"]) == [PutStatus.STORED]
        assert server_side.accepted == [{"qpn": 7}]
        assert client_side.replies == [{"qpn": 42, "echo": 7}]


def test_server_applies_queued_access_reports_once_idle(server) -> None:
    with make_client(server) as c:
        keys = [key(i) for i in range(64)]
        assert c.put(keys, [b"v"] * 64) == [PutStatus.STORED] * 64
        seen: list[bytes] = []
        for cls in server.core.tenants["a"].classes:
            real = cls.policy.on_access

            def spy(k: bytes, now: float, real=real) -> None:
                seen.append(k)
                real(k, now)

            cls.policy.on_access = spy  # type: ignore[method-assign]
        for _ in range(5):
            assert len(c.lookup_prefix(keys)) == 64
        deadline = time.monotonic() + 5.0
        while server.core.access_backlog and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.core.access_backlog == 0  # drained once no request came for a moment
        assert set(seen) == set(keys) and len(seen) <= 5 * 64  # each key reported, repeats possibly merged


@pytest.mark.parametrize("server", ["local"], indirect=True)
def test_sent_requests_get_their_replies_even_with_a_call_in_between(server) -> None:
    """`send` / `receive` (pipelined reservations and early commits): a call made while a reply is owed gets its
    own reply, `receive` still gets the owed one; misuse is a UsageError; a closed connection owes nothing."""
    from rdmapool.client.protocol import parse_grants
    from rdmapool.errors import ProtocolError, ServerUnavailable
    from rdmapool.server.core import AllocStatus

    with make_client(server) as c:
        assert c.put([key(1)], [b"x" * 100]) == [PutStatus.STORED]
        conn = c._conn(c.router.servers[0])
        ids = conn.send([("allocate", {"keys": key(2), "lengths": wire.pack_u64s([100])})])
        assert conn.owes
        with pytest.raises(UsageError, match="receive"):
            conn.send([("stats", {})])
        stats = conn.call("stats")  # a call in between gets its own reply, not the owed allocate's
        with pytest.raises(ProtocolError):
            parse_grants(stats, 1)
        (grant,) = parse_grants(conn.receive(ids)[0], 1)
        assert grant.status == AllocStatus.OK and not conn.owes
        ids = conn.send([("allocate", {"keys": key(3), "lengths": wire.pack_u64s([100])})])
        conn.abandon()  # giving up with a reply owed drops the connection
        assert not conn.connected and not conn.owes
        with pytest.raises(ServerUnavailable):
            conn.receive(ids)
        assert c.get([key(1)], [bytearray(100)]) == [100]  # and the next call reconnects
        # a data endpoint failing while a reply is owed (an early commit, say): the connection goes, the reply
        # is read first and still received (a stress run once lost it, reporting stored blocks unavailable)
        ids = conn.send([("allocate", {"keys": key(4), "lengths": wire.pack_u64s([100])})])
        conn.drop_broken_data_path()
        assert not conn.connected and conn.owes
        (grant,) = parse_grants(conn.receive(ids)[0], 1)
        assert grant.status == AllocStatus.OK and not conn.owes
        assert c.get([key(1)], [bytearray(100)]) == [100]


def test_common_mistakes_are_named(server) -> None:
    """What a new user gets wrong first gets an error that says what to do, not a misleading one."""
    cfg = ClientConfig(token=TOKENS["a"])
    with pytest.raises(UsageError, match=r"list of HOST:PORT addresses, got one str: write \['127"):
        PoolClient(server.address, cfg)  # a str is a Sequence: its characters were taken as addresses
    with pytest.raises(UsageError, match="unknown transport 'tpc'; choose one of tcp, shm, verbs"):
        PoolClient([server.address], cfg, transport_name="tpc")  # was: every call a miss, with a log line
    with make_client(server) as c:
        with pytest.raises(UsageError, match="got one bytes: wrap a single key in a list"):
            c.get(key(1), [bytearray(8)])
        with pytest.raises(UsageError, match="got int"):
            c.lookup_prefix(5)
        with pytest.raises(UsageError, match=r"as bytes or bytearray, got memoryview \(convert it with bytes"):
            c.put([memoryview(key(1))], [b"x"])
        with pytest.raises(UsageError, match="exactly 16 bytes, got bytes of 15"):
            c.put([key(1)[:15]], [b"x"])
        assert c.put([bytearray(key(1))], [b"x"]) == [PutStatus.STORED]


def test_a_closed_client_refuses_calls(server) -> None:
    """After close, calls raise instead of quietly reconnecting (and remaking what close released)."""
    c = make_client(server)
    assert c.put([key(1)], [b"x"]) == [PutStatus.STORED]
    c.close()
    for call in (lambda: c.get([key(1)], [bytearray(8)]), lambda: c.put([key(2)], [b"y"]),
                 lambda: c.lookup_prefix([key(1)]), lambda: c.delete([key(1)]), lambda: c.register(bytearray(64))):
        with pytest.raises(UsageError, match="PoolClient is closed"):
            call()
    c.close()  # idempotent
