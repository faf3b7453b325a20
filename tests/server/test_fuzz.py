"""Fuzzed control frames against a real server process: random bytes, random msgpack, truncated and oversized
frames, before and after hello. The server must survive, and a well-behaved client on another connection must
keep being served correctly throughout."""

from __future__ import annotations

import socket
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdmapool.client import PoolClient, PutStatus
from rdmapool.commands.stats import fetch
from rdmapool.config import ClientConfig, ServerAddress
from rdmapool.server import wire
from tests.support import procs

KEY = bytes(range(16))

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
OPS = ["hello", "lookup", "allocate", "commit", "abort", "delete", "touch", "stats", "accept", "nope"]
requests = st.fixed_dictionaries(
    {"v": st.sampled_from([wire.VERSION] * 3 + [1, str(wire.VERSION)]), "id": st.integers(min_value=-5, max_value=2**33),
     "op": st.sampled_from(OPS)},
    optional={"keys": st.lists(st.binary(min_size=15, max_size=17), max_size=4).map(b"".join)
                      | st.lists(st.binary(min_size=16, max_size=16), max_size=4) | msgpack_values,
              "lengths": st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=4).map(wire.pack_u64s)
                         | st.lists(st.integers(min_value=-1, max_value=2**64 - 1), max_size=4) | msgpack_values,
              "generations": st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=4).map(wire.pack_u64s)
                             | msgpack_values,
              "items": msgpack_values, "prefix": msgpack_values, "token": msgpack_values,
              "request": msgpack_values,
              "hints": st.lists(st.tuples(st.none() | st.binary(min_size=16, max_size=16),
                                          st.integers(-2, 2**31), st.integers(-1, 2**31)).map(list), max_size=4)
              | msgpack_values},
)


def framed(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


payloads = st.one_of(
    st.binary(max_size=300),
    msgpack_values.map(framed),
    requests.map(framed),
    requests.map(framed).flatmap(lambda f: st.integers(1, max(1, len(f) - 1)).map(lambda n: f[:n])),
    st.integers(min_value=(1 << 20) + 1, max_value=2**32 - 1).map(lambda n: struct.pack(">I", n) + b"x" * 10),
    st.just(struct.pack(">I", 0)),
)


@pytest.fixture(scope="module")
def server():
    with procs.running("tcp", "4MiB", "--size-classes", "4KiB") as srv:
        yield srv


def hello_frame() -> bytes:
    return wire.encode({"v": wire.VERSION, "id": 1, "op": "hello", "token": procs.TOKENS["a"]})


def send_and_drain(address: str, data: bytes) -> None:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2.0) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(2.0)
        while s.recv(65536):  # the server answers and/or closes; it must never hang us
            pass


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=payloads, authenticated=st.booleans())
def test_fuzzed_frames_never_stop_the_server_or_disturb_others(server, data: bytes, authenticated: bool) -> None:
    send_and_drain(server.address, (hello_frame() if authenticated else b"") + data)
    assert server.proc.poll() is None


def test_good_client_is_unaffected_by_fuzzing_around_it(server) -> None:
    cfg = ClientConfig(token=procs.TOKENS["a"], staging_bytes=1 << 20)
    with PoolClient([server.address], cfg, transport_name="tcp") as c:
        assert c.put([KEY], [b"steady"]) == [PutStatus.STORED]
        for i in range(50):
            send_and_drain(server.address, hello_frame() + struct.pack(">I", 5) + b"\xc1" * 5)
            send_and_drain(server.address, struct.pack(">I", 2**31) + bytes(i))
            buf = bytearray(6)
            assert c.get([KEY], [buf]) == [6] and bytes(buf) == b"steady"
        assert c.counters["unavailable"] == 0
    counters = fetch(ServerAddress.parse(server.address), procs.TOKENS["a"])["counters"]
    assert counters["protocol_errors"] >= 100  # the bad frames really reached the protocol and were refused
